"""``WebServer``: the app on uvicorn, in a thread of its own, bound before ``start`` returns.

The socket is bound here (not by uvicorn) so a port in use is a ``ConfigError`` naming the flag, and port 0 gives
the real port at once. Slow or silent clients are bounded three ways: a connection that has not sent a whole
request head within ``request_timeout_s`` is closed (uvicorn alone would keep a silent connection for ever), an
idle keep-alive connection is closed after ``KEEP_ALIVE_S``, and beyond ``limit_concurrency`` connections uvicorn
answers 503.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from typing import Any

import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol

from edgemed.dashboard.web.config import WebConfig
from edgemed.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["KEEP_ALIVE_S", "WebServer"]

#: An idle keep-alive connection is closed after this long.
KEEP_ALIVE_S = 5
_START_TIMEOUT_S = 20.0


def _timed_protocol(request_timeout_s: float) -> type[H11Protocol]:
    class TimedH11(H11Protocol):
        """uvicorn's h11 protocol, closing a connection whose request head does not arrive in time."""

        _head_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(request_timeout_s, self._head_timeout)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            if self.cycle is None or self.cycle.response_complete:
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm()  # a request is being served (an event stream may last hours)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return TimedH11


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _name, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ConfigError(f"cannot serve the dashboard on {host}:{port} ({exc}); check --host") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot serve the dashboard on {host}:{port} ({exc}); choose another --port or --host"
        ) from exc
    sock.set_inheritable(True)
    return sock


class WebServer:
    """The dashboard's app served by uvicorn on a thread; ``start()``, ``url``, ``stop()``."""

    def __init__(self, app: ASGIApp, config: WebConfig) -> None:
        """Prepare (nothing is bound until ``start``).

        Args:
            app: the ASGI app (``create_app``).
            config: host, port, TLS and the slow-client limits.

        Raises:
            ConfigError: only one of the TLS certificate and key, one that is missing, or a key every user may read.
        """
        if (config.tls_cert is None) != (config.tls_key is None):
            raise ConfigError("--tls-cert and --tls-key go together: give both (PEM files) or neither")
        for flag, path in (("--tls-cert", config.tls_cert), ("--tls-key", config.tls_key)):
            if path is not None and not path.is_file():
                raise ConfigError(f"{flag} {path}: no such file; give the PEM file's path")
        if config.tls_key is not None and config.tls_key.stat().st_mode & 0o007:
            # Group access is left alone (Debian's ssl-cert group reads /etc/ssl/private); everyone is not.
            mode = config.tls_key.stat().st_mode & 0o777
            raise ConfigError(
                f"--tls-key {config.tls_key} is open to every user on this machine (mode {mode:04o}): whoever reads "
                f"it can pose as this dashboard; run chmod 600 {config.tls_key} (as its owner)"
            )
        self.app = app
        self.config = config
        self._sock: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._companions: list[Any] = []
        self.port = config.port

    def attach(self, companion: Any) -> None:
        """Stop ``companion`` (anything with ``stop()``: the escalation thread) when the server stops."""
        self._companions.append(companion)

    def start(self) -> None:
        """Bind and serve; returns once uvicorn accepts connections.

        Raises:
            ConfigError: the address cannot be bound, the TLS files are unusable, or the server did not start.
        """
        cfg = self.config
        self._sock = _bind(cfg.host, cfg.port)
        self.port = int(self._sock.getsockname()[1])
        options: dict[str, Any] = {}
        if cfg.tls_cert is not None and cfg.tls_key is not None:
            options = {"ssl_certfile": str(cfg.tls_cert), "ssl_keyfile": str(cfg.tls_key)}
        uv_config = uvicorn.Config(
            self.app,
            http=_timed_protocol(cfg.request_timeout_s),
            lifespan="off",
            log_level="warning",
            access_log=False,
            server_header=False,
            proxy_headers=False,  # X-Forwarded-For is believed only from --trusted-proxy (context.client_address)
            timeout_keep_alive=KEEP_ALIVE_S,
            limit_concurrency=cfg.limit_concurrency,
            timeout_graceful_shutdown=2,
            **options,
        )
        try:
            uv_config.load()
        except (OSError, ValueError) as exc:
            self._sock.close()
            raise ConfigError(f"cannot use --tls-cert {cfg.tls_cert} / --tls-key {cfg.tls_key}: {exc}") from exc
        server = uvicorn.Server(uv_config)
        self._server = server
        sock = self._sock
        self._thread = threading.Thread(target=lambda: server.run(sockets=[sock]), name="edgemed-web", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise ConfigError(f"the dashboard's web server did not start on {cfg.host}:{self.port}")
            time.sleep(0.01)

    @property
    def url(self) -> str:
        """``http(s)://host:port/`` of the bound socket."""
        host = self.config.host
        if ":" in host:
            host = f"[{host}]"
        scheme = "https" if self.config.tls else "http"
        return f"{scheme}://{host}:{self.port}/"

    def stop(self) -> None:
        """Stop serving (open event streams get ``timeout_graceful_shutdown``) and close the socket."""
        end_streams = getattr(getattr(self.app, "state", None), "end_streams", None)
        if callable(end_streams):
            end_streams()  # web/live.py: open event streams end at their next poll
        while self._companions:
            self._companions.pop().stop()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
            if self._thread.is_alive():
                log.warning("the dashboard's web server did not stop within 10 s")
        if self._sock is not None:
            self._sock.close()
