"""Item 16: the page shows the label triage acted on, and the top prediction beside it when they differ."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from dashboard_helpers import make_result
from web_helpers import login, make_user, running_web

from edgemed.dashboard.ingest import Ingest
from edgemed.dashboard.store import DashboardStore
from edgemed.publish.config import MqttConfig
from edgemed.triage import ClassRule, TriagePolicy, triage
from edgemed.types import Prediction

POLICY = TriagePolicy(
    rules={
        "malignant": ClassRule(level="urgent", min_probability=0.25, reason="suspicious for malignancy: refer now"),
        "normal_benign": ClassRule(level="no_finding", min_probability=0.6),
    }
)


def _result(probabilities: tuple[float, float], seq: int) -> dict[str, object]:
    """A result envelope whose prediction and triage come from the real triage policy."""
    pred = Prediction(("normal_benign", "malignant"), probabilities)
    decision = triage(pred, POLICY)
    return {**make_result(seq=seq), "prediction": pred.as_dict(), "triage": decision.as_dict()}


def test_an_escalated_result_shows_the_urgent_class_and_the_top_prediction(tmp_path: Path) -> None:
    store = DashboardStore(tmp_path / "d.sqlite3")
    ingest = Ingest(MqttConfig(url="mqtt://127.0.0.1:1"), store)
    escalated = _result((0.7, 0.3), seq=1)  # malignant 0.30 reaches its urgent threshold below normal_benign
    plain = _result((0.1, 0.9), seq=2)  # malignant is also the top class
    assert escalated["triage"]["label"] == "malignant" and escalated["prediction"]["label"] == "normal_benign"
    for result in (escalated, plain):
        assert ingest.handle("edgemed/clinic-a/us-01/results", json.dumps(result).encode()) == "stored"
    make_user(store, "ada", "admin")
    try:
        with running_web(store) as base, login(base, "ada") as http:
            summary = http.get("/api/summary").json()
            labels = [(a["seq"], a["label"], a["top_label"]) for a in summary["attention"]]
            assert labels == [(1, "malignant", "normal_benign"), (2, "malignant", "malignant")]
            results = {r["seq"]: r for r in http.get("/api/results").json()["results"]}
            assert (results[1]["label"], results[1]["top_label"]) == ("malignant", "normal_benign")
    finally:
        store.close()


def test_a_database_from_before_keeps_working_and_gets_the_triage_label(tmp_path: Path) -> None:
    db = tmp_path / "old.sqlite3"
    store = DashboardStore(db)
    store.add_result(_result((0.7, 0.3), seq=1))
    store.close()
    with sqlite3.connect(db) as con:  # the schema of a dashboard before this change
        con.execute("ALTER TABLE results DROP COLUMN triage_label")
        con.execute("ALTER TABLE studies DROP COLUMN triage_label")
    store = DashboardStore(db)
    try:
        [row] = store.recent_results()
        assert (row["label"], row["top_label"]) == ("malignant", "normal_benign")
        assert store.add_result(_result((0.6, 0.4), seq=2)) is True
    finally:
        store.close()
