"""The admin pages on a real uvicorn: users (add, disable, enable, role, reset password) and the audit trail.

Only admins reach them; each change is a CSRF-checked form that takes effect at once and is audited with the
admin's name and address; the audit page pages and filters newest first, shows hostile strings as text, verifies
the chain (and names an edited row); the CSV export streams and is itself audited.
"""

from __future__ import annotations

import csv
import io
import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from web_helpers import PASSWORD, client, login, login_csrf, make_user, running_web, secrets_for

from edgemed.dashboard import audit, users
from edgemed.dashboard.store import DashboardStore

NEW = "a new long passphrase"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[DashboardStore]:
    db = DashboardStore(tmp_path / "dash.sqlite3")
    make_user(db, "boss", "admin")
    make_user(db, "rita", "reviewer", sites={"clinic-a"})
    make_user(db, "vic", "viewer")
    yield db
    db.close()


@pytest.fixture
def base(store: DashboardStore) -> Iterator[str]:
    with running_web(store) as url:
        yield url


def last_row(store: DashboardStore) -> dict[str, object]:
    return audit.rows(store, limit=1)[0]


def test_only_admins_reach_the_admin_pages(base: str) -> None:
    with client(base) as anonymous:
        page = anonymous.get("/admin/users")
        assert page.status_code == 303 and page.headers["location"].startswith("/login?next=%2Fadmin%2Fusers")
        assert anonymous.get("/admin/audit.csv").status_code == 303
    for name in ("rita", "vic"):
        with login(base, name) as http:
            for path in ("/admin/users", "/admin/audit", "/admin/audit.csv"):
                assert http.get(path).status_code == 403, (name, path)
            refused = http.post(
                "/admin/users", data={"name": "x.y", "role": "admin", "password": NEW, "password2": NEW}
            )
            assert refused.status_code == 403
            assert http.post("/admin/users/boss/disable").status_code == 403
            assert 'href="/admin/users"' not in http.get("/admin/audit").text  # no admin link in their nav
    with login(base, "boss") as http:
        page = http.get("/admin/users")
        assert page.status_code == 200
        for name in ("boss", "rita", "vic"):
            assert f'<td class="mono">{name}</td>' in page.text
        assert "clinic-a" in page.text and 'name="csrf" value="' + http.csrf + '"' in page.text
        assert 'href="/admin/users"' in page.text


def test_an_admin_adds_a_user_who_can_then_log_in(
    base: str, store: DashboardStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # the server runs in this process: its log lines are captured too
    with login(base, "boss") as http:
        added = http.post(
            "/admin/users",
            data={
                "name": "nurse.k",
                "role": "reviewer",
                "sites": "clinic-a, clinic-b",
                "password": NEW,
                "password2": NEW,
            },
        )
        assert added.status_code == 303 and added.headers["location"] == "/admin/users?done=added&user=nurse.k"
        assert "nurse.k was added." in http.get(added.headers["location"]).text
    row = last_row(store)
    assert (row["action"], row["actor"], row["address"], row["target"]) == (
        "user_added",
        "boss",
        "127.0.0.1",
        "nurse.k",
    )
    assert row["detail"] == '{"password":true,"role":"reviewer","sites":["clinic-a","clinic-b"]}'
    with login(base, "nurse.k", NEW) as nurse:
        me = nurse.get("/api/me").json()
        assert (me["role"], me["sites"]) == ("reviewer", ["clinic-a", "clinic-b"])
    assert "/admin/users" in caplog.text and NEW not in caplog.text and PASSWORD not in caplog.text


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": "x.y", "role": "viewer", "password": NEW, "password2": NEW + "!"}, "the two passwords differ"),
        ({"name": "x.y", "role": "viewer", "password": "eleven char", "password2": "eleven char"}, "at least 12"),
        ({"name": "x y", "role": "viewer", "password": NEW, "password2": NEW}, "is not allowed"),
        ({"name": "x.y", "role": "root", "password": NEW, "password2": NEW}, "is not one of viewer"),
        ({"name": "rita", "role": "viewer", "password": NEW, "password2": NEW}, "exists already"),
    ],
)
def test_a_refused_addition_says_why_and_changes_nothing(
    base: str, store: DashboardStore, fields: dict[str, str], message: str
) -> None:
    before = audit.count(store)
    with login(base, "boss") as http:
        answer = http.post("/admin/users", data=fields)
    assert answer.status_code == 400 and message in answer.text
    assert fields["password"] not in answer.text  # the form comes back without the password
    assert audit.count(store) == before + 1  # the admin's login only
    assert users.get_user(store, "x.y") is None


def test_disable_role_and_password_take_effect_at_once(base: str, store: DashboardStore) -> None:
    with login(base, "boss") as admin, login(base, "rita") as rita:
        assert rita.get("/api/me").json()["role"] == "reviewer"
        answer = admin.post("/admin/users/rita/role", data={"role": "viewer"})
        assert answer.status_code == 303 and "done=role" in answer.headers["location"]
        assert rita.get("/api/me").json()["role"] == "viewer"  # the same session, the new role
        assert (
            admin.post("/admin/users/rita/role", data={"role": "viewer"})
            .headers["location"]
            .endswith("done=unchanged&user=rita")
        )
        assert admin.post("/admin/users/rita/disable").status_code == 303
        assert rita.get("/api/me").status_code == 401  # disabled: the open session is over
        with client(base) as again:
            token = login_csrf(again)
            refused = again.post("/login", data={"name": "rita", "password": PASSWORD, "csrf": token})
            assert refused.status_code == 401
        assert admin.post("/admin/users/rita/enable").status_code == 303
        with login(base, "rita") as back:
            assert back.get("/api/me").status_code == 200
            assert admin.post("/admin/users/rita/password", data={"password": NEW, "password2": NEW}).status_code == 303
            assert back.get("/api/me").status_code == 401  # a new password ends the old sessions
        with login(base, "rita", NEW) as renewed:
            assert renewed.get("/api/me").status_code == 200
        lone = admin.post("/admin/users/boss/disable")
        assert lone.status_code == 400 and "last enabled admin" in lone.text
        assert admin.post("/admin/users/ghost/disable").status_code == 400
        assert admin.post("/admin/users/rita/explode").status_code == 404
    actions = [(r["action"], r["actor"], r["target"]) for r in audit.rows(store, limit=100) if r["actor"] == "boss"]
    assert [a for a in actions if a[0] != "login"][::-1] == [
        ("role_changed", "boss", "rita"),
        ("user_disabled", "boss", "rita"),
        ("user_enabled", "boss", "rita"),
        ("password_changed", "boss", "rita"),
    ]
    assert NEW not in str(audit.rows(store, limit=100))


def test_a_change_without_the_csrf_token_or_from_another_origin_is_refused(base: str, store: DashboardStore) -> None:
    with login(base, "boss") as admin:
        bare = httpx.Client(base_url=base, cookies=admin.cookies, follow_redirects=False)
        try:
            assert bare.post("/admin/users/rita/disable").status_code == 403
            assert bare.post("/admin/users/rita/disable", data={"csrf": "forged"}).status_code == 403
        finally:
            bare.close()
        cross = admin.post("/admin/users/rita/disable", headers={"Origin": "https://evil.example"})
        assert cross.status_code == 403
    record = users.get_user(store, "rita")
    assert record is not None and not record.disabled


def test_the_audit_page_pages_filters_shows_text_and_verifies(base: str, store: DashboardStore, tmp_path: Path) -> None:
    secrets = secrets_for(store)
    for i in range(60):
        audit.record(store, secrets, actor="cli:test", action="acknowledged", target=f"r{i}", site="clinic-a")
    audit.record(store, secrets, actor="-", action="login_failed", target="<script>alert(1)</script>")
    with login(base, "boss") as http:
        page = http.get("/admin/audit")
        assert page.status_code == 200
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text and "<script>alert" not in page.text
        first = page.text.index("login_failed</td>")
        assert first < page.text.index(">r59<") < page.text.index(">r58<")  # newest first
        assert ">r0<" not in page.text and 'href="/admin/audit?offset=50"' in page.text
        older = http.get("/admin/audit?offset=50").text
        assert ">r0<" in older and 'href="/admin/audit"' in older
        only = http.get("/admin/audit", params={"action": "login_failed"}).text
        assert "&lt;script&gt;" in only and ">r5<" not in only
        assert ">r5<" in http.get("/admin/audit", params={"actor": "cli:test", "offset": "50"}).text
        assert http.get("/admin/audit", params={"action": "drop table"}).status_code == 400
        assert http.get("/admin/audit", params={"offset": "-1"}).status_code == 400
        holds = http.get("/admin/audit?verify=1").text
        assert "The chain holds: " in holds
        broken_id = next(r["id"] for r in audit.rows(store, limit=200) if r["target"] == "r7")
        with sqlite3.connect(tmp_path / "dash.sqlite3") as conn:
            conn.execute("UPDATE audit SET actor = 'nobody' WHERE target = 'r7'")
        conn.close()
        broken = http.get("/admin/audit?verify=1").text
        assert f"The chain is broken at row {broken_id} (" in broken and "acknowledged" in broken


def test_the_csv_export_streams_and_is_audited(base: str, store: DashboardStore) -> None:
    secrets = secrets_for(store)
    audit.record(store, secrets, actor="cli:test", action="settings_changed", detail={"k": "=1+1"}, at=1.8e9)
    with login(base, "boss") as http:
        answer = http.get("/admin/audit.csv")
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/csv")
        assert answer.headers["content-disposition"].startswith('attachment; filename="edgemed-audit-')
        table = list(csv.reader(io.StringIO(answer.text)))
        assert table[0] == list(audit.CSV_COLUMNS)
        assert [r[4] for r in table[1:]][:3] == ["user_added", "user_added", "user_added"]
        assert table[-1][4] == "export_audit" and table[-1][2] == "boss"  # recorded before the first row left
        assert ["settings_changed", '{"k":"=1+1"}'] in [[r[4], r[7]] for r in table]
        later = list(csv.reader(io.StringIO(http.get("/admin/audit.csv", params={"since": "2027-01-15"}).text)))
        assert [r[4] for r in later[1:]] == ["settings_changed"]
        bad = http.get("/admin/audit.csv", params={"since": "yesterday"})
        assert bad.status_code == 400 and "ISO 8601" in bad.text
    row = audit.rows(store, action="export_audit", limit=1)[0]
    assert row["detail"] == '{"rows":1,"since":"2027-01-15","until":null,"via":"page"}'
    assert audit.verify(store, secrets.audit_key).ok


def test_admin_pages_on_postgresql(pg_url: str) -> None:
    store = DashboardStore(pg_url)
    try:
        make_user(store, "boss", "admin")
        with running_web(store) as url, login(url, "boss") as http:
            data = {"name": "pg.user", "role": "viewer", "password": NEW, "password2": NEW}
            assert http.post("/admin/users", data=data).status_code == 303
            assert http.post("/admin/users/pg.user/disable").status_code == 303
            page = http.get("/admin/audit?verify=1").text
            assert "The chain holds: 4 rows" in page and "user_disabled" in page
        record = users.get_user(store, "pg.user")
        assert record is not None and record.disabled
    finally:
        store.close()
