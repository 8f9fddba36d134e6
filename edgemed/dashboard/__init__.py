"""Central fleet dashboard: ingest the devices' MQTT results into SQLite and serve a page that shows them.

    edgemed dashboard --broker mqtt://127.0.0.1:1883 --db fleet.sqlite3 [--port 8080] [--host 127.0.0.1]
                      [--consumer-id dashboard] [--client-id edgemed-dashboard]
    edgemed dashboard export --db fleet.sqlite3 [--since 2026-11-25T00:00:00Z] --format jsonl > results.jsonl

The dashboard subscribes to edgemed/+/+/# at QoS 1 with a fixed client id and a persistent session, so results
published while it is down arrive when it comes back; duplicates are dropped by result id. Open
http://127.0.0.1:8080/ for the fleet table, urgent results waiting for review (with an acknowledge button) and
counts per triage level. It shows only what devices publish: no images, file names or patient ids.

The dashboard is the devices' consumer of record. After each commit it publishes, retained at QoS 1 on
edgemed/{site}/{device_id}/receipts, a receipt (edgemed.receipt/1) saying which seqs of the device it has settled
(stored, refused as a dead letter, or announced lost by the device), at most four a second per device; a device
whose profile names this consumer (delivery.consumer, the --consumer-id, default dashboard) keeps each result
until a receipt covers it. Each dashboard process says online or offline (retained, offline also as its last
will) on edgemed-consumer/{consumer-id}/{client-id}; online means its subscription is granted. Processes of one
consumer share --consumer-id and keep their own --client-id. Batches (edgemed.batch/1 on .../batches) are filed
element by element. `edgemed dashboard export` prints every stored result and study decision as it was sent.

The page has no login: it binds to 127.0.0.1 unless --host says otherwise; put an authenticating reverse proxy in
front of it before exposing it, and name the proxy's address with --public-origin https://PROXY-HOST so that
acknowledgements made through it are accepted.
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
    from edgemed.publish.config import MqttConfig

log = logging.getLogger(__name__)

__all__ = ["add_arguments", "run", "serve"]


def _merge_config(mqtt_url: str, mqtt: MqttConfig | None) -> MqttConfig:
    fields: dict[str, Any] = mqtt.model_dump() if mqtt is not None else {}
    fields["url"] = mqtt_url
    return _validate_config(fields)


def _validate_config(fields: dict[str, Any]) -> MqttConfig:
    from pydantic import ValidationError

    from edgemed.publish.config import MqttConfig

    try:
        return MqttConfig.model_validate(fields)
    except ValidationError as exc:
        from edgemed.validation import describe

        raise ConfigError(f"dashboard broker settings: {describe(exc, MqttConfig)}") from exc


def serve(
    mqtt_url: str,
    *,
    db: Path,
    host: str = "127.0.0.1",
    port: int = 8080,
    mqtt: MqttConfig | None = None,
    stop: threading.Event | None = None,
    on_ready: Callable[[str], None] | None = None,
    device_expiry_s: float | None = 7 * 86400.0,
    public_origins: tuple[str, ...] = (),
    consumer_id: str = "dashboard",
) -> int:
    """Run the ingest and the web server until ``stop`` is set or the process gets SIGINT/SIGTERM.

    Args:
        mqtt_url: ``mqtt://host:port`` or ``mqtts://host:port`` of the broker the devices publish to.
        db: SQLite file of the dashboard (created if missing; kept across restarts).
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

    Returns:
        0 after a clean stop.

    Raises:
        ConfigError: bad broker settings, an unusable database, a port that cannot be bound, a malformed
            public origin, or a consumer or client id that does not fit in a topic.
        BrokerRefusedError: plaintext MQTT to a remote broker without ``allow_plaintext_remote``.
    """
    from edgemed.dashboard.ingest import Ingest
    from edgemed.dashboard.origin import parse_origin
    from edgemed.dashboard.store import DashboardStore
    from edgemed.dashboard.web import make_server

    cfg = _merge_config(mqtt_url, mqtt)
    origins = tuple(parse_origin(o) for o in public_origins)  # a typo is refused before anything starts
    stop_event = stop if stop is not None else threading.Event()
    store = DashboardStore(db)
    ingest: Ingest | None = None
    server = None
    restore: list[tuple[signal.Signals, Any]] = []
    try:
        ingest = Ingest(cfg, store, consumer_id=consumer_id)
        server = make_server(
            store,
            host=host,
            port=port,
            ingest_snapshot=ingest.snapshot,
            device_expiry_s=device_expiry_s,
            public_origins=origins,
        )
        if stop is None and threading.current_thread() is threading.main_thread():

            def _on_signal(signum: int, frame: FrameType | None) -> None:
                stop_event.set()

            for sig in (signal.SIGINT, signal.SIGTERM):
                restore.append((sig, signal.signal(sig, _on_signal)))
        ingest.start()
        web = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="edgemed-web", daemon=True
        )
        web.start()
        log.info("dashboard at %s (database %s, broker %s)", server.url, db, cfg.url)
        if on_ready is not None:
            on_ready(server.url)
        while not stop_event.wait(0.5):
            pass
        return 0
    finally:
        for sig, handler in restore:
            signal.signal(sig, handler)
        if server is not None:
            server.shutdown()
            server.server_close()
        if ingest is not None:
            ingest.stop()
        store.close()


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``edgemed dashboard`` options to a parser, and its ``export`` sub-command.

    ``--broker`` and ``--db`` are required to serve; argparse cannot require them of the parent command while
    ``export`` (which needs only ``--db``) is a sub-command of it, so ``run`` checks them.

    Args:
        p: the sub-command's parser.
    """
    from edgemed.dashboard.export import __doc__ as export_doc
    from edgemed.dashboard.export import add_export_arguments

    actions = p.add_subparsers(dest="dashboard_action", metavar="export")
    export = actions.add_parser(
        "export",
        help="print every stored result and study decision as the device sent it, one JSON per line",
        description=export_doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_export_arguments(export)
    p.add_argument(
        "--broker",
        metavar="URL",
        help="required: broker the devices publish to: mqtt://host:1883 or mqtts://host:8883",
    )
    p.add_argument(
        "--db",
        type=Path,
        metavar="FILE",
        help="required: SQLite file for results and device state (created if missing, kept across restarts)",
    )
    p.add_argument(
        "--consumer-id",
        default="dashboard",
        metavar="ID",
        help="the consumer of record devices name in delivery.consumer: receipts and this process's online state "
        "name it; processes of one dashboard share it (default dashboard; letters, digits, _ or -)",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface for the web page (default 127.0.0.1; the page has no login of its own)",
    )
    p.add_argument("--port", type=int, default=8080, help="TCP port for the web page (default 8080)")
    p.add_argument(
        "--public-origin",
        action="append",
        default=[],
        metavar="URL",
        help="address of a reverse proxy in front of the page, e.g. https://dashboard.example.org: acknowledgements "
        "made through it are accepted (repeat for several)",
    )
    p.add_argument(
        "--device-expiry-days",
        type=float,
        default=7.0,
        metavar="DAYS",
        help="leave devices silent for this long out of the fleet table; their results stay (default 7; 0 = never)",
    )
    p.add_argument(
        "--client-id",
        default=None,
        help="MQTT client id; keep it fixed so queued results reach this dashboard, and unique per process "
        "(default edgemed-dashboard)",
    )
    p.add_argument("--username", default=None, help="broker user name")
    secret = p.add_mutually_exclusive_group()
    secret.add_argument(
        "--password-env", default=None, metavar="VAR", help="environment variable holding the broker password"
    )
    secret.add_argument(
        "--password-file", type=Path, default=None, metavar="FILE", help="file whose first line is the broker password"
    )
    p.add_argument("--ca-file", type=Path, default=None, help="PEM CA of the broker's certificate (mqtts://)")
    p.add_argument("--cert-file", type=Path, default=None, help="PEM client certificate, if the broker wants one")
    p.add_argument("--key-file", type=Path, default=None, help="PEM key of --cert-file")
    p.add_argument(
        "--mqtt-protocol",
        choices=["auto", "5", "3.1.1"],
        default="auto",
        help="MQTT version (default auto: 5, falling back to 3.1.1 when the broker refuses 5 or leaves it unanswered)",
    )
    p.add_argument(
        "--allow-plaintext-remote",
        action="store_true",
        help="allow mqtt:// to a broker on another machine (results then cross the network in clear)",
    )


def run(args: argparse.Namespace) -> int:
    """Run ``edgemed dashboard`` from parsed arguments (see ``add_arguments``).

    Args:
        args: the parsed command line.

    Returns:
        The exit code (0 after Ctrl-C or SIGTERM).

    Raises:
        ConfigError: bad options, database or port.
        BrokerRefusedError: plaintext MQTT to a remote broker without --allow-plaintext-remote.
    """
    if getattr(args, "dashboard_action", None) == "export":
        from edgemed.dashboard.export import run_export

        return run_export(args)
    missing = [name for name, value in (("--broker", args.broker), ("--db", args.db)) if value is None]
    if missing:
        raise ConfigError(
            f"edgemed dashboard needs {' and '.join(missing)}: edgemed dashboard --broker mqtt://HOST:1883 --db FILE "
            "(or `edgemed dashboard export --db FILE` to print what a database holds)"
        )
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be between 0 and 65535, not {args.port}")
    if not 0 <= args.device_expiry_days < 100_000:
        raise ConfigError(f"--device-expiry-days must be 0 (never) or a positive number, not {args.device_expiry_days}")
    expiry = args.device_expiry_days * 86400.0 or None
    fields: dict[str, Any] = {
        "url": args.broker,
        "client_id": args.client_id,
        "username": args.username,
        "password_env": args.password_env,
        "password_file": args.password_file,
        "allow_plaintext_remote": args.allow_plaintext_remote,
        "protocol": args.mqtt_protocol,
    }
    if args.ca_file or args.cert_file or args.key_file:
        fields["tls"] = {"ca_file": args.ca_file, "cert_file": args.cert_file, "key_file": args.key_file}
    cfg = _validate_config(fields)

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
    )
