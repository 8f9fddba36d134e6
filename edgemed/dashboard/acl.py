"""``edgemed dashboard acl``: a mosquitto ``acl_file`` that binds each device to its own site and device id.

A device publishes on ``edgemed/{site}/{device_id}/...`` and the dashboard checks that a payload's ``site`` and
``device_id`` agree with its topic, but without a broker ACL nothing stops a device (or whoever holds its
password) from publishing under another device's topics, or reading the fleet's results. A username pattern
(``pattern write edgemed/+/%u/#``) would bind the device id only and leave the site open, so the file has one
``user`` block per device, naming both:

* the device (username = its device id unless the devices file names another) may write its own ``results``,
  ``studies``, ``batches``, ``lost``, ``status`` (also its last will) and ``health``, and read its own
  ``receipts`` and the consumer state ``edgemed-consumer/{consumer}/+``; nothing else;
* the dashboard user reads ``edgemed/+/+/#`` and writes ``edgemed/+/+/receipts`` and
  ``edgemed-consumer/{consumer}/#``. mosquitto 2.0 grants a ``$share/{group}/...`` SUBSCRIBE without an ACL rule of
  its own and checks each message it delivers against the subscriber's ``read`` rules on the message's topic (found
  on mosquitto 2.0.11; see tests/test_dashboard_acl.py), so ``--group`` workers need no extra rule;
* everyone else (anonymous clients, users not listed) gets no rule: mosquitto denies them everything.

The devices are those the database has ever heard from, plus a devices file (CSV with a header ``site,
device_id,username``, or YAML: a list of mappings with those keys, or ``devices:`` holding one) for devices not
seen yet. Regenerate the file when a device is added, and make mosquitto reload it (SIGHUP).
"""

from __future__ import annotations

import argparse
import csv
import io
import re
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgemed.errors import ConfigError

__all__ = ["ACL_DESCRIPTION", "AclDevice", "acl_text", "add_acl_arguments", "load_devices_file", "run_acl"]

_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
#: Broker user names the file may hold: no whitespace or line break could smuggle a rule into the file.
_USER = re.compile(r"^[A-Za-z0-9_.@-]{1,128}$")
#: What a device writes, and what it reads, under its own ``edgemed/{site}/{device_id}/``.
DEVICE_WRITES = ("results", "studies", "batches", "lost", "status", "health")
DEVICE_READS = ("receipts",)

ACL_DESCRIPTION = """\
Print a mosquitto acl_file: one rule set per device, binding both its site and its device id (it may publish only
its own results, studies, batches, lost announcements, status and heartbeats, and read only its own receipts and
the consumer state), and the dashboard user's rules (read every device topic, write receipts and its consumer
state). Devices come from the database (every device it has heard from) and from --devices FILE (CSV or YAML with
site, device_id and optionally username) for devices not seen yet. The broker user of a device is its device id
unless the file names another. Use it with a password_file and allow_anonymous false; reload mosquitto (SIGHUP)
after regenerating it.

example:
  edgemed dashboard acl --db /var/lib/edgemed/fleet.sqlite3 --devices devices.csv > /etc/mosquitto/edgemed.acl
"""


@dataclass(frozen=True)
class AclDevice:
    """One device of the ACL: where it publishes and which broker user it logs in as."""

    site: str
    device_id: str
    username: str


def add_acl_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``edgemed dashboard acl``.

    Args:
        p: the sub-command's parser.
    """
    p.add_argument("--db", default=None, metavar="DB", help="the dashboard database: its devices are listed")
    p.add_argument(
        "--devices",
        type=Path,
        default=None,
        metavar="FILE",
        help="CSV (header site,device_id,username) or YAML list of devices to add, e.g. ones not seen yet",
    )
    p.add_argument(
        "--dashboard-user", default="dashboard", metavar="NAME", help="the dashboard's broker user (default dashboard)"
    )
    p.add_argument(
        "--consumer-id", default="dashboard", metavar="ID", help="the dashboard's consumer id (default dashboard)"
    )


def _device(site: Any, device_id: Any, username: Any, where: str) -> AclDevice:
    for name, value in (("site", site), ("device_id", device_id)):
        if not isinstance(value, str) or not _ID.match(value):
            raise ConfigError(f"{where}: {name} {str(value)[:80]!r} must be 1-64 letters, digits, _ or -")
    user = device_id if username in (None, "") else username
    if not isinstance(user, str) or not _USER.match(user):
        raise ConfigError(
            f"{where}: username {str(user)[:80]!r} must be 1-128 letters, digits or . _ @ - (it is a line of the "
            "acl_file)"
        )
    return AclDevice(site, device_id, user)


def load_devices_file(path: Path) -> list[AclDevice]:
    """Read a devices file: CSV (``.csv``, header ``site,device_id[,username]``) or YAML (``.yaml``/``.yml``).

    Args:
        path: the file.

    Returns:
        Its devices, in file order.

    Raises:
        ConfigError: unreadable, an unknown format, or a row without a valid site or device id.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"cannot read the devices file {path}: {exc}; pass --devices with a CSV or YAML file"
        ) from exc
    if path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(io.StringIO(text)))
        if rows and not {"site", "device_id"} <= set(rows[0]):
            raise ConfigError(f"{path}: the CSV needs a header line naming site,device_id (and optionally username)")
        return [
            _device(r.get("site"), r.get("device_id"), r.get("username"), f"{path} row {i + 2}")
            for i, r in enumerate(rows)
        ]
    if path.suffix.lower() in (".yaml", ".yml"):
        return list(_yaml_devices(path, text))
    raise ConfigError(f"{path}: the devices file must end in .csv, .yaml or .yml")


def _yaml_devices(path: Path, text: str) -> Iterator[AclDevice]:
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML ({exc})") from exc
    if isinstance(data, dict):
        data = data.get("devices")
    if not isinstance(data, list):
        raise ConfigError(f"{path}: expected a list of devices (site, device_id, username), or devices: holding one")
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise ConfigError(f"{path} device {i + 1}: expected a mapping with site and device_id")
        yield _device(item.get("site"), item.get("device_id"), item.get("username"), f"{path} device {i + 1}")


def _db_devices(db: str) -> Iterator[AclDevice]:
    from edgemed.dashboard.cli_args import open_store

    if "://" not in db and not Path(db).exists():
        raise ConfigError(f"no dashboard database at {db}: pass the dashboard's --db, or list devices with --devices")
    store = open_store(db)
    try:
        offset = 0
        while True:
            rows = store.fleet(offset=offset, limit=1000, expire_after_s=None)
            for row in rows:
                # The ingest checked these against the same pattern; an older database is checked again here.
                yield _device(row["site"], row["device_id"], None, f"device {row['site']}/{row['device_id']}")
            if len(rows) < 1000:
                return
            offset += 1000
    finally:
        store.close()


def merge_devices(devices: Iterable[AclDevice], dashboard_user: str) -> list[AclDevice]:
    """One entry per (site, device id), a later entry's username winning; every username used once.

    Args:
        devices: from the database, then the devices file (whose usernames override).
        dashboard_user: the dashboard's user, which no device may share.

    Returns:
        Sorted by site and device id.

    Raises:
        ConfigError: two devices with one username (the ACL could not tell them apart), or a device with the
            dashboard's.
    """
    by_key: dict[tuple[str, str], AclDevice] = {}
    for device in devices:
        by_key[(device.site, device.device_id)] = device
    users: dict[str, AclDevice] = {}
    for device in sorted(by_key.values(), key=lambda d: (d.site, d.device_id)):
        if device.username == dashboard_user:
            raise ConfigError(
                f"device {device.site}/{device.device_id} has the dashboard's user name {dashboard_user!r}: give it "
                "another username in --devices, or the dashboard another --dashboard-user"
            )
        other = users.get(device.username)
        if other is not None:
            raise ConfigError(
                f"devices {other.site}/{other.device_id} and {device.site}/{device.device_id} both log in as "
                f"{device.username!r}: each device needs its own broker user (name one in --devices), or either could "
                "publish as the other"
            )
        users[device.username] = device
    return sorted(by_key.values(), key=lambda d: (d.site, d.device_id))


def acl_text(devices: Iterable[AclDevice], *, dashboard_user: str = "dashboard", consumer_id: str = "dashboard") -> str:
    """The acl_file.

    Args:
        devices: from ``merge_devices``.
        dashboard_user: the dashboard's broker user.
        consumer_id: the dashboard's consumer id (``--consumer-id``).

    Returns:
        The file's text.

    Raises:
        ConfigError: a dashboard user or consumer id that cannot be written into the file.
    """
    if not _USER.match(dashboard_user):
        raise ConfigError(f"--dashboard-user {dashboard_user[:80]!r} must be 1-128 letters, digits or . _ @ -")
    if not _ID.match(consumer_id):
        raise ConfigError(f"--consumer-id {consumer_id[:80]!r} must be 1-64 letters, digits, _ or -")
    listed = list(devices)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    lines = [
        f"# mosquitto acl_file written by `edgemed dashboard acl` at {stamp}: {len(listed)} devices.",
        "# Use with password_file and allow_anonymous false; reload mosquitto (SIGHUP) after regenerating it.",
        "# Users not listed here, and anonymous clients, get no rule: mosquitto denies them everything.",
        "",
        f"user {dashboard_user}",
        "topic read edgemed/+/+/#",
        "topic write edgemed/+/+/receipts",
        f"topic write edgemed-consumer/{consumer_id}/#",
    ]
    for device in listed:
        base = f"edgemed/{device.site}/{device.device_id}"
        lines += ["", f"# {device.site}/{device.device_id}", f"user {device.username}"]
        lines += [f"topic write {base}/{kind}" for kind in DEVICE_WRITES]
        lines += [f"topic read {base}/{kind}" for kind in DEVICE_READS]
        lines.append(f"topic read edgemed-consumer/{consumer_id}/+")
    return "\n".join(lines) + "\n"


def run_acl(args: argparse.Namespace) -> int:
    """Run ``edgemed dashboard acl``: print the acl_file on standard output.

    Returns:
        0.

    Raises:
        ConfigError: neither --db nor --devices, an unreadable source, or devices the ACL cannot tell apart.
    """
    if args.db is None and args.devices is None:
        raise ConfigError(
            "edgemed dashboard acl needs --db (the devices the dashboard has seen) or --devices FILE, or both: "
            "edgemed dashboard acl --db fleet.sqlite3 --devices devices.csv > edgemed.acl"
        )
    devices: list[AclDevice] = list(_db_devices(str(args.db))) if args.db is not None else []
    if args.devices is not None:
        devices += load_devices_file(args.devices)
    merged = merge_devices(devices, args.dashboard_user)
    sys.stdout.write(acl_text(merged, dashboard_user=args.dashboard_user, consumer_id=args.consumer_id))
    print(f"edgemed: acl_file for {len(merged)} devices and dashboard user {args.dashboard_user}", file=sys.stderr)
    return 0
