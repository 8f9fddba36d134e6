"""The clinical dashboard end to end in a real browser: Playwright driving Debian's Chromium (no browser download).

The rig (``dashboard_browser_rig.py``: one mosquitto with its defaults, one embedded ``edgemed dashboard`` as a child
process, two days of history, users, one Chromium) serves the whole module. A real ``edgemed run`` (the test's int8
model, real BreastMNIST images) publishes through the broker into the dashboard's ingest while a reviewer watches
the queue; then the rest of the issue's list: acknowledge and close audited with the reviewer's name, a viewer
without buttons and with a 403, a user of site A who never sees site B (page, API, stream, export), a cross-origin
POST refused, the session cookie's flags (Secure under TLS), markup a device publishes rendered as text, ``audit
verify`` naming an edited row, repeated wrong passwords slowed. The test saves screenshots of the queue, the fleet
view and the charts under its temporary folder, and with ``EDGEMED_UPDATE_SCREENSHOTS=1`` to ``docs/images/``
(the README shows them).

The slow-down test runs last: failed logins also count against the address (127.0.0.1) and would slow every later
login of the module.
"""

from __future__ import annotations

import http.server
import json
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as paho
from broker_fixtures import Pki
from dashboard_browser_rig import (
    DEVICE_ID,
    PROFILE,
    SITE_A,
    SITE_B,
    Rig,
    images,
    review_of,
    rig_fixture,  # noqa: F401  # the rig fixture
    row_of,
    screenshot,
    urgent_rows,
)
from dashboard_helpers import make_result, wait_until
from web_helpers import PASSWORD, login, login_csrf, running_web

from edgemed.envelope import EnvelopeContext, build_result, encode
from edgemed.types import Frame, Prediction, TriageResult

# Device-controlled strings: a reason for a finding (a profile's text) and the name of the model it runs.
HOSTILE = '<img src=x onerror="window.__xss=1"><b>suspicious</b> - refer today'
HOSTILE_MODEL = "<script>window.__xss=2</script>breast"


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
            *("--source", str(images(data_dir, tmp_path / "scans")), "--broker", rig.broker.url),
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
            rows = urgent_rows(rig.store)
            if rows:
                urgent = min(rows, key=lambda r: r["received_at"])
                if row_of(page, urgent["result_id"]).count():
                    seen_at = time.time()
            time.sleep(0.05)
        _, err = device.communicate(timeout=120)
    finally:
        if device.poll() is None:
            device.kill()
            device.wait(10)
    assert device.returncode == 0, err
    assert urgent is not None and seen_at is not None, (urgent, page.inner_text("main"))
    assert seen_at - urgent["received_at"] <= 2.0, f"on screen {seen_at - urgent['received_at']:.2f} s after stored"
    assert page.evaluate("window.__sameDocument") is True  # it arrived without a reload
    screenshot(page, "queue", tmp_path)

    rid = urgent["result_id"]
    row_of(page, rid).get_by_role("button", name="Acknowledge").click()
    page.wait_for_load_state()
    assert wait_until(lambda: (review_of(rig, rid) or {}).get("state") == "acknowledged", 5)
    assert "acknowledged by rita" in row_of(page, rid).inner_text()
    row_of(page, rid).locator("a").first.click()  # the result's own page: close it there, with a note
    page.wait_for_url(f"{rig.url}/results/{rid}")
    page.locator("select[name=outcome]").select_option("referred")
    page.locator("textarea[name=note]").fill("seen by the breast team today")
    page.get_by_role("button", name="Close").click()
    page.wait_for_load_state()
    assert wait_until(lambda: (review_of(rig, rid) or {}).get("state") == "closed", 5)
    assert "Closed by rita" in page.inner_text("main") and "seen by the breast team today" in page.inner_text("main")
    page.goto(f"{rig.url}/queue")
    review = review_of(rig, rid)
    assert review is not None
    assert (review["acked_by"], review["closed_by"], review["outcome"]) == ("rita", "rita", "referred")
    assert row_of(page, rid).count() == 0  # closed: out of the queue

    audit = rig.page_as("ada", "/admin/audit")
    for action in ("acknowledged", "closed"):
        entry = audit.locator("tr", has_text=action).filter(has_text=rid[:8])
        assert entry.count() >= 1, audit.content()[:3000]
        assert "rita" in entry.first.inner_text()


def test_the_fleet_view_and_the_charts_show_what_runs_where(rig: Rig, tmp_path: Path) -> None:
    page = rig.page_as("rita", "/fleet")
    text = page.inner_text("main")
    for device in (DEVICE_ID, "us-02", "us-11", "us-12"):
        assert device in text
    manifest = json.loads(next(rig.model.parent.glob("*.manifest.json")).read_text())
    assert manifest["name"] in text and manifest["artifacts"][0]["sha256"][:12] in text  # what runs there
    screenshot(page, "fleet", tmp_path)
    page.goto(f"{rig.url}/charts")
    assert page.locator("svg").count() >= 2  # triage mix per site over time, results per hour
    screenshot(page, "charts", tmp_path)
    page.goto(f"{rig.url}/devices/{SITE_A}/us-02")
    assert page.locator("svg").count() >= 1  # fps, latency, CPU, pending over time
    assert not [m for m in rig.console if "Content Security Policy" in m], rig.console  # scripts and styles obey


def _publish_as_a_device(rig: Rig, device_id: str) -> dict[str, Any]:
    """A device at SITE_A whose status names HOSTILE_MODEL and whose urgent result's reason is HOSTILE, published
    through the broker (QoS 1, the status retained) as its runtime would."""
    ctx = EnvelopeContext(
        device_id=device_id,
        site=SITE_A,
        model={"name": HOSTILE_MODEL, "version": "1", "sha256": "c" * 64, "target": "int8"},
        preprocess_sha256="b" * 64,
        backend="ai_edge_litert",
        delegate="cpu",
        degraded=False,
        stream="0123456789abcdef",
    )
    body = build_result(
        ctx,
        frame=Frame(index=0, source_kind="folder"),
        seq=0,
        created_at=time.time(),
        clock_synced=True,
        session_id=None,
        quality=None,
        prediction=Prediction(("malignant", "benign"), (0.8, 0.2)),
        triage=TriageResult("urgent", HOSTILE, {"label": "malignant", "basis": "urgent_threshold"}),
        latency_ms={"total": 1.0},
    )
    status = {"state": "online", "device_id": device_id, "site": SITE_A, "model": HOSTILE_MODEL, "delegate": "cpu"}
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"browser-test-{device_id}")
    client.connect("127.0.0.1", rig.broker.port)
    client.loop_start()
    try:
        topic = f"edgemed/{SITE_A}/{device_id}"
        client.publish(f"{topic}/status", json.dumps(status), qos=1, retain=True).wait_for_publish(10)
        client.publish(f"{topic}/results", encode(body), qos=1).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()
    assert wait_until(lambda: bool(urgent_rows(rig.store, device_id)), 10)
    return body


def test_markup_a_device_publishes_renders_as_text(rig: Rig) -> None:
    body = _publish_as_a_device(rig, "us-09")
    page = rig.page_as("rita", "/queue")
    row = row_of(page, body["result_id"])
    assert HOSTILE in row.inner_text()  # the reason, characters and all
    assert row.locator("img").count() == 0 and row.locator("b").count() == 0
    page.goto(f"{rig.url}/results/{body['result_id']}")
    assert HOSTILE in page.inner_text("main")
    assert wait_until(lambda: "us-09" in str(rig.store.fleet()), 10)
    page.goto(rig.url + "/fleet")
    assert HOSTILE_MODEL in page.inner_text("main")  # the model it says it runs
    assert page.locator("main script").count() == 0
    assert page.evaluate("typeof window.__xss") == "undefined"


def test_a_viewer_gets_no_button_and_a_403_from_the_api(rig: Rig) -> None:
    body = make_result(site=SITE_A, device_id="us-02", seq=9001, level="urgent", reason="for the viewer")
    rig.store.add_result(body)
    page = rig.page_as("victor", "/queue")
    row = row_of(page, body["result_id"])
    row.wait_for(timeout=5000)
    assert row.locator("button").count() == 0 and row.locator("form").count() == 0
    with login(rig.url, "victor") as viewer:
        assert viewer.post(f"/api/results/{body['result_id']}/ack").status_code == 403
        assert viewer.post(f"/api/results/{body['result_id']}/close", json={"outcome": "seen"}).status_code == 403
    assert review_of(rig, body["result_id"]) is None


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


def _iso(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


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
        assert sam.get("/api/queue", params={"site": SITE_B}).status_code == 403
        period = {"since": _iso(time.time() - 7 * 86400), "until": _iso(time.time() + 60), "format": "csv"}
        assert sam.get("/export/results", params={**period, "site": SITE_B}).status_code == 403
        export = sam.get("/export/results", params=period)
        assert export.status_code == 200 and mine["result_id"] in export.text
        assert theirs["result_id"] not in export.text and SITE_B not in export.text
    page = rig.page_as("sam", "/queue")
    row_of(page, mine["result_id"]).wait_for(timeout=5000)
    for path in ("/queue", "/fleet", "/charts"):
        page.goto(rig.url + path)
        assert SITE_B not in page.content() and "site B only" not in page.content(), path
    assert review_of(rig, theirs["result_id"]) is None


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
    assert review_of(rig, body["result_id"]) is None


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


def test_audit_verify_names_an_editedrow_of(rig: Rig) -> None:
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
    # The waits are short at first (1 s, then 2 s, from the last counted failure), so on a loaded machine an attempt
    # may arrive after one has passed and be checked (401) again: try until the page shows the wait, boundedly.
    for _ in range(8):
        page.goto(f"{rig.url}/login")
        page.fill("input[name=name]", "wanda")
        page.fill("input[name=password]", "not the password at all")
        with page.expect_response(lambda r: r.url.endswith("/login") and r.request.method == "POST") as answer:
            page.click("button[type=submit]")
        statuses.append(answer.value.status)
        errors.append(page.locator("[role=alert]").inner_text())
        if statuses[-1] == 429:
            break
    assert statuses[:3] == [401, 401, 401] and statuses[-1] == 429, statuses
    assert set(statuses) <= {401, 429}, statuses
    assert "too many failed logins: wait" in errors[-1], errors
    with httpx.Client(base_url=rig.url, timeout=10) as http:

        def attempt(password: str) -> httpx.Response:
            token = login_csrf(http)
            return http.post("/login", data={"name": "wanda", "password": password, "csrf": token, "next": "/queue"})

        # Sit out each short wait and fail again until the wait is long enough (>= 4 s) that the right password,
        # sent straight after, surely lands inside it however slow this machine is.
        waits: list[tuple[int, int]] = []
        for _ in range(12):
            answer = attempt("not the password at all")
            retry_after = int(answer.headers.get("Retry-After", "0"))
            waits.append((answer.status_code, retry_after))
            assert answer.status_code in (401, 429), waits
            if answer.status_code == 429 and retry_after >= 4:
                break
            if answer.status_code == 429:
                time.sleep(retry_after + 0.1)
        assert waits[-1][0] == 429 and waits[-1][1] >= 4, waits
        answer = attempt(PASSWORD)  # even the right password waits its turn
    assert answer.status_code == 429 and int(answer.headers["Retry-After"]) >= 1, answer.status_code
