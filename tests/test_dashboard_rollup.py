"""``result_hourly`` equals a GROUP BY over ``results`` on both engines, through the message-by-message and the
set-based paths, with duplicates not counted; and an upgraded database is filled from the results it held."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from dashboard_helpers import make_result

from edgemed.dashboard.rollup import hour_of
from edgemed.dashboard.store import DashboardStore
from edgemed.dashboard.tables import result_hourly, results
from edgemed.dashboard.validate import classify


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "fleet.sqlite3")
    return str(request.getfixturevalue("pg_url"))


def _counts(store: DashboardStore) -> tuple[dict[Any, tuple[int, float]], dict[Any, tuple[int, float]]]:
    hour = sa.cast(sa.func.floor(results.c.received_at / 3600), sa.BigInteger) * 3600
    with store.database.engine.connect() as conn:
        grouped = conn.execute(
            sa.select(
                results.c.site, hour, sa.func.coalesce(results.c.model, ""), results.c.level,
                sa.func.coalesce(results.c.label, ""), sa.func.count(),
                sa.func.coalesce(sa.func.sum(results.c.confidence), 0.0),
            ).group_by(results.c.site, hour, results.c.model, results.c.level, results.c.label)
        ).all()  # fmt: skip
        rolled = conn.execute(sa.select(result_hourly)).all()
    want = {tuple(r[:5]): (int(r[5]), round(float(r[6]), 6)) for r in grouped}
    got = {tuple(r[:5]): (int(r[5]), round(float(r[6]), 6)) for r in rolled}
    return want, got


def test_hourly_counts_match_the_results_on_both_paths(db: str) -> None:
    store = DashboardStore(db)
    try:
        bodies = [make_result(seq=i, site=f"clinic-{'ab'[i % 2]}", level=("urgent", "routine", "inconclusive")[i % 3])
                  for i in range(30)]  # fmt: skip
        for i, body in enumerate(bodies[:10]):
            assert store.add_result(body, received_at=7200.0 + i * 400)  # one message at a time, spanning hours
        filings = [classify(f"edgemed/{b['site']}/{b['device_id']}/results", json.dumps(b).encode()) for b in bodies]
        outcomes = store.file(filings, received_at=20000.0)  # set-based: 10 duplicates, 20 new
        assert outcomes.count("stored") == 20 and outcomes.count("duplicate") == 10
        want, got = _counts(store)
        assert got == want
        assert sum(n for n, _ in got.values()) == 30
        assert (("clinic-a", hour_of(20000.0), "breast-cnn", "urgent", "benign")) in got
    finally:
        store.close()


def test_an_upgraded_database_is_counted_from_its_results(tmp_path: Path) -> None:
    path = tmp_path / "fleet.sqlite3"
    store = DashboardStore(path)
    for i in range(6):
        store.add_result(make_result(seq=i, level="urgent" if i % 2 else "routine"), received_at=3600.0 * i)
    store.close()
    con = sqlite3.connect(path)  # as revision 0003 left it: no counts, no model or confidence columns filled
    con.execute("DELETE FROM result_hourly")
    con.execute("UPDATE results SET model = NULL, confidence = NULL")
    con.execute("UPDATE alembic_version SET version_num = '0003'")
    for table in ("users", "web_sessions", "login_failures", "audit", "reviews", "escalations", "settings",
                  "result_hourly"):  # fmt: skip
        con.execute(f"DROP TABLE {table}")
    for index in ("results_site_recent", "results_site_level", "studies_site_level", "results_waiting",
                  "studies_waiting"):  # fmt: skip
        con.execute(f"DROP INDEX {index}")
    con.execute("ALTER TABLE results DROP COLUMN model")
    con.execute("ALTER TABLE results DROP COLUMN confidence")
    con.execute("ALTER TABLE results DROP COLUMN closed_at")
    con.execute("ALTER TABLE studies DROP COLUMN closed_at")
    # Revision 0003's acks table (0004 turns its rows into reviews and drops it).
    con.execute("CREATE TABLE acks (result_id TEXT PRIMARY KEY, acked_at FLOAT NOT NULL, acked_by TEXT NOT NULL)")
    con.commit()
    con.close()
    store = DashboardStore(path)
    try:
        want, got = _counts(store)
        assert got == want and sum(n for n, _ in got.values()) == 6
        assert {k[2] for k in got} == {"breast-cnn"} and all(abs(c - 0.7 * n) < 1e-6 for n, c in got.values())
    finally:
        store.close()
