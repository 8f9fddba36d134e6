"""Item 16: the page shows the label triage acted on, and the top prediction beside it when they differ."""

from __future__ import annotations

import json
import sqlite3
import threading
import urllib.request
from pathlib import Path

from dashboard_helpers import chromium, make_result

from edgemed.dashboard.ingest import Ingest
from edgemed.dashboard.store import DashboardStore
from edgemed.dashboard.web import make_server
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
    server = make_server(store, port=0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        summary = json.loads(urllib.request.urlopen(server.url + "api/summary", timeout=5).read())
        labels = [(a["seq"], a["label"], a["top_label"]) for a in summary["attention"]]
        assert labels == [(1, "malignant", "normal_benign"), (2, "malignant", "malignant")]
        dom = chromium(tmp_path, server.url, "--dump-dom").stdout
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
        store.close()
    rows = dom.split('<tr class="urgent-row">')[1:]
    assert len(rows) == 2, dom[-3000:]
    assert '<td class="finding">malignant<span class="note top">(top prediction: normal_benign)</span></td>' in rows[0]
    assert '<td class="finding">malignant</td>' in rows[1]
    assert "Finding: normal_benign" not in dom


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
