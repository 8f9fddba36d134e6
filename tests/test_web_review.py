"""The review pages and API over HTTP, on a real uvicorn at 127.0.0.1: a viewer sees no button and gets 403 from
the API; a user limited to site A never sees site B in the queue, its fragment, the API, a result page or the
export; a POST without the CSRF token is refused; acknowledge and close work by form (303 back) and by JSON, with
the reviewer's name in the audit trail; an escalated result is highlighted; the export is streamed and audited;
the settings are admin only and audited; a device's markup renders as text.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from dashboard_helpers import make_result, make_study
from web_helpers import client, login, make_user, running_web, secrets_for

from edgemed.dashboard import audit, escalation, review_settings
from edgemed.dashboard.store import DashboardStore

A, B = "clinic-a", "clinic-b"
HOSTILE = '<img src=x onerror="alert(1)"><script>alert(2)</script>'


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One store and server for the module: results at two sites, one escalated, and four users."""
    store = DashboardStore(tmp_path_factory.mktemp("web-review") / "fleet.sqlite3")
    ids: dict[str, str] = {}
    for key, body, at in (
        ("a_urgent", make_result(site=A, seq=1, level="urgent", reason="malignant 0.91"), 1000.0),
        ("a_hostile", make_result(site=A, seq=2, level="inconclusive", reason=HOSTILE, label=HOSTILE), 1100.0),
        ("a_escalated", make_result(site=A, seq=3, level="urgent", reason="escalated one"), 900.0),
        ("b_urgent", make_result(site=B, seq=4, level="urgent", reason="site b secret", device_id="xr-b"), 1000.0),
        ("a_routine", make_result(site=A, seq=5, level="routine"), 1200.0),
    ):
        store.add_result(body, at)
        ids[key] = body["result_id"]
    study = make_study(site=B)
    store.add_study(study, 1050.0)
    ids["b_study"] = study["result_id"]
    keys = secrets_for(store)
    review_settings.save(store, keys, actor="setup", address=None, escalate_after_min=15, webhook_url=None, at=1.0)
    # Only the oldest of clinic-a is due at this clock: it is claimed, as the web process's thread would.
    assert escalation.claim_due(store, keys, 900.0 + 16 * 60, 15, webhook=False) == [ids["a_escalated"]]
    make_user(store, "vera", "viewer")
    make_user(store, "rita", "reviewer", sites={A})
    make_user(store, "rob", "reviewer")
    make_user(store, "ada", "admin")
    with running_web(store) as base:
        yield {"store": store, "base": base, "ids": ids}
    store.close()


def _rows(html: str) -> list[str]:
    return re.findall(r'data-result-id="([0-9a-f]+)"', html)


def test_a_viewer_sees_the_queue_without_buttons_and_gets_403_from_the_api(site: dict[str, Any]) -> None:
    ids = site["ids"]
    with login(site["base"], "vera") as vera:
        page = vera.get("/queue")
        assert page.status_code == 200 and ids["b_urgent"] in _rows(page.text)
        assert "Acknowledge</button>" not in page.text and "/ack" not in page.text
        for path in (f"/api/results/{ids['a_urgent']}/ack", f"/api/results/{ids['a_urgent']}/close"):
            answer = vera.post(path, json={"outcome": "seen"})
            assert answer.status_code == 403 and "needs the reviewer role" in answer.json()["error"]
        assert vera.get("/export").status_code == 403
        assert vera.get("/export/results").status_code == 403
        assert vera.get("/admin/settings").status_code == 403
        assert "Acknowledge" not in vera.get(f"/results/{ids['a_urgent']}").text
    assert site["store"]._count("SELECT count(*) FROM reviews") == 0


def test_nobody_logged_in_is_sent_to_the_login_or_gets_401(site: dict[str, Any]) -> None:
    with client(site["base"]) as anonymous:
        page = anonymous.get("/queue")
        assert page.status_code == 303 and page.headers["location"].startswith("/login?next=")
        assert anonymous.get("/api/queue").status_code == 401
        assert anonymous.get("/fragments/queue").status_code == 401


def test_a_site_a_user_never_sees_site_b(site: dict[str, Any]) -> None:
    ids = site["ids"]
    with login(site["base"], "rita") as rita:
        page = rita.get("/queue").text
        fragment = rita.get("/fragments/queue").text
        api = rita.get("/api/queue").json()
        for text in (page, fragment, json.dumps(api)):
            assert B not in text and "site b secret" not in text and ids["b_urgent"] not in text
        assert set(_rows(page)) == set(_rows(fragment)) == {ids["a_urgent"], ids["a_hostile"], ids["a_escalated"]}
        assert set(api["counts"]) == {A} and {r["site"] for r in api["rows"]} == {A}
        assert rita.get("/api/queue", params={"site": B}).status_code == 403
        assert rita.get("/queue", params={"site": B}).status_code == 403
        for rid in (ids["b_urgent"], ids["b_study"]):
            assert rita.get(f"/results/{rid}").status_code == 404
            answer = rita.post(f"/api/results/{rid}/ack")
            assert answer.status_code == 404 and "not one of your sites" in answer.json()["error"]
        export = rita.get("/export/results", params={"since": "1970-01-01", "until": "1970-01-02"})
        assert export.status_code == 200 and B not in export.text and ids["b_urgent"] not in export.text
        assert {r["site"] for r in csv.DictReader(io.StringIO(export.text))} == {A}
        assert rita.get("/export/results", params={"site": B}).status_code == 403
        assert B not in rita.get("/export").text


def test_a_post_without_the_csrf_token_is_refused(site: dict[str, Any]) -> None:
    rid = site["ids"]["a_urgent"]
    with login(site["base"], "rob") as rob:
        bare = httpx.post(f"{site['base']}/api/results/{rid}/ack", cookies=rob.cookies, json={})
        assert bare.status_code == 403 and "CSRF" in bare.json()["error"]
        wrong = rob.post(f"/api/results/{rid}/ack", headers={"X-CSRF-Token": "0" * 43}, json={})
        assert wrong.status_code == 403
        form = httpx.post(f"{site['base']}/admin/settings", cookies=rob.cookies, data={"escalate_after_min": "1"})
        assert form.status_code == 403
    assert site["store"]._count("SELECT count(*) FROM reviews") == 0


def test_acknowledge_and_close_by_form_and_by_json_with_the_name_in_the_audit(site: dict[str, Any]) -> None:
    store, ids = site["store"], site["ids"]
    with login(site["base"], "rita") as rita:
        rid = ids["a_urgent"]
        shown = rita.get(f"/results/{rid}").text
        assert "Acknowledge</button>" in shown
        # A form (no JavaScript): 303 back to where it came from.
        done = rita.post(f"/api/results/{rid}/ack", data={"csrf": rita.csrf, "next": "/queue"})
        assert done.status_code == 303 and done.headers["location"] == "/queue"
        again = rita.post(f"/api/results/{rid}/ack", data={"csrf": rita.csrf, "next": "/queue"})
        assert again.status_code == 409 and "already acknowledged by rita" in again.text
        queue = rita.get("/queue").text
        assert "acknowledged by rita" in queue
        bad = rita.post(f"/api/results/{rid}/close", json={"outcome": "cured"})
        assert bad.status_code == 400 and "is not one of referred, seen, false_alarm, other" in bad.json()["error"]
        closed = rita.post(f"/api/results/{rid}/close", json={"outcome": "false_alarm", "note": "artefact"})
        assert closed.status_code == 200 and closed.json()["review"]["closed_by"] == "rita"
        assert rita.post(f"/api/results/{rid}/close", json={"outcome": "seen"}).status_code == 409
        assert rid not in _rows(rita.get("/queue").text)
        page = rita.get(f"/results/{rid}").text
        assert "Closed by <strong>rita</strong>" in page and "false alarm" in page and "artefact" in page
        routine = rita.post(f"/api/results/{ids['a_routine']}/ack", json={})
        assert routine.status_code == 409
    trail = [(r["action"], r["actor"], r["target"]) for r in audit.rows(store, limit=50)]
    assert ("acknowledged", "rita", ids["a_urgent"]) in trail and ("closed", "rita", ids["a_urgent"]) in trail
    assert audit.verify(store, secrets_for(store).audit_key).ok


def test_an_escalated_result_is_highlighted_and_device_markup_is_text(site: dict[str, Any]) -> None:
    ids = site["ids"]
    with login(site["base"], "rob") as rob:
        page = rob.get("/queue").text
        row = re.search(rf'<tr class="([^"]*)" data-result-id="{ids["a_escalated"]}"', page)
        assert row is not None and "escalated" in row.group(1).split()
        assert '<span class="badge escalated">escalated</span>' in page
        assert rob.get("/api/queue").json()["counts"][A]["escalated"] == 1
        plain = re.search(rf'<tr class="([^"]*)" data-result-id="{ids["b_urgent"]}"', page)
        assert plain is not None and "escalated" not in plain.group(1).split()
        for text in (page, rob.get(f"/results/{ids['a_hostile']}").text):
            assert "<script>alert(2)</script>" not in text and '<img src=x onerror="alert(1)">' not in text
            assert "&lt;script&gt;alert(2)&lt;/script&gt;" in text
        detail = rob.get(f"/results/{ids['a_escalated']}").text
        assert '<span class="badge escalated">escalated</span>' in detail and "no webhook set" in detail
        assert "prediction.probabilities.malignant" in detail  # what the device published, field by field


def test_the_export_is_streamed_in_both_formats_and_audited(site: dict[str, Any]) -> None:
    store = site["store"]
    with login(site["base"], "rob") as rob:
        params = {"since": "1970-01-01", "until": "1970-01-01", "site": A, "format": "jsonl"}
        answer = rob.get("/export/results", params=params)
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("application/x-ndjson")
        assert (
            'filename="edgemed-results-clinic-a-1970-01-01-1970-01-02.jsonl"' in answer.headers["content-disposition"]
        )
        lines = [json.loads(line) for line in answer.text.splitlines()]
        assert len(lines) == 4 and {r["site"] for r in lines} == {A}
        everything = rob.get("/export/results", params={"since": "1970-01-01", "until": "1970-01-01"})
        assert len(list(csv.DictReader(io.StringIO(everything.text)))) == 6
        assert rob.get("/export/results", params={"format": "xml"}).status_code == 400
        assert rob.get("/export/results", params={"since": "yesterday"}).status_code == 400
    exports = [r for r in audit.rows(store, limit=50, action="export_results") if r["actor"] == "rob"]
    assert len(exports) == 2
    details = sorted((json.loads(r["detail"]) for r in exports), key=lambda d: d["rows"])
    assert details[0] == {
        "since": "1970-01-01T00:00:00.000Z",
        "until": "1970-01-02T00:00:00.000Z",
        "format": "jsonl",
        "rows": 4,
        "sites": [A],
    }
    assert details[1]["rows"] == 6 and details[1]["sites"] is None and details[1]["format"] == "csv"


def test_an_export_period_beyond_the_calendar_is_a_clear_400(site: dict[str, Any]) -> None:
    with login(site["base"], "rob") as rob:
        for params in ({"until": "9999-12-31"}, {"since": "0001-01-01T00:00:00+05:00", "until": "1970-01-01"}):
            answer = rob.get("/export/results", params=params)
            assert answer.status_code == 400, (params, answer.status_code, answer.text[:200])
            assert "0001-01-01" in answer.text and "9999-12-30" in answer.text


def test_settings_are_admin_only_checked_and_audited(site: dict[str, Any]) -> None:
    store = site["store"]
    with login(site["base"], "rob") as rob:
        assert rob.get("/admin/settings").status_code == 403
        assert rob.post("/admin/settings", data={"escalate_after_min": "5", "csrf": rob.csrf}).status_code == 403
    with login(site["base"], "ada") as ada:
        form = ada.get("/admin/settings")
        assert form.status_code == 200 and 'value="15"' in form.text
        bad = ada.post("/admin/settings", data={"csrf": ada.csrf, "escalate_after_min": "5", "webhook_url": "ftp://x"})
        assert bad.status_code == 400 and "must start with http:// or https://" in bad.text
        url = "https://hooks.example.org/T0KEN"
        ok = ada.post("/admin/settings", data={"csrf": ada.csrf, "escalate_after_min": "5", "webhook_url": url})
        assert ok.status_code == 303 and ok.headers["location"] == "/admin/settings?saved=1"
        assert "Saved." in ada.get("/admin/settings?saved=1").text
    assert review_settings.load(store) == review_settings.ReviewSettings(5, url)
    [row] = [r for r in audit.rows(store, limit=50, action="settings_changed") if r["actor"] == "ada"]
    assert "T0KEN" not in row["detail"] and "https://hooks.example.org" in row["detail"]
    review_settings.save(store, secrets_for(store), actor="setup", address=None, escalate_after_min=15, webhook_url="")


def test_every_review_template_is_free_of_inline_script_and_style() -> None:
    folder = Path(__file__).parent.parent / "edgemed" / "dashboard" / "web" / "templates"
    for name in ("queue.html", "queue_fragment.html", "result.html", "settings.html", "export.html"):
        text = (folder / name).read_text()
        assert "<script" not in text and "<style" not in text and "style=" not in text, name
        assert re.search(r"\bon[a-z]+=", text) is None, name


def test_a_huge_device_reason_is_shortened_in_the_queue(tmp_path: Path) -> None:
    # Twenty thousand characters in one cell took a browser seconds to lay out (the old page's test, kept).
    store = DashboardStore(tmp_path / "fleet.sqlite3")
    try:
        make_user(store, "rita", "reviewer")
        store.add_result(make_result(level="urgent", reason="x" * 20_000))
        with running_web(store) as base, login(base, "rita") as http:
            html = http.get("/fragments/queue").text
        assert "x" * 300 + "… (shortened: 20,000 characters)" in html and "x" * 301 not in html
    finally:
        store.close()
