"""Schema revisions: databases of older dashboards are recognised, stamped and upgraded in place, every row kept.

Two SQLite databases made before Alembic: today's main (receipts, ``PRAGMA user_version`` 1) and one from before
receipts (``user_version`` 0). Each is filled with rows in every table it has, opened by the store, and counted
again. A new database on either engine matches ``tables.py`` exactly (Alembic's own comparison).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from dashboard_helpers import make_result, make_study

from edgemed.dashboard.schema import HEAD
from edgemed.dashboard.settlement import stream_progress
from edgemed.dashboard.store import DashboardStore
from edgemed.dashboard.tables import metadata
from edgemed.errors import ConfigError

FIXTURES = Path(__file__).parent / "fixtures"
SITE, DEVICE, STREAM = "clinic-a", "us-01", "0123456789abcdef"


def _fill(db: Path, schema: str, *, receipts: bool) -> dict[str, int]:
    con = sqlite3.connect(db)
    con.executescript((FIXTURES / schema).read_text())
    for seq in range(5):
        body = {**make_result(seq=seq), "stream": STREAM}
        con.execute(
            "INSERT INTO results(result_id, site, device_id, seq, created_at, received_at, level, reason, payload) "
            "VALUES (?, ?, ?, ?, ?, ?, 'routine', 'ok', ?)",
            (body["result_id"], SITE, DEVICE, seq, body["created_at"], 1.0 + seq, json.dumps(body)),
        )
    study = {**make_study(), "stream": STREAM}
    con.execute(
        "INSERT INTO studies(result_id, site, device_id, seq, created_at, received_at, level, reason, payload) "
        "VALUES (?, ?, ?, 5, ?, 9.0, 'urgent', 'x', ?)",
        (study["result_id"], SITE, DEVICE, study["created_at"], json.dumps(study)),
    )
    con.execute("INSERT INTO devices(site, device_id, last_seen, health, health_at) VALUES (?, ?, 9.0, '{}', 9.0)",
                (SITE, DEVICE))  # fmt: skip
    con.execute("INSERT INTO acks VALUES (?, 10.0, 'AB')", (study["result_id"],))
    con.execute(
        "INSERT INTO dead_letters(received_at, topic, reason, payload, payload_bytes, site, device_id, seq) "
        "VALUES (1.0, 'edgemed/clinic-a/us-01/results', 'bad', x'00', 1, ?, ?, 6)",
        (SITE, DEVICE),
    )
    con.execute("INSERT INTO dead_letter_counts VALUES ('bad', 1, 1.0)")
    if receipts:  # what main's ingest wrote beside them
        con.execute("UPDATE dead_letters SET stream = ?", (STREAM,))
        con.executemany(
            "INSERT INTO settled VALUES (?, ?, ?, ?, ?)",
            [(SITE, DEVICE, STREAM, s, "stored") for s in range(6)] + [(SITE, DEVICE, STREAM, 6, "rejected")],
        )
        con.execute("INSERT INTO stream_progress VALUES (?, ?, ?, 3)", (SITE, DEVICE, STREAM))
        con.execute("INSERT INTO stream_seen VALUES (?, ?, ?, 9.0)", (SITE, DEVICE, STREAM))
        con.execute("INSERT INTO lost_ranges VALUES (?, ?, ?, 8, 9, 'evicted', 9.0)", (SITE, DEVICE, STREAM))
    con.commit()
    tables = [
        r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'") if r[0] != "sqlite_sequence"
    ]
    counts = {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables}
    con.close()
    return counts


def _check_upgraded(db: Path, before: dict[str, int], through_seq: int) -> None:
    store = DashboardStore(db)
    try:
        # Every table keeps its rows, but acks: revision 0004 turns them into reviews and drops the table.
        kept = [t for t in before if t != "acks"]
        after = {t: store._count(f"SELECT count(*) FROM {t}") for t in kept}
        expected = {t: n for t, n in before.items() if t != "acks"}
        assert after == expected | ({"settled": 7} if before.get("settled", 0) == 0 else {})
        assert "acks" not in {r[0] for r in store._query("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert store._query("SELECT version_num FROM alembic_version")[0][0] == HEAD
        assert store._count("PRAGMA user_version") == 1
        # The old page's typed initials become an acknowledged review, marked as initials (never a login).
        reviews = [tuple(r) for r in store._query("SELECT state, acked_by FROM reviews")]
        assert reviews == [("acknowledged", "initials:AB")]
        # The new stream column comes from each row's JSON: a duplicate is checked against it, receipts count it.
        assert {r[0] for r in store._query("SELECT stream FROM results UNION SELECT stream FROM studies")} == {STREAM}
        with store.database.connect() as conn:
            state = stream_progress(conn, (SITE, DEVICE, STREAM))
        assert state.through_seq == through_seq and state.missing == ()
        [row] = store.recent_results(limit=1)
        assert row["seq"] == 4 and store.unacknowledged_urgent_count() == 0
        assert store.health_history(SITE, DEVICE, 0.0) == [] and store.workers() == []
    finally:
        store.close()
    again = DashboardStore(db)  # a second open changes nothing
    try:
        assert {t: again._count(f"SELECT count(*) FROM {t}") for t in kept} == after
    finally:
        again.close()


def test_a_database_of_todays_main_is_recognised_and_upgraded_with_every_row(tmp_path: Path) -> None:
    db = tmp_path / "main.sqlite3"
    before = _fill(db, "dashboard-schema-receipts.sql", receipts=True)
    assert set(before) >= {"results", "studies", "settled", "lost_ranges", "stream_seen", "stream_progress"}
    _check_upgraded(db, before, 6)  # seq 6 is the dead letter (its stream known)


def test_a_database_from_before_receipts_is_recognised_and_upgraded_with_every_row(tmp_path: Path) -> None:
    db = tmp_path / "old.sqlite3"
    before = _fill(db, "dashboard-schema-before-receipts.sql", receipts=False)
    assert "settled" not in before
    # The dead letter kept no stream then: it settles seq 6 of stream '' (as main's upgrade did).
    _check_upgraded(db, {**before, "settled": 0}, 5)


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_a_new_database_matches_the_tables_module(engine: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    db = str(tmp_path / "new.sqlite3") if engine == "sqlite" else str(request.getfixturevalue("pg_url"))
    store = DashboardStore(db)
    try:
        with store.database.engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), metadata)
        assert diff == []
        assert store.file([], 1.0) == [] and store.result_count() == 0
    finally:
        store.close()


def test_a_database_of_an_unknown_newer_revision_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "future.sqlite3"
    DashboardStore(db).close()
    with sqlite3.connect(db) as con:
        con.execute("UPDATE alembic_version SET version_num = '9999'")
    with pytest.raises(ConfigError, match="revision 9999, which this edgemed does not know"):
        DashboardStore(db)
