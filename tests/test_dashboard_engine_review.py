"""Review of the store on both engines: a failed commit, and what the writer files again after it.

Each test runs on an SQLite file and on a real PostgreSQL 15 (``pg_url``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from dashboard_helpers import make_result

from edgemed.dashboard import review
from edgemed.dashboard.secrets import load_secrets
from edgemed.dashboard.store import DashboardStore
from edgemed.dashboard.validate import Filing, classify

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


def _driver_error(store: DashboardStore) -> Exception:
    if store.database.dialect == "sqlite":
        import sqlite3

        return sqlite3.OperationalError("disk I/O error")
    import psycopg

    return psycopg.OperationalError("server closed the connection unexpectedly")


def test_a_failed_commit_leaves_nothing_behind_and_the_retried_batch_is_stored_once(
    db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The COMMIT itself fails (the seam: the dialect's commit call, as a busy or failing disk makes SQLite's fail).
    # The driver's transaction may still be open: the store must end it, or every later batch fails ("cannot
    # start a transaction within a transaction") and the failed batch's rows ride along with the next commit.
    store = DashboardStore(db)
    try:
        dialect = store.database.engine.dialect
        real_commit = dialect.do_commit
        failures = [_driver_error(store)]

        def commit(dbapi_connection: Any) -> None:
            if failures:
                raise failures.pop()
            real_commit(dbapi_connection)

        monkeypatch.setattr(dialect, "do_commit", commit)
        dead = filing("results", b"{not json")
        with pytest.raises(Exception, match=r"disk I/O error|server closed"):
            store.file([filing("results", result(0)), dead], 1.0)
        # The writer files the same batch again, with what came meanwhile.
        out = store.file([filing("results", result(0)), dead, filing("results", result(1))], 2.0)
        assert out[0] == "stored" and out[1].startswith("rejected") and out[2] == "stored"
        assert store.result_count() == 2
        assert sum(store.dead_letter_counts().values()) == 1
    finally:
        store.close()


def test_an_acknowledgement_beside_another_process_committing_is_not_refused_as_locked(tmp_path: Path) -> None:
    # serve (acknowledge: a read, then a write) and ingest (commits all the time) on one SQLite file. A transaction
    # begun with a plain BEGIN reads a snapshot first; when the other process commits before its first write,
    # SQLite refuses that write at once ("database is locked", without waiting for the busy timeout): the
    # clinician's acknowledgement fails. A write transaction must take the write lock at BEGIN (IMMEDIATE).
    import threading

    import sqlalchemy as sa

    db = tmp_path / "fleet.sqlite3"
    serve, ingest = DashboardStore(db), DashboardStore(db)
    try:
        urgent = result(0, level="urgent", reason="malignant 0.91")
        assert ingest.file([filing("results", urgent)], 1.0) == ["stored"]
        other = threading.Thread(target=ingest.file, args=([filing("results", result(1))], 2.0))

        def commit_meanwhile(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
            if statement.startswith("INSERT INTO reviews") and not other.is_alive() and other.ident is None:
                other.start()
                other.join(1.0)  # it commits now (plain BEGIN), or waits for our write lock (IMMEDIATE)

        sa.event.listen(serve.database.engine, "before_cursor_execute", commit_meanwhile)
        secrets = load_secrets(tmp_path / "fleet.key", create=True)
        assert review.acknowledge(serve, urgent["result_id"], "ab", None, secrets, 3.0)["state"] == "acknowledged"
        other.join(10.0)
        assert not other.is_alive() and serve.result_count() == 2
    finally:
        serve.close()
        ingest.close()
