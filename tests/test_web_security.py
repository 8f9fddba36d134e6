"""The web core's guards on a real uvicorn: headers and CSP, the Host check, the body limit, CSRF and Origin,
slow clients, and hostile text rendered as text."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from web_helpers import client, login, login_csrf, make_user, running_web, secrets_for

from edgemed.dashboard.store import DashboardStore
from edgemed.dashboard.web.config import WebConfig
from edgemed.dashboard.web.security import CSP, SecurityMiddleware

TEMPLATES = Path(__file__).resolve().parent.parent / "edgemed" / "dashboard" / "web" / "templates"
CONTRACT_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DashboardStore]:
    db = DashboardStore(tmp_path_factory.mktemp("security") / "dash.sqlite3")
    make_user(db, "vera", "viewer")
    yield db
    db.close()


@pytest.fixture(scope="module")
def base(store: DashboardStore) -> Iterator[str]:
    with running_web(store, max_body_bytes=4096, request_timeout_s=1.0, limit_concurrency=8) as url:
        yield url


def test_every_response_carries_the_csp_and_the_security_headers(base: str) -> None:
    assert CSP == CONTRACT_CSP
    with client(base) as http:
        for path in ("/login", "/api/fleet", "/static/dashboard.css", "/no-such-page", "/"):
            answer = http.get(path)
            assert answer.headers["content-security-policy"] == CONTRACT_CSP, path
            assert answer.headers["x-content-type-options"] == "nosniff", path
            assert answer.headers["x-frame-options"] == "DENY", path
            assert answer.headers["referrer-policy"] == "same-origin", path  # no-referrer: Origin null
            assert "cache-control" in answer.headers, path
            assert "server" not in answer.headers, path  # no version banner
            assert "strict-transport-security" not in answer.headers  # plain http: HSTS would be meaningless
        assert http.get("/login").headers["cache-control"] == "no-store"


def test_no_template_has_inline_script_or_style() -> None:
    # The CSP forbids them: one would silently not run (or not style) in the browser.
    templates = sorted(TEMPLATES.glob("*.html"))
    assert {"base.html", "login.html", "error.html"} <= {t.name for t in templates}
    for template in templates:
        text = template.read_text()
        assert not re.search(r"<script(?![^>]*\ssrc=)[^>]*>", text), template.name
        assert "<style" not in text and not re.search(r"\sstyle=", text), template.name
        assert not re.search(r"\son[a-z]+=", text), template.name  # no inline event handlers either


def test_on_a_loopback_binding_the_host_must_be_the_loopback(base: str) -> None:
    port = base.rsplit(":", 1)[1]
    with client(base) as http:
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example"):
            answer = http.get("/login", headers={"Host": host})
            assert answer.status_code == 403 and "127.0.0.1 or localhost" in answer.json()["error"], host
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "[::1]"):
            assert http.get("/login", headers={"Host": host}).status_code == 200, host
        # /metrics has its own allow-list and is named by whatever address a scraper uses.
        assert http.get("/metrics", headers={"Host": "scraper.example"}).status_code == 404


def test_a_non_loopback_binding_does_not_check_the_host(store: DashboardStore) -> None:
    secrets = secrets_for(store)
    anywhere = SecurityMiddleware(lambda *a: None, store, WebConfig(secrets=secrets, host="0.0.0.0"))  # type: ignore[arg-type]
    assert anywhere._host_ok(httpx.Headers({"host": "dashboard.example.org"}))
    loopback = SecurityMiddleware(lambda *a: None, store, WebConfig(secrets=secrets))  # type: ignore[arg-type]
    assert not loopback._host_ok(httpx.Headers({"host": "dashboard.example.org"}))


def test_a_body_over_the_limit_is_refused(base: str) -> None:
    with login(base, "vera") as http:
        big = http.post("/logout", content=b"x" * 5000, headers={"Content-Type": "application/octet-stream"})
        assert big.status_code == 413
        chunked = http.post("/logout", content=iter([b"x" * 3000, b"x" * 3000]))  # no Content-Length
        assert chunked.status_code == 413
        assert http.get("/api/me").status_code == 200  # still logged in: nothing ran


def test_a_state_changing_request_needs_the_session_csrf_token(base: str) -> None:
    with login(base, "vera") as http:
        bare = httpx.Client(base_url=base, cookies=http.cookies, follow_redirects=False)
        refused = bare.post("/logout")
        assert refused.status_code == 403 and "CSRF" in refused.json()["error"]
        assert bare.post("/logout", headers={"X-CSRF-Token": "x" * 43}).status_code == 403
        assert bare.post("/logout", data={"csrf": "wrong"}).status_code == 403
        assert bare.post("/logout", data={"csrf": "é" * 43}).status_code == 403  # not ASCII: refused, not a 500
        assert bare.post("/logout", headers={"X-CSRF-Token": "é".encode("latin-1") * 43}).status_code == 403
        for method in ("PUT", "PATCH", "DELETE"):
            assert bare.request(method, "/api/me").status_code == 403, method
        assert http.get("/api/me").status_code == 200  # none of them logged the user out
        # The form field works like the header.
        done = bare.post("/logout", data={"csrf": http.csrf})
        assert done.status_code == 303
        assert http.get("/api/me").status_code == 401
        bare.close()


def test_a_route_of_any_other_method_gets_the_csrf_check_too(store: DashboardStore) -> None:
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from edgemed.dashboard.web.app import create_app
    from edgemed.dashboard.web.server import WebServer

    ran: list[str] = []

    def purge(request: object) -> PlainTextResponse:
        ran.append("purge")
        return PlainTextResponse("purged")

    cfg = WebConfig(secrets=secrets_for(store), port=0)
    app = create_app(store, cfg)
    app.router.routes.insert(0, Route("/purge", purge, methods=["PURGE"]))  # as another module might register
    server = WebServer(app, cfg)
    server.start()
    try:
        with login(server.url.rstrip("/"), "vera") as http:
            bare = http.request("PURGE", "/purge", headers={"X-CSRF-Token": "x" * 43})
            assert bare.status_code == 403 and "CSRF" in bare.json()["error"] and ran == []
            assert http.request("PURGE", "/purge", headers={"X-CSRF-Token": http.csrf}).text == "purged"
    finally:
        server.stop()


def test_a_cross_origin_request_is_refused_even_with_the_token(base: str) -> None:
    with login(base, "vera") as http:
        for origin in ("https://evil.example", "null", "http://127.0.0.1:1"):
            answer = http.post("/logout", headers={"Origin": origin})
            assert answer.status_code == 403 and "--public-origin" in answer.json()["error"], origin
        assert http.get("/api/me").status_code == 200
        assert http.post("/logout", headers={"Origin": base}).status_code == 303


def test_a_form_body_that_cannot_be_parsed_is_a_400_not_a_server_error(
    base: str, caplog: pytest.LogCaptureFixture
) -> None:
    with client(base) as http, caplog.at_level("ERROR"):
        login_csrf(http)  # the pre-login cookie: the body is what is wrong
        for path in ("/login", "/logout"):
            answer = http.post(path, content=b"csrf=x", headers={"Content-Type": "multipart/form-data"})
            assert answer.status_code == 400 and "boundary" in answer.json()["error"], path
    assert not [r for r in caplog.records if r.levelname == "ERROR"]  # no stack trace in the log per request


def test_the_login_form_has_its_own_csrf_token(base: str) -> None:
    with client(base) as http:
        # No pre-login cookie (a cross-site page posting the form): refused before the password is checked.
        answer = http.post("/login", data={"name": "vera", "password": "correct horse battery staple"})
        assert answer.status_code == 403 and "login form" in answer.json()["error"]
        token = login_csrf(http)
        other = token[:-1] + ("1" if token[-1] == "0" else "0")  # one digit off
        forged = http.post("/login", data={"name": "vera", "password": "x", "csrf": other})
        assert forged.status_code == 403
        ok = http.post("/login", data={"name": "vera", "password": "correct horse battery staple", "csrf": token})
        assert ok.status_code == 303


def test_a_forged_or_garbled_session_cookie_is_nobody(base: str) -> None:
    with login(base, "vera") as http:
        value = str(http.cookies["edgemed_session"])
        token, _, mac = value.rpartition(".")
        changed = token[:-1] + ("B" if token[-1] == "A" else "A")  # one character off, the old signature
        for forged in (f"{token}.{'0' * 64}", f"{changed}.{mac}", "é" * 50, "no-dot", "." * 3, "x" * 500):
            with client(base, headers={"Cookie": f"edgemed_session={forged}".encode("latin-1")}) as other:
                assert other.get("/api/me").status_code == 401, forged


def test_hostile_text_renders_as_text(base: str) -> None:
    markup = '<img src=x onerror="alert(1)"><script>alert(2)</script>'
    with client(base) as http:
        missing = http.get("/" + markup)
        assert missing.status_code == 404
        assert "<script>alert(2)" not in missing.text and "&lt;script&gt;alert(2)" in missing.text
        token = login_csrf(http)
        echoed = http.post("/login", data={"name": markup, "password": "whatever it is", "csrf": token})
        assert echoed.status_code == 401
        assert "<img src=x" not in echoed.text and "&lt;img src=x onerror=" in echoed.text
        assert "next=" not in http.get("/login?next=//evil.example").text  # only a local path is kept as next
        nxt = re.search(r'name="next" value="([^"]*)"', http.get("/login?next=//evil.example").text)
        assert nxt is not None and nxt.group(1) == "/queue"


def _connect(base: str) -> socket.socket:
    port = int(base.rsplit(":", 1)[1])
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def _read_to_close(sock: socket.socket) -> bytes:
    """What the server sent before closing; raises TimeoutError when it keeps the connection open."""
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def test_silent_and_stalled_clients_are_closed(base: str) -> None:
    silent, stalled = _connect(base), _connect(base)
    try:
        stalled.sendall(b"GET /login HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # the headers never end
        started = time.monotonic()
        assert _read_to_close(silent) == b""
        assert _read_to_close(stalled) == b""
        assert time.monotonic() - started < 3.0  # request_timeout_s is 1 s
    finally:
        silent.close()
        stalled.close()
    with client(base) as http:
        assert http.get("/login").status_code == 200


def test_a_body_that_stalls_is_refused_and_its_connection_closed(base: str) -> None:
    heads = (
        b"Content-Length: 100\r\nContent-Type: application/x-www-form-urlencoded\r\n\r\nname=",  # 95 bytes never come
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nname=\r\n",  # nor the last chunk
    )
    for head in heads:
        stalled = _connect(base)
        try:
            stalled.sendall(b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\n" + head)
            started = time.monotonic()
            answer = _read_to_close(stalled)  # TimeoutError (5 s) if the server waits for the body for ever
            assert answer.startswith(b"HTTP/1.1 408 ") and b"did not arrive within 1 s" in answer, head
            assert time.monotonic() - started < 3.0  # request_timeout_s is 1 s
        finally:
            stalled.close()


def test_beyond_the_connection_limit_new_requests_get_503_until_slots_free(base: str) -> None:
    before = threading.active_count()
    socks = [_connect(base) for _ in range(40)]  # limit_concurrency is 8: these hold every slot, silently
    try:
        # Connections cost no thread of their own (uvicorn's event loop holds them): a flood adds none.
        assert threading.active_count() <= before
        deadline = time.monotonic() + 5
        status = 0
        while time.monotonic() < deadline:
            with client(base) as http:
                status = http.get("/login").status_code
            if status == 503:
                break
            time.sleep(0.05)
        assert status == 503
    finally:
        for s in socks:
            s.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with client(base) as http:
            if http.get("/login").status_code == 200:
                break
        time.sleep(0.05)
    else:
        pytest.fail("the server did not serve again after the connections closed")


def test_the_defaults_bound_slow_clients() -> None:
    from edgemed.dashboard.web.server import KEEP_ALIVE_S

    fields = WebConfig.__dataclass_fields__
    assert fields["request_timeout_s"].default == 10.0 and fields["limit_concurrency"].default == 200
    assert KEEP_ALIVE_S == 5
