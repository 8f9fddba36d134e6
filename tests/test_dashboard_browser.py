"""The clinical dashboard end to end in a real browser: Playwright driving Debian's Chromium (no browser download).

One mosquitto (its defaults), one embedded ``edgemed dashboard`` (ingest + web, a child process on an SQLite file)
and one Chromium serve the whole module. A real ``edgemed run`` (the test's int8 model, real BreastMNIST images)
publishes through the broker into the dashboard's ingest while a reviewer watches the queue; the rest of the
issue's list follows: acknowledge and close audited with the reviewer's name, a viewer without buttons and with a
403, a user of site A who never sees site B (page, API, stream, export), a cross-origin POST refused, the session
cookie's flags (Secure under TLS), device-controlled markup rendered as text, repeated wrong passwords slowed, and
``audit verify`` naming an edited row. The test saves screenshots of the queue, the fleet view and the charts to
``docs/images/`` (the README shows them) and a copy under its temporary folder.

Order matters in one place: the slow-down test runs last, because failed logins also count against the address
(127.0.0.1) and would slow every later login of the module.
"""

from __future__ import annotations

import http.server
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest
from broker_fixtures import Mosquitto, Pki, free_port
from dashboard_helpers import HEALTH, make_result, wait_until
from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright
from web_helpers import PASSWORD, login, make_user, running_web

from edgemed.dashboard.store import DashboardStore

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "docs" / "images"
CHROMIUM = "/usr/bin/chromium"
SITE_A, SITE_B = "clinic-a", "clinic-b"
# A device-controlled string: the profile's reason for an urgent finding, published in every urgent result.
HOSTILE = '<img src=x onerror="window.__xss=1"><b>suspicious</b> - refer for biopsy today'
PROFILE = f"""
profile: browser-test
description: the browser test's device
validated: false
device:
  id: us-01
  site: clinic-a
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
      reason: '{HOSTILE}'
    benign:
      level: no_finding
      min_probability: 0.75
health:
  interval_s: 1
"""
USERS = {  # name: (role, sites)
    "ada": ("admin", None),
    "rita": ("reviewer", None),
    "victor": ("viewer", None),
    "sam": ("reviewer", {SITE_A}),
    "wanda": ("viewer", None),  # the slow-down test's target
}


@dataclass
class Rig:
    """What the module's tests share."""

    url: str
    db: Path
    store: DashboardStore
    broker: Mosquitto
    folder: Path
    browser: Browser
    contexts: list[BrowserContext] = field(default_factory=list)

    def page_as(self, name: str, path: str = "/queue") -> Page:
        """A new browser context logged in as ``name`` through the login form, at ``path``."""
        context = self.browser.new_context(viewport={"width": 1280, "height": 860})
        self.contexts.append(context)
        page = context.new_page()
        page.goto(f"{self.url}/login?next={path}")
        page.fill("input[name=name]", name)
        page.fill("input[name=password]", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url(f"{self.url}{path}")
        return page


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _seed_history(store: DashboardStore, now: float) -> None:
    """Two days of two sites' other devices (results, status, heartbeats): the charts have something to draw."""
    rng = np.random.default_rng(13)
    for site, device in ((SITE_A, "us-02"), (SITE_B, "us-11"), (SITE_B, "us-12")):
        store.set_status(site, device, {"state": "online", "model": "breast", "delegate": "cpu", "edgemed": "0.1.0"})
        for k, hour in enumerate(range(int(now // 3600) * 3600 - 47 * 3600, int(now), 3600)):
            for j in range(int(rng.integers(2, 8))):
                # Clear-cut benign frames, and one urgent and one inconclusive a device: the queue stays short.
                p = {(40, 0): 0.7, (44, 0): 0.3}.get((k, j), float(rng.choice([0.03, 0.08, 0.15])))
                level = "urgent" if p >= 0.4 else "inconclusive" if p > 0.25 else "no_finding"
                body = make_result(device_id=device, site=site, seq=k * 10 + j, level=level, label="benign")
                body["model"] = {"name": "breast", "version": "1", "sha256": "a" * 64, "target": "int8"}
                label = "malignant" if p >= 0.5 else "benign"
                body["prediction"] = {"label": label, "index": 0, "probabilities": {"malignant": p, "benign": 1 - p}}
                store.add_result(body, received_at=hour + 300.0 * j)
            health = {**HEALTH, "degraded": False, "degraded_reason": None, "pending": int(rng.integers(0, 5))}
            health.update(fps=round(float(rng.uniform(3, 8)), 2), cpu_percent=round(float(rng.uniform(20, 70)), 1))
            store.set_health(site, device, health, received_at=hour + 1800.0)


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    if not Path(CHROMIUM).exists():
        pytest.fail("the browser tests need Debian's Chromium: apt-get install -y chromium")
    folder = tmp_path_factory.mktemp("browser")
    broker = Mosquitto(folder / "broker", persistence=False, defaults=True).start()
    db = folder / "fleet.sqlite3"
    store = DashboardStore(db)
    _seed_history(store, time.time())
    for name, (role, sites) in USERS.items():
        make_user(store, name, role, sites)
    port = free_port()
    cmd = [sys.executable, "-m", "edgemed", "dashboard", "--broker", broker.url, "--db", str(db)]
    cmd += ["--port", str(port), "--client-id", "browser-test-dashboard"]
    log = (folder / "dashboard.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
        )
        rig = Rig(url, db, store, broker, folder, browser)
        try:
            up = wait_until(lambda: _answers(url + "/login"), 60)
            assert up, (folder / "dashboard.log").read_text(errors="replace")[-3000:]
            with login(url, "ada") as admin:
                subscribed = wait_until(lambda: admin.get("/api/summary").json()["ingest"]["subscribed"], 30)
            assert subscribed, (folder / "dashboard.log").read_text(errors="replace")[-3000:]
            yield rig
        finally:
            for context in rig.contexts:
                context.close()
            browser.close()
            _stop(proc)
            log.close()
            broker.stop()
            store.close()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def _images(data_dir: Path, folder: Path) -> Path:
    """Six malignant and six benign BreastMNIST test images (label 0 is malignant), as PNG files."""
    data = np.load(data_dir / "breastmnist_28.npz")
    labels = data["test_labels"].ravel()
    chosen = [*np.flatnonzero(labels == 0)[:6], *np.flatnonzero(labels == 1)[:6]]
    folder.mkdir()
    for i in chosen:
        cv2.imwrite(str(folder / f"scan{i:03d}.png"), data["test_images"][i])
    return folder


def _screenshot(page: Page, name: str, folder: Path) -> None:
    IMAGES.mkdir(parents=True, exist_ok=True)
    shot = folder / f"dashboard-{name}.png"
    page.screenshot(path=str(shot), full_page=True)
    shutil.copyfile(shot, IMAGES / shot.name)
    assert shot.stat().st_size > 10_000  # a real rendering, not a blank page


def _urgent_rows(store: DashboardStore) -> list[dict[str, Any]]:
    return [r for r in store.recent_results(level="urgent", limit=100) if r["device_id"] == "us-01"]


def _review(rig: Rig, result_id: str) -> dict[str, Any] | None:
    with sqlite3.connect(f"file:{rig.db}?mode=ro", uri=True, timeout=10) as con:
        con.row_factory = sqlite3.Row
        row = con.execute("SELECT * FROM reviews WHERE result_id = ?", (result_id,)).fetchone()
    return dict(row) if row is not None else None


def _row(page: Page, result_id: str) -> Any:
    return page.locator(f'[data-result-id="{result_id}"]')


def test_a_reviewer_sees_the_urgent_result_arrive_live_then_acknowledges_and_closes_it(
    rig: Rig, int8_model: Path, data_dir: Path, tmp_path: Path
) -> None:
    page = rig.page_as("rita", "/queue")
    page.evaluate("window.__sameDocument = true")  # gone if the page reloads or navigates
    profile = tmp_path / "device.yaml"
    profile.write_text(PROFILE)
    device = subprocess.Popen(
        [
            *(sys.executable, "-m", "edgemed", "run", "--profile", str(profile), "--model", str(int8_model)),
            *("--source", str(_images(data_dir, tmp_path / "scans")), "--broker", rig.broker.url),
            *("--device-id", "us-01", "--site", SITE_A, "--data-dir", str(tmp_path / "device"), "--quiet"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Poll the database and the page side by side: the first urgent result's time on screen after being stored.
        deadline, seen_at, urgent = time.monotonic() + 60, None, None
        while seen_at is None and time.monotonic() < deadline and device.poll() in (None, 0):
            rows = _urgent_rows(rig.store)
            if rows:
                urgent = min(rows, key=lambda r: r["received_at"])
                if _row(page, urgent["result_id"]).count():
                    seen_at = time.time()
            time.sleep(0.05)
        _, err = device.communicate(timeout=120)
    finally:
        if device.poll() is None:
            device.kill()
            device.wait(10)
    assert device.returncode == 0, err
    assert urgent is not None and seen_at is not None, (urgent, page.content()[:3000])
    assert seen_at - urgent["received_at"] <= 2.0, f"on screen {seen_at - urgent['received_at']:.2f} s after stored"
    assert page.evaluate("window.__sameDocument") is True  # it arrived without a reload
    _screenshot(page, "queue", tmp_path)

    rid = urgent["result_id"]
    _row(page, rid).get_by_role("button", name="Acknowledge").click()
    page.wait_for_load_state()
    assert wait_until(lambda: (_review(rig, rid) or {}).get("state") == "acknowledged", 5)
    row = _row(page, rid)
    row.locator("select[name=outcome]").select_option("referred")
    row.locator("[name=note]").fill("seen by the breast team today")
    row.get_by_role("button", name="Close").click()
    page.wait_for_load_state()
    assert wait_until(lambda: (_review(rig, rid) or {}).get("state") == "closed", 5)
    review = _review(rig, rid)
    assert review is not None
    assert (review["acked_by"], review["closed_by"], review["outcome"]) == ("rita", "rita", "referred")
    assert _row(page, rid).count() == 0  # closed: out of the queue

    audit = rig.page_as("ada", "/admin/audit")
    for action in ("acknowledged", "closed"):
        entry = audit.locator("tr", has_text=action).filter(has_text=rid[:8])
        assert entry.count() >= 1, audit.content()[:3000]
        assert "rita" in entry.first.inner_text()


def test_the_fleet_view_and_the_charts_show_what_runs_where(rig: Rig, tmp_path: Path) -> None:
    page = rig.page_as("rita", "/fleet")
    assert page.locator("text=us-01").count() >= 1 and page.locator("text=us-11").count() >= 1
    text = page.inner_text("main")
    assert "breast" in text  # the model the device runs
    _screenshot(page, "fleet", tmp_path)
    page.goto(f"{rig.url}/charts")
    assert page.locator("svg").count() >= 2  # triage mix per site over time, results per hour
    _screenshot(page, "charts", tmp_path)
    page.goto(f"{rig.url}/devices/{SITE_A}/us-02")
    assert page.locator("svg").count() >= 1  # fps, latency, CPU, pending over time


def test_device_controlled_markup_renders_as_text(rig: Rig) -> None:
    page = rig.page_as("rita", "/queue")
    rows = [r for r in _urgent_rows(rig.store) if (_review(rig, r["result_id"]) or {}).get("state") != "closed"]
    assert rows, "the device run left urgent results in the queue"
    row = _row(page, rows[0]["result_id"])
    assert HOSTILE in row.inner_text()  # the reason, characters and all
    assert row.locator("img").count() == 0 and row.locator("b").count() == 0
    page.goto(f"{rig.url}/results/{rows[0]['result_id']}")
    assert HOSTILE in page.inner_text("main")
    assert page.evaluate("typeof window.__xss") == "undefined"


def test_a_viewer_gets_no_button_and_a_403_from_the_api(rig: Rig) -> None:
    body = make_result(site=SITE_A, device_id="us-02", seq=9001, level="urgent", reason="for the viewer")
    rig.store.add_result(body)
    page = rig.page_as("victor", "/queue")
    row = _row(page, body["result_id"])
    row.wait_for(timeout=5000)
    assert row.locator("button").count() == 0 and row.locator("form").count() == 0
    with login(rig.url, "victor") as viewer:
        assert viewer.post(f"/api/results/{body['result_id']}/ack").status_code == 403
        assert viewer.post(f"/api/results/{body['result_id']}/close", json={"outcome": "seen"}).status_code == 403
    assert _review(rig, body["result_id"]) is None


def _stream_until(client: httpx.Client, wanted: str, after: Any, timeout_s: float = 10.0) -> str:
    """Everything ``/api/stream`` sends until a line naming ``wanted`` (``after()`` runs once the stream is open)."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    with client.stream("GET", "/api/stream", headers={"Accept": "text/event-stream"}) as answer:
        assert answer.status_code == 200
        after()
        for line in answer.iter_lines():
            seen.append(line)
            if wanted in line or time.monotonic() > deadline:
                break
    text = "\n".join(seen)
    assert wanted in text, f"the stream did not carry {wanted} within {timeout_s} s:\n{text[-2000:]}"
    return text


def test_a_user_of_site_a_never_sees_site_b(rig: Rig) -> None:
    mine = make_result(site=SITE_A, device_id="us-02", seq=9100, level="urgent", reason="site A only")
    theirs = make_result(site=SITE_B, device_id="us-11", seq=9100, level="urgent", reason="site B only")
    with login(rig.url, "sam") as sam:

        def store_both() -> None:
            rig.store.add_result(theirs)  # first: were it carried at all, it would come before the wanted one
            rig.store.add_result(mine)

        stream = _stream_until(sam, mine["result_id"], store_both)
        assert theirs["result_id"] not in stream and SITE_B not in stream
        for path in ("/api/results", "/api/queue", "/api/fleet", "/api/summary", "/api/drift"):
            answer = sam.get(path)
            assert answer.status_code == 200, (path, answer.text[:300])
            assert SITE_B not in answer.text and theirs["result_id"] not in answer.text, path
        assert mine["result_id"] in sam.get("/api/queue").text
        assert sam.get(f"/results/{theirs['result_id']}").status_code == 404
        assert sam.post(f"/api/results/{theirs['result_id']}/ack").status_code == 404
        assert sam.get("/api/results", params={"site": SITE_B}).status_code == 403
        until = time.time() + 60
        assert sam.get("/export/results", params={"site": SITE_B, "until": until, "format": "csv"}).status_code == 403
        export = sam.get("/export/results", params={"since": 0, "until": until, "format": "csv"})
        assert export.status_code == 200 and mine["result_id"] in export.text
        assert theirs["result_id"] not in export.text and SITE_B not in export.text
    page = rig.page_as("sam", "/queue")
    _row(page, mine["result_id"]).wait_for(timeout=5000)
    for path in ("/queue", "/fleet", "/charts"):
        page.goto(rig.url + path)
        assert SITE_B not in page.content() and "site B only" not in page.content(), path
    assert _review(rig, theirs["result_id"]) is None


class _Evil(http.server.BaseHTTPRequestHandler):
    """Another origin's page that POSTs an acknowledgement to the dashboard as soon as it loads (no CSRF token)."""

    target = ""

    def do_GET(self) -> None:
        body = (
            f'<form id="f" method="post" action="{self.target}"><input name="note" value="x"></form>'
            '<script>document.getElementById("f").submit()</script>'
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass  # quiet: the test reads the outcome from the database


def test_a_cross_origin_post_without_the_csrf_token_is_refused(rig: Rig) -> None:
    body = make_result(site=SITE_A, device_id="us-02", seq=9200, level="urgent", reason="cross-origin target")
    rig.store.add_result(body)
    ack = f"/api/results/{body['result_id']}/ack"
    page = rig.page_as("rita", "/queue")  # a logged-in reviewer's browser ...
    _Evil.target = rig.url + ack
    evil = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Evil)
    threading.Thread(target=evil.serve_forever, daemon=True).start()
    try:
        with page.expect_response(lambda r: r.url.startswith(rig.url + ack)) as posted:
            page.goto(f"http://127.0.0.1:{evil.server_address[1]}/")  # ... visits another site
        assert posted.value.status in (401, 403), posted.value.status
    finally:
        evil.shutdown()
        evil.server_close()
    with login(rig.url, "rita") as rita:
        without = httpx.Client(base_url=rig.url, cookies=rita.cookies, timeout=10)
        assert without.post(ack).status_code == 403  # the session cookie alone is not enough
        assert without.post(ack, headers={"Origin": "http://127.0.0.1:9"}).status_code == 403
        assert rita.post(ack, headers={"Origin": "http://127.0.0.1:9"}).status_code == 403  # a foreign origin
        without.close()
    assert _review(rig, body["result_id"]) is None


def test_the_session_cookie_carries_its_flags_and_secure_under_tls(rig: Rig, pki: Pki) -> None:
    page = rig.page_as("rita", "/queue")
    [cookie] = [c for c in page.context.cookies() if c["name"] == "edgemed_session"]
    assert (cookie["httpOnly"], cookie["sameSite"], cookie["secure"]) == (True, "Strict", False)
    assert "edgemed_session" not in page.evaluate("document.cookie")  # no script can read it
    with running_web(rig.store, tls_cert=pki.server_cert, tls_key=pki.server_key) as base:
        assert base.startswith("https://")
        context = rig.browser.new_context(ignore_https_errors=True)  # the test CA is not in Chromium's store
        rig.contexts.append(context)
        tls = context.new_page()
        tls.goto(f"{base}/login")
        tls.fill("input[name=name]", "rita")
        tls.fill("input[name=password]", PASSWORD)
        tls.click("button[type=submit]")
        tls.wait_for_url(f"{base}/queue")
        [secure] = [c for c in context.cookies() if c["name"] == "edgemed_session"]
        assert (secure["httpOnly"], secure["sameSite"], secure["secure"]) == (True, "Strict", True)


def test_audit_verify_names_an_edited_row(rig: Rig) -> None:
    verify = [sys.executable, "-m", "edgemed", "dashboard", "audit", "verify", "--db", str(rig.db)]
    held = subprocess.run(verify, capture_output=True, text=True, timeout=60)
    assert held.returncode == 0 and "audit chain holds" in held.stdout, held.stdout + held.stderr
    with sqlite3.connect(rig.db, timeout=10) as con:
        row_id, actor = con.execute(
            "SELECT id, actor FROM audit WHERE action = 'closed' ORDER BY id LIMIT 1"
        ).fetchone()
        con.execute("UPDATE audit SET actor = 'someone else' WHERE id = ?", (row_id,))
    broken = subprocess.run(verify, capture_output=True, text=True, timeout=60)
    with sqlite3.connect(rig.db, timeout=10) as con:
        con.execute("UPDATE audit SET actor = ? WHERE id = ?", (actor, row_id))
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert str(row_id) in broken.stdout + broken.stderr and "closed" in broken.stdout + broken.stderr
    assert subprocess.run(verify, capture_output=True, timeout=60).returncode == 0  # that edit was all it found


def test_repeated_wrong_passwords_are_slowed(rig: Rig) -> None:
    # Last in the module: failures count against 127.0.0.1 as well, slowing every later login from it.
    context = rig.browser.new_context()
    rig.contexts.append(context)
    page = context.new_page()
    statuses, errors = [], []
    for _ in range(5):
        page.goto(f"{rig.url}/login")
        page.fill("input[name=name]", "wanda")
        page.fill("input[name=password]", "not the password at all")
        with page.expect_response(lambda r: r.url.endswith("/login") and r.request.method == "POST") as answer:
            page.click("button[type=submit]")
        statuses.append(answer.value.status)
        errors.append(page.locator("[role=alert]").inner_text())
    assert statuses[:3] == [401, 401, 401] and 429 in statuses[3:], statuses
    assert "too many failed logins: wait" in errors[-1], errors
    with httpx.Client(base_url=rig.url, timeout=10) as http:  # even the right password waits its turn
        login_page = http.get("/login")
        token = login_page.text.split('name="csrf" value="', 1)[1].split('"', 1)[0]
        answer = http.post("/login", data={"name": "wanda", "password": PASSWORD, "csrf": token, "next": "/queue"})
    assert answer.status_code == 429 and int(answer.headers["Retry-After"]) >= 1
