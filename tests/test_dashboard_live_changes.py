"""The live stream's change feed on both engines: only what comes after the start, only the reader's sites, a
batch bigger than one poll in full, a row that commits late with an earlier time still reported once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from dashboard_helpers import HEALTH, make_result

from edgemed.dashboard import live_changes
from edgemed.dashboard.live_changes import ChangeFeed
from edgemed.dashboard.store import DashboardStore
from edgemed.dashboard.tables import reviews
from edgemed.dashboard.validate import classify

NOW = 1_800_000_000.0


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    db = str(tmp_path / "fleet.sqlite3") if request.param == "sqlite" else str(request.getfixturevalue("pg_url"))
    opened = DashboardStore(db)
    yield opened
    opened.close()


def _file(store: DashboardStore, bodies: list[dict[str, Any]], at: float) -> None:
    filings = [classify(f"edgemed/{b['site']}/{b['device_id']}/results", json.dumps(b).encode()) for b in bodies]
    store.file(filings, received_at=at)


def _ids(changes: list[live_changes.Change], event: str = "result") -> list[str]:
    return [c.data["result_id"] for c in changes if c.event == event]


def test_the_feed_reports_what_comes_after_and_only_the_readers_sites(store: DashboardStore) -> None:
    _file(store, [make_result(site="clinic-a", seq=0)], NOW)  # before the start: not news
    mine, everyone = ChangeFeed(frozenset({"clinic-a"})), ChangeFeed(None)
    mine.start(store)
    everyone.start(store)
    assert mine.poll(store) == [] and everyone.poll(store) == []
    a = make_result(site="clinic-a", seq=1, level="urgent")
    b = make_result(site="clinic-b", device_id="us-09", seq=0, level="urgent")
    _file(store, [a, b], NOW + 1)
    got = mine.poll(store)
    results = [c for c in got if c.event == "result"]
    assert [c.data for c in results] == [
        {"kind": "frame", "result_id": a["result_id"], "site": "clinic-a", "device_id": "us-01", "level": "urgent"}
    ]
    assert {c.data["site"] for c in got} == {"clinic-a"}  # its device event too, never clinic-b's
    assert sorted(_ids(everyone.poll(store))) == sorted([a["result_id"], b["result_id"]])
    assert mine.poll(store) == [] and everyone.poll(store) == []
    assert ChangeFeed(frozenset()).poll(store) == []

    store.set_health("clinic-a", "us-01", HEALTH, NOW + 2)
    store.set_health("clinic-b", "us-09", HEALTH, NOW + 2)
    assert [c.data for c in mine.poll(store)] == [{"site": "clinic-a", "device_id": "us-01"}]
    with store._transaction() as conn:
        conn.execute(sa.insert(reviews), [
            {"result_id": a["result_id"], "site": "clinic-a", "state": "acknowledged", "acked_by": "rita",
             "acked_at": NOW + 3},
            {"result_id": b["result_id"], "site": "clinic-b", "state": "acknowledged", "acked_by": "bob",
             "acked_at": NOW + 3},
        ])  # fmt: skip
    (review,) = mine.poll(store)
    assert review.event == "review" and review.data == {
        "result_id": a["result_id"], "site": "clinic-a", "state": "acknowledged"
    }  # fmt: skip
    assert mine.poll(store) == []


def test_a_big_batch_and_a_late_commit_are_reported_in_full_once(
    store: DashboardStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(live_changes, "PER_POLL", 7)
    feed = ChangeFeed(None)
    feed.start(store)  # an empty database
    batch = [make_result(seq=i) for i in range(20)]
    _file(store, batch, NOW)  # one time stamp for all twenty
    reported: list[str] = []
    for _ in range(5):
        reported += _ids(feed.poll(store))
    assert sorted(reported) == sorted(b["result_id"] for b in batch)
    # Another worker's transaction began earlier (its time is below the cursor) and committed only now.
    late = make_result(seq=50, level="urgent")
    _file(store, [late], NOW - 2)
    assert _ids(feed.poll(store)) == [late["result_id"]]
    assert _ids(feed.poll(store)) == []
    # Older than the look-back: not news any more.
    _file(store, [make_result(seq=60)], NOW - 60)
    assert _ids(feed.poll(store)) == []
