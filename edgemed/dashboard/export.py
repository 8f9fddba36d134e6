"""edgemed dashboard export: every stored result and study decision as the device sent it, one JSON per line.

    edgemed dashboard export --db fleet.sqlite3 [--since 2026-11-25T00:00:00Z] --format jsonl > audit.jsonl

For audits, migrations and independent checks (count what a device sent against what the dashboard holds). Each
line is the envelope's JSON text exactly as the device published it: for a single result or study decision the
message's bytes; for an element of a batch (edgemed.batch/1) the element's JSON, which is what the device
embedded. Two exceptions, both re-encoded compactly: an envelope whose source carried a file name (kept
without it: the dashboard never stores file names), and an envelope sent with line breaks between its tokens
(one line per envelope is what JSON Lines means). Lines come oldest first by the dashboard's reception time;
--since keeps those received at or after the given time (ISO 8601; a time without a zone is UTC).

The database is opened read-only, so a dashboard may keep running while its store is exported; the rows are read
one at a time, so an export of millions of results needs no more memory than one.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

from edgemed.errors import ConfigError

__all__ = ["add_export_arguments", "export_lines", "parse_since", "run_export"]

_ROWS = (
    "SELECT received_at, 0 AS k, rowid AS r, payload FROM results WHERE received_at >= ? "
    "UNION ALL SELECT received_at, 1, rowid, payload FROM studies WHERE received_at >= ? "
    "ORDER BY received_at, k, r"
)


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


def _open(db: Path) -> sqlite3.Connection:
    if not db.is_file():
        raise ConfigError(f"no dashboard database at {db}: pass --db with the file `edgemed dashboard --db` writes")
    try:
        conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error as exc:
        raise ConfigError(
            f"cannot read {db} as a dashboard database ({exc}); pass --db with the dashboard's file"
        ) from exc
    if not {"results", "studies"} <= tables:
        conn.close()
        raise ConfigError(f"{db} is an SQLite database but not a dashboard's (it has no results table)")
    return conn


def _line(payload: str) -> bytes:
    if "\n" in payload or "\r" in payload:
        # Whitespace between tokens only (JSON strings cannot hold a raw line break): compacted, same content.
        payload = json.dumps(json.loads(payload), separators=(",", ":"), ensure_ascii=False)
    return payload.encode("utf-8") + b"\n"


def export_lines(db: Path, since: float | None = None) -> Iterator[bytes]:
    """Every stored result and study decision, oldest first, one JSON Lines line each.

    Args:
        db: the dashboard database.
        since: only those received at or after this time (seconds since the epoch); None for all.

    Yields:
        One line (ending in ``\\n``) per envelope.

    Raises:
        ConfigError: the file is missing, not a database, or not a dashboard's.
    """
    conn = _open(db)
    floor = float("-inf") if since is None else since
    try:
        for _at, _kind, _row, payload in conn.execute(_ROWS, (floor, floor)):
            yield _line(payload)
    except sqlite3.Error as exc:
        raise ConfigError(f"cannot read {db} ({exc})") from exc
    finally:
        conn.close()


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``edgemed dashboard export``.

    Args:
        p: the sub-command's parser.
    """
    p.add_argument("--db", required=True, type=Path, metavar="FILE", help="the dashboard's SQLite file (--db)")
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
