"""The fleet view's and charts' reads on both engines: limited to the reader's sites, what runs where from each
device's status, results per hour and level from result_hourly, and a device's heartbeat series."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from dashboard_helpers import HEALTH, make_result

from edgemed.dashboard import fleet_data
from edgemed.dashboard.fleet_data import class_mix_rows, device_series, fleet_devices, hourly_levels
from edgemed.dashboard.rollup import hour_of
from edgemed.dashboard.store import DashboardStore
from edgemed.dashboard.validate import classify

NOW = 1_800_000_000.0
HOSTILE = '<img src=x onerror="alert(1)">'


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    db = str(tmp_path / "fleet.sqlite3") if request.param == "sqlite" else str(request.getfixturevalue("pg_url"))
    opened = DashboardStore(db)
    yield opened
    opened.close()


def _status(model: str = "breast-cnn") -> dict[str, Any]:
    return {
        "state": "online",
        "delegate": "cpu",
        "degraded": False,
        "model": model,
        "model_version": "3",
        "model_sha256": "f" * 64,
        "edgemed": "0.9.0",
        "reference": {"n": 10, "class_mix": {"benign": 1.0}, "mean_confidence": 0.8, "split": "test"},
    }


def test_fleet_rows_carry_what_runs_where_and_only_the_readers_sites(store: DashboardStore) -> None:
    store.set_status("clinic-a", "us-01", _status(HOSTILE), NOW - 10)
    store.set_health("clinic-a", "us-01", HEALTH, NOW - 5)
    store.set_status("clinic-b", "us-02", {"state": "online", "model_version": 7}, NOW - 500)  # a wrong type
    rows = fleet_devices(store, None, now=NOW)
    assert [(r["site"], r["device_id"]) for r in rows] == [("clinic-a", "us-01"), ("clinic-b", "us-02")]
    a, b = rows
    assert a["model"] == HOSTILE and a["model_version"] == "3" and a["model_sha256"] == "f" * 64
    assert a["edgemed"] == "0.9.0" and a["delegate"] == "cpu" and a["pending"] == 17 and a["fps"] == 7.5
    assert a["reference"]["split"] == "test" and a["rejected"] == 0 and a["lost"] == 0
    assert b["model_version"] is None and b["silent"] is True and b["reference"] is None
    assert [r["site"] for r in fleet_devices(store, frozenset({"clinic-b"}), now=NOW)] == ["clinic-b"]
    assert fleet_devices(store, frozenset(), now=NOW) == []
    assert [r["device_id"] for r in fleet_devices(store, None, now=NOW, device=("clinic-a", "us-01"))] == ["us-01"]
    # The site filter applies to a named device too.
    assert fleet_devices(store, frozenset({"clinic-b"}), now=NOW, device=("clinic-a", "us-01")) == []
    assert [r["device_id"] for r in fleet_devices(store, None, now=NOW, expire_after_s=60)] == ["us-01"]


def test_results_per_hour_level_and_label_by_site(store: DashboardStore) -> None:
    bodies = [
        make_result(site="clinic-a", seq=0, level="urgent", label="malignant"),
        make_result(site="clinic-a", seq=1, level="routine"),
        make_result(site="clinic-b", seq=0, level="routine"),
    ]
    filings = [classify(f"edgemed/{b['site']}/{b['device_id']}/results", json.dumps(b).encode()) for b in bodies]
    store.file(filings[:2], received_at=NOW - 3600)
    store.file(filings[2:], received_at=NOW)
    store.file([classify("edgemed/clinic-a/us-01/results", json.dumps(make_result(seq=5)).encode())], NOW - 90000)
    levels = hourly_levels(store, None, NOW - 7200)
    assert levels == [
        {"site": "clinic-a", "hour": hour_of(NOW - 3600), "level": "routine", "n": 1},
        {"site": "clinic-a", "hour": hour_of(NOW - 3600), "level": "urgent", "n": 1},
        {"site": "clinic-b", "hour": hour_of(NOW), "level": "routine", "n": 1},
    ]
    assert {r["site"] for r in hourly_levels(store, frozenset({"clinic-b"}), NOW - 7200)} == {"clinic-b"}
    mix = class_mix_rows(store, frozenset({"clinic-a"}), NOW - 86400 * 2)
    assert [(r["label"], r["n"]) for r in mix] == [("benign", 2), ("malignant", 1)]
    assert mix[0]["confidence_sum"] == pytest.approx(1.4) and mix[0]["model"] == "breast-cnn"


def test_a_devices_series_from_raw_and_hourly_heartbeats(store: DashboardStore) -> None:
    for i in range(6):
        beat = {**HEALTH, "fps": 5.0 + i, "pending": 10 - i, "latency_ms": {"p50": 1.0, "p95": 8.0 + i}}
        store.set_health("clinic-a", "us-01", beat, NOW - 3 * 3600 + i * 1200)  # every 20 min over two hours
    store.set_health("clinic-a", "us-01", {**HEALTH, "fps": None}, NOW - 60)  # a heartbeat without a frame rate
    store.set_health("clinic-b", "us-01", {**HEALTH, "fps": 99.0}, NOW - 60)  # another site's device
    raw = device_series(store, "clinic-a", "us-01", span_s=4 * 3600, now=NOW)
    assert [v for _, v in raw["fps"]] == [5.0, 6.0, 7.0, 8.0, 9.0, 10.0]
    assert [v for _, v in raw["p95_ms"]] == [8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 8.9]
    assert raw["cpu_percent"][0] == (NOW - 3 * 3600, 37.5)
    hourly = device_series(store, "clinic-a", "us-01", span_s=72 * 3600, now=NOW)
    # Each hour's worst: the lowest frame rate, the highest latency and backlog.
    hours = sorted({hour_of(NOW - 3 * 3600 + i * 1200) for i in range(6)})
    assert [t for t, _ in hourly["fps"]] == [float(h) for h in hours]
    assert hourly["fps"][0][1] == 5.0 and hourly["pending"][0][1] == 10.0
    assert max(v for _, v in hourly["p95_ms"]) == 13.0


def test_a_long_series_is_thinned_keeping_the_worst() -> None:
    points = [(float(i), 1.0) for i in range(2000)]
    points[1234] = (1234.0, 50.0)
    thinned = fleet_data._thin(points, "max")
    assert len(thinned) <= fleet_data.MAX_POINTS and max(v for _, v in thinned) == 50.0
    lows = fleet_data._thin([(float(i), 10.0 if i != 7 else 0.5) for i in range(2000)], "min")
    assert min(v for _, v in lows) == 0.5
