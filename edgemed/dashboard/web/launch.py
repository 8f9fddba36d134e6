"""The web side's command-line flags and how a process starts its ``WebServer`` (embedded and ``serve``).

--tls-cert FILE --tls-key FILE          serve HTTPS only (cookies then carry Secure)
--proxy-user-header NAME                single sign-on: the header a trusted reverse proxy names the user in
--trusted-proxy CIDR                    (repeatable) the proxies whose header and X-Forwarded-For are believed
--idle-timeout-min N                    a session unused for N minutes ends (default 30)
--session-hours N                       a session ends N hours after the login however busy (default 12)
--secret-file FILE                      the 0600 key file (default <db>.key beside an SQLite database)
--no-escalation                         this process does not run the escalation checker
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgemed.dashboard.metrics import Network, parse_allow
from edgemed.errors import ConfigError

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

    from edgemed.dashboard.store import DashboardStore
    from edgemed.dashboard.web.server import WebServer

log = logging.getLogger(__name__)

__all__ = ["WebOptions", "add_web_arguments", "start_web", "web_options"]


@dataclass(frozen=True)
class WebOptions:
    """The web flags of ``edgemed dashboard`` and ``edgemed dashboard serve`` (see the module docstring)."""

    tls_cert: Path | None = None
    tls_key: Path | None = None
    proxy_user_header: str | None = None
    trusted_proxies: tuple[Network, ...] = ()
    idle_timeout_s: float = 30 * 60.0
    absolute_timeout_s: float = 12 * 3600.0
    secret_file: Path | None = None
    escalation: bool = True


def add_web_arguments(p: argparse.ArgumentParser, *, sub_command: bool = False) -> None:
    """Add the web flags to a parser.

    Args:
        p: the parser of ``edgemed dashboard`` or of its ``serve``.
        sub_command: on a sub-command, a flag not given keeps what was given to the parent before the
            sub-command's name (an argparse default would replace it).
    """

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if sub_command else value

    p.add_argument("--tls-cert", type=Path, default=default(None), metavar="FILE", help="PEM certificate: serve HTTPS")
    p.add_argument("--tls-key", type=Path, default=default(None), metavar="FILE", help="PEM private key of --tls-cert")
    p.add_argument(
        "--proxy-user-header",
        default=default(None),
        metavar="NAME",
        help="single sign-on: a request from a --trusted-proxy naming an existing user in this header is that user",
    )
    p.add_argument(
        "--trusted-proxy",
        action="append",
        default=default([]),
        metavar="CIDR",
        help="a reverse proxy's address or network (repeatable): its --proxy-user-header and X-Forwarded-For are "
        "believed; from any other address they are ignored",
    )
    p.add_argument(
        "--idle-timeout-min",
        type=float,
        default=default(30.0),
        metavar="N",
        help="a session unused for N minutes ends (default 30)",
    )
    p.add_argument(
        "--session-hours",
        type=float,
        default=default(12.0),
        metavar="N",
        help="a session ends N hours after its login however busy (default 12)",
    )
    p.add_argument(
        "--secret-file",
        type=Path,
        default=default(None),
        metavar="FILE",
        help="the key file signing sessions and the audit trail (0600; created while the audit trail is empty, "
        "refused as missing once it has rows; default DB.key beside an SQLite database, required for PostgreSQL; "
        "give every process of one dashboard the same file)",
    )
    p.add_argument(
        "--no-escalation",
        action="store_true",
        default=default(False),
        help="do not run the escalation checker in this process (another web process runs it)",
    )


def web_options(args: argparse.Namespace) -> WebOptions:
    """The ``WebOptions`` of parsed arguments.

    Raises:
        ConfigError: a bad time-out, a proxy header without trusted proxies, a malformed network, or only one of
            the TLS files.
    """
    idle_min = float(getattr(args, "idle_timeout_min", 30.0))
    hours = float(getattr(args, "session_hours", 12.0))
    if not 0 < idle_min <= 7 * 24 * 60:
        raise ConfigError(f"--idle-timeout-min must be between 0 and 10080 minutes (a week), not {idle_min:g}")
    if not 0 < hours <= 24 * 31:
        raise ConfigError(f"--session-hours must be between 0 and 744 hours (a month), not {hours:g}")
    header = getattr(args, "proxy_user_header", None)
    given = [part for value in getattr(args, "trusted_proxy", []) or [] for part in value.split(",") if part.strip()]
    try:
        proxies = parse_allow(given)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("--metrics-allow", "--trusted-proxy")) from None
    if header is not None and not proxies:
        raise ConfigError(
            f"--proxy-user-header {header} needs --trusted-proxy CIDR (the reverse proxy's address): without it any "
            "client could name any user"
        )
    cert, key = getattr(args, "tls_cert", None), getattr(args, "tls_key", None)
    if (cert is None) != (key is None):
        raise ConfigError("--tls-cert and --tls-key go together: give both (PEM files) or neither")
    return WebOptions(
        tls_cert=cert,
        tls_key=key,
        proxy_user_header=header,
        trusted_proxies=proxies,
        idle_timeout_s=idle_min * 60.0,
        absolute_timeout_s=hours * 3600.0,
        secret_file=getattr(args, "secret_file", None),
        escalation=not getattr(args, "no_escalation", False),
    )


def start_web(
    store: DashboardStore,
    *,
    db: str | Path,
    host: str,
    port: int,
    options: WebOptions,
    public_origins: tuple[str, ...],
    device_expiry_s: float | None,
    metrics: Collector | None,
    metrics_allow: tuple[Network, ...] | None,
    ingest_snapshot: Callable[[], dict[str, Any]] | None = None,
) -> WebServer:
    """Load the secrets, build the app and start serving it (bound when this returns).

    With no users yet it logs the one command that creates the first admin (the page shows it too); the
    process keeps running, and an embedded ingest keeps storing.

    Args:
        store: the open dashboard database.
        db: ``--db`` as given (shown, password masked, in the first-admin command; locates the default key file).
        host: interface.
        port: TCP port; 0 picks a free one.
        options: the web flags.
        public_origins: reverse proxy origins (already ``parse_origin``-ed).
        device_expiry_s: devices silent for longer leave the fleet table.
        metrics: what ``/metrics`` exports.
        metrics_allow: who may read it; None: the loopback.
        ingest_snapshot: the embedded ingest's counters.

    Returns:
        The running server (``stop()`` it).

    Raises:
        ConfigError: no usable key file (or none while the audit trail has rows), unusable TLS files, or an address
            that cannot be bound.
    """
    from edgemed.dashboard import users
    from edgemed.dashboard.audit import open_secrets
    from edgemed.dashboard.cli_args import shown_db
    from edgemed.dashboard.secrets import resolve_secret_path
    from edgemed.dashboard.web.app import create_app
    from edgemed.dashboard.web.auth_routes import first_admin_command
    from edgemed.dashboard.web.config import WebConfig
    from edgemed.dashboard.web.server import WebServer
    from edgemed.publish.config import is_loopback

    # Created only while the audit trail is empty: a new key beside a trail that has rows (the file lost, or the
    # wrong --secret-file) would silently make every old row fail `audit verify`.
    secrets = open_secrets(store, resolve_secret_path(db, options.secret_file))
    fields: dict[str, Any] = {}
    if metrics_allow is not None:
        fields["metrics_allow"] = metrics_allow
    config = WebConfig(
        secrets=secrets,
        host=host,
        port=port,
        public_origins=public_origins,
        device_expiry_s=device_expiry_s,
        idle_timeout_s=options.idle_timeout_s,
        absolute_timeout_s=options.absolute_timeout_s,
        tls_cert=options.tls_cert,
        tls_key=options.tls_key,
        proxy_user_header=options.proxy_user_header,
        trusted_proxies=options.trusted_proxies,
        metrics=metrics,
        ingest_snapshot=ingest_snapshot,
        escalation=options.escalation,
        db_display=shown_db(db),
        **fields,
    )
    if not is_loopback(host) and not config.tls and not any(o.startswith("https://") for o in public_origins):
        log.warning(
            "serving the dashboard on %s over plain http: passwords and session cookies cross the network in clear; "
            "give --tls-cert/--tls-key, or put a TLS reverse proxy in front and name it with --public-origin",
            host,
        )
    server = WebServer(create_app(store, config), config)
    server.start()
    if config.escalation:
        from edgemed.dashboard.escalation import Escalator

        # The links in the webhook's posts: the address people open (the proxy's, behind one).
        escalator = Escalator(store, secrets, public_origins[0] if public_origins else server.url)
        escalator.start()
        server.attach(escalator)
    if users.user_count(store) == 0:
        log.warning(
            "the dashboard has no users yet: create the first admin with `%s`, then log in at %s",
            first_admin_command(config.db_display),
            server.url,
        )
    return server
