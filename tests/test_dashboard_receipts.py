"""Receipts from the store: settled seqs (stored, rejected, lost), holes, streams, batches, upgrades and export.

Everything here runs against the real SQLite store through the ingest's own filing path (``Ingest.handle``); the
receipt arithmetic is ``edgemed.receipts.progress`` fed from the ``settled`` table.
"""

from __future__ import annotations

import itertools
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dashboard_helpers import make_result, make_study

from edgemed.cli import main
from edgemed.dashboard import settlement
from edgemed.dashboard.ingest import Ingest
from edgemed.dashboard.receipt_sender import ReceiptSender
from edgemed.dashboard.settlement import stream_progress
from edgemed.dashboard.store import DashboardStore
from edgemed.envelope import encode
from edgemed.errors import ConfigError
from edgemed.publish.config import MqttConfig
from edgemed.receipts import MAX_RANGES, Lost, Progress, batch_payload, parse_receipt

SITE, DEVICE = "clinic-a", "us-01"
STREAM_A, STREAM_B = "0123456789abcdef", "fedcba9876543210"
OLD_SCHEMA = Path(__file__).parent / "fixtures" / "dashboard-schema-before-receipts.sql"


def topic(kind: str, device_id: str = DEVICE) -> str:
    return f"edgemed/{SITE}/{device_id}/{kind}"


def result(seq: int, stream: str = STREAM_A, **kw: Any) -> dict[str, Any]:
    body = make_result(seq=seq, **kw)
    return {**body, "stream": stream} if stream else body


def wire(body: dict[str, Any]) -> bytes:
    return encode(body)  # the device's own encoder: compact, non-ASCII kept


@pytest.fixture
def ingest(tmp_path: Path) -> Iterator[Ingest]:
    store = DashboardStore(tmp_path / "d.sqlite3")
    yield Ingest(MqttConfig(url="mqtt://127.0.0.1:1"), store)  # never started: handle() files directly
    store.close()


def progress_of(ingest: Ingest, stream: str = STREAM_A, device_id: str = DEVICE) -> Progress:
    # A connection of its own, as the receipt thread's: from the store's engine (stream_progress takes SQLAlchemy's).
    with ingest.store.database.connect() as db:
        return stream_progress(db, (SITE, device_id, stream))


def settled(ingest: Ingest) -> dict[int, str]:
    rows = ingest.store._query("SELECT seq, how FROM settled WHERE stream = ? ORDER BY seq", (STREAM_A,))
    return {r["seq"]: r["how"] for r in rows}


def lost(
    first: int, last: int, stream: str = STREAM_A, reason: str = "evicted (outbox.on_full: evict_oldest)"
) -> bytes:
    return Lost(SITE, DEVICE, stream, ((first, last),), reason).encode()


def test_progress_from_the_store_lists_the_holes_and_advances_when_they_fill(ingest: Ingest) -> None:
    for seq in (0, 1, 2, 4, 5, 7):
        assert ingest.handle(topic("results"), wire(result(seq))) == "stored"
    assert progress_of(ingest) == Progress(2, ((3, 3), (6, 6)), 7)
    assert ingest.handle(topic("results"), wire(result(3))) == "stored"
    assert progress_of(ingest) == Progress(5, ((6, 6),), 7)
    # through_seq is kept, so the next receipt reads only the rows above it; it never goes back.
    rows = ingest.store._query("SELECT through_seq FROM stream_progress WHERE stream = ?", (STREAM_A,))
    assert [r[0] for r in rows] == [5]
    duplicate = ingest.store._query("SELECT payload FROM results WHERE seq = 3")[0][0]
    assert ingest.handle(topic("results"), duplicate.encode()) == "duplicate"  # settles again, harmlessly
    assert progress_of(ingest) == Progress(5, ((6, 6),), 7)


def test_a_lost_announcement_settles_its_seqs_and_the_page_counts_them(ingest: Ingest) -> None:
    for seq in (0, 1, 5, 9):
        ingest.handle(topic("results"), wire(result(seq)))
    assert ingest.handle(topic("lost"), lost(2, 6)) == "recorded"
    assert progress_of(ingest) == Progress(6, ((7, 8),), 9)
    how = settled(ingest)
    assert [how[s] for s in range(0, 7)] == ["stored", "stored", "lost", "lost", "lost", "stored", "lost"]
    ranges = ingest.store._query("SELECT first_seq, last_seq, reason FROM lost_ranges")
    assert [tuple(r) for r in ranges] == [(2, 6, "evicted (outbox.on_full: evict_oldest)")]
    # A late copy of a seq announced lost (from a broker queue) is stored, and counts as stored.
    assert ingest.handle(topic("results"), wire(result(4))) == "stored"
    assert settled(ingest)[4] == "stored"
    [device] = ingest.store.fleet()
    assert (device["lost"], device["rejected"]) == (3, 0)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b'{"schema": "edgemed.lost/1"}', "not a lost announcement: site must match"),
        (Lost(SITE, "other", STREAM_A, ((0, 1),), "x").encode(), "differ from the topic"),
        (
            Lost(SITE, DEVICE, STREAM_A, ((0, settlement.LOST_MAX_SEQS),), "x").encode(),
            f"more than {settlement.LOST_MAX_SEQS} seqs",
        ),
    ],
)
def test_an_unusable_lost_announcement_is_a_dead_letter(ingest: Ingest, payload: bytes, reason: str) -> None:
    outcome = ingest.handle(topic("lost"), payload)
    assert outcome.startswith("rejected: ") and reason in outcome, outcome
    assert ingest.store._count("SELECT count(*) FROM settled") == 0


def test_a_refused_result_with_a_readable_seq_is_receipted_as_rejected(ingest: Ingest) -> None:
    ingest.handle(topic("results"), wire(result(0)))
    outcome = ingest.handle(topic("results"), wire(result(1, level="catastrophic")))
    assert outcome == "rejected: triage.level is not a known level"
    ingest.handle(topic("results"), wire(result(2)))
    assert progress_of(ingest) == Progress(2, (), 2)
    assert settled(ingest) == {0: "stored", 1: "rejected", 2: "stored"}
    dead = ingest.store._query("SELECT seq, stream FROM dead_letters")
    assert [tuple(r) for r in dead] == [(1, STREAM_A)]
    # A heartbeat that happens to carry a seq settles nothing: only results and studies carry seqs.
    ingest.handle(topic("health"), json.dumps({"seq": 3, "fps": "fast"}).encode())
    assert progress_of(ingest) == Progress(2, (), 2)
    [device] = ingest.store.fleet()
    assert (device["rejected"], device["lost"]) == (1, 0)


def test_each_stream_of_a_device_has_its_own_receipt(ingest: Ingest) -> None:
    # A device re-flashed with a fresh data directory starts again at seq 0 under the same id.
    for seq in (0, 1, 2, 3):
        ingest.handle(topic("results"), wire(result(seq, STREAM_A)))
    for seq in (0, 2):
        ingest.handle(topic("results"), wire(result(seq, STREAM_B)))
    ingest.handle(topic("results"), wire(result(0, "")))  # an older device names no stream
    study = {**make_study(), "seq": 4, "stream": STREAM_A}
    assert ingest.handle(topic("studies"), wire(study)) == "stored"
    assert progress_of(ingest, STREAM_A) == Progress(4, (), 4)
    assert progress_of(ingest, STREAM_B) == Progress(0, ((1, 1),), 2)
    assert progress_of(ingest, "") == Progress(0, (), 0)
    assert progress_of(ingest, STREAM_A, device_id="us-02") == Progress(-1, (), -1)


def test_a_stream_that_is_not_16_hex_digits_is_refused(ingest: Ingest) -> None:
    outcome = ingest.handle(topic("results"), wire({**make_result(seq=0), "stream": "XYZ"}))
    assert outcome == "rejected: stream is neither absent nor 16 lowercase hex digits"


def test_missing_ranges_stop_at_the_limit(ingest: Ingest) -> None:
    for seq in range(0, 2 * (MAX_RANGES + 5), 2):  # every odd seq is a hole
        ingest.handle(topic("results"), wire(result(seq)))
    state = progress_of(ingest)
    assert state.through_seq == 0 and len(state.missing) == MAX_RANGES
    assert state.missing[-1] == (2 * MAX_RANGES - 1, 2 * MAX_RANGES - 1)
    assert state.max_seq == 2 * MAX_RANGES  # stops before the first hole left out


def test_a_receipt_reads_a_bounded_number_of_rows(ingest: Ingest, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settlement, "SCAN_ROWS", 10)
    with ingest.store._transaction() as db:  # the store's own write transaction (SQLAlchemy's connection)
        for seq in [*range(0, 35), *range(36, 80)]:
            settlement.settle(db, (SITE, DEVICE, STREAM_A), seq, "stored")
    # 0..34 are contiguous: through_seq advances chunk by chunk. Above the hole at 35, one chunk is read: what
    # lies beyond it is not known yet (max_seq stops at the last row read).
    assert progress_of(ingest) == Progress(34, ((35, 35),), 40)  # rows 30-34 and 36-40 make the last chunk
    with ingest.store._transaction() as db:
        settlement.settle(db, (SITE, DEVICE, STREAM_A), 35, "stored")
    assert progress_of(ingest) == Progress(79, (), 79)


def test_a_batch_with_one_bad_element_stores_the_others_and_rejects_that_one(ingest: Ingest) -> None:
    good = [wire(result(0, reason="érythème")), wire(result(2))]
    bad = wire(result(1, level="catastrophic"))
    payload = batch_payload(SITE, DEVICE, [good[0], bad, good[1]])
    assert ingest.handle(topic("batches"), payload) == "batch: 2 stored, 0 duplicates, 1 rejected"
    assert progress_of(ingest) == Progress(2, (), 2)
    assert settled(ingest) == {0: "stored", 1: "rejected", 2: "stored"}
    [dead] = ingest.store._query("SELECT reason, seq, stream, payload FROM dead_letters")
    assert dead["reason"] == "batch element: triage.level is not a known level"
    assert (dead["seq"], dead["stream"], bytes(dead["payload"])) == (1, STREAM_A, bad)
    stored = [r[0].encode() for r in ingest.store._query("SELECT payload FROM results ORDER BY seq")]
    assert stored == good  # each element kept byte for byte as the device embedded it
    assert ingest.stats.stored == 2 and sum(ingest.stats.rejected.values()) == 1
    again = ingest.handle(topic("batches"), payload)
    assert again == "batch: 0 stored, 2 duplicates, 1 rejected"


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (batch_payload(SITE, "us-02", [wire(result(0))]), "site/device_id in the batch differ from the topic"),
        (b'{"schema":"edgemed.batch/1","site":"clinic-a","device_id":"us-01","results":[]}', "list of 1 to 1000"),
        (batch_payload(SITE, DEVICE, [wire(result(0))] * 1001), "list of 1 to 1000"),
        (b"[" * 5000 + b"]" * 5000, "nests deeper"),
    ],
    ids=["other device", "empty", "too many", "too deep"],
)
def test_a_batch_that_is_not_one_is_a_single_dead_letter(ingest: Ingest, payload: bytes, reason: str) -> None:
    outcome = ingest.handle(topic("batches"), payload)
    assert outcome.startswith("rejected: ") and reason in outcome, outcome
    assert ingest.store.result_count() == 0 and ingest.store._count("SELECT count(*) FROM settled") == 0


def test_a_batch_element_of_another_device_is_its_own_dead_letter(ingest: Ingest) -> None:
    payload = batch_payload(SITE, DEVICE, [wire(result(0)), wire(result(1, device_id="us-02"))])
    assert ingest.handle(topic("batches"), payload) == "batch: 1 stored, 0 duplicates, 1 rejected"
    assert settled(ingest) == {0: "stored", 1: "rejected"}  # settled on the topic's device: it sent it


def test_receipts_are_ignored_not_dead_letters(ingest: Ingest) -> None:
    receipt = b'{"schema":"edgemed.receipt/1","consumer":"dashboard"}'
    assert ingest.handle(topic("receipts"), receipt) == "ignored"
    assert ingest.store.dead_letter_counts() == {}


def test_an_older_database_is_upgraded_in_place(tmp_path: Path) -> None:
    db = tmp_path / "old.sqlite3"
    old = sqlite3.connect(db)
    old.executescript(OLD_SCHEMA.read_text())
    for seq in (0, 1, 3):
        body = make_result(seq=seq)
        old.execute(
            "INSERT INTO results(result_id, site, device_id, seq, created_at, received_at, level, reason, payload) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (body["result_id"], SITE, DEVICE, seq, body["created_at"], 1.0, "routine", "ok", json.dumps(body)),
        )
    study = make_study()
    old.execute(
        "INSERT INTO studies(result_id, site, device_id, seq, created_at, received_at, level, reason, payload) "
        "VALUES (?, ?, ?, 4, ?, 2.0, 'urgent', 'x', ?)",
        (study["result_id"], SITE, DEVICE, study["created_at"], json.dumps(study)),
    )
    dead = [("edgemed/clinic-a/us-01/results", 2), ("edgemed/clinic-a/us-01/health", 7)]
    for dead_topic, seq in dead:
        old.execute(
            "INSERT INTO dead_letters(received_at, topic, reason, payload, payload_bytes, site, device_id, seq) "
            "VALUES (1.0, ?, 'bad', x'00', 1, ?, ?, ?)",
            (dead_topic, SITE, DEVICE, seq),
        )
    old.commit()
    old.close()
    store = DashboardStore(db)
    try:
        rows = store._query("SELECT stream, seq, how FROM settled ORDER BY seq")
        assert [tuple(r) for r in rows] == [("", 0, "stored"), ("", 1, "stored"), ("", 2, "rejected"),
                                            ("", 3, "stored"), ("", 4, "stored")]  # fmt: skip
        assert store._count("PRAGMA user_version") == 1
        ingest = Ingest(MqttConfig(url="mqtt://127.0.0.1:1"), store)
        assert ingest.handle(topic("results"), wire(result(5, stream=""))) == "stored"
        assert progress_of(ingest, "") == Progress(5, (), 5)
    finally:
        store.close()
    again = DashboardStore(db)  # a second open changes nothing
    try:
        assert again._count("SELECT count(*) FROM settled") == 6
    finally:
        again.close()


# -- export ---------------------------------------------------------------------------------------------------


def export(db: Path, capsysbinary: pytest.CaptureFixture[bytes], *extra: str) -> tuple[int, list[bytes], str]:
    code = main(["dashboard", "export", "--db", str(db), *extra, "--format", "jsonl"])
    out, err = capsysbinary.readouterr()
    return code, out.splitlines(keepends=True), err.decode()


def test_export_prints_what_the_devices_sent_byte_for_byte(
    ingest: Ingest, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    sent = [wire(result(0, reason="légère opacité")), wire({**make_study(), "stream": STREAM_A})]
    spaced = json.dumps(result(1), indent=None).encode()  # a third-party encoder with spaces after , and :
    ingest.store.file([], 0)
    for payload, kind in ((sent[0], "results"), (sent[1], "studies"), (spaced, "results")):
        ingest.handle(topic(kind), payload)
        time.sleep(0.002)  # reception time orders the export
    elements = [wire(result(2)), wire(result(3))]
    ingest.handle(topic("batches"), batch_payload(SITE, DEVICE, elements))
    code, lines, _ = export(ingest.store.path, capsysbinary)
    assert code == 0
    assert lines == [line + b"\n" for line in [*sent, spaced, *elements]]


def test_export_since_keeps_what_was_received_from_then(
    ingest: Ingest, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    early, late = wire(result(0)), wire(result(1))
    ingest.store.file(ingest_filings(early), 1_000_000_000.0)  # 2001-09-09
    ingest.store.file(ingest_filings(late), 2_000_000_000.0)  # 2033-05-18
    code, lines, _ = export(ingest.store.path, capsysbinary, "--since", "2020-01-01")
    assert (code, lines) == (0, [late + b"\n"])
    code, _, err = export(ingest.store.path, capsysbinary, "--since", "last tuesday")
    assert code == 2 and "--since 'last tuesday' is not an ISO 8601 time" in err


def ingest_filings(payload: bytes) -> list[Any]:
    from edgemed.dashboard.validate import classify

    return [classify(topic("results"), payload)]


def test_export_names_a_missing_or_foreign_file(tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    code, lines, err = export(tmp_path / "nope.sqlite3", capsysbinary)
    assert (code, lines) == (2, []) and "no dashboard database at" in err and "pass --db" in err
    text = tmp_path / "notes.txt"
    text.write_text("not a database at all, just some words\n" * 100)
    code, _, err = export(text, capsysbinary)
    assert code == 2 and "cannot read" in err and "as a dashboard database" in err
    other = tmp_path / "other.sqlite3"
    sqlite3.connect(other).execute("CREATE TABLE t(x)").connection.close()
    code, _, err = export(other, capsysbinary)
    assert code == 2 and "not a dashboard's" in err


def test_export_streams_rows_one_at_a_time(ingest: Ingest) -> None:
    from edgemed.dashboard.export import export_lines

    for seq in range(3):
        ingest.handle(topic("results"), wire(result(seq)))
    lines = export_lines(ingest.store.path)
    first = next(lines)  # a generator over the cursor: nothing is read before it is asked for
    assert json.loads(first)["seq"] == 0 and len(list(lines)) == 2


# -- rate limit -----------------------------------------------------------------------------------------------


def test_receipts_are_rate_limited_per_device_and_the_latest_state_wins(ingest: Ingest) -> None:
    sent: list[tuple[float, str, bytes]] = []
    lock = threading.Lock()

    def publish(topic_name: str, payload: bytes) -> None:
        with lock:
            sent.append((time.monotonic(), topic_name, payload))

    sender = ReceiptSender(ingest.store.path, publish, "dashboard", min_interval_s=0.25)
    ingest.receipts = sender
    sender.start()
    try:
        start = time.monotonic()
        for seq in range(40):  # 40 commits in about a second for us-01, one for us-02
            ingest.handle(topic("results"), wire(result(seq)))
            if seq == 20:
                ingest.handle(topic("results", "us-02"), wire(result(0, device_id="us-02")))
            time.sleep(0.025)
        sender.stop(drain_s=2.0)
    finally:
        sender.stop()
    elapsed = time.monotonic() - start
    mine = [(t, parse_receipt(p)) for t, name, p in sent if name == topic("receipts")]
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(mine)]
    assert all(gap >= 0.2 for gap in gaps), gaps  # never more than about four a second (0.25 s apart when taken)
    assert len(mine) <= elapsed / 0.25 + 2
    assert mine[-1][1].state == Progress(39, (), 39)  # the commit in the last quiet period got its receipt
    others = [parse_receipt(p) for _, name, p in sent if name == topic("receipts", "us-02")]
    assert [r.state for r in others] == [Progress(0, (), 0)] and others[0].consumer == "dashboard"


def test_a_round_slow_to_send_is_not_followed_at_once_by_the_next(ingest: Ingest) -> None:
    # A busy database or broker makes one round slow; the next round was already due when it ended, and went out
    # milliseconds after it (seen on a loaded machine). The quiet period counts from the end of a round.
    sent: list[float] = []

    def publish(topic_name: str, payload: bytes) -> None:
        if not sent:
            time.sleep(0.6)  # the first round is slow to send
        sent.append(time.monotonic())

    sender = ReceiptSender(ingest.store.path, publish, "dashboard", min_interval_s=0.25)
    ingest.receipts = sender
    sender.start()
    try:
        for seq in range(30):  # commits all through the slow round and after it
            ingest.handle(topic("results"), wire(result(seq)))
            time.sleep(0.03)
        sender.stop(drain_s=2.0)
    finally:
        sender.stop()
    gaps = [b - a for a, b in itertools.pairwise(sent)]
    assert len(sent) >= 3 and all(gap >= 0.24 for gap in gaps), gaps


def test_a_consumer_or_client_id_that_does_not_fit_a_topic_is_refused(tmp_path: Path) -> None:
    store = DashboardStore(tmp_path / "d.sqlite3")
    try:
        with pytest.raises(ConfigError, match="consumer id 'a/b' is invalid"):
            Ingest(MqttConfig(url="mqtt://127.0.0.1:1"), store, consumer_id="a/b")
        with pytest.raises(ConfigError, match=r"consumer process 'dash\.1' is invalid"):
            Ingest(MqttConfig(url="mqtt://127.0.0.1:1"), store, client_id="dash.1")
    finally:
        store.close()
