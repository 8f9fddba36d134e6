"""``WebConfig``: everything the web process is told at start (the command line's flags), frozen."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from edgemed.dashboard.metrics import DEFAULT_ALLOW, Network, parse_allow
from edgemed.publish.config import is_loopback

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

    from edgemed.dashboard.secrets import Secrets

__all__ = ["DEVICE_EXPIRY_S", "WebConfig"]

#: Devices not heard from for a week leave the fleet table (their results stay); ``--device-expiry-days``.
DEVICE_EXPIRY_S = 7 * 86400.0


def _default_allow() -> tuple[Network, ...]:
    return parse_allow(DEFAULT_ALLOW)


@dataclass(frozen=True, kw_only=True)
class WebConfig:
    """How the web process serves (see ``edgemed dashboard serve --help`` for the flags behind each field).

    Attributes:
        secrets: the keys of this deployment (``secrets.load_secrets``): sessions are signed with ``session_key``.
        host: the interface bound; on a loopback address the ``Host`` header must name the loopback too.
        port: TCP port; 0 picks a free one.
        public_origins: origins (``parse_origin`` form) of a reverse proxy in front of the page: state-changing
            requests may come from them and their hosts are accepted as ``Host``.
        device_expiry_s: devices silent for longer leave the fleet table; None keeps all.
        idle_timeout_s: a session unused for this long is over (``--idle-timeout-min``).
        absolute_timeout_s: a session this old is over however busy (``--session-hours``).
        tls_cert: PEM certificate chain (``--tls-cert``); with ``tls_key`` the server speaks HTTPS only.
        tls_key: PEM private key (``--tls-key``).
        proxy_user_header: single sign-on: the request header a trusted proxy names the user in; None = off.
        trusted_proxies: the only peers whose ``proxy_user_header`` and ``X-Forwarded-For`` are believed.
        metrics: what ``/metrics`` exports; None: ``/metrics`` answers 404.
        metrics_allow: networks whose clients may read ``/metrics`` (default the loopback).
        ingest_snapshot: the embedded ingest's counters for ``/api/summary``; None when no ingest runs here.
        escalation: this process runs the escalation checker (``--no-escalation`` turns it off).
        max_body_bytes: a request body larger than this is refused (413).
        request_timeout_s: a connection that has not sent a whole request head within this long is closed; a
            state-changing request whose body has not all arrived within this long is refused (408).
        limit_concurrency: connections served at once; beyond it uvicorn answers 503.
        db_display: the database as the first-admin hint names it (``--db``'s value, password masked).
    """

    secrets: Secrets
    host: str = "127.0.0.1"
    port: int = 8080
    public_origins: tuple[str, ...] = ()
    device_expiry_s: float | None = DEVICE_EXPIRY_S
    idle_timeout_s: float = 30 * 60.0
    absolute_timeout_s: float = 12 * 3600.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    proxy_user_header: str | None = None
    trusted_proxies: tuple[Network, ...] = ()
    metrics: Collector | None = None
    metrics_allow: tuple[Network, ...] = field(default_factory=_default_allow)
    ingest_snapshot: Callable[[], dict[str, Any]] | None = None
    escalation: bool = True
    max_body_bytes: int = 64 * 1024
    request_timeout_s: float = 10.0
    limit_concurrency: int = 200
    db_display: str = "DB"

    @property
    def tls(self) -> bool:
        """Whether the server itself speaks HTTPS."""
        return self.tls_cert is not None

    @property
    def secure_cookies(self) -> bool:
        """Cookies carry ``Secure``: under TLS, or when the browser reaches the page through an https proxy."""
        return self.tls or any(o.startswith("https://") for o in self.public_origins)

    @property
    def loopback_only(self) -> bool:
        """Bound to the loopback: the ``Host`` check against DNS rebinding applies."""
        return is_loopback(self.host)

    @property
    def public_hosts(self) -> frozenset[str]:
        """The ``host[:port]`` of each public origin (accepted as a ``Host`` header)."""
        return frozenset(urlsplit(o).netloc for o in self.public_origins)
