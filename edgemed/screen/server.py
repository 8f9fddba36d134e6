"""The screen's HTTP server: stdlib ``http.server`` on 127.0.0.1, one thread per request.

Routes::

    GET  /            the page (with this run's token in <meta name="edgemed-screen-token">)
    GET  /screen.css  its style sheet
    GET  /screen.js   its script
    GET  /events      Server-Sent Events: frame, status, map (edgemed.screen.events); at most MAX_CLIENTS (503)
    POST /occlusion   ask for an occlusion map of a shown frame: 202, 409 (no classified frame), 429 (one running)

Every request first needs a loopback ``Host`` (else 421); a POST also needs a same-origin (or absent) ``Origin``
and the token header (else 403). Every response carries ``SECURITY_HEADERS``. Requests are logged at DEBUG only,
by method, route and status: never a query string or a body.
"""

from __future__ import annotations

import errno
import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any, Protocol

from edgemed.errors import ConfigError
from edgemed.screen.hub import Client, Hub
from edgemed.screen.security import SECURITY_HEADERS, TOKEN_HEADER, host_allowed, origin_allowed, token_matches

log = logging.getLogger("edgemed.screen")

#: An SSE comment this often keeps the connection open through idle periods and tells a gone client.
KEEPALIVE_S = 10.0
_MAX_BODY_BYTES = 1024
_STATIC = {"/screen.css": "text/css; charset=utf-8", "/screen.js": "text/javascript; charset=utf-8"}
_TOKEN_MARK = "{{token}}"


class ScreenApp(Protocol):
    """What the server asks of the screen behind it (``edgemed.screen.screen.Screen``)."""

    hub: Hub
    token: str

    def greet(self, client: Client) -> None:
        """Queue what a newly connected page needs first (the current status and frame)."""
        ...

    def request_occlusion(self, seq: int | None) -> tuple[int, str]:
        """Start an occlusion map of frame ``seq`` (None: the latest shown); returns (HTTP status, message)."""
        ...


def static_text(name: str) -> str:
    """One of the page's files from the package (``edgemed/screen/static``)."""
    return resources.files("edgemed.screen").joinpath("static", name).read_text(encoding="utf-8")


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # an open SSE response must not keep the process alive at exit
    app: ScreenApp
    page: bytes
    static: dict[str, bytes]

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver prints a traceback to stderr for every dropped connection (a page reloaded mid-request);
        # that is routine for a kiosk browser, not an error of the run.
        log.debug("screen: a connection ended abruptly", exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def version_string(self) -> str:
        return "edgemed-screen"  # not the Python version: nothing the page needs, something a probe would like

    def log_message(self, format: str, *args: Any) -> None:
        # The base class writes every request line to stderr; a path is ours to choose, but stay quiet anyway.
        return

    def end_headers(self) -> None:
        # Here rather than per route: every response carries them, also the base class's own errors (400 for a
        # malformed request line, 501 for a method it does not serve).
        for name, value in SECURITY_HEADERS:
            self.send_header(name, value)
        super().end_headers()

    def _port(self) -> int:
        return int(self.server.server_address[1])

    def _send(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        log.debug("screen: %s %s -> %d", self.command, self._route(), status)

    def _route(self) -> str:
        return self.path.split("?", 1)[0]

    def _host_ok(self) -> bool:
        if host_allowed(self.headers.get("Host"), self._port()):
            return True
        port = self._port()
        self._send(
            HTTPStatus.MISDIRECTED_REQUEST,
            f"This screen answers only to http://127.0.0.1:{port}/ (or localhost:{port}). A request naming another "
            "host is refused, so that a web page cannot reach the device's screen through its own name "
            "(DNS rebinding).\n".encode(),
        )
        return False

    def do_GET(self) -> None:
        if not self._host_ok():
            return
        route = self._route()
        if route in ("/", "/index.html"):
            self._send(HTTPStatus.OK, self.server.page, "text/html; charset=utf-8")
        elif route in _STATIC:
            self._send(HTTPStatus.OK, self.server.static[route], _STATIC[route])
        elif route == "/events":
            self._events()
        else:
            self._send(HTTPStatus.NOT_FOUND, b"Not found: this screen serves /, /screen.css, /screen.js, /events.\n")

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_POST(self) -> None:
        if not self._host_ok():
            return
        if not origin_allowed(self.headers.get("Origin"), self._port()) or not token_matches(
            self.headers.get(TOKEN_HEADER), self.server.app.token
        ):
            self._send(
                HTTPStatus.FORBIDDEN,
                b"Refused: only the screen's own page may ask for this (same origin and its token).\n",
            )
            return
        if self._route() != "/occlusion":
            self._send(HTTPStatus.NOT_FOUND, b"Not found: POST /occlusion is the only action.\n")
            return
        seq = self._seq_from_body()
        if seq is False:
            return
        status, message = self.server.app.request_occlusion(seq)
        self._send(status, json.dumps({"message": message}).encode(), "application/json")

    def _seq_from_body(self) -> int | bool | None:
        """The ``seq`` of the JSON body (None when absent); False after answering 400/413 for a bad body."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > _MAX_BODY_BYTES:
            self.close_connection = True  # the body is not read: the connection cannot carry another request
            self._send(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, b"The body must be at most 1 KB of JSON.\n")
            return False
        raw = self.rfile.read(length) if length else b""
        if not raw.strip():
            return None
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        seq = body.get("seq") if isinstance(body, dict) else "bad"
        if seq is not None and (not isinstance(seq, int) or isinstance(seq, bool)):
            self._send(HTTPStatus.BAD_REQUEST, b'The body must be JSON like {"seq": 12}.\n')
            return False
        return seq

    def _events(self) -> None:
        hub = self.server.app.hub
        client = hub.join()
        if client is None:
            self._send(
                HTTPStatus.SERVICE_UNAVAILABLE,
                f"{hub.max_clients} pages are already showing this screen; close one and reload.\n".encode(),
            )
            return
        try:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Connection", "close")  # the stream ends only when one side goes
            self.end_headers()
            self.close_connection = True
            self.wfile.write(b"retry: 2000\n\n")
            self.wfile.flush()
            self.server.app.greet(client)
            while not client.closed:
                event = client.next(KEEPALIVE_S)
                self.wfile.write(event if event is not None else b": keepalive\n\n")
                self.wfile.flush()
        except OSError:  # the page went away (a reload, the browser closed): its handler ends here
            log.debug("screen: an event stream ended", exc_info=True)
        finally:
            hub.leave(client)


class ScreenServer:
    """The HTTP server, bound at construction (so that a port in use fails before the run starts)."""

    def __init__(self, app: ScreenApp, port: int) -> None:
        """Args:
        app: the screen it serves.
        port: TCP port on 127.0.0.1 (0: any free port).

        Raises:
            ConfigError: the port is in use or cannot be bound.
        """
        try:
            server = _Server(("127.0.0.1", port), _Handler)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"screen port {port} is already in use on 127.0.0.1 (another edgemed run or program holds it): "
                    "pass another one with --screen-port N (0: any free port) or set screen.port in the profile"
                ) from exc
            raise ConfigError(
                f"the screen cannot listen on 127.0.0.1:{port} ({exc.strerror or exc}): choose another port with "
                "--screen-port N (a port under 1024 needs privileges; 0: any free port)"
            ) from exc
        server.app = app
        server.page = static_text("screen.html").replace(_TOKEN_MARK, app.token).encode()
        server.static = {route: static_text(route.lstrip("/")).encode() for route in _STATIC}
        self._server = server
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port it listens on (the free one chosen for port 0)."""
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Serve on a daemon thread."""
        self._thread = threading.Thread(target=self._server.serve_forever, name="edgemed-screen-http", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving and release the port (open event streams are ended by ``Hub.close`` first)."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5.0)
        self._server.server_close()
