"""Long and many: length limits at ingest, clipped rendering, paged API answers and aged-out devices.

Against the real web server (uvicorn on 127.0.0.1) and store, logged in as an admin.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dashboard_helpers import dead_letters, make_result
from web_helpers import WebClient, login, make_user, running_web

from edgemed.dashboard.ingest import Ingest
from edgemed.dashboard.store import DashboardStore
from edgemed.dashboard.validate import Filing
from edgemed.dashboard.web.templating import clip
from edgemed.publish.config import MqttConfig

TOPIC = "edgemed/clinic-a/us-01/results"
# Twenty thousand characters that are expensive to lay out: one letter with 19,999 combining accents took
# Chromium 5.5 s per refresh (the page refreshes every 3 s, so it never answered again), and mixed right-to-left
# and left-to-right text 1.7 s.
ZALGO = "a" + "\u0301" * 19_999
BIDI = "\u05d0a" * 10_000


@pytest.fixture
def store(tmp_path: Path) -> Iterator[DashboardStore]:
    s = DashboardStore(tmp_path / "d.sqlite3")
    yield s
    s.close()


@contextlib.contextmanager
def _admin(store: DashboardStore, **config: Any) -> Iterator[WebClient]:
    """A real server on the store and an admin logged in to it."""
    make_user(store, "ada", "admin")
    with running_web(store, **config) as base, login(base, "ada") as http:
        yield http


def test_a_string_over_its_limit_is_a_dead_letter_with_its_raw_bytes(store: DashboardStore) -> None:
    ingest = Ingest(MqttConfig(url="mqtt://127.0.0.1:1"), store)
    at_limit = make_result(seq=1, level="urgent", reason="r" * 1000, label="x" * 128)
    payload = json.dumps(at_limit).encode()
    assert ingest.handle(TOPIC, payload) == "stored"
    stored = store._db.execute("SELECT payload FROM results").fetchone()[0]
    assert json.loads(stored) == at_limit  # never shortened or altered
    over = {
        "triage.reason": {**make_result(seq=2), "triage": {"level": "urgent", "reason": "r" * 1001}},
        "model.name": {**make_result(seq=3), "model": {"name": "m" * 129, "version": "1", "sha256": "a" * 64}},
        "prediction.label": {**make_result(seq=4), "prediction": {"label": "l" * 129, "index": 0}},
        "a string in the payload": {**make_result(seq=5), "note": "n" * 1001},
        "an object key": {**make_result(seq=6), "k" * 129: 1},
    }
    for field, body in over.items():
        raw = json.dumps(body).encode()
        outcome = ingest.handle(TOPIC, raw)
        assert outcome.startswith(f"rejected: {field} is longer than"), (field, outcome)
    long_status = json.dumps({"state": "offline", "reason": "s" * 201}).encode()
    assert ingest.handle("edgemed/clinic-a/us-01/status", long_status) == (
        "rejected: reason is longer than 200 characters"
    )
    rows = dead_letters(store.path)
    assert [bytes(r["payload"]) for r in rows] == [json.dumps(b).encode() for b in over.values()] + [long_status]
    assert [r["seq"] for r in rows[:5]] == [2, 3, 4, 5, 6] and store.result_count() == 1


def test_three_urgent_results_with_20000_character_reasons_are_clipped_for_the_page(store: DashboardStore) -> None:
    # Stored directly, as a database written before the ingest had length limits would hold them.
    for seq, reason in enumerate((ZALGO, BIDI, ZALGO)):
        store.add_result(make_result(seq=seq, level="urgent", reason=reason, label="malignant"))
    with _admin(store) as http:
        # The API hands the text on whole (a script may want it); a page shows it clipped (the ``clip`` filter).
        reasons = [a["reason"] for a in http.get("/api/summary").json()["attention"]]
        assert sorted(map(len, reasons)) == [20_000, 20_000, 20_000]
    for reason in (ZALGO, BIDI):
        cell = clip(reason)
        assert "…" in cell and "shortened" in cell and "20,000 characters" in cell, cell[-80:]
        assert len(cell) < 400 and cell.startswith(reason[:300])
    assert clip("short") == "short" and clip(None) == ""


def _devices(store: DashboardStore, n: int, received_at: float, prefix: str) -> None:
    status = {"state": "online", "delegate": "cpu", "degraded": False}
    filings = [Filing("status", "", b"", body=status, site="flood", device_id=f"{prefix}{i:05d}") for i in range(n)]
    store.file(filings, received_at)


def test_20000_device_ids_come_in_pages_and_silent_devices_age_out(store: DashboardStore) -> None:
    now = time.time()
    _devices(store, 20_000, now, "fake-")
    _devices(store, 50, now - 8 * 86400, "old-")  # silent for 8 days
    with _admin(store, device_expiry_s=7 * 86400.0) as http:
        t0 = time.monotonic()
        first = http.get("/api/fleet").json()
        assert time.monotonic() - t0 < 1.0
        assert len(first["devices"]) == 100 and first["total"] == 20_000 and first["hidden"] == 50
        assert first["devices"][0]["device_id"] == "fake-00000"
        page = http.get("/api/fleet?offset=19950&limit=100").json()
        assert [d["device_id"] for d in page["devices"]] == [f"fake-{i:05d}" for i in range(19_950, 20_000)]
        assert not any(d["device_id"].startswith("old-") for d in page["devices"])
    # Without an expiry every device is listed (and counted).
    assert store.device_counts(now) == (20_050, 0)


def test_long_result_lists_come_in_pages(store: DashboardStore) -> None:
    t = time.time() - 1000
    for seq in range(70):
        store.add_result(make_result(seq=seq, level="urgent", reason=f"r{seq}"), t + seq)
    with _admin(store) as http:
        summary = http.get("/api/summary").json()
        assert len(summary["attention"]) == 50 and summary["attention_total"] == 70
        assert summary["attention"][0]["seq"] == 0  # oldest first
        newest = http.get("/api/results?limit=50").json()["results"]
        older = http.get("/api/results?limit=50&offset=50").json()["results"]
        assert [r["seq"] for r in newest + older] == list(range(69, -1, -1))


def test_the_device_expiry_option_is_checked(tmp_path: Path) -> None:
    import argparse

    from edgemed.dashboard import add_arguments, run
    from edgemed.errors import ConfigError

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for bad in ("-1", "nan"):
        args = parser.parse_args(
            ["--broker", "mqtt://127.0.0.1:1", "--db", str(tmp_path / "x"), "--device-expiry-days", bad]
        )
        with pytest.raises(ConfigError, match="--device-expiry-days"):
            run(args)
