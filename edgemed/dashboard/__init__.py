"""Central fleet dashboard: ingest the devices' MQTT results into SQLite and serve a page that shows them.

    edgemed dashboard --broker mqtt://127.0.0.1:1883 --db fleet.sqlite3 [--port 8080] [--host 127.0.0.1]
                      [--consumer-id dashboard] [--client-id edgemed-dashboard]
    edgemed dashboard export --db fleet.sqlite3 [--since 2026-11-25T00:00:00Z] --format jsonl > results.jsonl

At fleet scale the two halves run apart against one database (see `edgemed dashboard ingest --help`, `serve --help`):
    edgemed dashboard ingest --db fleet.sqlite3 --broker mqtt://127.0.0.1:1883 [--group central --client-id ID]
    edgemed dashboard serve --db fleet.sqlite3 [--port 8080] [--metrics-allow 10.20.0.0/16]
    edgemed dashboard acl --db fleet.sqlite3 [--devices devices.csv] > edgemed.acl     (a mosquitto acl_file)
/metrics (Prometheus) is served beside the page, without a login, to --metrics-allow (default the loopback).

The dashboard subscribes to edgemed/+/+/# at QoS 1 with a fixed client id and a persistent session, so results
published while it is down arrive when it comes back; duplicates are dropped by result id. Open
http://127.0.0.1:8080/ and log in: the review queue (urgent and inconclusive results per site), the fleet view,
charts, and for admins users, the audit trail and settings. It shows only what devices publish: no images, file
names or patient ids.

The dashboard is the devices' consumer of record. After each commit it publishes, retained at QoS 1 on
edgemed/{site}/{device_id}/receipts, a receipt (edgemed.receipt/1) saying which seqs of the device it has settled
(stored, refused as a dead letter, or announced lost by the device), at most four a second per device; a device
whose profile names this consumer (delivery.consumer, the --consumer-id, default dashboard) keeps each result
until a receipt covers it. Each dashboard process says online or offline (retained, offline also as its last
will) on edgemed-consumer/{consumer-id}/{client-id}; online means its subscription is granted. Processes of one
consumer share --consumer-id and keep their own --client-id. Batches (edgemed.batch/1 on .../batches) are filed
element by element. `edgemed dashboard export` prints every stored result and study decision as it was sent.

Logins: users live in the database (`edgemed dashboard users add NAME --db DB --role admin` creates the first
admin; until then the page shows that command and the API answers 401, and the ingest stores as usual). Sessions
are signed with a key kept beside an SQLite database (DB.key, 0600) or in --secret-file. Serve HTTPS with
--tls-cert/--tls-key, or behind a TLS reverse proxy named with --public-origin https://PROXY-HOST (its forms are
then accepted); single sign-on from such a proxy with --proxy-user-header NAME --trusted-proxy CIDR.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from edgemed.errors import ConfigError

if TYPE_CHECKING:
    from edgemed.dashboard.metrics import Network
    from edgemed.dashboard.web.launch import WebOptions
    from edgemed.publish.config import MqttConfig

log = logging.getLogger(__name__)

__all__ = ["add_arguments", "run", "serve"]


def _merge_config(mqtt_url: str, mqtt: MqttConfig | None) -> MqttConfig:
    from edgemed.dashboard.cli_args import validate_config

    fields: dict[str, Any] = mqtt.model_dump() if mqtt is not None else {}
    fields["url"] = mqtt_url
    return validate_config(fields)


def serve(
    mqtt_url: str,
    *,
    db: str | Path,
    host: str = "127.0.0.1",
    port: int = 8080,
    mqtt: MqttConfig | None = None,
    stop: threading.Event | None = None,
    on_ready: Callable[[str], None] | None = None,
    device_expiry_s: float | None = 7 * 86400.0,
    public_origins: tuple[str, ...] = (),
    consumer_id: str = "dashboard",
    metrics_allow: tuple[Network, ...] | None = None,
    health_retention_days: float = 7.0,
    web: WebOptions | None = None,
) -> int:
    """Run the ingest and the web server until ``stop`` is set or the process gets SIGINT/SIGTERM.

    Args:
        mqtt_url: ``mqtt://host:port`` or ``mqtts://host:port`` of the broker the devices publish to.
        db: SQLite file of the dashboard (created if missing; kept across restarts), or a database URL.
        host: interface of the web server; 127.0.0.1 by default.
        port: TCP port of the web server; 0 picks a free one (logged).
        mqtt: credentials, TLS, client id and session expiry; its ``url`` is replaced by ``mqtt_url``.
        stop: set it to stop; when None, SIGINT and SIGTERM stop (only from the main thread).
        on_ready: called once with the page's URL (``http://host:port/``, the real port when ``port`` is 0)
            after the web server is bound and the ingest has started.
        device_expiry_s: devices not heard from for this long leave the fleet table (their results stay);
            None keeps every device listed.
        public_origins: the origins (``https://host[:port]``) of a reverse proxy in front of the page, from
            which acknowledgements are accepted besides the page's own address.
        consumer_id: the consumer of record this process belongs to: its receipts and its online/offline state
            name it.
        metrics_allow: networks whose clients may read ``/metrics`` (served beside the page); None: loopback.
        health_retention_days: how long raw heartbeats are kept (hourly summaries: a year).
        web: TLS, single sign-on, session time-outs, the key file (``web.launch.WebOptions``); None: defaults.

    Returns:
        0 after a clean stop.

    Raises:
        ConfigError: bad broker settings, an unusable database or key file, a port that cannot be bound, a
            malformed public origin, or a consumer or client id that does not fit in a topic.
        BrokerRefusedError: plaintext MQTT to a remote broker without ``allow_plaintext_remote``.
    """
    from edgemed.dashboard.cli_args import open_store, shown_db
    from edgemed.dashboard.ingest import Ingest
    from edgemed.dashboard.metrics import store_collector
    from edgemed.dashboard.origin import parse_origin
    from edgemed.dashboard.web.launch import WebOptions, start_web
    from edgemed.dashboard.web.server import WebServer

    cfg = _merge_config(mqtt_url, mqtt)
    origins = tuple(parse_origin(o) for o in public_origins)  # a typo is refused before anything starts
    stop_event = stop if stop is not None else threading.Event()
    store = open_store(db, health_retention_days=health_retention_days)
    ingest: Ingest | None = None
    server: WebServer | None = None
    restore: list[tuple[signal.Signals, Any]] = []
    try:
        ingest = Ingest(cfg, store, consumer_id=consumer_id)
        live = ingest
        server = start_web(
            store,
            db=db,
            host=host,
            port=port,
            options=web if web is not None else WebOptions(),
            public_origins=origins,
            device_expiry_s=device_expiry_s,
            metrics=store_collector(store, device_expiry_s=device_expiry_s, live_workers=lambda: [live.live_row()]),
            metrics_allow=metrics_allow,
            ingest_snapshot=ingest.snapshot,
        )
        if stop is None and threading.current_thread() is threading.main_thread():

            def _on_signal(signum: int, frame: FrameType | None) -> None:
                stop_event.set()

            for sig in (signal.SIGINT, signal.SIGTERM):
                restore.append((sig, signal.signal(sig, _on_signal)))
        ingest.start()
        log.info("dashboard at %s (database %s, broker %s)", server.url, shown_db(db), cfg.url)
        if on_ready is not None:
            on_ready(server.url)
        while not stop_event.wait(0.5):
            pass
        return 0
    finally:
        for sig, handler in restore:
            signal.signal(sig, handler)
        if server is not None:
            server.stop()
        if ingest is not None:
            ingest.stop()
        store.close()


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``edgemed dashboard`` options to a parser, and its sub-commands (export, ingest, serve, acl).

    ``--broker`` and ``--db`` are required to run the embedded dashboard; argparse cannot require them of the
    parent command while its sub-commands have options of their own, so ``run`` checks them.

    Args:
        p: the sub-command's parser.
    """
    from edgemed.dashboard.acl import ACL_DESCRIPTION, add_acl_arguments
    from edgemed.dashboard.audit_cli import AUDIT_DESCRIPTION, add_audit_arguments
    from edgemed.dashboard.cli_args import add_broker_arguments, add_metrics_allow, add_retention_argument
    from edgemed.dashboard.export import __doc__ as export_doc
    from edgemed.dashboard.export import add_export_arguments
    from edgemed.dashboard.processes import (
        INGEST_DESCRIPTION,
        SERVE_DESCRIPTION,
        add_ingest_arguments,
        add_serve_arguments,
    )
    from edgemed.dashboard.users_cli import USERS_DESCRIPTION, add_users_arguments
    from edgemed.dashboard.web.launch import add_web_arguments

    raw = argparse.RawDescriptionHelpFormatter
    actions = p.add_subparsers(dest="dashboard_action", metavar="{ingest,serve,acl,export,users,audit}")
    for name, helptext, description, add in (
        (
            "ingest",
            "run an ingest worker only (no page); several share the load with --group",
            INGEST_DESCRIPTION,
            add_ingest_arguments,
        ),
        (
            "serve",
            "serve the page and /metrics from the database only (no ingest)",
            SERVE_DESCRIPTION,
            add_serve_arguments,
        ),
        (
            "acl",
            "print a mosquitto acl_file binding each device to its own site and device id",
            ACL_DESCRIPTION,
            add_acl_arguments,
        ),
        (
            "export",
            "print every stored result and study decision as the device sent it, one JSON per line",
            export_doc,
            add_export_arguments,
        ),
        (
            "users",
            "add, disable, enable, re-password and list the people who may log in",
            USERS_DESCRIPTION,
            add_users_arguments,
        ),
        (
            "audit",
            "check the audit trail's HMAC chain (verify) or export it as CSV",
            AUDIT_DESCRIPTION,
            add_audit_arguments,
        ),
    ):
        add(actions.add_parser(name, help=helptext, description=description, formatter_class=raw))
    p.add_argument(
        "--db",
        metavar="DB",
        help="required: SQLite file for results and device state (created if missing, kept across restarts), or a "
        "database URL (sqlite:///PATH, postgresql://USER@HOST:PORT/NAME)",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface for the web page (default 127.0.0.1; elsewhere use --tls-cert/--tls-key or a TLS proxy)",
    )
    p.add_argument("--port", type=int, default=8080, help="TCP port for the web page and /metrics (default 8080)")
    p.add_argument(
        "--public-origin",
        action="append",
        default=[],
        metavar="URL",
        help="address of a reverse proxy in front of the page, e.g. https://dashboard.example.org: logins and reviews "
        "made through it are accepted (repeat for several)",
    )
    p.add_argument(
        "--device-expiry-days",
        type=float,
        default=7.0,
        metavar="DAYS",
        help="leave devices silent for this long out of the fleet table; their results stay (default 7; 0 = never)",
    )
    add_broker_arguments(
        p,
        client_id_help="MQTT client id; keep it fixed so queued results reach this dashboard, and unique per process "
        "(default edgemed-dashboard)",
    )
    add_metrics_allow(p)
    add_retention_argument(p)
    add_web_arguments(p)


def run(args: argparse.Namespace) -> int:
    """Run ``edgemed dashboard`` (or one of its sub-commands) from parsed arguments (see ``add_arguments``).

    Args:
        args: the parsed command line.

    Returns:
        The exit code (0 after Ctrl-C or SIGTERM).

    Raises:
        ConfigError: bad options, database or port.
        BrokerRefusedError: plaintext MQTT to a remote broker without --allow-plaintext-remote.
    """
    action = getattr(args, "dashboard_action", None)
    if action == "export":
        from edgemed.dashboard.export import run_export

        return run_export(args)
    if action in ("users", "audit"):
        from edgemed.dashboard.audit_cli import run_audit
        from edgemed.dashboard.users_cli import run_users

        return run_users(args) if action == "users" else run_audit(args)
    if action in ("ingest", "serve", "acl"):
        from edgemed.dashboard.acl import run_acl
        from edgemed.dashboard.processes import run_ingest, run_serve

        return {"ingest": run_ingest, "serve": run_serve, "acl": run_acl}[action](args)
    from edgemed.dashboard.cli_args import broker_config, check_port, metrics_networks, retention_days
    from edgemed.dashboard.processes import device_expiry
    from edgemed.dashboard.web.launch import web_options

    missing = [name for name, value in (("--broker", args.broker), ("--db", args.db)) if value is None]
    if missing:
        raise ConfigError(
            f"edgemed dashboard needs {' and '.join(missing)}: edgemed dashboard --broker mqtt://HOST:1883 --db FILE "
            "(or `edgemed dashboard export --db FILE` to print what a database holds)"
        )
    check_port("--port", args.port)
    expiry = device_expiry(args.device_expiry_days)
    cfg = broker_config(args)
    allow = metrics_networks(args)
    web = web_options(args)

    def announce(url: str) -> None:
        print(f"edgemed: dashboard at {url} (receiving from {cfg.url}; Ctrl-C stops)", file=sys.stderr)

    return serve(
        args.broker,
        db=args.db,
        host=args.host,
        port=args.port,
        mqtt=cfg,
        on_ready=announce,
        device_expiry_s=expiry,
        public_origins=tuple(args.public_origin),
        consumer_id=args.consumer_id,
        metrics_allow=allow,
        health_retention_days=retention_days(args),
        web=web,
    )
