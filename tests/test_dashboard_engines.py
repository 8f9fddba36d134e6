"""One store, two engines: every store behaviour on an SQLite file and on a real PostgreSQL 15 (``pg_url``).

Also: a NUL character PostgreSQL cannot hold in text is a dead letter in its batch's one transaction (the
savepoint per message), two processes filing overlapping batches into one PostgreSQL database store every result
once, the heartbeat history and its retention, and the one-line errors for a wrong password, a dead port and a
missing database.
"""

from __future__ import annotations

import json
import multiprocessing
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from broker_fixtures import free_port
from dashboard_helpers import make_result, make_study

from edgemed.dashboard import history, review
from edgemed.dashboard.export import export_lines
from edgemed.dashboard.schema import HEAD
from edgemed.dashboard.secrets import load_secrets
from edgemed.dashboard.settlement import stream_progress
from edgemed.dashboard.store import DashboardStore
from edgemed.dashboard.validate import Filing, classify
from edgemed.errors import ConfigError
from edgemed.receipts import Lost, Progress

SITE, DEVICE, STREAM = "clinic-a", "us-01", "0123456789abcdef"


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "fleet.sqlite3")
    return str(request.getfixturevalue("pg_url"))


def result(seq: int, **kw: Any) -> dict[str, Any]:
    return {**make_result(seq=seq, **kw), "stream": STREAM}


def filing(kind: str, body: dict[str, Any] | bytes, device_id: str = DEVICE) -> Filing:
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    return classify(f"edgemed/{SITE}/{device_id}/{kind}", payload)


def progress(store: DashboardStore, device_id: str = DEVICE) -> Progress:
    with store.database.connect() as conn:
        return stream_progress(conn, (SITE, device_id, STREAM))


def test_a_batch_is_stored_once_with_duplicates_conflicts_and_dead_letters(db: str, tmp_path: Path) -> None:
    store = DashboardStore(db)
    try:
        first = result(0, level="urgent", reason="malignant 0.91")
        forged = {**result(5), "result_id": first["result_id"]}  # another seq under a stored id
        batch = [
            filing("results", first),
            filing("results", result(1)),
            filing("results", first),  # the same result twice in one batch
            filing("results", forged),
            filing("results", b"{not json"),
            filing("studies", {**make_study(), "stream": STREAM, "seq": 2}),
            filing("health", {"schema": "edgemed.health/1", "fps": 4.5, "pending": 3, "latency_ms": {"p95": 80}}),
        ]
        out = store.file(batch, 1000.0)
        assert out[:4] == ["stored", "stored", "duplicate", "rejected: " + out[3].removeprefix("rejected: ")]
        assert "already stored for another result" in out[3] and out[4].startswith("rejected: ")
        assert out[5:] == ["stored", "updated"]
        again = store.file(batch[:2], 1001.0)
        assert again == ["duplicate", "duplicate"]
        assert store.result_count() == 2
        assert progress(store) == Progress(2, ((3, 4),), 5)  # seq 5 (the forged copy) is refused: receipted
        [device] = store.fleet(now=1002.0)
        assert (device["fps"], device["pending"], device["p95_ms"], device["rejected"]) == (4.5, 3, 80, 1)
        urgent = store.unacknowledged_urgent()
        assert [u["kind"] for u in urgent] == ["frame", "study"] and urgent[0]["result_id"] == first["result_id"]
        assert store.unacknowledged_urgent_count() == 2
        secrets = load_secrets(tmp_path / "fleet.key", create=True)
        review.acknowledge(store, first["result_id"], "ab", None, secrets, 1003.0)
        with pytest.raises(review.ReviewConflict):
            review.acknowledge(store, first["result_id"], "ab", None, secrets, 1004.0)
        with pytest.raises(review.ReviewNotFound):
            review.acknowledge(store, "f" * 32, "ab", None, secrets)
        assert store.unacknowledged_urgent_count() == 1
        assert store.level_counts()["results"]["urgent"] == 1 and store.level_counts()["studies"]["urgent"] == 1
        assert [r["seq"] for r in store.recent_results()] == [1, 0]
        assert store.recent_results()[1]["acked_by"] == "ab"
        dead = store.recent_dead_letters()
        assert len(dead) == 2 and sum(store.dead_letter_counts().values()) == 2
    finally:
        store.close()


def test_a_message_the_database_refuses_is_a_dead_letter_in_the_same_transaction(db: str) -> None:
    # A NUL character is valid JSON ("\u0000") and SQLite keeps it; PostgreSQL cannot hold it in text. Without
    # a savepoint per message, PostgreSQL aborts the whole transaction and the batch could never be stored.
    store = DashboardStore(db)
    try:
        nul = result(1, reason="opacity\u0000")
        out = store.file([filing("results", result(0)), filing("results", nul), filing("results", result(2))], 5.0)
        if store.database.dialect == "postgresql":
            assert out == ["stored", "rejected: could not be stored (DataError)", "stored"]
            assert store.result_count() == 2 and progress(store) == Progress(2, (), 2)  # 1 refused, receipted
        else:
            assert out == ["stored", "stored", "stored"] and store.result_count() == 3
    finally:
        store.close()


def test_lost_announcements_and_receipts_from_the_store(db: str) -> None:
    store = DashboardStore(db)
    try:
        store.file([filing("results", result(s)) for s in (0, 1, 5, 9)], 1.0)
        lost = Lost(SITE, DEVICE, STREAM, ((2, 6),), "evicted").encode()
        assert store.file([filing("lost", lost)], 2.0) == ["recorded"]
        assert progress(store) == Progress(6, ((7, 8),), 9)
        assert store.file([filing("results", result(4))], 3.0) == ["stored"]  # a late copy counts as stored
        assert store.fleet()[0]["lost"] == 3  # 2, 3 and 6: 4 is stored after all
        assert progress(store) == Progress(6, ((7, 8),), 9)
        rows = store._query("SELECT through_seq FROM stream_progress WHERE stream = ?", (STREAM,))
        assert [r[0] for r in rows] == [6]
    finally:
        store.close()


def test_export_reads_either_engine_in_reception_order(db: str) -> None:
    store = DashboardStore(db)
    try:
        sent = [json.dumps(result(s), separators=(",", ":")).encode() for s in range(3)]
        for i, payload in enumerate(sent):
            store.file([filing("results", payload)], 10.0 + i)
        assert list(export_lines(db)) == [p + b"\n" for p in sent]
        assert list(export_lines(db, since=11.0)) == [p + b"\n" for p in sent[1:]]
    finally:
        store.close()


def test_workers_report_and_heartbeats_are_kept_downsampled_and_aged_out(db: str) -> None:
    store = DashboardStore(db, health_retention_days=1)
    try:
        store.report_worker("w1", consumer_id="dashboard", group="g", stats={"received": 3, "stored": 2})
        store.report_worker("w1", consumer_id="dashboard", group="g", stats={"received": 5, "stored": 4})
        store.report_worker("w2", consumer_id="dashboard", group=None, stats={"received": 0})
        workers = store.workers()
        assert [(w["worker_id"], w["group"], w["stats"]) for w in workers] == [
            ("w1", "g", {"received": 5, "stored": 4}),
            ("w2", None, {"received": 0}),
        ]
        assert workers[0]["last_at"] >= workers[0]["started_at"]
        with pytest.raises(ValueError, match="finite"):
            store.report_worker("w3", consumer_id="dashboard", group=None, stats={"x": float("nan")})
        day, hour = 86400.0, 3600.0
        now = 100 * day
        beats = [(now - 3 * day + i * 600, {"fps": float(i), "pending": 10 - i}) for i in range(4)]  # one old hour
        beats += [(now - 30 * 60 + i * 60, {"fps": 5.0 + i, "pending": i}) for i in range(3)]  # the current hour
        for at, fields in beats:
            store.set_health(SITE, DEVICE, {"schema": "edgemed.health/1", **fields}, received_at=at)
        assert len(store.health_history(SITE, DEVICE, 0.0)) == 7
        store._next_maintenance = 0.0
        store.file([], now)  # the writer path runs the maintenance pass (inside the batch's transaction)
        raw = store.health_history(SITE, DEVICE, 0.0)
        assert [r["fps"] for r in raw] == [5.0, 6.0, 7.0]  # the old hour's raw rows are gone (retention 1 day)
        hourly = store.health_hourly(SITE, DEVICE, 0.0)
        old_hour = int((now - 3 * day) // hour) * hour
        assert [(h["hour"], h["n"], h["fps_min"], h["fps_max"], h["fps_last"], h["pending_last"]) for h in hourly] == [
            (old_hour, 4, 0.0, 3.0, 3.0, 7.0),
            (int((now - 30 * 60) // hour) * hour, 3, 5.0, 7.0, 7.0, 2.0),  # not downsampled yet: from raw rows
        ]
        store._next_maintenance = 0.0
        store.file([], now + 400 * day)  # a year later the hourly rows go too (raw ones first: bounded batches)
        assert store.health_history(SITE, DEVICE, 0.0) == []
        store._next_maintenance = 0.0
        store.file([], now + 400 * day)
        assert store.health_hourly(SITE, DEVICE, 0.0)[:1] != hourly[:1]
    finally:
        store.close()


def test_maintenance_runs_at_most_every_few_minutes(tmp_path: Path) -> None:
    store = DashboardStore(tmp_path / "d.sqlite3")
    try:
        calls: list[float] = []
        real = history.maintain
        history.maintain = lambda conn, now, retention_s: calls.append(now)  # type: ignore[assignment]
        try:
            for i in range(20):
                store.file([filing("results", result(i))], float(i))
        finally:
            history.maintain = real
        assert calls == [0.0]
    finally:
        store.close()


def _file_overlapping(url: str, worker: int, rounds: int, queue: Any) -> None:
    store = DashboardStore(url)
    stored = 0
    try:
        for r in range(rounds):
            # Both workers file the same 200 results per round, in opposite orders (a redelivery to the other).
            seqs = list(range(r * 200, (r + 1) * 200))
            order = seqs if worker == 0 else reversed(seqs)
            bodies = [result(s // 4, device_id=f"d{s % 4}") for s in order]  # 4 devices, 500 seqs each
            for body in bodies:
                body["result_id"] = uuid.uuid5(uuid.NAMESPACE_OID, f"{body['device_id']}/{body['seq']}").hex
            out = store.file([filing("results", b, b["device_id"]) for b in bodies], time.time())
            assert set(out) <= {"stored", "duplicate"}, set(out)
            stored += out.count("stored")
    finally:
        store.close()
    queue.put(stored)


def test_two_processes_file_overlapping_batches_into_one_postgresql_database(pg_url: str) -> None:
    DashboardStore(pg_url).close()  # the schema first (the lock makes a race safe too: next test)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_file_overlapping, args=(pg_url, w, 10, queue)) for w in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    stored = [queue.get(timeout=5) for _ in procs]
    assert sum(stored) == 2000  # each result stored by exactly one of them
    store = DashboardStore(pg_url)
    try:
        assert store.result_count() == 2000
        assert store._count("SELECT count(*) FROM settled WHERE how = 'stored'") == 2000
        for d in range(4):
            with store.database.connect() as conn:
                state = stream_progress(conn, (SITE, f"d{d}", STREAM))
            assert state == Progress(499, (), 499)
    finally:
        store.close()


def _open_store(url: str) -> None:
    DashboardStore(url).close()


def test_several_processes_opening_a_new_database_at_once_upgrade_it_once(db: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_open_store, args=(db,)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    store = DashboardStore(db)
    try:
        assert store._query("SELECT version_num FROM alembic_version")[0][0] == HEAD
    finally:
        store.close()


def test_wrong_password_dead_port_and_missing_database_are_one_line_errors(pg_url: str) -> None:
    wrong = pg_url.replace("edgemed-test-only", "not-the-password")
    with pytest.raises(ConfigError) as err:
        DashboardStore(wrong)
    text = str(err.value)
    assert "refused the login" in text and "PGPASSWORD" in text and "\n" not in text
    assert "not-the-password" not in text and "edgemed-test-only" not in text and ":***@" in text
    dead = f"postgresql://edgemed:secret@127.0.0.1:{free_port()}/x"
    with pytest.raises(ConfigError) as err:
        DashboardStore(dead)
    text = str(err.value)
    assert "cannot be reached" in text and "secret" not in text and "\n" not in text
    missing = pg_url.rsplit("/", 1)[0] + "/no_such_db"
    with pytest.raises(ConfigError) as err:
        DashboardStore(missing)
    assert "does not exist" in str(err.value) and "createdb" in str(err.value)
    with pytest.raises(ConfigError, match="looks like a URL passed as a file path"):
        DashboardStore(Path(pg_url))
    with pytest.raises(ConfigError, match="unknown kind of database"):
        DashboardStore("mysql://u@h/db")


def test_postgresql_keeps_its_durable_defaults_and_a_sized_pool(pg_url: str) -> None:
    store = DashboardStore(pg_url)
    try:
        assert store._query("SHOW synchronous_commit")[0][0] == "on"
        pool = store.database.engine.pool
        assert pool.size() >= 3  # type: ignore[attr-defined]  # the writer, the receipt thread, the page
        assert "edgemed-test-only" not in store.database.display
    finally:
        store.close()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:pw@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("postgresql://u:p@ss/w:rd@h/db", "postgresql://u:***@h/db"),  # unencoded @ / : in the password
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("/var/lib/edgemed/fleet.sqlite3", "/var/lib/edgemed/fleet.sqlite3"),
    ],
)
def test_a_password_never_shows_in_a_database_name(url: str, shown: str) -> None:
    from edgemed.dashboard.cli_args import shown_db
    from edgemed.dashboard.db import mask_url

    assert mask_url(url) == shown == shown_db(url)


def test_a_port_that_is_not_a_number_is_a_one_line_error() -> None:
    with pytest.raises(ConfigError, match="is not a database URL") as info:
        DashboardStore("postgresql://u:secret@127.0.0.1:abc/db")
    assert "secret" not in str(info.value)
