"""A failing database (full disk, a lock held by another process) is retried until it works, without a restart;
and what the dashboard acknowledges to the broker is what a durable commit holds, in batches.

Against a real mosquitto and the real SQLite file: the disk is "full" past ``max_page_count`` (SQLite then reports
"database or disk is full", as for a real full disk) and the lock is a real write transaction of another
connection.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from pathlib import Path

import pytest
from broker_fixtures import Device, Mosquitto
from dashboard_helpers import HEALTH, fill_the_disk, free_the_disk, make_result, wait_until
from web_helpers import login, make_user, running_web

from edgemed.dashboard.ingest import Ingest
from edgemed.dashboard.store import DashboardStore
from edgemed.dashboard.writer import Held
from edgemed.publish.config import MqttConfig


def _log_lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def test_a_full_disk_is_retried_and_everything_held_back_is_stored_once_space_is_freed(
    broker: Mosquitto, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    store = DashboardStore(tmp_path / "full.sqlite3")
    ingest = Ingest(MqttConfig(url=broker.url), store)
    make_user(store, "ada", "admin")  # logged in before the disk fills: a login writes its session
    server = running_web(store, ingest_snapshot=ingest.snapshot)
    base = server.__enter__()
    http = login(base, "ada")
    fillers = fill_the_disk(store)
    ingest.start()
    device = Device(broker.port)
    try:
        assert ingest.wait_subscribed(10)
        sent = [make_result(seq=i, level="urgent" if i % 5 == 0 else "routine") for i in range(30)]
        for result in sent:
            device.send("results", json.dumps(result).encode())
        device.send("health", json.dumps(HEALTH).encode())
        assert wait_until(lambda: ingest.snapshot()["store_error"] is not None and ingest.snapshot()["held"] >= 1, 10)
        assert "full" in ingest.snapshot()["store_error"]
        # Every page says so (base.html's system alerts), here the refused-messages page.
        page = http.get("/admin/dead-letters").text
        assert '<p class="alert" role="alert" data-system-alert>Results are not being saved: cannot write' in page, page
        assert "held back, not yet acknowledged to the broker" in page
        time.sleep(1.6)  # a few attempts with back-off (0.5 s, 1 s, ...)
        attempts = _log_lines(caplog, "cannot write to the dashboard database")
        assert 2 <= len(attempts) <= 4, attempts  # one line per back-off step, not one per message
        free_the_disk(store)
        # No restart: the next attempt stores everything held back, and what comes after goes in as usual.
        assert wait_until(lambda: store.result_count() == fillers + 30, 10), (store.result_count(), ingest.snapshot())
        device.send("results", json.dumps(make_result(seq=30)).encode())
        assert wait_until(lambda: store.result_count() == fillers + 31, 10)
        # The row is visible once committed; the message stays "held" until the writer has acknowledged it to the
        # broker a moment later, so the counters are awaited rather than read at once.
        assert wait_until(lambda: ingest.snapshot()["held"] == 0, 5), ingest.snapshot()
        snap = ingest.snapshot()
        assert snap["store_error"] is None and snap["held"] == 0 and snap["stored"] == 31
        assert len(_log_lines(caplog, "takes writes again")) == 1
        assert {r["result_id"] for r in store.recent_results("urgent")} == {
            r["result_id"] for r in sent if r["triage"]["level"] == "urgent"
        }
    finally:
        device.close()
        ingest.stop()
        http.close()
        server.__exit__(None, None, None)
        store.close()


def test_a_database_locked_by_another_process_is_retried_until_the_lock_goes(broker: Mosquitto, tmp_path: Path) -> None:
    db = tmp_path / "locked.sqlite3"
    store = DashboardStore(db, busy_timeout_s=0.2)
    ingest = Ingest(MqttConfig(url=broker.url), store)
    ingest.start()
    device = Device(broker.port)
    other = sqlite3.connect(db, isolation_level=None)
    try:
        assert ingest.wait_subscribed(10)
        other.execute("BEGIN IMMEDIATE")  # e.g. a backup script writing: no other writer until it commits
        for i in range(20):
            device.send("results", json.dumps(make_result(seq=i)).encode())
        assert wait_until(lambda: "locked" in (ingest.snapshot()["store_error"] or ""), 10), ingest.snapshot()
        time.sleep(2.0)
        assert store.result_count() == 0
        other.execute("COMMIT")
        assert wait_until(lambda: store.result_count() == 20, 10), ingest.snapshot()
        assert ingest.snapshot()["store_error"] is None
    finally:
        other.close()
        device.close()
        ingest.stop()
        store.close()


def test_messages_are_acknowledged_only_after_the_durable_commit_that_holds_them(
    broker: Mosquitto, tmp_path: Path
) -> None:
    db = tmp_path / "acks.sqlite3"
    store = DashboardStore(db)
    # The database survives a power cut once a commit returned: the write-ahead log is fsynced at each commit.
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    commits: list[str] = []
    store._db.set_trace_callback(lambda sql: commits.append(sql) if sql.strip().upper() == "COMMIT" else None)
    ingest = Ingest(MqttConfig(url=broker.url), store)
    acked_unstored: list[str] = []
    acked: list[str] = []
    no_ack: list[str] = []
    checker = sqlite3.connect(db, check_same_thread=False)  # sees only committed data
    submit = ingest.writer.submit

    def record(held: Held) -> None:  # what the link's network thread hands the writer
        rid, send_ack = json.loads(held.payload)["result_id"], held.ack
        if send_ack is None:  # QoS 1 with manual acknowledgement must come with its ack
            no_ack.append(rid)
            return

        def check_then_ack() -> None:
            if checker.execute("SELECT 1 FROM results WHERE result_id = ?", (rid,)).fetchone() is None:
                acked_unstored.append(rid)
            acked.append(rid)
            send_ack()

        held.ack = check_then_ack
        submit(held)

    ingest.writer.submit = record  # type: ignore[method-assign]
    ingest.start()
    device = Device(broker.port)
    try:
        assert ingest.wait_subscribed(10)
        infos = [
            device.client.publish("edgemed/clinic-a/us-01/results", json.dumps(make_result(seq=i)).encode(), qos=1)
            for i in range(300)
        ]
        for info in infos:
            info.wait_for_publish(10)
        assert wait_until(lambda: len(acked) == 300, 20), (len(acked), ingest.snapshot())
    finally:
        device.close()
        ingest.stop()
        checker.close()
    assert acked_unstored == [] and no_ack == []
    assert store.result_count() == 300
    # Batched: far fewer commits (each one an fsync) than messages.
    assert len(commits) <= 100, len(commits)
    store.close()


def _refuse_in_sqlite(store: DashboardStore, seq: int) -> None:
    # A defect seam: no validated payload is known to make SQLite refuse it, so SQLite itself is made to refuse
    # one (a trigger on the store's own connection raises a constraint error, as a real constraint would).
    store._db.execute(
        f"CREATE TEMP TRIGGER refuse_{seq} BEFORE INSERT ON results WHEN NEW.seq = {seq} "
        "BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed'); END"
    )


def test_a_message_the_database_refuses_becomes_a_dead_letter_and_the_batch_goes_in(tmp_path: Path) -> None:
    from edgemed.dashboard.validate import classify

    store = DashboardStore(tmp_path / "d.sqlite3")
    _refuse_in_sqlite(store, 2)
    commits: list[str] = []
    store._db.set_trace_callback(lambda sql: commits.append(sql) if sql.strip().upper() == "COMMIT" else None)
    batch = [make_result(seq=1), make_result(seq=2), make_result(seq=3)]
    filings = [classify("edgemed/clinic-a/us-01/results", json.dumps(r).encode()) for r in batch]
    assert store.file(filings, time.time()) == [
        "stored",
        "rejected: could not be stored (IntegrityError)",
        "stored",
    ]
    assert store.result_count() == 2 and store.dead_letter_counts() == {"could not be stored (IntegrityError)": 1}
    assert len(commits) == 1  # the whole batch, its dead letter included, in one commit
    store.close()


def test_a_database_error_after_a_refused_message_never_keeps_its_dead_letter_twice(
    broker: Mosquitto, tmp_path: Path
) -> None:
    # Item 12 of the review: the per-message fallback committed message by message; a database error halfway then
    # made the writer retry the whole batch, and the refused message was kept as a dead letter a second time.
    store = DashboardStore(tmp_path / "d.sqlite3")
    _refuse_in_sqlite(store, 2)
    failures = []

    def fail_once() -> int:  # the database fails once (an I/O error, a full disk), then works again
        if not failures:
            failures.append(1)
            raise OSError("disk I/O error")
        return 0

    store._db.create_function("fail_once", 0, fail_once)
    store._db.execute(
        "CREATE TEMP TRIGGER fail_on_3 BEFORE INSERT ON results WHEN NEW.seq = 3 BEGIN SELECT fail_once(); END"
    )
    ingest = Ingest(MqttConfig(url=broker.url), store)
    ingest.writer.retry_min_s = 0.05
    ingest.writer.gap_s, ingest.writer.window_s = 0.5, 2.0  # the three messages make one batch
    ingest.start()
    device = Device(broker.port)
    try:
        assert ingest.wait_subscribed(10)
        infos = [
            device.client.publish("edgemed/clinic-a/us-01/results", json.dumps(make_result(seq=i)).encode(), qos=1)
            for i in (1, 2, 3)
        ]
        for info in infos:
            info.wait_for_publish(5)
        assert wait_until(lambda: store.result_count() == 2 and ingest.snapshot()["held"] == 0, 10), ingest.snapshot()
    finally:
        device.close()
        ingest.stop()
    assert failures == [1] and ingest.writer.commits >= 1
    assert store.dead_letter_counts() == {"could not be stored (IntegrityError)": 1}
    assert store._db.execute("SELECT count(*) FROM dead_letters").fetchone()[0] == 1
    store.close()
