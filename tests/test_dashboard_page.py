"""Long and many: length limits at ingest, truncated rendering, paged tables and aged-out devices.

The page is driven in headless Chromium (tests/browser.py) against the real web server and store.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from browser import WAIT_FOR_JS, PipeBrowser
from dashboard_helpers import dead_letters, make_result

from edgemed.dashboard.ingest import Ingest
from edgemed.dashboard.store import DashboardStore
from edgemed.dashboard.validate import Filing
from edgemed.dashboard.web import DashboardServer, make_server
from edgemed.publish.config import MqttConfig

TOPIC = "edgemed/clinic-a/us-01/results"
# Twenty thousand characters that are expensive to lay out: one letter with 19,999 combining accents took
# Chromium 5.5 s per refresh (the page refreshes every 3 s, so it never answered again), and mixed right-to-left
# and left-to-right text 1.7 s.
ZALGO = "a" + "\u0301" * 19_999
BIDI = "\u05d0a" * 10_000

TIMED_REFRESH = (
    "(async () => { const t0 = performance.now(); await refresh(); document.body.getBoundingClientRect(); "
    "return performance.now() - t0; })()"
)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[DashboardStore]:
    s = DashboardStore(tmp_path / "d.sqlite3")
    yield s
    s.close()


def _serve(store: DashboardStore, **kw: Any) -> tuple[DashboardServer, threading.Thread]:
    server = make_server(store, port=0, **kw)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    return server, thread


def _get(server: DashboardServer, path: str) -> Any:
    with urllib.request.urlopen(server.url.rstrip("/") + path, timeout=10) as resp:
        return json.loads(resp.read())


def _stop(server: DashboardServer, thread: threading.Thread) -> None:
    server.shutdown()
    server.server_close()
    thread.join(5)


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


def test_three_urgent_results_with_20000_character_reasons_do_not_freeze_the_page(
    store: DashboardStore, tmp_path: Path
) -> None:
    # Stored directly, as a database written before the ingest had length limits would hold them.
    for seq, reason in enumerate((ZALGO, BIDI, ZALGO)):
        store.add_result(make_result(seq=seq, level="urgent", reason=reason, label="malignant"))
    server, thread = _serve(store)
    browser = PipeBrowser(tmp_path, server.url)
    try:
        assert browser.evaluate(WAIT_FOR_JS % "document.querySelectorAll('.urgent-row').length === 3")
        took_ms = browser.evaluate(TIMED_REFRESH)
        assert took_ms < 1500, f"one refresh took {took_ms:.0f} ms"
        cells = browser.evaluate("[...document.querySelectorAll('#attention-body td.reason')].map(c => c.textContent)")
        assert len(cells) == 3
        for cell in cells:
            assert "…" in cell and "shortened" in cell and "20,000 characters" in cell, cell[-80:]
            assert len(cell) < 400
        assert cells[1].startswith(BIDI[:300])
    finally:
        browser.close()
        _stop(server, thread)


def _devices(store: DashboardStore, n: int, received_at: float, prefix: str) -> None:
    status = {"state": "online", "delegate": "cpu", "degraded": False}
    filings = [Filing("status", "", b"", body=status, site="flood", device_id=f"{prefix}{i:05d}") for i in range(n)]
    store.file(filings, received_at)


def test_20000_device_ids_come_in_pages_and_silent_devices_age_out(store: DashboardStore, tmp_path: Path) -> None:
    now = time.time()
    _devices(store, 20_000, now, "fake-")
    _devices(store, 50, now - 8 * 86400, "old-")  # silent for 8 days
    server, thread = _serve(store, device_expiry_s=7 * 86400.0)
    try:
        t0 = time.monotonic()
        first = _get(server, "/api/fleet")
        assert time.monotonic() - t0 < 1.0
        assert len(first["devices"]) == 100 and first["total"] == 20_000 and first["hidden"] == 50
        assert first["devices"][0]["device_id"] == "fake-00000"
        page = _get(server, "/api/fleet?offset=19950&limit=100")
        assert [d["device_id"] for d in page["devices"]] == [f"fake-{i:05d}" for i in range(19_950, 20_000)]
        assert not any(d["device_id"].startswith("old-") for d in page["devices"])
        browser = PipeBrowser(tmp_path, server.url)
        try:
            assert browser.evaluate(WAIT_FOR_JS % "document.querySelectorAll('.device-row').length === 100")
            took_ms = browser.evaluate(TIMED_REFRESH)
            assert took_ms < 1500, f"one refresh took {took_ms:.0f} ms"
            assert "Devices 1–100 of 20000" in browser.evaluate("document.getElementById('fleet-pager').textContent")
            assert "50 devices not heard from for over 7 days not shown" in browser.evaluate(
                "document.getElementById('fleet-hidden').textContent"
            )
            browser.evaluate("[...document.querySelectorAll('#fleet-pager button')][1].click(); true")
            assert browser.evaluate(
                WAIT_FOR_JS % "document.querySelector('.device-row')?.dataset.device === 'fake-00100'"
            )
        finally:
            browser.close()
    finally:
        _stop(server, thread)
    # Without an expiry every device is listed (and counted).
    assert store.device_counts(now) == (20_050, 0)


def test_long_result_lists_come_in_pages(store: DashboardStore, tmp_path: Path) -> None:
    t = time.time() - 1000
    for seq in range(70):
        store.add_result(make_result(seq=seq, level="urgent", reason=f"r{seq}"), t + seq)
    server, thread = _serve(store)
    try:
        summary = _get(server, "/api/summary")
        assert len(summary["attention"]) == 50 and summary["attention_total"] == 70
        assert summary["attention"][0]["seq"] == 0  # oldest first
        newest = _get(server, "/api/results?limit=50")["results"]
        older = _get(server, "/api/results?limit=50&offset=50")["results"]
        assert [r["seq"] for r in newest + older] == list(range(69, -1, -1))
        browser = PipeBrowser(tmp_path, server.url)
        try:
            more = browser.evaluate(WAIT_FOR_JS % "document.querySelector('#attention-body .more-row')?.textContent")
            assert "20 more waiting" in more
            assert browser.evaluate("document.getElementById('attention-count').textContent") == "(70)"
            browser.evaluate("[...document.querySelectorAll('#results-pager button')][1].click(); true")
            assert browser.evaluate(
                WAIT_FOR_JS % "document.querySelectorAll('.result-row').length === 20 && "
                "document.getElementById('results-pager').textContent.includes('Results 51–70')"
            )
        finally:
            browser.close()
    finally:
        _stop(server, thread)


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
