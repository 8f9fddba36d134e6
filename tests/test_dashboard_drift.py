"""Drift at a glance: the population stability index on known mixes, the flag boundary, and the per site and
model report read from result_hourly and the devices' published references, on both engines, site-filtered."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from dashboard_helpers import make_result

from edgemed.dashboard.drift import MIN_RESULTS, PSI_THRESHOLD, drift_report, psi, verdict
from edgemed.dashboard.store import DashboardStore
from edgemed.dashboard.validate import classify
from edgemed.manifest import Reference

NOW = 1_800_000_000.0
EVEN = Reference(n=200, class_mix={"benign": 0.5, "malignant": 0.5}, mean_confidence=0.9, split="test")


def test_psi_of_known_mixes() -> None:
    assert psi({"a": 0.3, "b": 0.7}, {"a": 0.3, "b": 0.7}) == 0.0
    # (0.5 - 0.9) ln(0.5/0.9) + (0.5 - 0.1) ln(0.5/0.1) = 0.4 ln 9
    assert psi({"a": 0.5, "b": 0.5}, {"a": 0.9, "b": 0.1}) == pytest.approx(0.4 * math.log(9))
    # Counts are normalised: 30 of 60 is a half.
    assert psi({"a": 30, "b": 30}, {"a": 0.9, "b": 0.1}) == pytest.approx(0.4 * math.log(9))
    # A class one side never saw counts with the epsilon: large, but finite.
    gone = psi({"a": 1.0}, {"a": 0.5, "b": 0.5})
    assert math.isfinite(gone) and gone > 2.0
    forth, back = psi({"a": 0.5, "b": 0.5}, {"a": 0.6, "b": 0.4}), psi({"a": 0.6, "b": 0.4}, {"a": 0.5, "b": 0.5})
    assert forth == pytest.approx(back)  # symmetric
    with pytest.raises(ValueError, match="recent class mix is empty"):
        psi({}, {"a": 1.0})
    with pytest.raises(ValueError, match="reference class mix holds a negative"):
        psi({"a": 1.0}, {"a": -1.0, "b": 2.0})


def test_the_flag_is_above_the_threshold_and_needs_enough_results() -> None:
    # Against an even mix, a shift of d gives d (ln(1 + 2d) - ln(1 - 2d)): 0.169 at d = 0.2, 0.208 at d = 0.22.
    value, status = verdict(100, {"benign": 0.7, "malignant": 0.3}, EVEN)
    assert value is not None and value < PSI_THRESHOLD and status == "ok"
    value, status = verdict(100, {"benign": 0.72, "malignant": 0.28}, EVEN)
    assert value is not None and value > PSI_THRESHOLD and status == "drift"
    assert verdict(MIN_RESULTS - 1, {"benign": 1.0}, EVEN) == (None, "too_few")
    assert verdict(MIN_RESULTS, {"benign": 1.0}, EVEN)[1] == "drift"
    assert verdict(500, {"benign": 1.0}, None) == (None, "no_reference")


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "fleet.sqlite3")
    return str(request.getfixturevalue("pg_url"))


def _file(store: DashboardStore, bodies: list[dict[str, Any]], at: float) -> None:
    filings = [classify(f"edgemed/{b['site']}/{b['device_id']}/results", json.dumps(b).encode()) for b in bodies]
    assert set(store.file(filings, received_at=at)) == {"stored"}


def _results(site: str, device: str, benign: int, malignant: int) -> list[dict[str, Any]]:
    labels = ["benign"] * benign + ["malignant"] * malignant
    return [make_result(site=site, device_id=device, seq=i, label=label) for i, label in enumerate(labels)]


def _status(reference: dict[str, Any] | None, version: str = "1") -> dict[str, Any]:
    body: dict[str, Any] = {"state": "online", "model": "breast-cnn", "model_version": version}
    if reference is not None:
        body["reference"] = reference
    return body


def test_the_report_per_site_and_model_on_both_engines(db: str) -> None:
    store = DashboardStore(db)
    try:
        even = EVEN.model_dump(mode="json")
        # clinic-a: 90% benign against an even reference (drift); clinic-b: as validated; clinic-c: a broken
        # reference (its fractions sum to 0.9) counts as none; clinic-d: too few results.
        store.set_status("clinic-a", "us-01", _status(even), NOW - 60)
        store.set_status("clinic-b", "us-02", _status(even), NOW - 60)
        store.set_status("clinic-c", "us-03", _status({**even, "class_mix": {"benign": 0.5, "malignant": 0.4}}))
        store.set_status("clinic-d", "us-04", _status(even), NOW - 60)
        _file(store, _results("clinic-a", "us-01", 45, 5), NOW - 3600)
        _file(store, _results("clinic-b", "us-02", 26, 24), NOW - 7200)
        _file(store, _results("clinic-c", "us-03", 25, 25), NOW - 3600)
        _file(store, _results("clinic-d", "us-04", 5, 5), NOW - 3600)
        # Ten days ago clinic-b saw only malignant results: outside the seven days, not counted.
        _file(store, _results("clinic-b", "us-02", 0, 80), NOW - 10 * 86400)
        rows = {r.site: r for r in drift_report(store, None, now=NOW)}
        assert sorted(rows) == ["clinic-a", "clinic-b", "clinic-c", "clinic-d"]
        a, b, c, d = (rows[s] for s in sorted(rows))
        assert a.status == "drift" and a.flagged and a.n == 50
        assert a.class_mix == pytest.approx({"benign": 0.9, "malignant": 0.1})
        assert a.psi == pytest.approx(psi({"benign": 0.9, "malignant": 0.1}, EVEN.class_mix))
        # make_result's top probability is 0.7; the reference says 0.9.
        assert a.mean_confidence == pytest.approx(0.7) and a.confidence_change == pytest.approx(-0.2)
        assert a.reference == EVEN and a.reference_device == "us-01" and a.reference_version == "1"
        assert b.status == "ok" and not b.flagged and b.n == 50 and b.psi is not None and b.psi < 0.01
        assert c.status == "no_reference" and c.reference is None and c.psi is None
        assert d.status == "too_few" and d.n == 10
        as_json = a.as_dict()
        assert json.loads(json.dumps(as_json, allow_nan=False))["threshold"] == PSI_THRESHOLD
        assert as_json["flagged"] is True and as_json["reference"]["class_mix"] == EVEN.class_mix

        # A user limited to clinic-a sees only its row; an empty set sees nothing.
        assert [r.site for r in drift_report(store, frozenset({"clinic-a"}), now=NOW)] == ["clinic-a"]
        assert drift_report(store, frozenset(), now=NOW) == []

        # A second device at clinic-a runs version 2 with another reference, and its status is newer: its
        # reference is used and the row says the site's devices differ.
        skewed = {**even, "class_mix": {"benign": 0.9, "malignant": 0.1}}
        store.set_status("clinic-a", "us-05", _status(skewed, version="2"), NOW)
        (a2,) = drift_report(store, frozenset({"clinic-a"}), now=NOW)
        assert a2.reference_version == "2" and a2.reference_device == "us-05" and a2.versions_differ
        assert a2.status == "ok" and a2.psi == pytest.approx(0.0, abs=1e-12)
    finally:
        store.close()
