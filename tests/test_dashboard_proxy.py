"""Acknowledging through the documented HTTPS reverse proxy works; a foreign origin is still refused.

The proxy here is a real TLS-terminating reverse proxy on 127.0.0.1 (the standard library's HTTP server behind
``ssl``, forwarding to the dashboard) and the browser is headless Chromium clicking *Acknowledge* on the page it
loaded through it. Like nginx by default (``proxy_set_header Host $proxy_host``) it sends the dashboard's own
address as ``Host``, while the browser's ``Origin`` is the proxy's ``https://`` address.
"""

from __future__ import annotations

import http.client
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

from edgemed.dashboard import add_arguments, run
from edgemed.dashboard.origin import parse_origin
from edgemed.dashboard.store import DashboardStore
from edgemed.dashboard.web import DashboardServer, make_server
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
    yield db
    db.close()


def _proxied(store: DashboardStore, pki: Pki, *, pass_host: bool, public: bool) -> tuple[TlsProxy, DashboardServer]:
    proxy = TlsProxy(pki, pass_host=pass_host)
    dashboard = make_server(store, port=0, public_origins=(proxy.origin,) if public else ())
    proxy.upstream = ("127.0.0.1", dashboard.server_address[1])
    return proxy, dashboard


def _ack_in_chromium(tmp_path: Path, proxy: TlsProxy, store: DashboardStore) -> None:
    # The test CA is not in Chromium's store; the certificate is checked by the proxy's own clients elsewhere.
    browser = PipeBrowser(tmp_path, proxy.origin + "/", extra_flags=("--ignore-certificate-errors",))
    try:
        rid = browser.evaluate(WAIT_FOR_JS % "document.querySelector('button[data-result]')?.dataset.result")
        assert rid == store.unacknowledged_urgent()[0]["result_id"]
        assert browser.evaluate("location.origin") == proxy.origin
        browser.evaluate(
            "document.getElementById('ack-by').value = 'CD'; "
            "document.querySelector('button[data-result]').click(); true"
        )
        assert wait_until(lambda: store.unacknowledged_urgent() == [], 10), "the acknowledgement was refused"
        assert store.recent_results("urgent")[0]["acked_by"] == "CD"
    finally:
        browser.close()


@pytest.mark.parametrize("pass_host", [False, True], ids=["nginx-default-host", "host-passed-through"])
def test_an_acknowledgement_through_an_https_reverse_proxy_is_accepted(
    store: DashboardStore, pki: Pki, tmp_path: Path, pass_host: bool
) -> None:
    # nginx's default Host is the dashboard's address: --public-origin names the proxy. With `proxy_set_header
    # Host $host` the https:// origin matches the Host it passes on, and that needs no option at all.
    proxy, dashboard = _proxied(store, pki, pass_host=pass_host, public=not pass_host)
    threads = [_serve(proxy), _serve(dashboard)]
    try:
        _ack_in_chromium(tmp_path, proxy, store)
    finally:
        for server in (proxy, dashboard):
            server.shutdown()
            server.server_close()
        for thread in threads:
            thread.join(5)


def _post_ack(url: str, rid: str, origin: str, *, context: ssl.SSLContext | None = None) -> int:
    request = urllib.request.Request(
        f"{url}api/ack/{rid}",
        data=b'{"by": "x"}',
        method="POST",
        headers={"Content-Type": "application/json", "Origin": origin},
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
    proxy, dashboard = _proxied(store, pki, pass_host=False, public=True)
    threads = [_serve(proxy), _serve(dashboard)]
    trusting = ssl.create_default_context(cafile=str(pki.ca_cert))
    rid = store.unacknowledged_urgent()[0]["result_id"]
    try:
        for origin in ("https://evil.example", "http://127.0.0.1:1", proxy.origin.replace("https", "http")):
            assert _post_ack(dashboard.url, rid, origin) == 403, origin
            assert _post_ack(proxy.origin + "/", rid, origin, context=trusting) == 403, origin
        assert store.unacknowledged_urgent() != []
        # The proxy's name is also accepted as Host (a proxy passing $host); a foreign Host still is not.
        assert _get_status(dashboard.url + "api/summary", f"127.0.0.1:{proxy.server_address[1]}") == 200
        assert _get_status(dashboard.url + "api/summary", "evil.example") == 403
        assert _post_ack(proxy.origin + "/", rid, proxy.origin, context=trusting) == 200
    finally:
        for server in (proxy, dashboard):
            server.shutdown()
            server.server_close()
        for thread in threads:
            thread.join(5)


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
