"""``edgemed dashboard ingest`` and ``edgemed dashboard serve``: the central side as separate processes.

The embedded ``edgemed dashboard`` runs one ingest and the page in one process against one SQLite file: right for
a clinic on a laptop. A region's fleet runs them apart, against one database: any number of ingest workers (with
``--group``, MQTT 5 shared subscriptions spread the devices' results over them) and one or more web processes.
The web process has no ingest of its own: its page and ``/metrics`` show every worker from its reports in the
database (``store.workers()``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgemed.dashboard.cli_args import (
    add_broker_arguments,
    add_metrics_allow,
    add_retention_argument,
    broker_config,
    check_port,
    metrics_networks,
    open_store,
    retention_days,
    shown_db,
    stop_on_signals,
)
from edgemed.errors import ConfigError

if TYPE_CHECKING:
    from edgemed.dashboard.metrics import Network
    from edgemed.dashboard.web.launch import WebOptions
    from edgemed.publish.config import MqttConfig

log = logging.getLogger(__name__)

INGEST_DESCRIPTION = """\
Run one ingest worker: subscribe to the broker, file what devices publish into the database, acknowledge each
message after the commit that holds it, publish receipts and this worker's consumer state. No web page (run
`edgemed dashboard serve` for it, against the same database).

Several workers share the load with --group NAME (MQTT 5 shared subscriptions: each result, study decision,
batch and lost announcement goes to one worker of the group; every worker takes status and heartbeats). Each
worker needs its own fixed --client-id: the default with --group is edgemed-ingest-NAME-HOSTNAME, so a second
worker on one host must pass one. SIGTERM or Ctrl-C stops cleanly: what arrived is committed and acknowledged,
its receipts sent, and the worker says offline.

example:
  edgemed dashboard ingest --db /var/lib/edgemed/fleet.sqlite3 --broker mqtt://127.0.0.1:1883 \\
      --group central --client-id ingest-1 --metrics-port 9101
"""

SERVE_DESCRIPTION = """\
Serve the dashboard pages, its JSON API and /metrics from the database, without an ingest of its own: the pages'
alerts and /metrics show every ingest worker from its reports in the database (`edgemed dashboard ingest`).
The pages and the API need a login (`edgemed dashboard users add NAME --db DB --role admin` creates the first
admin); sessions live in the database, so several serve processes behind a load balancer behave as one (give them
the same --secret-file). /metrics needs no login but answers only to --metrics-allow (default the loopback).

example:
  edgemed dashboard serve --db /var/lib/edgemed/fleet.sqlite3 --port 8080 --metrics-allow 10.20.0.0/16
"""


# -- edgemed dashboard ingest ---------------------------------------------------------------------------------

#: A group worker's session expiry unless --session-expiry says otherwise. mosquitto keeps handing a shared
#: subscription's share to a member whose persistent session is still there: a worker that stays down for a day
#: strands half the stream for a day (the devices' re-sends recover it, slowly). Long enough for systemd's restart
#: (RestartSec=2, docs/central.md) to find the session and its queue again.
GROUP_SESSION_EXPIRY_S = 60


def add_ingest_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``edgemed dashboard ingest``.

    Args:
        p: the sub-command's parser.
    """
    p.add_argument("--db", required=True, metavar="DB", help="the dashboard database: a SQLite file (or its URL)")
    add_broker_arguments(
        p,
        required=True,
        client_id_help="MQTT client id: fixed across restarts (the broker queues for it) and unique per worker "
        "(default edgemed-dashboard, or edgemed-ingest-GROUP-HOSTNAME with --group; a second worker on one host "
        "needs its own)",
    )
    p.add_argument(
        "--group",
        default=None,
        metavar="NAME",
        help="share the devices' results with the other workers of this group (MQTT 5 shared subscriptions "
        "$share/NAME/...); without it one worker takes everything (also on MQTT 3.1.1)",
    )
    p.add_argument(
        "--session-expiry",
        type=int,
        default=None,
        metavar="SECONDS",
        help="how long the broker keeps this worker's session while it is down (default 86400; with --group "
        f"{GROUP_SESSION_EXPIRY_S}: a shared-subscription member that stays down is dropped from the group then, "
        "instead of being handed its share of the fleet's results for a day; the devices send again what it held)",
    )
    p.add_argument("--metrics-port", type=int, default=None, metavar="N", help="serve this worker's /metrics on port N")
    p.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        metavar="H",
        help="interface of --metrics-port (default 127.0.0.1; 0.0.0.0 or :: with --metrics-allow for a scraper "
        "on another machine)",
    )
    add_metrics_allow(p, sub_command=True)
    add_retention_argument(p, sub_command=True)


def session_expiry(given: int | None, group: str | None) -> int | None:
    """The session expiry an ingest worker asks for: ``--session-expiry``, else ``GROUP_SESSION_EXPIRY_S`` for a
    group worker, else None (the broker settings' default, a day).

    Raises:
        ConfigError: outside MQTT 5's range.
    """
    if given is None:
        return GROUP_SESSION_EXPIRY_S if group is not None else None
    if not 0 <= given <= 0xFFFFFFFF:
        raise ConfigError(f"--session-expiry must be between 0 and 4294967295 seconds, not {given}")
    return given


def run_ingest(args: argparse.Namespace) -> int:
    """Run ``edgemed dashboard ingest`` from parsed arguments.

    Returns:
        0 after SIGTERM or Ctrl-C.

    Raises:
        ConfigError: bad options, database or port; ``--group`` on an MQTT 3.1.1-only broker.
        BrokerRefusedError: plaintext MQTT to a remote broker without --allow-plaintext-remote.
    """
    cfg = broker_config(args)
    expiry = session_expiry(args.session_expiry, args.group)
    if expiry is not None:
        cfg = cfg.model_copy(update={"session_expiry_s": expiry})
    allow = metrics_networks(args)
    if args.metrics_port is not None:
        check_port("--metrics-port", args.metrics_port)
    metrics = (args.metrics_host, args.metrics_port) if args.metrics_port is not None else None
    return ingest_worker(
        cfg,
        db=args.db,
        group=args.group,
        consumer_id=args.consumer_id,
        metrics=metrics,
        metrics_allow=allow,
        health_retention_days=retention_days(args),
    )


def ingest_worker(
    cfg: MqttConfig,
    *,
    db: str | Path,
    group: str | None = None,
    consumer_id: str = "dashboard",
    metrics: tuple[str, int] | None = None,
    metrics_allow: tuple[Network, ...] | None = None,
    stop: threading.Event | None = None,
    on_ready: Callable[[str], None] | None = None,
    health_retention_days: float = 7.0,
) -> int:
    """Run one ingest worker until ``stop`` is set or the process gets SIGINT/SIGTERM.

    Args:
        cfg: broker settings (its ``client_id``, when set, is the worker's).
        db: the database.
        group: the shared-subscription group; None: a single worker with a plain subscription.
        consumer_id: the consumer of record the worker belongs to.
        metrics: (host, port) for this worker's ``/metrics``; None: not served.
        metrics_allow: networks that may read it; None: the loopback.
        stop: set it to stop; when None, SIGINT and SIGTERM stop (only from the main thread).
        on_ready: called with the worker's client id once it started.
        health_retention_days: how long raw heartbeats are kept (hourly summaries: a year).

    Returns:
        0 after a clean stop.

    Raises:
        ConfigError: an unusable database, group, client id or metrics port; ``--group`` on a broker that speaks
            only MQTT 3.1.1.
    """
    from edgemed.dashboard.ingest import Ingest
    from edgemed.dashboard.metrics import DEFAULT_ALLOW, MetricsCollector, MetricsServer, parse_allow

    stop_event = stop if stop is not None else threading.Event()
    store = open_store(db, health_retention_days=health_retention_days)
    ingest: Ingest | None = None
    server: MetricsServer | None = None
    try:
        ingest = Ingest(cfg, store, consumer_id=consumer_id, group=group)
        worker = ingest
        if metrics is not None:
            allow = metrics_allow if metrics_allow is not None else parse_allow(DEFAULT_ALLOW)
            server = MetricsServer(metrics, MetricsCollector(lambda: [worker.live_row()]), allow)
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()
        with stop_on_signals(stop_event, install=stop is None):
            ingest.start()
            where = f"; metrics at {server.url}" if server is not None else ""
            group_text = f" (group {group})" if group else ""
            print(
                f"edgemed: ingest worker {ingest.client_id}{group_text} receiving from {cfg.url} into "
                f"{shown_db(db)}{where}; SIGTERM or Ctrl-C stops",
                file=sys.stderr,
            )
            if on_ready is not None:
                on_ready(ingest.client_id)
            while not stop_event.wait(0.5):
                ingest.check()
        return 0
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
        if ingest is not None:
            ingest.stop()  # commit, acknowledge, last receipts, offline, last report
        store.close()


# -- edgemed dashboard serve ----------------------------------------------------------------------------------


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``edgemed dashboard serve``.

    Args:
        p: the sub-command's parser.
    """
    p.add_argument("--db", required=True, metavar="DB", help="the dashboard database: a SQLite file (or its URL)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface for the page (default 127.0.0.1; elsewhere use --tls-cert/--tls-key or a TLS proxy)",
    )
    p.add_argument("--port", type=int, default=8080, help="TCP port for the page and /metrics (default 8080)")
    p.add_argument(
        "--public-origin",
        action="append",
        default=[],
        metavar="URL",
        help="address of a reverse proxy in front of the page, e.g. https://dashboard.example.org (repeat for several)",
    )
    p.add_argument(
        "--device-expiry-days",
        type=float,
        default=7.0,
        metavar="DAYS",
        help="leave devices silent for this long out of the fleet table and /metrics (default 7; 0 = never)",
    )
    add_metrics_allow(p, sub_command=True)
    from edgemed.dashboard.web.launch import add_web_arguments

    add_web_arguments(p, sub_command=True)


def device_expiry(days: float) -> float | None:
    """``--device-expiry-days`` in seconds (None for 0: never).

    Raises:
        ConfigError: a negative or absurd value.
    """
    from edgemed.errors import ConfigError

    if not 0 <= days < 100_000:
        raise ConfigError(f"--device-expiry-days must be 0 (never) or a positive number, not {days}")
    return days * 86400.0 or None


def run_serve(args: argparse.Namespace) -> int:
    """Run ``edgemed dashboard serve`` from parsed arguments.

    Returns:
        0 after SIGTERM or Ctrl-C.

    Raises:
        ConfigError: bad options, database or port.
    """
    from edgemed.dashboard.web.launch import web_options

    check_port("--port", args.port)
    return serve_web(
        db=args.db,
        web=web_options(args),
        host=args.host,
        port=args.port,
        device_expiry_s=device_expiry(args.device_expiry_days),
        public_origins=tuple(args.public_origin),
        metrics_allow=metrics_networks(args),
    )


def serve_web(
    *,
    db: str | Path,
    host: str = "127.0.0.1",
    port: int = 8080,
    device_expiry_s: float | None = 7 * 86400.0,
    public_origins: tuple[str, ...] = (),
    metrics_allow: tuple[Network, ...] | None = None,
    stop: threading.Event | None = None,
    on_ready: Callable[[str], None] | None = None,
    web: WebOptions | None = None,
) -> int:
    """Serve the page, the API and ``/metrics`` from the database until ``stop`` is set or SIGINT/SIGTERM.

    Args:
        db: the database.
        host: interface; 127.0.0.1 by default.
        port: TCP port; 0 picks a free one.
        device_expiry_s: devices silent for longer are left out of the table and the metrics; None keeps all.
        public_origins: a reverse proxy's origins.
        metrics_allow: networks that may read ``/metrics``; None: the loopback.
        stop: set it to stop; when None, SIGINT and SIGTERM stop (only from the main thread).
        on_ready: called with the page's URL once bound.
        web: TLS, single sign-on, session time-outs, the key file; None: defaults.

    Returns:
        0 after a clean stop.

    Raises:
        ConfigError: an unusable database or key file, a port that cannot be bound, a malformed public origin.
    """
    from edgemed.dashboard.metrics import store_collector
    from edgemed.dashboard.origin import parse_origin
    from edgemed.dashboard.web.launch import WebOptions, start_web

    origins = tuple(parse_origin(o) for o in public_origins)
    stop_event = stop if stop is not None else threading.Event()
    store = open_store(db)
    server: Any = None
    try:
        server = start_web(
            store,
            db=db,
            host=host,
            port=port,
            options=web if web is not None else WebOptions(),
            public_origins=origins,
            device_expiry_s=device_expiry_s,
            metrics=store_collector(store, device_expiry_s=device_expiry_s),
            metrics_allow=metrics_allow,
        )
        with stop_on_signals(stop_event, install=stop is None):
            print(
                f"edgemed: dashboard page at {server.url} and {server.url}metrics (database {shown_db(db)}; the "
                "ingest runs apart: edgemed dashboard ingest); SIGTERM or Ctrl-C stops",
                file=sys.stderr,
            )
            if on_ready is not None:
                on_ready(server.url)
            while not stop_event.wait(0.5):
                pass
        return 0
    finally:
        if server is not None:
            server.stop()
        store.close()
