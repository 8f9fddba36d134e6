"""The device side of receipts through the in-memory publisher (``fakes.FakePublisher``): no broker, no paho.

A real outbox (SQLite in a temporary folder) and the real delivery thread, with a consumer of record: a PUBACK
only marks a result awaiting its receipt, a receipt of the device's own stream releases it, what the consumer
misses (or does not receipt in time) is sent again with the same bytes, nothing is published while the consumer
is offline, receipts of another stream and malformed ones change nothing, numbers no longer held and evicted
rows are announced lost, and batches are bounded and acknowledged by one PUBACK. Every wait is bounded.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
from fakes import FakePublisher
from receipt_helpers import DEV, RESULTS, SITE, put_numbered, wait_for

from edgemed import receipts
from edgemed.outbox import Outbox, OutboxConfig
from edgemed.publish.batching import Batcher
from edgemed.publish.config import BatchConfig
from edgemed.publish.consumer import Consumer
from edgemed.publish.delivery import Delivery

STUDIES = f"edgemed/{SITE}/{DEV}/studies"
STREAM = receipts.stream_id(b"k" * 32)
OTHER_STREAM = receipts.stream_id(b"j" * 32)


def _consumer(timeout_s: float = 60.0) -> Consumer:
    return Consumer("dashboard", site=SITE, device_id=DEV, stream=STREAM, receipt_timeout_s=timeout_s)


def _start(
    ob: Outbox, *, online: bool = True, timeout_s: float = 60.0, batch: BatchConfig | None = None
) -> tuple[FakePublisher, Consumer, Delivery]:
    pub, consumer = FakePublisher(), _consumer(timeout_s)
    pub.listen(consumer.subscriptions, consumer.on_message, consumer.on_state)
    batcher = Batcher(batch, site=SITE, device_id=DEV) if batch is not None else None
    delivery = Delivery(ob, pub, consumer=consumer, batch=batcher)
    if online:
        pub.consumer_state("dashboard", "online")
    delivery.start()
    return pub, consumer, delivery


def _on(pub: FakePublisher, kind: str) -> list[bytes]:
    return [s.payload for s in list(pub.sent) if s.topic.rsplit("/", 1)[1] == kind]


def test_the_link_subscribes_to_its_receipts_and_its_consumers_state_at_qos_1() -> None:
    subs = {(s.topic_filter, s.qos) for s in _consumer().subscriptions}
    assert subs == {(f"edgemed/{SITE}/{DEV}/receipts", 1), ("edgemed-consumer/dashboard/+", 1)}


def test_a_puback_marks_results_awaiting_and_only_a_receipt_releases_them(outbox: Outbox) -> None:
    pub, _, delivery = _start(outbox)
    try:
        put_numbered(outbox, 10)
        assert wait_for(lambda: len(pub.sent) == 10)
        pub.ack()
        assert wait_for(lambda: outbox.awaiting_count() == 10)
        time.sleep(0.1)
        assert outbox.pending_count() == 10 and outbox.unsent_count() == 0  # acknowledged is not stored
        assert outbox.oldest_awaiting_s() is not None and outbox.pending(100) == []
        pub.receipt(SITE, DEV, STREAM, through_seq=5)
        assert wait_for(lambda: outbox.pending_count() == 4)
        assert outbox.awaiting_count() == 4
        pub.receipt(SITE, DEV, STREAM, through_seq=9)
        assert delivery.drain(5) == 0
        assert len(pub.sent) == 10  # nothing was sent twice
        assert delivery.backlog().total == 0
    finally:
        delivery.stop()


def test_a_receipt_releases_results_not_yet_acknowledged_too(outbox: Outbox) -> None:
    pub, _, delivery = _start(outbox)
    try:
        put_numbered(outbox, 3)
        assert wait_for(lambda: len(pub.sent) == 3)
        pub.receipt(SITE, DEV, STREAM, through_seq=2)  # the consumer stored them before the PUBACK came
        assert wait_for(lambda: outbox.pending_count() == 0)
        pub.ack()  # a late PUBACK of a released row changes nothing
        assert delivery.drain(2) == 0 and outbox.awaiting_count() == 0
    finally:
        delivery.stop()


def test_missing_results_are_sent_again_with_the_same_bytes_and_nothing_in_flight_twice(outbox: Outbox) -> None:
    pub, consumer, delivery = _start(outbox)
    try:
        payloads = put_numbered(outbox, 5)
        assert wait_for(lambda: len(pub.sent) == 5)
        pub.ack(3)  # seq 0-2 acknowledged; 3 and 4 stay in flight
        assert wait_for(lambda: outbox.awaiting_count() == 3)
        time.sleep(1.1)  # a missing result acknowledged less than a second ago may still be on its way
        pub.receipt(SITE, DEV, STREAM, through_seq=0, missing=[(1, 1)], max_seq=2)
        assert wait_for(lambda: len(pub.sent) == 6)
        time.sleep(0.2)
        assert len(pub.sent) == 6  # seq 3 and 4, in flight, were not sent a second time
        assert pub.sent[5].payload == payloads[1] and pub.sent[5].topic == RESULTS
        assert outbox.pending_count() == 3  # 0 and 2 released; 1 sent again; 3 and 4 in flight
        assert consumer.resent_total == 1
        pub.ack()
        pub.receipt(SITE, DEV, STREAM, through_seq=4)
        assert delivery.drain(5) == 0
    finally:
        delivery.stop()


def test_results_not_receipted_in_time_are_sent_again(outbox: Outbox) -> None:
    pub, _, delivery = _start(outbox, timeout_s=0.5)
    try:
        payloads = put_numbered(outbox, 4)
        assert wait_for(lambda: len(pub.sent) == 4)
        pub.ack()
        assert wait_for(lambda: len(pub.sent) == 8, timeout_s=5.0)  # no receipt at all: all four again
        assert [s.payload for s in pub.sent[4:]] == payloads
        pub.receipt(SITE, DEV, STREAM, through_seq=3)
        assert delivery.drain(5) == 0
    finally:
        delivery.stop()


def test_nothing_is_published_while_the_consumer_is_offline_or_unknown(outbox: Outbox) -> None:
    pub, consumer, delivery = _start(outbox, online=False)
    try:
        put_numbered(outbox, 5)
        time.sleep(0.3)
        assert pub.sent == [] and not consumer.online  # unknown counts as offline
        pub.consumer_state("dashboard", "online")
        assert wait_for(lambda: len(pub.sent) == 5)
        pub.consumer_state("dashboard", "offline")
        put_numbered(outbox, 2)
        time.sleep(0.3)
        assert len(pub.sent) == 5
        pub.consumer_state("dashboard", "online", process="dashboard-2")  # another process of the consumer
        assert wait_for(lambda: len(pub.sent) == 7)
        pub.drop()
        pub.reconnect()  # a new connection forgets the states until the retained ones come again
        assert not consumer.online
        put_numbered(outbox, 1)
        time.sleep(0.3)
        assert len(pub.sent) == 7
        pub.consumer_state("dashboard", "online")
        assert wait_for(lambda: len(pub.sent) == 8)
        assert delivery.backlog().consumer_online is True
    finally:
        delivery.stop()


def test_receipts_of_another_stream_or_consumer_release_nothing(
    outbox: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    pub, _, delivery = _start(outbox)
    try:
        put_numbered(outbox, 4)
        assert wait_for(lambda: len(pub.sent) == 4)
        pub.ack()
        assert wait_for(lambda: outbox.awaiting_count() == 4)
        with caplog.at_level(logging.WARNING):
            pub.receipt(SITE, DEV, OTHER_STREAM, through_seq=10)  # the data directory before a re-flash
            pub.receipt(SITE, DEV, STREAM, through_seq=10, consumer="audit")  # not the consumer of record
            time.sleep(0.3)
        assert outbox.pending_count() == 4
        assert "ignoring receipts of consumer dashboard for stream" in caplog.text
        assert "ignoring receipts of consumer audit" in caplog.text
    finally:
        delivery.stop()


def test_a_malformed_receipt_is_ignored_and_logged_once(outbox: Outbox, caplog: pytest.LogCaptureFixture) -> None:
    pub, _, delivery = _start(outbox)
    topic = f"edgemed/{SITE}/{DEV}/receipts"
    try:
        put_numbered(outbox, 2)
        assert wait_for(lambda: len(pub.sent) == 2)
        pub.ack()
        with caplog.at_level(logging.WARNING):
            for payload in (b"not json", b'{"schema": "edgemed.receipt/1", "through_seq": "x"}', b"\xff\xfe"):
                pub.deliver(topic, payload)
                time.sleep(0.1)
        assert caplog.text.count("ignoring a malformed receipt") == 1
        assert outbox.pending_count() == 2
        pub.receipt(SITE, DEV, STREAM, through_seq=1)  # the delivery goes on
        assert delivery.drain(5) == 0
    finally:
        delivery.stop()


def test_an_older_receipt_arriving_late_changes_nothing(outbox: Outbox) -> None:
    pub, _, delivery = _start(outbox)
    try:
        put_numbered(outbox, 6)
        assert wait_for(lambda: len(pub.sent) == 6)
        pub.ack()
        pub.receipt(SITE, DEV, STREAM, through_seq=3)
        assert wait_for(lambda: outbox.pending_count() == 2)
        time.sleep(1.1)
        # From a lagging consumer process: it lists seq 2 as missing, which the newer receipt settled.
        pub.receipt(SITE, DEV, STREAM, through_seq=1, missing=[(2, 2)], max_seq=3)
        time.sleep(0.3)
        assert len(pub.sent) == 6 and _on(pub, "lost") == []
    finally:
        delivery.stop()


def test_missing_numbers_the_outbox_no_longer_holds_are_announced_lost_once(outbox: Outbox) -> None:
    put_numbered(outbox, 10)
    gone = [i.row_id for i in outbox.pending(100) if i.seq in (5, 6, 7)]
    outbox.ack_many(gone)  # e.g. released by a PUBACK before the profile named a consumer
    outbox.flush()
    pub, consumer, delivery = _start(outbox)
    try:
        assert wait_for(lambda: len(pub.sent) == 7)
        pub.ack()
        pub.receipt(SITE, DEV, STREAM, through_seq=4, missing=[(5, 7)], max_seq=9)
        assert wait_for(lambda: len(_on(pub, "lost")) == 1)
        lost = receipts.parse_lost(_on(pub, "lost")[0])
        assert (lost.ranges, lost.reason, lost.stream) == (((5, 7),), "not in the outbox", STREAM)
        assert (lost.site, lost.device_id) == (SITE, DEV)
        pub.ack()  # the announcement leaves on its PUBACK
        assert wait_for(lambda: outbox.pending_count() == 0)
        pub.receipt(SITE, DEV, STREAM, through_seq=4, missing=[(5, 7)], max_seq=9)  # before it was processed
        time.sleep(0.3)
        assert len(_on(pub, "lost")) == 1  # announced once
        assert consumer.lost_announced_total == 1
    finally:
        delivery.stop()


def test_evicted_rows_are_announced_lost_and_the_announcements_are_never_evicted(tmp_path: Path) -> None:
    cfg = OutboxConfig(commit_every=1, max_pending=3, on_full="evict_oldest")
    with Outbox(tmp_path / "outbox.sqlite3", cfg) as ob:
        consumer = _consumer()
        ob.set_lost_announcer(consumer.announce)
        put_numbered(ob, 8)
        rows = ob.pending(100)
        lost = [receipts.parse_lost(i.payload) for i in rows if i.seq is None]
        assert lost and all(x.reason == "evicted (outbox.on_full: evict_oldest)" for x in lost)
        evicted = sorted(s for x in lost for a, b in x.ranges for s in range(a, b + 1))
        kept = sorted(i.seq for i in rows if i.seq is not None)
        assert evicted + kept == list(range(8))  # every seq is either still held or announced lost
        assert ob.evicted_total == len(evicted)


def test_batches_are_bounded_in_count_and_one_puback_acknowledges_every_row(tmp_path: Path) -> None:
    # One commit holds all twelve: a batch holds what is committed when the delivery looks.
    outbox = Outbox(tmp_path / "outbox.sqlite3", OutboxConfig(commit_every=1000, commit_interval_s=60))
    pub, _, delivery = _start(outbox, batch=BatchConfig(enabled=True, max_results=4))
    try:
        payloads = put_numbered(outbox, 2, topic=STUDIES)  # not batched
        payloads += put_numbered(outbox, 10)
        outbox.flush()
        assert wait_for(lambda: delivery.published_total == 12)
        assert _on(pub, "results") == []
        batches = [json.loads(p) for p in _on(pub, "batches")]
        assert [len(b["results"]) for b in batches] == [4, 4, 2]
        assert all(b["schema"] == "edgemed.batch/1" and (b["site"], b["device_id"]) == (SITE, DEV) for b in batches)
        # Each element is the committed envelope byte for byte.
        elements = [json.dumps(e, separators=(",", ":")).encode() for b in batches for e in b["results"]]
        assert elements == payloads[2:]
        assert len(_on(pub, "studies")) == 2
        pub.ack(2)  # the two studies
        pub.ack(1)  # one PUBACK, the first batch
        assert wait_for(lambda: outbox.awaiting_count() == 6)
        pub.ack()
        pub.receipt(SITE, DEV, STREAM, through_seq=11)
        assert delivery.drain(5) == 0
    finally:
        delivery.stop()
        outbox.close()


def test_batches_without_a_consumer_leave_on_their_puback(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite3", OutboxConfig(commit_every=1000, commit_interval_s=60))
    pub = FakePublisher()
    delivery = Delivery(outbox, pub, batch=Batcher(BatchConfig(enabled=True), site=SITE, device_id=DEV))
    delivery.start()
    try:
        put_numbered(outbox, 7)
        outbox.flush()
        assert wait_for(lambda: delivery.published_total == 7)
        assert len(pub.sent) == 1 and pub.sent[0].topic == f"edgemed/{SITE}/{DEV}/batches"
        pub.ack()
        assert delivery.drain(5) == 0
    finally:
        delivery.stop()
        outbox.close()


def test_a_batch_stays_under_its_byte_bound_and_an_oversized_result_goes_alone(outbox: Outbox) -> None:
    put_numbered(outbox, 9, pad=1000)
    put_numbered(outbox, 1, pad=5000)  # larger than max_bytes on its own
    outbox.flush()
    cfg = BatchConfig(enabled=True, max_results=100, max_bytes=4096)
    messages = Batcher(cfg, site=SITE, device_id=DEV).messages(outbox.pending(100))
    assert all(len(m.payload) <= 4096 for m in messages[:-1])
    assert [len(m.row_ids) for m in messages] == [3, 3, 3, 1]
    assert messages[-1].topic == RESULTS and len(messages[-1].payload) > 4096
    assert sum(len(m.row_ids) for m in messages) == 10
