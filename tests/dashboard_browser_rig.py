"""The rig of ``test_dashboard_browser.py``: a broker, an embedded dashboard, two days of history, users, Chromium.

``rig`` (module scope; import ``rig_fixture`` into the test module): one mosquitto with its defaults, one embedded
``edgemed dashboard`` (ingest + web) as a child process on an SQLite file, and one headless Chromium driven by
Playwright's sync API from Debian's ``/usr/bin/chromium`` (``executable_path``: nothing is downloaded). Before the
dashboard starts, the database gets users (``web_helpers.make_user``: the users API) and two days of three other
devices on two sites, built as a device builds them (``edgemed.envelope.build_result`` triaged by
``edgemed.triage.triage``) and reviewed through ``edgemed.dashboard.review``, so the charts, the fleet view and
the drift table have something to show. Site ``clinic-b`` sees more suspicious frames than the model's validation
mix: its drift is flagged.

Everything listens on 127.0.0.1; the dashboard is stopped by its own process group, the broker by its pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest
from broker_fixtures import Mosquitto, free_port
from dashboard_helpers import HEALTH, wait_until
from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright
from web_helpers import PASSWORD, login, make_user, secrets_for

from edgemed.dashboard import review
from edgemed.dashboard.store import DashboardStore
from edgemed.envelope import EnvelopeContext, build_result
from edgemed.triage import ClassRule, TriagePolicy, triage
from edgemed.types import Frame, Prediction, QualityReport

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "docs" / "images"
CHROMIUM = "/usr/bin/chromium"
SITE_A, SITE_B = "clinic-a", "clinic-b"
LABELS = ("malignant", "benign")  # the test model's labels
URGENT_REASON = "suspicious for malignancy - refer for biopsy assessment today"
#: The live device's profile (the demo's policy on the test model's labels); DEVICE_ID at SITE_A.
DEVICE_ID = "us-01"
PROFILE = f"""
profile: browser-test
description: the browser test's device
validated: false
device:
  id: {DEVICE_ID}
  site: {SITE_A}
inference:
  accelerator: cpu
  threads: 1
triage:
  min_confidence: 0.6
  min_margin: 0.1
  rules:
    malignant:
      level: urgent
      min_probability: 0.4
      reason: {URGENT_REASON}
    benign:
      level: no_finding
      min_probability: 0.75
health:
  interval_s: 1
"""
POLICY = TriagePolicy(
    min_confidence=0.6,
    min_margin=0.1,
    rules={
        "malignant": ClassRule(level="urgent", min_probability=0.4, reason=URGENT_REASON),
        "benign": ClassRule(level="no_finding", min_probability=0.75),
    },
)
USERS = {  # name: (role, sites)
    "ada": ("admin", None),
    "rita": ("reviewer", None),
    "victor": ("viewer", None),
    "sam": ("reviewer", {SITE_A}),
    "wanda": ("viewer", None),  # the slow-down test's target
}
#: The other devices: (site, device id, share of suspicious frames).
HISTORY = ((SITE_A, "us-02", 0.04), (SITE_B, "us-11", 0.2), (SITE_B, "us-12", 0.2))


@dataclass
class Rig:
    """What the module's tests share."""

    url: str
    db: Path
    store: DashboardStore
    broker: Mosquitto
    browser: Browser
    model: Path
    contexts: list[BrowserContext] = field(default_factory=list)
    console: list[str] = field(default_factory=list)

    def new_page(self, **options: Any) -> Page:
        """A page in a fresh browser context (no cookies); its console errors are kept in ``console``."""
        context = self.browser.new_context(viewport={"width": 1280, "height": 860}, **options)
        self.contexts.append(context)
        page = context.new_page()
        page.on("console", lambda msg: self.console.append(msg.text) if msg.type == "error" else None)
        return page

    def page_as(self, name: str, path: str = "/queue", base: str | None = None, **options: Any) -> Page:
        """A new browser context logged in as ``name`` through the login form, at ``path``."""
        base = base or self.url
        page = self.new_page(**options)
        page.goto(f"{base}/login?next={path}")
        page.fill("input[name=name]", name)
        page.fill("input[name=password]", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url(f"{base}{path}")
        return page


def _manifest(model: Path) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(next(model.parent.glob("*.manifest.json")).read_text())
    return found


def _seed_history(store: DashboardStore, model: Path, now: float) -> None:
    """Two days of the other devices: hourly results and heartbeats, their status, and reviews of what is older
    than 3 hours (so the queue holds the last hours' results)."""
    manifest = _manifest(model)
    sha256 = manifest["artifacts"][0]["sha256"]
    rng = np.random.default_rng(13)
    secrets = secrets_for(store)
    to_review = []
    for site, device, suspicious in HISTORY:
        status = {
            "state": "online",
            "device_id": device,
            "site": site,
            "delegate": "cpu",
            "degraded": device == "us-12",
        }
        status.update(model=manifest["name"], model_version=manifest["version"], model_sha256=sha256, edgemed="0.1.0")
        if manifest.get("reference") is not None:
            status["reference"] = manifest["reference"]
        store.set_status(site, device, status, received_at=now - 2 * 86400)
        ctx = EnvelopeContext(
            device_id=device,
            site=site,
            model={"name": manifest["name"], "version": manifest["version"], "sha256": sha256, "target": "int8"},
            preprocess_sha256="b" * 64,
            backend="ai_edge_litert",
            delegate="cpu",
            degraded=device == "us-12",
            stream=rng.bytes(8).hex(),
        )
        seq = 0
        for hour in range(int(now // 3600) * 3600 - 47 * 3600, int(now) - 600, 3600):
            for j in range(int(rng.integers(2, 8))):
                p = float(rng.uniform(0.55, 0.9) if rng.random() < suspicious else rng.choice([0.03, 0.08, 0.12, 0.3]))
                pred = Prediction(LABELS, (round(p, 4), round(1 - p, 4)))
                at = hour + 500.0 * j + float(rng.uniform(0, 400))
                if at > now - 60:
                    break  # the dashboard's clock never stamps the future
                body = build_result(
                    ctx,
                    frame=Frame(index=seq, source_kind="folder"),
                    seq=seq,
                    created_at=at - 0.4,
                    clock_synced=True,
                    session_id=None,
                    quality=QualityReport(True, 140.0, 0.5, 0.001),
                    prediction=pred,
                    triage=triage(pred, POLICY),
                    latency_ms={"preprocess": 0.3, "inference": 0.08, "total": 0.6},
                )
                store.add_result(body, received_at=at)
                if body["triage"]["level"] in ("urgent", "inconclusive") and at < now - 3 * 3600:
                    to_review.append((body["result_id"], at))
                seq += 1
            health = {**HEALTH, "degraded": device == "us-12", "awaiting_receipt": 0}
            health["pending"] = int(rng.integers(0, 5))
            if device != "us-12":
                health["degraded_reason"] = None
            health.update(fps=round(float(rng.uniform(3, 8)), 2), cpu_percent=round(float(rng.uniform(20, 70)), 1))
            health["latency_ms"] = {
                "p50": round(float(rng.uniform(3, 5)), 2),
                "p95": round(float(rng.uniform(6, 12)), 2),
            }
            store.set_health(site, device, health, received_at=hour + 1800.0)
        store.set_health(site, device, health, received_at=now - 5)  # online: its latest heartbeat is fresh
    for k, (result_id, at) in enumerate(to_review):
        who = ("dr.chen", "n.okafor")[k % 2]
        review.acknowledge(store, result_id, who, "127.0.0.1", secrets, at=at + 300)
        review.close(
            store, result_id, ("referred", "seen", "false_alarm")[k % 3], None, who, "127.0.0.1", secrets, at=at + 900
        )


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture(scope="module", name="rig")
def rig_fixture(tmp_path_factory: pytest.TempPathFactory, int8_model: Path) -> Iterator[Rig]:
    """The module's broker, dashboard, history, users and browser (see the module docstring)."""
    if not Path(CHROMIUM).exists():
        pytest.fail("the browser tests need Debian's Chromium: apt-get install -y chromium")
    folder = tmp_path_factory.mktemp("browser")
    broker = Mosquitto(folder / "broker", persistence=False, defaults=True).start()
    db = folder / "fleet.sqlite3"
    store = DashboardStore(db)
    _seed_history(store, int8_model, time.time())
    for name, (role, sites) in USERS.items():
        make_user(store, name, role, sites)
    port = free_port()
    cmd = [sys.executable, "-m", "edgemed", "dashboard", "--broker", broker.url, "--db", str(db)]
    cmd += ["--port", str(port), "--client-id", "browser-test-dashboard"]
    log_path = folder / "dashboard.log"
    with log_path.open("wb") as log, contextlib.ExitStack() as stack:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        stack.callback(_stop, proc)
        stack.callback(broker.stop)
        stack.callback(store.close)
        url = f"http://127.0.0.1:{port}"
        pw = stack.enter_context(sync_playwright())
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        stack.callback(browser.close)
        rig = Rig(url, db, store, broker, browser, int8_model)
        stack.callback(lambda: [context.close() for context in rig.contexts])
        assert wait_until(lambda: _answers(url + "/login"), 60), log_path.read_text(errors="replace")[-3000:]
        with login(url, "ada") as admin:
            subscribed = wait_until(lambda: admin.get("/api/summary").json()["ingest"]["subscribed"], 30)
        assert subscribed, log_path.read_text(errors="replace")[-3000:]
        yield rig


def images(data_dir: Path, folder: Path) -> Path:
    """Six malignant and six benign BreastMNIST test images (label 0 is malignant), as PNG files."""
    data = np.load(data_dir / "breastmnist_28.npz")
    labels = data["test_labels"].ravel()
    chosen = [*np.flatnonzero(labels == 0)[:6], *np.flatnonzero(labels == 1)[:6]]
    folder.mkdir()
    for i in chosen:
        cv2.imwrite(str(folder / f"scan{i:03d}.png"), data["test_images"][i])
    return folder


def screenshot(page: Page, name: str, folder: Path) -> None:
    """``dashboard-NAME.png`` of the whole page under ``folder`` and, with ``EDGEMED_UPDATE_SCREENSHOTS=1``, for the
    README in ``docs/images/`` (not on every run: a run would leave three tracked files changed)."""
    shot = folder / f"dashboard-{name}.png"
    page.screenshot(path=str(shot), full_page=True)
    if os.environ.get("EDGEMED_UPDATE_SCREENSHOTS") == "1":
        IMAGES.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, IMAGES / shot.name)
    assert shot.stat().st_size > 10_000  # a real rendering, not a blank page


def urgent_rows(store: DashboardStore, device_id: str = DEVICE_ID) -> list[dict[str, Any]]:
    """The urgent results of one device, newest first."""
    return [r for r in store.recent_results(level="urgent", limit=200) if r["device_id"] == device_id]


def review_of(rig: Rig, result_id: str) -> dict[str, Any] | None:
    """The ``reviews`` row of a result, read from the database file (None: new)."""
    with sqlite3.connect(f"file:{rig.db}?mode=ro", uri=True, timeout=10) as con:
        con.row_factory = sqlite3.Row
        row = con.execute("SELECT * FROM reviews WHERE result_id = ?", (result_id,)).fetchone()
    return dict(row) if row is not None else None


def row_of(page: Page, result_id: str) -> Any:
    """A result's row in the queue."""
    return page.locator(f'[data-result-id="{result_id}"]')
