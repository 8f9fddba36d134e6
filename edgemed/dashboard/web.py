"""The dashboard's web side: one self-contained page and a small JSON API, on the standard library's HTTP server.

Routes:
    GET  /                      the page (inline CSS and JS; it polls the API every few seconds)
    GET  /api/fleet?offset=O&limit=N    one row per device heard from recently (``DashboardStore.fleet``), a page
    GET  /api/results?level=L&offset=O&limit=N   newest results, optionally of one triage level, a page
    GET  /api/summary           level counts, urgent results nobody acknowledged yet, refused messages by reason,
                                ingest counters
    GET  /api/dead-letters      the newest refused messages (topic, reason, size, device; never the payload)
    GET  /metrics               Prometheus text format (``metrics.py``), only to clients in ``metrics_allow``
    POST /api/ack/{result_id}   a person acknowledges an urgent result (JSON body ``{"by": "initials"}``)

Security. Everything shown comes from devices, and a device id, a model name or a triage reason may be hostile
text: the page builds every cell with ``textContent``, never with HTML strings, and a Content-Security-Policy
allows only the page's own inline script and style (by hash), so even a missed spot could not run injected code.
The server binds to 127.0.0.1 by default and has no login: put it behind an authenticating reverse proxy before
binding it to another interface. On a loopback binding the ``Host`` header must name the loopback (a DNS-rebinding
page cannot read the API), and the acknowledge endpoint needs a JSON content type and a same-origin ``Origin``
(a cross-site form cannot post one): ``http://`` or ``https://`` and the ``Host`` the request came with, or one of
the ``public_origins`` (``--public-origin``). Behind a TLS reverse proxy the browser's origin is the proxy's
(``https://dashboard.example.org``) while the proxy may send its upstream address as ``Host`` (nginx's default,
``127.0.0.1:8080``): the proxy's public address is then named with ``--public-origin``, and it is also accepted
as a ``Host``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import re
import sys
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from edgemed.dashboard.metrics import (
    CONTENT_TYPE,
    DEFAULT_ALLOW,
    Network,
    address_allowed,
    parse_allow,
    proxied,
    render,
)
from edgemed.dashboard.origin import parse_origin
from edgemed.dashboard.page import PAGE_TEMPLATE, SCRIPT, STYLE
from edgemed.dashboard.store import AckOutcome, DashboardStore
from edgemed.errors import ConfigError
from edgemed.publish.config import is_loopback

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

_ACK_PATH = re.compile(r"^/api/ack/([0-9a-f]{32})$")
_MAX_BODY_BYTES = 4096
#: A connection silent this long while the server waits for its request is closed.
REQUEST_TIMEOUT_S = 10.0
#: Connections served at once (each has a thread); the page makes three requests every 3 s per open browser.
MAX_CONNECTIONS = 64
_BUSY = b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 5\r\nConnection: close\r\n\r\n"
#: Devices not heard from for a week leave the fleet table (their results stay); ``--device-expiry-days``.
DEVICE_EXPIRY_S = 7 * 86400.0


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


_PAGE = PAGE_TEMPLATE.replace("/*STYLE*/", STYLE).replace("/*SCRIPT*/", SCRIPT).encode()
_CSP = (
    f"default-src 'none'; script-src {_csp_hash(SCRIPT)}; style-src {_csp_hash(STYLE)}; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def encode_json(value: Any) -> bytes:
    """The API's JSON: always valid JSON, with any NaN or Infinity replaced by null.

    The ingest refuses non-finite numbers and the store never returns one; this is the last line, because one
    ``NaN`` in ``/api/fleet`` made the page's ``JSON.parse`` fail and blanked the dashboard for everyone.

    Args:
        value: what to send.

    Returns:
        Compact UTF-8 JSON.
    """
    try:
        text = json.dumps(value, separators=(",", ":"), allow_nan=False)
    except ValueError:
        log.warning("a non-finite number reached the dashboard's API; it is sent as null")
        text = json.dumps(_finite(value), separators=(",", ":"), allow_nan=False)
    return text.encode()


class DashboardServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer that knows the store and how to read the ingest's counters.

    Each connection gets a thread, so both are bounded: a connection that sends nothing (half open, or a client
    that stalls) is closed after ``request_timeout_s`` of silence, and beyond ``max_connections`` at a time a new
    connection is answered 503 and closed at once instead of getting a thread. Without that, every half-open
    connection held a thread for ever.
    """

    daemon_threads = True
    # The standard library's 5 would leave a burst of connections waiting in the kernel instead of being served
    # or refused at once.
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        store: DashboardStore,
        ingest_snapshot: Callable[[], dict[str, Any]] | None = None,
        *,
        device_expiry_s: float | None = DEVICE_EXPIRY_S,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
        max_connections: int = MAX_CONNECTIONS,
        public_origins: tuple[str, ...] = (),
        metrics: Collector | None = None,
        metrics_allow: tuple[Network, ...] | None = None,
    ) -> None:
        """Bind the socket.

        Args:
            address: (host, port); port 0 picks a free port (see ``server_address``).
            store: the dashboard database.
            ingest_snapshot: returns the ingest's counters and broker state; None = no ingest running.
            device_expiry_s: devices silent for longer are left out of the fleet table; None shows all.
            request_timeout_s: a connection silent for this long (while the server waits for its request) is
                closed.
            max_connections: connections served at the same time; more are answered 503 and closed.
            public_origins: origins (``https://host[:port]``, see ``parse_origin``) of a reverse proxy in front of
                the server: acknowledgements may come from them, and their hosts are accepted as ``Host``.
            metrics: what ``/metrics`` exports; None: ``/metrics`` is not served (404).
            metrics_allow: the networks whose clients may read ``/metrics``; None: the loopback only.

        Raises:
            ConfigError: the address cannot be bound (port in use, host not on this machine), or a public origin
                is malformed.
        """
        self.store = store
        self.ingest_snapshot = ingest_snapshot
        self.device_expiry_s = device_expiry_s
        self.request_timeout_s = request_timeout_s
        self.max_connections = max_connections
        self.refused = 0
        self._slots = threading.BoundedSemaphore(max_connections)
        self.loopback_only = is_loopback(address[0])
        self.public_origins = frozenset(parse_origin(o) for o in public_origins)
        self.public_hosts = frozenset(urlsplit(o).netloc for o in self.public_origins)
        self.metrics = metrics
        self.metrics_allow = metrics_allow if metrics_allow is not None else parse_allow(DEFAULT_ALLOW)
        try:
            super().__init__(address, _Handler)
        except OSError as exc:
            raise ConfigError(
                f"cannot serve the dashboard on {address[0]}:{address[1]} ({exc}); choose another --port or --host"
            ) from exc

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve the connection on a thread of its own, or refuse it when ``max_connections`` are busy."""
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            if self.refused == 1 or self.refused % 100 == 0:  # an attack must not flood the log as well
                log.warning(
                    "more than %d connections to the dashboard at once: refusing new ones (%d so far)",
                    self.max_connections,
                    self.refused,
                )
            try:
                request.setblocking(False)  # never let a client that does not read stall the accept loop
                request.send(_BUSY)
            except OSError:
                pass  # it is being refused anyway
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """The connection's thread: serve it, then give its slot back."""
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away mid-answer is routine (debug); anything else is logged with its traceback."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            log.debug("client %s went away: %s", client_address, exc)
            return
        log.exception("error while answering %s", client_address)

    @property
    def url(self) -> str:
        """``http://host:port/`` of the bound socket."""
        host, port = self.server_address[0], self.server_address[1]
        return f"http://{host!s}:{port}/"


def _number_param(query: dict[str, list[str]], name: str, default: int) -> int:
    text = (query.get(name) or [str(default)])[0]
    if not text.isdigit() or len(text) > 9:
        raise ConfigError(f"{name} must be a whole number, not {text[:20]!r}")
    return int(text)


class _Handler(BaseHTTPRequestHandler):
    server: DashboardServer
    server_version = "edgemed-dashboard"
    sys_version = ""

    def setup(self) -> None:
        # Every read and write then gives up after this long: a connection that says nothing is closed (the
        # standard handler answers a timed-out request line by closing the connection).
        self.request.settimeout(self.server.request_timeout_s)
        super().setup()

    # -- plumbing ----------------------------------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:
        # The default writes every request to stderr; requests are routine, keep them at debug level.
        log.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("X-Frame-Options", "DENY")
        if content_type.startswith("text/html"):
            self.send_header("Content-Security-Policy", _CSP)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, value: Any) -> None:
        self._send(status, encode_json(value), "application/json; charset=utf-8")

    def _error(self, status: HTTPStatus, message: str) -> None:
        self._json(status, {"error": message})

    def _host_ok(self) -> bool:
        if not self.server.loopback_only:
            return True
        host_header = (self.headers.get("Host") or "").lower()
        if host_header in self.server.public_hosts:
            return True  # the reverse proxy's public name, passed on by the proxy
        host = urlsplit("//" + host_header).hostname or ""
        return is_loopback(host)

    def _origin_ok(self) -> bool:
        origin = self.headers.get("Origin")
        if origin is None:
            return True  # not from a browser page (curl, a script): no cross-site form can omit it
        origin = origin.lower()
        host = (self.headers.get("Host") or "").lower()
        return origin in (f"http://{host}", f"https://{host}") or origin in self.server.public_origins

    # -- routes ------------------------------------------------------------------------------------------------

    def _metrics(self) -> None:
        # Checked before the Host check: a scraper names the server by whatever address it scrapes.
        allowed = address_allowed(str(self.client_address[0]), self.server.metrics_allow)
        if self.server.metrics is None or not allowed or proxied(self.headers):
            status = HTTPStatus.NOT_FOUND if self.server.metrics is None and allowed else HTTPStatus.FORBIDDEN
            self._send(status, b"", "text/plain; charset=utf-8")  # no detail for a client that may not read it
            return
        self._send(HTTPStatus.OK, render(self.server.metrics), CONTENT_TYPE)

    def do_GET(self) -> None:
        if urlsplit(self.path).path == "/metrics":
            self._metrics()
            return
        if not self._host_ok():
            self._error(HTTPStatus.FORBIDDEN, "this dashboard answers only to 127.0.0.1 or localhost")
            return
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        now = time.time()
        try:
            if url.path in ("/", "/index.html"):
                self._send(HTTPStatus.OK, _PAGE, "text/html; charset=utf-8")
            elif url.path == "/api/fleet":
                self._json(HTTPStatus.OK, self._fleet(query, now))
            elif url.path == "/api/results":
                level = (query.get("level") or [""])[0] or None
                offset, limit = _number_param(query, "offset", 0), _number_param(query, "limit", 100)
                results = self.server.store.recent_results(level, limit, offset)
                self._json(HTTPStatus.OK, {"now": now, "level": level, "offset": offset, "results": results})
            elif url.path == "/api/summary":
                self._json(HTTPStatus.OK, self._summary(query, now))
            elif url.path == "/api/dead-letters":
                self._json(HTTPStatus.OK, {"now": now, "dead_letters": self.server.store.recent_dead_letters()})
            else:
                self._error(HTTPStatus.NOT_FOUND, f"no such page: {url.path[:100]}")
        except ConfigError as exc:
            self._error(HTTPStatus.BAD_REQUEST, str(exc))

    def _fleet(self, query: dict[str, list[str]], now: float) -> dict[str, Any]:
        store, expiry = self.server.store, self.server.device_expiry_s
        offset, limit = _number_param(query, "offset", 0), _number_param(query, "limit", 100)
        listed, hidden = store.device_counts(now, expiry)
        devices = store.fleet(now, offset=offset, limit=limit, expire_after_s=expiry)
        return {
            "now": now,
            "total": listed,
            "hidden": hidden,
            "expire_after_s": expiry,
            "offset": offset,
            "devices": devices,
        }

    def _summary(self, query: dict[str, list[str]], now: float) -> dict[str, Any]:
        store, snapshot = self.server.store, self.server.ingest_snapshot
        limit = _number_param(query, "attention_limit", 50)
        return {
            "now": now,
            "counts": store.level_counts(),
            "attention": store.unacknowledged_urgent(limit),
            "attention_total": store.unacknowledged_urgent_count(),
            "dead_letters": store.dead_letter_counts(),
            "ingest": snapshot() if snapshot is not None else None,
            # Every ingest worker's last report (a separate ``edgemed dashboard ingest`` among them).
            "workers": store.workers(),
        }

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_POST(self) -> None:
        if not self._host_ok():
            self._error(HTTPStatus.FORBIDDEN, "this dashboard answers only to 127.0.0.1 or localhost")
            return
        match = _ACK_PATH.match(urlsplit(self.path).path)
        if match is None:
            self._error(HTTPStatus.NOT_FOUND, "POST /api/ack/{result_id} with a 32-hex-digit result id")
            return
        # A cross-site form can send only form content types and cannot set Origin to ours; fetch() from another
        # origin with a JSON body needs a CORS preflight that this server never approves.
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if content_type != "application/json" or not self._origin_ok():
            self._error(
                HTTPStatus.FORBIDDEN,
                "acknowledge from the dashboard page (JSON, same origin); behind a reverse proxy, start the dashboard "
                "with --public-origin https://PROXY-HOST",
            )
            return
        length_text = self.headers.get("Content-Length") or "0"
        length = int(length_text) if length_text.isdigit() else -1
        if not 0 <= length <= _MAX_BODY_BYTES:
            self._error(HTTPStatus.BAD_REQUEST, f"body must be JSON of at most {_MAX_BODY_BYTES} bytes")
            return
        by = ""
        if length:
            try:
                body = json.loads(self.rfile.read(length))
            except (UnicodeDecodeError, ValueError):
                self._error(HTTPStatus.BAD_REQUEST, 'body must be JSON such as {"by": "initials"}')
                return
            if isinstance(body, dict) and isinstance(body.get("by"), str):
                by = body["by"]
        outcome = self.server.store.acknowledge(match.group(1), by)
        if outcome is AckOutcome.NOT_FOUND:
            self._error(HTTPStatus.NOT_FOUND, f"no result {match.group(1)} in this dashboard")
            return
        self._json(HTTPStatus.OK, {"result_id": match.group(1), "outcome": outcome.value})


def make_server(
    store: DashboardStore,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    ingest_snapshot: Callable[[], dict[str, Any]] | None = None,
    device_expiry_s: float | None = DEVICE_EXPIRY_S,
    request_timeout_s: float = REQUEST_TIMEOUT_S,
    max_connections: int = MAX_CONNECTIONS,
    public_origins: tuple[str, ...] = (),
    metrics: Collector | None = None,
    metrics_allow: tuple[Network, ...] | None = None,
) -> DashboardServer:
    """Bind the dashboard's HTTP server (call ``serve_forever()`` on it, and ``shutdown()`` to stop).

    Args:
        store: the dashboard database.
        host: interface to bind; 127.0.0.1 by default (the dashboard has no login of its own).
        port: TCP port; 0 picks a free one.
        ingest_snapshot: returns the ingest's counters; None when no ingest runs.
        device_expiry_s: devices silent for longer are left out of the fleet table; None shows all.
        request_timeout_s: a connection silent for this long is closed.
        max_connections: connections served at the same time; more are answered 503 and closed.
        public_origins: a reverse proxy's origins (``https://host[:port]``) acknowledgements may come from.
        metrics: what ``/metrics`` exports (``metrics.store_collector``); None: not served.
        metrics_allow: networks whose clients may read ``/metrics``; None: the loopback only.

    Returns:
        The bound server.

    Raises:
        ConfigError: the address cannot be bound, or a public origin is malformed.
    """
    if not is_loopback(host):
        log.warning(
            "serving the dashboard on %s: it has no login, so anyone who can reach this address sees the fleet's "
            "results; put an authenticating reverse proxy in front of it",
            host,
        )
    return DashboardServer(
        (host, port),
        store,
        ingest_snapshot,
        device_expiry_s=device_expiry_s,
        request_timeout_s=request_timeout_s,
        max_connections=max_connections,
        public_origins=public_origins,
        metrics=metrics,
        metrics_allow=metrics_allow,
    )
