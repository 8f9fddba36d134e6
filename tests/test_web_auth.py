"""Logins on a real uvicorn: the first-admin hint, password logins, sessions, logout, time-outs, the slow-down."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from web_helpers import PASSWORD, client, login, login_csrf, make_user, running_web

from edgemed.dashboard.store import DashboardStore


@pytest.fixture
def store(tmp_path: Path) -> Iterator[DashboardStore]:
    db = DashboardStore(tmp_path / "dash.sqlite3")
    yield db
    db.close()


def test_no_users_yet_the_login_page_names_the_first_admin_command_and_the_api_answers_401(
    store: DashboardStore,
) -> None:
    with running_web(store, db_display="/srv/fleet.sqlite3") as base, client(base) as http:
        page = http.get("/login")
        assert page.status_code == 200
        assert "edgemed dashboard users add NAME --db /srv/fleet.sqlite3 --role admin" in page.text
        api = http.get("/api/fleet")
        assert api.status_code == 401 and "error" in api.json()
        home = http.get("/")
        assert home.status_code == 303 and home.headers["location"] == "/queue"


def test_a_user_logs_in_reads_the_api_and_logs_out(store: DashboardStore) -> None:
    make_user(store, "rita", "reviewer", sites={"clinic-a"})
    with running_web(store) as base:
        with client(base) as anonymous:
            assert "users add" not in anonymous.get("/login").text  # a user exists: no first-admin hint
        http = login(base, "rita")
        me = http.get("/api/me").json()
        assert me["name"] == "rita" and me["role"] == "reviewer" and me["sites"] == ["clinic-a"]
        assert http.get("/api/fleet").status_code == 200
        cookie = next(c for c in http.cookies.jar if c.name == "edgemed_session")
        out = http.post("/logout")
        assert out.status_code == 303 and out.headers["location"] == "/login"
        # The old cookie is worth nothing once revoked, even replayed by hand.
        with client(base, cookies={"edgemed_session": str(cookie.value)}) as replay:
            assert replay.get("/api/me").status_code == 401
        http.close()


def test_a_wrong_password_is_refused_and_audited(store: DashboardStore) -> None:
    from edgemed.dashboard import audit

    make_user(store, "rita", "viewer")
    with running_web(store) as base, client(base) as http:
        token = login_csrf(http)
        answer = http.post("/login", data={"name": "rita", "password": "not the password", "csrf": token})
        assert answer.status_code == 401 and "wrong user name or password" in answer.text
        assert "edgemed_session" not in answer.headers.get("set-cookie", "")
        right = http.post("/login", data={"name": "rita", "password": PASSWORD, "csrf": token})
        assert right.status_code == 303
    actions = [row["action"] for row in audit.rows(store, limit=10)]
    assert "login_failed" in actions and "login" in actions


def test_the_session_cookie_carries_its_flags(store: DashboardStore) -> None:
    make_user(store, "rita", "viewer")
    with running_web(store) as base, client(base) as http:
        token = login_csrf(http)
        answer = http.post("/login", data={"name": "rita", "password": PASSWORD, "csrf": token})
        cookie = next(v for k, v in answer.headers.multi_items() if k == "set-cookie" and "edgemed_session=" in v)
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
        assert "Secure" not in cookie  # plain http on the loopback: a Secure cookie would never come back


def test_an_idle_session_ends(store: DashboardStore) -> None:
    make_user(store, "rita", "viewer")
    with running_web(store, idle_timeout_s=1.0) as base:
        http = login(base, "rita")
        assert http.get("/api/me").status_code == 200
        time.sleep(1.3)
        assert http.get("/api/me").status_code == 401
        http.close()
