"""edgemed dashboard export: every stored result and study decision as the device sent it, one JSON per line.

    edgemed dashboard export --db fleet.sqlite3 [--since 2026-11-25T00:00:00Z] --format jsonl > audit.jsonl

For audits, migrations and independent checks (count what a device sent against what the dashboard holds). Each
line is the envelope's JSON text exactly as the device published it: for a single result or study decision the
message's bytes; for an element of a batch (edgemed.batch/1) the element's JSON, which is what the device
embedded. Two exceptions, both re-encoded compactly: an envelope whose source carried a file name (kept
without it: the dashboard never stores file names), and an envelope sent with line breaks between its tokens
(one line per envelope is what JSON Lines means). Lines come oldest first by the dashboard's reception time;
--since keeps those received at or after the given time (ISO 8601; a time without a zone is UTC).

An SQLite database is opened read-only, so a dashboard may keep running while its store is exported; on
PostgreSQL (``--db postgresql://...``) the export reads in one snapshot through a server-side cursor. Either way
the rows are streamed, so an export of millions of results needs no more memory than a few hundred.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from edgemed.errors import ConfigError

if TYPE_CHECKING:
    from sqlalchemy import Connection

    from edgemed.dashboard.db import Database

__all__ = ["add_export_arguments", "export_lines", "parse_since", "run_export"]

# Oldest first by reception; within one commit (one reception time) in the order filed: SQLite's rowid, and on
# PostgreSQL (no rowid) by device and seq.
_ROWS = {
    "sqlite": (
        "SELECT received_at, 0 AS k, rowid AS r, payload FROM results WHERE received_at >= :since "
        "UNION ALL SELECT received_at, 1, rowid, payload FROM studies WHERE received_at >= :since "
        "ORDER BY received_at, k, r"
    ),
    "postgresql": (
        "SELECT received_at, 0 AS k, site, device_id, seq, result_id, payload FROM results "
        "WHERE received_at >= :since UNION ALL SELECT received_at, 1, site, device_id, seq, result_id, payload "
        "FROM studies WHERE received_at >= :since ORDER BY received_at, k, site, device_id, seq, result_id"
    ),
}
#: Rows fetched from the server at a time on PostgreSQL.
FETCH_ROWS = 500


def parse_since(text: str) -> float:
    """Seconds since the epoch of an ISO 8601 time (``2026-11-25``, ``2026-11-25T10:00:00Z``, ``...+01:00``).

    Raises:
        ConfigError: not such a time.
    """
    try:
        when = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ConfigError(
            f"--since {text!r} is not an ISO 8601 time; write it like 2026-11-25 or 2026-11-25T10:00:00Z"
        ) from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def _open(db: str | Path) -> tuple[Database, Connection]:
    from sqlalchemy import inspect
    from sqlalchemy.exc import SQLAlchemyError

    from edgemed.dashboard.db import describe_error, open_database

    database = open_database(db, read_only=True)
    if database.path is not None and not database.path.is_file():
        raise ConfigError(f"no dashboard database at {db}: pass --db with the file `edgemed dashboard --db` writes")
    conn = None
    try:
        conn = database.engine.connect()
        tables = set(inspect(conn).get_table_names())
    except SQLAlchemyError as exc:
        if conn is not None:
            conn.close()
        database.dispose()
        if database.dialect == "postgresql":  # the server is unreachable, refuses the login, has no such database
            raise ConfigError(describe_error(database.display, exc)) from exc
        orig = getattr(exc, "orig", None) or exc
        raise ConfigError(
            f"cannot read {database.display} as a dashboard database ({orig}); pass --db with the dashboard's file"
        ) from exc
    if not {"results", "studies"} <= tables:
        conn.close()
        database.dispose()
        kind = "an SQLite" if database.dialect == "sqlite" else "a PostgreSQL"
        raise ConfigError(f"{database.display} is {kind} database but not a dashboard's (it has no results table)")
    return database, conn


def _line(payload: str) -> bytes:
    if "\n" in payload or "\r" in payload:
        # Whitespace between tokens only (JSON strings cannot hold a raw line break): compacted, same content.
        payload = json.dumps(json.loads(payload), separators=(",", ":"), ensure_ascii=False)
    return payload.encode("utf-8") + b"\n"


def export_lines(db: str | Path, since: float | None = None) -> Iterator[bytes]:
    """Every stored result and study decision, oldest first, one JSON Lines line each.

    Args:
        db: the dashboard database (``--db``: a file path or a URL).
        since: only those received at or after this time (seconds since the epoch); None for all.

    Yields:
        One line (ending in ``\\n``) per envelope.

    Raises:
        ConfigError: the file is missing, not a database, or not a dashboard's; the server cannot be reached.
    """
    from sqlalchemy import text
    from sqlalchemy.exc import SQLAlchemyError

    database, conn = _open(db)
    floor = float("-inf") if since is None else since
    try:
        # stream_results: a server-side cursor on PostgreSQL (psycopg's named cursor); SQLite steps row by row.
        rows = conn.execution_options(stream_results=True, yield_per=FETCH_ROWS).execute(
            text(_ROWS[database.dialect]), {"since": floor}
        )
        for row in rows:
            yield _line(row[-1])
    except SQLAlchemyError as exc:
        orig = getattr(exc, "orig", None) or exc
        raise ConfigError(f"cannot read {database.display} ({' '.join(str(orig).split())[:300]})") from exc
    finally:
        conn.close()
        database.dispose()


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``edgemed dashboard export``.

    Args:
        p: the sub-command's parser.
    """
    p.add_argument(
        "--db",
        required=True,
        metavar="DB",
        help="the dashboard's database (--db): its SQLite file, or postgresql://user@host:port/dbname",
    )
    p.add_argument(
        "--since",
        default=None,
        metavar="ISO-8601",
        help="only what the dashboard received at or after this time, e.g. 2026-11-25T10:00:00Z (no zone = UTC)",
    )
    p.add_argument(
        "--format", default="jsonl", choices=["jsonl"], help="jsonl (the default): one envelope per line (JSON Lines)"
    )


def run_export(args: argparse.Namespace, out: BinaryIO | None = None) -> int:
    """Run ``edgemed dashboard export``.

    Args:
        args: the parsed command line (``--db``, ``--since``, ``--format``).
        out: where the lines go; standard output when None.

    Returns:
        0 (also when a reader such as ``head`` closed the pipe early).

    Raises:
        ConfigError: a bad ``--since`` or database.
    """
    since = parse_since(args.since) if args.since is not None else None
    stream = out if out is not None else sys.stdout.buffer
    try:
        for line in export_lines(args.db, since):
            stream.write(line)
        stream.flush()
    except BrokenPipeError:
        if out is None:
            # The reader has what it wanted; without this, Python complains again when it flushes at exit.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
