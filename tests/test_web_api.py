"""The JSON API on a real uvicorn: login required, limited to the user's sites, finite JSON, checked parameters,
dead letters for admins without their payload, and /metrics by its allow-list."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dashboard_helpers import HEALTH, make_result, make_study
from web_helpers import client, login, make_user, running_web

from edgemed.dashboard.ingest import Ingest
from edgemed.dashboard.metrics import store_collector
from edgemed.dashboard.store import DashboardStore
from edgemed.dashboard.web.context import encode_json
from edgemed.publish.config import MqttConfig


def strict_json(body: bytes) -> Any:
    """JSON as a browser's ``JSON.parse`` reads it: NaN and Infinity are errors."""

    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    return json.loads(body, parse_constant=refuse)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DashboardStore]:
    db = DashboardStore(tmp_path_factory.mktemp("api") / "dash.sqlite3")
    for site in ("clinic-a", "clinic-b"):
        db.set_status(site, f"{site}-us-01", {"state": "online", "delegate": "cpu"})
        db.set_health(site, f"{site}-us-01", HEALTH)
        for seq in range(3):
            db.add_result(make_result(site=site, device_id=f"{site}-us-01", seq=seq, level="urgent", reason=site))
        db.add_result(make_result(site=site, device_id=f"{site}-us-01", seq=10, level="routine"))
        db.add_study(make_study(site=site, device_id=f"{site}-us-01"))
    ingest = Ingest(MqttConfig(url="mqtt://127.0.0.1:1"), db)  # never started: handle() files directly
    ingest.handle("edgemed/clinic-b/clinic-b-us-01/results", b"not json")
    ingest.handle("edgemed/clinic-b/clinic-b-us-01/results", b"[" * 1000)
    make_user(db, "ada", "admin")
    make_user(db, "alice", "viewer", sites={"clinic-a"})
    make_user(db, "carl", "viewer", sites={"clinic-c"})  # a site with nothing stored yet
    yield db
    db.close()


@pytest.fixture(scope="module")
def base(store: DashboardStore) -> Iterator[str]:
    with running_web(store, metrics=store_collector(store, device_expiry_s=None), device_expiry_s=None) as url:
        yield url


def test_the_api_needs_a_login(base: str) -> None:
    with client(base) as http:
        for path in ("/api/fleet", "/api/results", "/api/summary", "/api/dead-letters", "/api/me"):
            answer = http.get(path)
            assert answer.status_code == 401 and "log in" in answer.json()["error"], path
        missing = http.get("/api/nope")
        assert missing.status_code == 404 and missing.headers["content-type"].startswith("application/json")


def test_a_user_limited_to_a_site_sees_only_that_site(base: str) -> None:
    with login(base, "alice") as alice, login(base, "ada") as ada:
        fleet = alice.get("/api/fleet").json()
        assert [d["site"] for d in fleet["devices"]] == ["clinic-a"] and fleet["total"] == 1
        assert len(ada.get("/api/fleet").json()["devices"]) == 2
        results = alice.get("/api/results?limit=1000").json()["results"]
        assert len(results) == 4 and {r["site"] for r in results} == {"clinic-a"}
        assert {r["site"] for r in alice.get("/api/results?level=urgent").json()["results"]} == {"clinic-a"}
        summary = alice.get("/api/summary").json()
        assert summary["counts"]["results"]["urgent"] == 3 and summary["counts"]["studies"]["urgent"] == 1
        assert summary["attention_total"] == 4 and {a["site"] for a in summary["attention"]} == {"clinic-a"}
        assert summary["dead_letters"] == {}  # clinic-b's refused messages are not counted for clinic-a's staff
        assert summary["ingest"] is None and summary["workers"] == []
        everyone = ada.get("/api/summary").json()
        assert everyone["counts"]["results"]["urgent"] == 6 and everyone["attention_total"] == 8
        assert sum(everyone["dead_letters"].values()) == 2
        assert "clinic-b" not in alice.get("/api/fleet?offset=0&limit=1000").text


def test_the_waiting_count_stops_at_its_cap_and_says_so(base: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The server runs in this process: a cap of 5 stands for the real 1,000 (8 urgent items wait for ada).
    from edgemed.dashboard.web import api_queries

    with login(base, "ada") as ada:
        assert ada.get("/api/summary").json()["attention_total_capped"] is False
        monkeypatch.setattr(api_queries, "TOTAL_CAP", 5)
        capped = ada.get("/api/summary").json()
        assert capped["attention_total"] == 5 and capped["attention_total_capped"] is True
        monkeypatch.setattr(api_queries, "TOTAL_CAP", 8)
        exact = ada.get("/api/summary").json()
        assert exact["attention_total"] == 8 and exact["attention_total_capped"] is False


def test_a_user_of_a_site_with_no_data_sees_nothing(base: str) -> None:
    with login(base, "carl") as http:
        assert http.get("/api/fleet").json()["devices"] == []
        assert http.get("/api/results").json()["results"] == []
        assert http.get("/api/summary").json()["attention_total"] == 0


def test_dead_letters_are_for_admins_and_never_carry_the_payload(base: str) -> None:
    with login(base, "alice") as alice, login(base, "ada") as ada:
        refused = alice.get("/api/dead-letters")
        assert refused.status_code == 403 and "admin" in refused.json()["error"]
        listed = ada.get("/api/dead-letters").json()["dead_letters"]
        assert [d["reason"] for d in listed] == ["payload nests deeper than 32 levels", "payload is not JSON"]
        assert all("payload" not in d for d in listed)


def test_parameters_are_checked(base: str) -> None:
    with login(base, "ada") as http:
        for path, word in (
            ("/api/results?level=bogus", "unknown triage level"),
            ("/api/results?limit=abc", "limit"),
            ("/api/results?limit=5000", "limit"),
            ("/api/fleet?offset=-1", "offset"),
            ("/api/fleet?limit=0", "limit"),
        ):
            answer = http.get(path)
            assert answer.status_code == 400 and word in answer.json()["error"], path
        page = http.get("/api/results?limit=2&offset=1").json()
        assert len(page["results"]) == 2 and page["offset"] == 1


def test_a_nan_stored_by_an_older_dashboard_never_reaches_the_api(tmp_path: Path) -> None:
    db = tmp_path / "d.sqlite3"
    store = DashboardStore(db)
    store.set_status("clinic-a", "us-01", {"state": "online"})
    store.set_health("clinic-a", "us-01", HEALTH)
    with sqlite3.connect(db) as con:  # what an older dashboard wrote: json.dumps allows NaN by default
        con.execute("UPDATE devices SET health = ?", (json.dumps({**HEALTH, "fps": float("nan")}),))
    make_user(store, "ada", "admin")
    try:
        with running_web(store) as base, login(base, "ada") as http:
            fleet = strict_json(http.get("/api/fleet").content)
            assert fleet["devices"][0]["fps"] is None and fleet["devices"][0]["pending"] == 17
    finally:
        store.close()


def test_the_api_encoder_never_writes_non_finite_numbers() -> None:
    value = {"a": [1.0, float("nan")], "b": {"c": float("-inf")}, "d": "NaN"}
    assert strict_json(encode_json(value)) == {"a": [1.0, None], "b": {"c": None}, "d": "NaN"}


def test_metrics_need_no_login_and_are_absent_when_nothing_is_exported(base: str, store: DashboardStore) -> None:
    # The allow-list and the proxy refusal: test_dashboard_metrics.
    with client(base) as http:
        answer = http.get("/metrics")
        assert answer.status_code == 200 and b"edgemed_results_stored" in answer.content
    with running_web(store) as bare, client(bare) as http:
        assert http.get("/metrics").status_code == 404  # nothing to export here


def test_sessions_and_the_site_filter_on_postgresql(pg_url: str) -> None:
    store = DashboardStore(pg_url)
    try:
        for site in ("clinic-a", "clinic-b"):
            store.set_status(site, f"{site}-us-01", {"state": "online"})
            store.add_result(make_result(site=site, device_id=f"{site}-us-01", level="urgent", reason=site))
        make_user(store, "alice", "viewer", sites={"clinic-a"})
        with running_web(store, device_expiry_s=None) as base, login(base, "alice") as http:
            assert [d["site"] for d in http.get("/api/fleet").json()["devices"]] == ["clinic-a"]
            assert {r["site"] for r in http.get("/api/results").json()["results"]} == {"clinic-a"}
            summary = http.get("/api/summary").json()
            assert summary["attention_total"] == 1 and summary["counts"]["results"]["urgent"] == 1
            assert http.post("/logout").status_code == 303
            assert http.get("/api/me").status_code == 401
    finally:
        store.close()
