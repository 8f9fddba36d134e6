"""``edgemed dashboard audit``: check the audit trail's HMAC chain, and export it as CSV."""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path
from typing import TextIO

from edgemed.dashboard.users_cli import add_db_arguments
from edgemed.errors import ConfigError

__all__ = ["AUDIT_DESCRIPTION", "add_audit_arguments", "run_audit"]

AUDIT_DESCRIPTION = """\
The audit trail records every login, failed login, logout, user change, review action, setting change and export
(who, when, from where, what, which result). Each row carries an HMAC chained to the row before it, keyed by the
secret file (DB.key beside an SQLite database; --secret-file with PostgreSQL), which is kept outside the database:
whoever can write the database cannot edit, delete or insert a row without `verify` naming the first row that no
longer holds.

verify exits 0 when the chain holds ("audit chain holds: N rows") and 1 naming the first broken row (its id, time
and action, and why). export prints the rows of a period as CSV (oldest first) and is itself audited.

examples:
  edgemed dashboard audit verify --db fleet.sqlite3
  edgemed dashboard audit verify --db postgresql://edgemed@db.example.org/fleet --secret-file /etc/edgemed/dash.key
  edgemed dashboard audit export --db fleet.sqlite3 --since 2026-11-01 --until 2026-12-01 > audit-november.csv
"""


def add_audit_arguments(p: argparse.ArgumentParser) -> None:
    """The sub-commands and options of ``edgemed dashboard audit``.

    Args:
        p: the ``audit`` parser.
    """
    sub = p.add_subparsers(dest="audit_action", metavar="{verify,export}")
    verify = sub.add_parser(
        "verify",
        help="check the HMAC chain: exit 0 when it holds, 1 naming the first broken row",
        description="Check every row of the audit trail against the secret file's key, oldest first.",
        epilog="examples:\n  edgemed dashboard audit verify --db fleet.sqlite3\n"
        "  edgemed dashboard audit verify --db postgresql://edgemed@db/fleet --secret-file /etc/edgemed/dash.key",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_db_arguments(verify)
    export = sub.add_parser(
        "export",
        help="print the audit rows of a period as CSV (itself audited)",
        description="Print the audit rows as CSV on standard output, oldest first: id, at (UTC), actor, address, "
        "action, target, site, detail (JSON), hmac.",
        epilog="example:\n  edgemed dashboard audit export --db fleet.sqlite3 --since 2026-11-01 --until 2026-12-01 "
        "> audit.csv",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_db_arguments(export)
    for flag, what in (("--since", "at or after"), ("--until", "before")):
        export.add_argument(
            flag, default=None, metavar="ISO-8601", help=f"only rows {what} this time, e.g. 2026-11-01 (no zone = UTC)"
        )


def _verify(db: str, secret_file: Path | None, out: TextIO) -> int:
    from edgemed.dashboard import audit
    from edgemed.dashboard.cli_args import open_store
    from edgemed.dashboard.secrets import load_secrets, resolve_secret_path

    if "://" not in db and not Path(db).is_file():
        raise ConfigError(f"no dashboard database at {db}: pass --db with the file `edgemed dashboard --db` writes")
    secrets = load_secrets(resolve_secret_path(db, secret_file), create=False)
    store = open_store(db)
    try:
        result = audit.verify(store, secrets.audit_key)
    finally:
        store.close()
    if result.ok:
        print(f"audit chain holds: {result.rows} rows", file=out)
        return 0
    when = audit.iso_time(result.broken_at) if result.broken_at is not None else "?"
    print(
        f"audit chain broken at row {result.broken_id} ({when}, {result.broken_action}): {result.reason}; "
        f"the {result.rows} rows before it hold",
        file=out,
    )
    return 1


def _export(db: str, secret_file: Path | None, args: argparse.Namespace, out: TextIO) -> int:
    from edgemed.dashboard import audit
    from edgemed.dashboard.cli_args import open_store
    from edgemed.dashboard.export import parse_since
    from edgemed.dashboard.secrets import resolve_secret_path
    from edgemed.dashboard.users_cli import cli_actor

    since = parse_since(args.since) if args.since is not None else None
    until = parse_since(args.until) if args.until is not None else None
    store = open_store(db)
    try:
        secrets = audit.open_secrets(store, resolve_secret_path(db, secret_file))
        # Audited before the first row leaves (as the page does): an export cut short by a full disk, an error or
        # Ctrl-C still shows in the trail.
        audit.record(
            store, secrets, actor=cli_actor(), address=socket.gethostname()[:200] or None, action="export_audit",
            detail={"since": args.since, "until": args.until, "rows": audit.count(store, since=since, until=until),
                    "via": "cli"},
        )  # fmt: skip
        try:
            n = audit.write_csv(store, out, since, until)
            out.flush()
        except BrokenPipeError:
            if out is sys.stdout:  # the reader stopped early (head): no second complaint at exit
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            n = -1
    finally:
        store.close()
    print(f"edgemed: exported {max(n, 0)} audit rows", file=sys.stderr)
    return 0


def run_audit(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run ``edgemed dashboard audit verify|export``.

    Args:
        args: the parsed command line.
        out: where the report or the CSV goes (standard output when None).

    Returns:
        ``verify``: 0 when the chain holds, 1 when a row is broken. ``export``: 0.

    Raises:
        ConfigError: no action or ``--db``, a bad time, an unusable database, or a missing secret file.
    """
    action = getattr(args, "audit_action", None)
    db = getattr(args, "db", None)
    if action is None or db is None:
        raise ConfigError(
            "edgemed dashboard audit needs verify or export and --db, e.g. audit verify --db fleet.sqlite3"
        )
    stream = out if out is not None else sys.stdout
    secret_file = getattr(args, "secret_file", None)
    if action == "verify":
        return _verify(db, secret_file, stream)
    return _export(db, secret_file, args, stream)
