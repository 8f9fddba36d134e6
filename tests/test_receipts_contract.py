"""The device-consumer contract (edgemed/receipts.py): range arithmetic, message round trips and schemas."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from edgemed import receipts
from edgemed.receipts import Progress, progress

SCHEMAS = Path(__file__).resolve().parents[1] / "edgemed" / "schemas"


def _schema(name: str) -> dict[str, object]:
    return json.loads((SCHEMAS / name).read_text())


def test_ranges_merge_and_compress() -> None:
    assert receipts.to_ranges([3, 1, 2, 7, 7, 9]) == [(1, 3), (7, 7), (9, 9)]
    assert receipts.merge_ranges([(5, 6), (1, 3), (4, 4), (10, 12), (11, 11)]) == [(1, 6), (10, 12)]


def test_progress_advances_over_contiguous_settled_seqs() -> None:
    state = progress(-1, receipts.to_ranges(range(0, 100)))
    assert state == Progress(99, (), 99)


def test_progress_lists_holes_above_through_seq() -> None:
    settled = receipts.to_ranges([0, 1, 2, 5, 6, 9])
    state = progress(-1, settled)
    assert state.through_seq == 2
    assert state.missing == ((3, 4), (7, 8))
    assert state.max_seq == 9
    assert [s for s in range(12) if state.settles(s)] == [0, 1, 2, 5, 6, 9]


def test_progress_never_goes_back_and_ignores_ranges_below() -> None:
    state = progress(50, [(0, 10), (52, 60)])
    assert state == Progress(50, ((51, 51),), 60)


def test_lost_ranges_close_holes() -> None:
    state = progress(-1, [*receipts.to_ranges([0, 1, 5]), (2, 4)])
    assert state == Progress(5, (), 5)


def test_missing_is_bounded_and_max_seq_stops_before_what_is_left_out() -> None:
    settled = receipts.to_ranges(range(0, 400, 2))  # 0, 2, 4, ...: a hole at every odd number
    state = progress(-1, settled, max_ranges=3)
    assert state.through_seq == 0
    assert state.missing == ((1, 1), (3, 3), (5, 5))
    assert state.max_seq == 6
    assert not state.settles(7) and not state.settles(8)  # beyond max_seq: unknown, never settled


def test_receipt_round_trip_and_schema() -> None:
    r = receipts.Receipt("dashboard", "site-1", "dev_1", "0123456789abcdef", Progress(10, ((12, 13),), 20))
    body = json.loads(r.encode())
    jsonschema.validate(body, _schema("receipt-v1.json"))
    back = receipts.parse_receipt(r.encode())
    assert back.state == r.state and back.stream == r.stream and back.device_id == "dev_1"


@pytest.mark.parametrize(
    "change",
    [
        {"through_seq": -2},
        {"max_seq": 5},  # below through_seq
        {"missing": [[15, 14]]},
        {"missing": [[12, 13], [13, 14]]},  # overlapping
        {"missing": [[9, 9]]},  # at or below through_seq
        {"missing": [[21, 21]]},  # above max_seq
        {"stream": "XYZ"},
        {"device_id": "a/b"},
        {"through_seq": True},
        {"schema": "edgemed.result/1"},
    ],
)
def test_inconsistent_receipts_are_refused(change: dict[str, object]) -> None:
    r = receipts.Receipt("dashboard", "s", "d", "", Progress(10, ((12, 13),), 20))
    body = {**json.loads(r.encode()), **change}
    with pytest.raises(ValueError):
        receipts.parse_receipt(json.dumps(body).encode())


def test_garbage_is_not_a_receipt() -> None:
    for payload in (b"", b"\xff\xfe", b"[1,2]", b"{" * 5, b"x" * 70_000):
        with pytest.raises(ValueError):
            receipts.parse_receipt(payload)


def test_lost_messages_split_at_the_range_limit_and_validate() -> None:
    seqs = list(range(0, 300, 2))  # 150 separate ranges
    messages = receipts.lost_messages("s", "d", "0123456789abcdef", receipts.to_ranges(seqs), "evicted")
    assert [len(m.ranges) for m in messages] == [64, 64, 22]
    for m in messages:
        jsonschema.validate(json.loads(m.encode()), _schema("lost-v1.json"))
        assert receipts.parse_lost(m.encode()).ranges == m.ranges


def test_batch_embeds_envelopes_byte_for_byte() -> None:
    envelopes = [json.dumps({"seq": i, "x": 0.1 * i}, separators=(",", ":")).encode() for i in range(3)]
    payload = receipts.batch_payload("s", "d", envelopes)
    body = json.loads(payload)
    assert body["schema"] == receipts.BATCH_SCHEMA and body["site"] == "s" and body["device_id"] == "d"
    assert [json.dumps(e, separators=(",", ":")).encode() for e in body["results"]] == envelopes


def test_consumer_presence_any_process_online() -> None:
    presence = receipts.ConsumerPresence("dashboard")
    assert not presence.online  # unknown counts as offline
    assert presence.update("edgemed-consumer/dashboard/p1", b'{"state":"online"}')
    assert presence.update("edgemed-consumer/dashboard/p2", b'{"state":"offline"}')
    assert presence.online
    assert not presence.update("edgemed-consumer/other/p1", b'{"state":"online"}')
    assert not presence.update("edgemed-consumer/dashboard/p1/x", b'{"state":"online"}')
    presence.update("edgemed-consumer/dashboard/p1", b"")  # retained state cleared
    assert not presence.online
    presence.update("edgemed-consumer/dashboard/p2", b"not json")
    assert not presence.online
    presence.update("edgemed-consumer/dashboard/p2", b'{"state":"online"}')
    presence.reset()
    assert not presence.online


def test_consumer_topic_is_outside_every_device_topic() -> None:
    topic = receipts.consumer_topic("dashboard", "edgemed-dashboard")
    assert not topic.startswith("edgemed/")
    with pytest.raises(ValueError, match="consumer process"):
        receipts.consumer_topic("dashboard", "a/b")


def test_stream_id_is_stable_and_hides_the_secret() -> None:
    a = receipts.stream_id(b"s" * 32)
    assert a == receipts.stream_id(b"s" * 32) and len(a) == 16 and a != receipts.stream_id(b"t" * 32)


def test_lost_messages_split_long_ranges_so_each_message_stays_bounded() -> None:
    # A device that evicted 120,000 results: one range, announced in messages of at most MAX_LOST_SEQS numbers.
    messages = receipts.lost_messages("s", "d", "", [(10, 120_009)], "evicted")
    counts = [sum(b - a + 1 for a, b in m.ranges) for m in messages]
    assert counts == [receipts.MAX_LOST_SEQS, receipts.MAX_LOST_SEQS, 120_000 - 2 * receipts.MAX_LOST_SEQS]
    assert receipts.merge_ranges([r for m in messages for r in m.ranges]) == [(10, 120_009)]
    for m in messages:
        assert receipts.parse_lost(m.encode()).ranges == m.ranges
