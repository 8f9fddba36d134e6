"""Command-line pieces the dashboard's commands share: broker options, ``--metrics-allow``, signals, names."""

from __future__ import annotations

import argparse
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from edgemed.errors import ConfigError

if TYPE_CHECKING:
    from edgemed.dashboard.store import DashboardStore
    from edgemed.publish.config import MqttConfig


def validate_config(fields: dict[str, Any]) -> MqttConfig:
    """Build the broker settings, with a one-line error naming the setting.

    Raises:
        ConfigError: a bad setting.
    """
    from pydantic import ValidationError

    from edgemed.publish.config import MqttConfig

    try:
        return MqttConfig.model_validate(fields)
    except ValidationError as exc:
        from edgemed.validation import describe

        raise ConfigError(f"dashboard broker settings: {describe(exc, MqttConfig)}") from exc


def add_broker_arguments(p: argparse.ArgumentParser, *, client_id_help: str, required: bool = False) -> None:
    """The broker options (URL, client and consumer id, credentials, TLS, protocol) of a dashboard command.

    Args:
        p: the command's parser.
        client_id_help: what ``--client-id`` defaults to and why it must stay fixed.
        required: argparse requires ``--broker`` (the parent ``edgemed dashboard`` checks it itself).
    """
    p.add_argument(
        "--broker",
        metavar="URL",
        required=required,
        help="required: broker the devices publish to: mqtt://host:1883 or mqtts://host:8883",
    )
    p.add_argument(
        "--consumer-id",
        default="dashboard",
        metavar="ID",
        help="the consumer of record devices name in delivery.consumer: receipts and this process's online state "
        "name it; processes of one dashboard share it (default dashboard; letters, digits, _ or -)",
    )
    p.add_argument("--client-id", default=None, metavar="ID", help=client_id_help)
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


def broker_config(args: argparse.Namespace) -> MqttConfig:
    """The broker settings from parsed ``add_broker_arguments`` options.

    Raises:
        ConfigError: a bad setting.
    """
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
    return validate_config(fields)


def add_metrics_allow(p: argparse.ArgumentParser, *, sub_command: bool = False) -> None:
    """``--metrics-allow CIDR`` (repeatable): who may read ``/metrics``.

    One network per option (``action="append"``), never ``nargs``: a list option would also swallow what follows it,
    so ``edgemed dashboard --metrics-allow 10.0.0.0/8 serve ...`` took ``serve`` for a network.

    Args:
        p: the command's parser.
        sub_command: ``p`` is a sub-command of ``edgemed dashboard``: when not given here, the value given to the
            parent before the sub-command's name is kept (an argparse default would replace it with the loopback).
    """
    p.add_argument(
        "--metrics-allow",
        action="append",
        default=argparse.SUPPRESS if sub_command else None,
        metavar="CIDR",
        help="a network whose clients may read /metrics without a login, e.g. 10.20.0.0/16; repeat the option (or "
        "separate with commas) for several: --metrics-allow 10.20.0.0/16 --metrics-allow fd00::/8 (default "
        "127.0.0.0/8 and ::1: the loopback only); any other client gets 403",
    )


def metrics_networks(args: argparse.Namespace) -> tuple[Any, ...]:
    """The parsed ``--metrics-allow`` values, each possibly a comma-separated list (the loopback when not given).

    Raises:
        ConfigError: a value that is not a network.
    """
    from edgemed.dashboard.metrics import DEFAULT_ALLOW, parse_allow

    given: list[str] | None = getattr(args, "metrics_allow", None)
    if not given:
        return parse_allow(DEFAULT_ALLOW)
    return parse_allow(part for value in given for part in value.split(","))


def check_port(option: str, port: int) -> None:
    """Refuse a TCP port outside 0-65535.

    Raises:
        ConfigError: out of range.
    """
    if not 0 <= port <= 65535:
        raise ConfigError(f"{option} must be between 0 and 65535, not {port}")


def shown_db(db: str | Path) -> str:
    """The database as the log shows it: a URL's password masked (``db.mask_url``)."""
    from edgemed.dashboard.db import mask_url

    return mask_url(str(db))


def add_retention_argument(p: argparse.ArgumentParser, *, sub_command: bool = False) -> None:
    """``--health-retention-days``: for the processes that file heartbeats (ingest, the embedded dashboard).

    On a sub-command the default is left to the parent parser, so that a value given before the sub-command's
    name is not replaced by the sub-command's default (as with ``add_metrics_allow``).
    """
    p.add_argument(
        "--health-retention-days",
        type=float,
        default=argparse.SUPPRESS if sub_command else 7.0,
        metavar="DAYS",
        help="keep each heartbeat this long (default 7); an hourly summary per device is kept for a year",
    )


def retention_days(args: argparse.Namespace) -> float:
    """``--health-retention-days``, checked.

    Raises:
        ConfigError: not a positive number.
    """
    days = float(getattr(args, "health_retention_days", 7.0))
    if not 0 < days < 100_000:
        raise ConfigError(f"--health-retention-days must be a positive number of days, not {days:g}")
    return days


def open_store(db: str | Path, *, health_retention_days: float = 7.0) -> DashboardStore:
    """Open ``--db`` as given: a file path, or a URL handed on as text.

    Never ``Path(db)``: it folds the ``//`` of ``postgresql://user@host/db`` into one slash, and the URL is lost
    (the store would take it for a file path, or refuse it).

    Raises:
        ConfigError: the database cannot be opened.
    """
    from edgemed.dashboard.store import DashboardStore

    return DashboardStore(
        db if isinstance(db, Path) or "://" in db else Path(db), health_retention_days=health_retention_days
    )


@contextmanager
def stop_on_signals(stop: threading.Event, *, install: bool) -> Iterator[None]:
    """While inside, SIGINT and SIGTERM set ``stop`` (only from the main thread, and only when ``install``)."""
    restore: list[tuple[signal.Signals, Any]] = []
    if install and threading.current_thread() is threading.main_thread():

        def _on_signal(signum: int, frame: FrameType | None) -> None:
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            restore.append((sig, signal.signal(sig, _on_signal)))
    try:
        yield
    finally:
        for sig, handler in restore:
            signal.signal(sig, handler)
