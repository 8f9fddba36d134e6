"""The fleet view, charts, device page and drift API on a real uvicorn: each limited to the user's sites, device
strings rendered as text, charts as well-formed SVG without inline style."""

from __future__ import annotations

import json
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from dashboard_helpers import HEALTH, make_result
from web_helpers import client, login, make_user, running_web

from edgemed.dashboard.store import DashboardStore
from edgemed.dashboard.validate import classify

HOSTILE = '<script>alert("pwned")</script>'
HOSTILE_ID = "<img src=x onerror=alert(1)>"
EVEN = {"n": 200, "class_mix": {"benign": 0.5, "malignant": 0.5}, "mean_confidence": 0.9, "split": "test"}
_SVG = re.compile(r"<svg\b.*?</svg>", re.S)


def _status(model: str, version: str = "4") -> dict[str, Any]:
    return {"state": "online", "delegate": "cpu", "degraded": True, "model": model, "model_version": version,
            "model_sha256": "ab" * 32, "edgemed": HOSTILE, "reference": EVEN}  # fmt: skip


@pytest.fixture
def base(tmp_path: Path) -> Iterator[tuple[str, DashboardStore]]:
    store = DashboardStore(tmp_path / "fleet.sqlite3")
    now = time.time()
    store.set_status("clinic-a", "us-01", _status("breast-cnn"), now)
    store.set_health("clinic-a", "us-01", HEALTH, now - 120)
    store.set_health("clinic-a", "us-01", {**HEALTH, "fps": 3.0}, now)
    store.set_status("clinic-a", HOSTILE_ID, {**_status(HOSTILE), "reference": None}, now)
    store.set_status("clinic-b", "us-09", _status("secret-b-model"), now)
    bodies = [make_result(site="clinic-a", seq=i, label="benign", level="urgent" if i % 5 == 0 else "routine")
              for i in range(40)]  # fmt: skip
    bodies += [make_result(site="clinic-b", device_id="us-09", seq=i, label="malignant") for i in range(5)]
    filings = [classify(f"edgemed/{b['site']}/{b['device_id']}/results", json.dumps(b).encode()) for b in bodies]
    store.file(filings, received_at=now - 1800)
    make_user(store, "ana", "viewer", sites={"clinic-a"})
    make_user(store, "root", "admin")
    with running_web(store) as url:
        yield url, store
    store.close()


def _page_checks(answer: Any) -> str:
    assert answer.status_code == 200, answer.text[:300]
    assert "default-src 'none'" in answer.headers["content-security-policy"]
    text: str = answer.text
    assert " style=" not in text and "<style" not in text
    assert HOSTILE not in text and HOSTILE_ID not in text  # never as markup
    for svg in _SVG.findall(text):
        root = ET.fromstring(svg)  # well-formed
        assert all("style" not in el.attrib for el in root.iter())
    return text


def test_the_fleet_view_shows_what_runs_where_at_the_users_sites_only(base: tuple[str, DashboardStore]) -> None:
    url, _ = base
    with login(url, "ana") as ana, login(url, "root") as root:
        page = _page_checks(ana.get("/fleet"))
        assert 'data-fragment="/fragments/fleet"' in page
        assert "us-01" in page and "breast-cnn" in page and "abababababab" in page and ">4<" in page
        assert "&lt;script&gt;alert(&#34;pwned&#34;)&lt;/script&gt;" in page  # the device's strings, as text
        assert quote(HOSTILE_ID, safe="") in page and "&lt;img src=x onerror=alert(1)&gt;" in page
        assert "degraded" in page and "online" in page
        assert "clinic-b" not in page and "us-09" not in page and "secret-b-model" not in page
        assert '<span class="badge drift">drift</span>' in page and "as validated" not in page  # all benign
        fragment = _page_checks(ana.get("/fragments/fleet"))
        assert "<html" not in fragment and "us-01" in fragment and "clinic-b" not in fragment
        everything = _page_checks(root.get("/fleet"))
        assert "us-09" in everything and "secret-b-model" in everything


def test_drift_is_flagged_per_site_and_model_and_filtered(base: tuple[str, DashboardStore]) -> None:
    url, _ = base
    with login(url, "ana") as ana, login(url, "root") as root:
        rows = ana.get("/api/drift").json()["rows"]
        assert [(r["site"], r["model"], r["status"]) for r in rows] == [("clinic-a", "breast-cnn", "drift")]
        assert rows[0]["n"] == 40 and rows[0]["class_mix"] == {"benign": 1.0} and rows[0]["flagged"] is True
        assert ana.get("/api/drift?site=clinic-b").status_code == 403
        every = {(r["site"], r["model"], r["status"]) for r in root.get("/api/drift").json()["rows"]}
        # clinic-b's results name breast-cnn, for which no device there published a reference; its device's
        # own model has a reference and no results yet.
        assert every == {
            ("clinic-a", "breast-cnn", "drift"),
            ("clinic-b", "breast-cnn", "no_reference"),
            ("clinic-b", "secret-b-model", "too_few"),
        }
        page = _page_checks(root.get("/fragments/fleet"))
        assert "1 flagged" in page and "too few results" in page and "no validation reference" in page
    with client(url) as anonymous:
        assert anonymous.get("/api/drift").status_code == 401
        answer = anonymous.get("/fleet")
        assert answer.status_code == 303 and answer.headers["location"] == "/login?next=%2Ffleet"


def test_charts_show_only_the_users_sites(base: tuple[str, DashboardStore]) -> None:
    url, _ = base
    with login(url, "ana") as ana, login(url, "root") as root:
        page = _page_checks(ana.get("/charts?days=1"))
        svgs = _SVG.findall(page)
        assert len(svgs) == 2  # results per hour, and clinic-a's triage mix
        assert "Triage mix at clinic-a" in page and "clinic-b" not in page
        assert "urgent" in svgs[1] and "routine" in svgs[1]
        assert ana.get("/charts?site=clinic-b").status_code == 403
        assert ana.get("/charts?days=many").status_code == 400
        assert len(_SVG.findall(_page_checks(root.get("/charts")))) == 3
        only_b = _page_checks(root.get("/charts?site=clinic-b&days=7"))
        assert "Triage mix at clinic-b" in only_b and "Triage mix at clinic-a" not in only_b


def test_a_devices_page_draws_its_heartbeats_and_hides_other_sites(base: tuple[str, DashboardStore]) -> None:
    url, _ = base
    with login(url, "ana") as ana, login(url, "root") as root:
        page = _page_checks(ana.get("/devices/clinic-a/us-01"))
        assert len(_SVG.findall(page)) == 4 and "Frames per second" in page and "ab" * 32 in page
        assert "No data in this period" not in page.split("Frames per second")[1].split("</svg>")[0]
        _page_checks(ana.get("/devices/clinic-a/us-01?hours=720"))  # from the hourly rows
        hostile = _page_checks(ana.get(f"/devices/clinic-a/{quote(HOSTILE_ID, safe='')}"))
        assert "&lt;img src=x onerror=alert(1)&gt;" in hostile
        other = ana.get("/devices/clinic-b/us-09")
        assert other.status_code == 404 and "us-09" in other.text  # as if it did not exist
        assert ana.get("/devices/clinic-a/nope").status_code == 404
        assert ana.get("/devices/clinic-a/us-01?hours=-1").status_code == 400
        assert root.get("/devices/clinic-b/us-09").status_code == 200
