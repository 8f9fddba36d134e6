"""Logging in and out (state-changing, CSRF- and Origin-checked forms) through the documented HTTPS reverse proxy
works; a foreign origin is still refused.

The proxy here is a real TLS-terminating reverse proxy on 127.0.0.1 (the standard library's HTTP server behind
``ssl``, forwarding to the dashboard) and the browser is headless Chromium submitting the login form of the page
it loaded through it. Like nginx by default (``proxy_set_header Host $proxy_host``) it sends the dashboard's own
address as ``Host``, while the browser's ``Origin`` is the proxy's ``https://`` address.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from broker_fixtures import Pki
from browser import WAIT_FOR_JS, PipeBrowser
from dashboard_helpers import make_result, wait_until
from web_helpers import PASSWORD, login, make_user, running_web

from edgemed.dashboard import add_arguments, audit, run
from edgemed.dashboard.origin import parse_origin
from edgemed.dashboard.store import DashboardStore
from edgemed.errors import ConfigError

_HOP = {"host", "connection", "keep-alive", "transfer-encoding", "content-length"}


class TlsProxy(ThreadingHTTPServer):
    """A TLS-terminating reverse proxy to one upstream; ``pass_host`` is nginx's ``$host`` instead of the default."""

    daemon_threads = True

    def __init__(self, pki: Pki, *, pass_host: bool = False) -> None:
        super().__init__(("127.0.0.1", 0), _Forward)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(pki.server_cert, pki.server_key)
        self.socket = ctx.wrap_socket(self.socket, server_side=True)
        self.pass_host = pass_host
        self.upstream: tuple[str, int] = ("127.0.0.1", 0)

    @property
    def origin(self) -> str:
        return f"https://127.0.0.1:{self.server_address[1]}"


class _Forward(BaseHTTPRequestHandler):
    server: TlsProxy

    def log_message(self, format: str, *args: object) -> None:
        pass  # a test proxy: its access log is noise

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
        host, port = self.server.upstream
        headers["Host"] = self.headers["Host"] if self.server.pass_host else f"{host}:{port}"
        headers["X-Forwarded-Proto"] = "https"
        upstream = http.client.HTTPConnection(host, port, timeout=10)
        try:
            upstream.request(self.command, self.path, body or None, headers)
            answer = upstream.getresponse()
            data = answer.read()
        finally:
            upstream.close()
        self.send_response(answer.status)
        for key, value in answer.getheaders():
            if key.lower() not in _HOP:
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_HEAD = _forward


def _serve(server: ThreadingHTTPServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def store(tmp_path: Path) -> Iterator[DashboardStore]:
    db = DashboardStore(tmp_path / "d.sqlite3")
    db.add_result(make_result(level="urgent", reason="malignant 0.93", seq=1))
    make_user(db, "cd", "reviewer")
    yield db
    db.close()


@contextlib.contextmanager
def _proxied(store: DashboardStore, pki: Pki, *, pass_host: bool, public: bool) -> Iterator[tuple[TlsProxy, str]]:
    proxy = TlsProxy(pki, pass_host=pass_host)
    thread = _serve(proxy)
    try:
        with running_web(store, public_origins=(proxy.origin,) if public else ()) as dashboard:
            proxy.upstream = ("127.0.0.1", int(dashboard.rsplit(":", 1)[1]))
            yield proxy, dashboard
    finally:
        proxy.shutdown()
        proxy.server_close()
        thread.join(5)


def _actions(store: DashboardStore) -> list[str]:
    return [row["action"] for row in audit.rows(store, limit=20)]


def _login_in_chromium(tmp_path: Path, proxy: TlsProxy, store: DashboardStore) -> None:
    # The test CA is not in Chromium's store; the certificate is checked by the proxy's own clients elsewhere.
    browser = PipeBrowser(tmp_path, proxy.origin + "/login", extra_flags=("--ignore-certificate-errors",))
    try:
        assert browser.evaluate(WAIT_FOR_JS % "document.querySelector('form[action=\"/login\"]') !== null")
        assert browser.evaluate("location.origin") == proxy.origin
        # The stylesheet loads under the CSP (style-src 'self'): the page is styled, not bare.
        assert browser.evaluate(
            WAIT_FOR_JS % "document.styleSheets.length === 1 && document.styleSheets[0].cssRules.length > 20"
        )
        browser.evaluate(
            "document.querySelector('input[name=name]').value = 'cd'; "
            f"document.querySelector('input[name=password]').value = {json.dumps(PASSWORD)}; "
            "document.querySelector('form[action=\"/login\"]').submit(); true"
        )
        ok = wait_until(lambda: "login" in _actions(store), 10)
        assert ok, f"the login was refused: {_actions(store)} {browser.evaluate('document.body.innerText')}"
        me = browser.evaluate(WAIT_FOR_JS % "location.pathname !== '/login' && fetch('/api/me').then(r => r.json())")
        assert me["name"] == "cd" and me["via"] == "password"
        # Logging out is a POST of the page's own form, with its CSRF token, from the proxy's origin.
        browser.evaluate("document.querySelector('form[action=\"/logout\"]').submit(); true")
        assert wait_until(lambda: "logout" in _actions(store), 10), f"the logout was refused: {_actions(store)}"
    finally:
        browser.close()


@pytest.mark.parametrize("pass_host", [False, True], ids=["nginx-default-host", "host-passed-through"])
def test_a_login_through_an_https_reverse_proxy_is_accepted(
    store: DashboardStore, pki: Pki, tmp_path: Path, pass_host: bool
) -> None:
    # nginx's default Host is the dashboard's address: --public-origin names the proxy. With `proxy_set_header
    # Host $host` the https:// origin matches the Host it passes on, and that needs no option at all.
    with _proxied(store, pki, pass_host=pass_host, public=not pass_host) as (proxy, _dashboard):
        _login_in_chromium(tmp_path, proxy, store)


def _post_logout(url: str, origin: str, session: str, csrf: str, *, context: ssl.SSLContext | None = None) -> int:
    request = urllib.request.Request(
        f"{url}/logout",
        data=b"",
        method="POST",
        headers={"Origin": origin, "Cookie": f"edgemed_session={session}", "X-CSRF-Token": csrf},
    )
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def _get_status(url: str, host: str) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"Host": host}), timeout=5) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_a_foreign_origin_is_still_refused_directly_and_through_the_proxy(store: DashboardStore, pki: Pki) -> None:
    trusting = ssl.create_default_context(cafile=str(pki.ca_cert))
    with _proxied(store, pki, pass_host=False, public=True) as (proxy, dashboard):
        http = login(proxy.origin, "cd", verify=trusting)
        session = http.cookies["edgemed_session"]
        for origin in ("https://evil.example", "http://127.0.0.1:1", proxy.origin.replace("https", "http")):
            assert _post_logout(dashboard, origin, session, http.csrf) == 403, origin
            assert _post_logout(proxy.origin, origin, session, http.csrf, context=trusting) == 403, origin
        assert http.get("/api/me").status_code == 200  # still logged in
        # The proxy's name is also accepted as Host (a proxy passing $host); a foreign Host still is not.
        assert _get_status(dashboard + "/login", f"127.0.0.1:{proxy.server_address[1]}") == 200
        assert _get_status(dashboard + "/login", "evil.example") == 403
        # Through a proxy named by --public-origin the cookie is Secure: the browser sends it to the proxy only.
        assert any(c.name == "edgemed_session" and c.secure for c in http.cookies.jar)
        # urllib follows the 303 to /login, through the proxy: 200.
        assert _post_logout(proxy.origin, proxy.origin, session, http.csrf, context=trusting) == 200
        assert http.get("/api/me").status_code == 401
        http.close()


def test_public_origins_are_written_as_a_browser_sends_them_and_bad_ones_refused(tmp_path: Path) -> None:
    assert parse_origin("https://Dashboard.Example.org/") == "https://dashboard.example.org"
    assert parse_origin("https://dashboard.example.org:443") == "https://dashboard.example.org"
    assert parse_origin("https://10.0.0.5:8443") == "https://10.0.0.5:8443"
    assert parse_origin("http://[::1]:8080") == "http://[::1]:8080"
    for bad in ("ftp://x", "dashboard.example.org", "https://x/dashboard", "https://u@x", "https://x:99999"):
        with pytest.raises(ConfigError, match="--public-origin"):
            parse_origin(bad)
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        ["--broker", "mqtt://127.0.0.1:1", "--db", str(tmp_path / "d.sqlite3"), "--public-origin", "https://x/y"]
    )
    with pytest.raises(ConfigError, match=r"--public-origin 'https://x/y' must be only https://host\[:port\]"):
        run(args)
    assert not (tmp_path / "d.sqlite3").exists()  # refused before anything started
    twice = parser.parse_args(
        ["--broker", "mqtt://x", "--db", "d", "--public-origin", "https://a", "--public-origin", "https://b"]
    )
    assert twice.public_origin == ["https://a", "https://b"]
