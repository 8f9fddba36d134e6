"""The audit trail: who did what, when, from where, to which result, in an append-only, tamper-evident table.

Every login, failed login, logout, user change, review action, setting change and export appends one row to
``audit``. Each row's ``hmac`` is HMAC-SHA256, keyed by the audit key (``secrets.py``: a file outside the
database), over the previous row's ``hmac`` and the canonical JSON of this row's own fields, its ``id`` included::

    hmac[n] = HMAC(key, hmac[n-1] || "\\n" || {"action":..,"actor":..,"address":..,"at":..,"detail":..,"id":n,..})

so whoever can write the database but does not hold the key cannot edit a row, delete one, insert one or renumber
them without ``verify`` naming the first row that no longer holds. (Cutting rows off the end leaves a shorter
chain that still holds: compare the row count with an earlier export or ``/metrics`` to see that.)

Ordering. Rows are numbered by ``append`` itself (the last row's id + 1) and each chains to the row before it, so
two processes must never read the same last row: ``append`` runs under a database lock held until the appending
transaction commits. On PostgreSQL that is ``pg_advisory_xact_lock``, taken before the last row is read; on SQLite
the store's write transactions begin with ``BEGIN IMMEDIATE``, which holds the database's one write lock from the
start (``store._transaction``). So ``append`` must be called with a connection of a store write transaction; an
action whose audit row must commit with the change it records (a review, a user change) calls it inside that
change's transaction, everything else uses ``record``.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, TextIO

import sqlalchemy as sa

from edgemed.dashboard.tables import audit
from edgemed.errors import ConfigError

if TYPE_CHECKING:
    from pathlib import Path

    from sqlalchemy import Connection

    from edgemed.dashboard.secrets import Secrets
    from edgemed.dashboard.store import DashboardStore

__all__ = [
    "ACTIONS",
    "CSV_COLUMNS",
    "VerifyResult",
    "append",
    "count",
    "csv_chunks",
    "iso_time",
    "open_secrets",
    "record",
    "rows",
    "verify",
    "write_csv",
]

#: Every action the trail records (``append`` refuses any other: a typo would otherwise hide a row from filters).
ACTIONS = (
    "login",
    "login_failed",
    "logout",
    "user_added",
    "user_disabled",
    "user_enabled",
    "password_changed",
    "role_changed",
    "acknowledged",
    "closed",
    "escalated",
    "settings_changed",
    "export_results",
    "export_audit",
)
#: The fields the HMAC covers (every column but ``hmac`` itself).
_FIELDS = ("id", "at", "actor", "address", "action", "target", "site", "detail")
CSV_COLUMNS = ("id", "at", "actor", "address", "action", "target", "site", "detail", "hmac")
# The audit appender's advisory lock (the schema upgrade is 1, the heartbeat maintenance 2).
_LOCK_KEY = 0x6564676D65640003
_TEXT_MAX = 1000
#: Rows read per query by ``verify`` and ``write_csv`` (the SQLite connection is shared: it is not held long).
_CHUNK = 1000
# A spreadsheet runs a cell starting with one of these as a formula: such cells get a leading apostrophe.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


@dataclass(frozen=True)
class VerifyResult:
    """What ``verify`` found: ``ok``, the rows that hold, and the first row that does not (with the reason)."""

    ok: bool
    rows: int
    broken_id: int | None = None
    broken_at: float | None = None
    broken_action: str | None = None
    reason: str | None = None


def _canonical(row: Mapping[str, Any]) -> bytes:
    fields = {name: row[name] for name in _FIELDS}
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _mac(key: bytes, previous: str, row: Mapping[str, Any]) -> str:
    return hmac.new(key, previous.encode("ascii") + b"\n" + _canonical(row), hashlib.sha256).hexdigest()


def _text(name: str, value: str | None, *, required: bool = False) -> str | None:
    if value is None:
        if required:
            raise ValueError(f"an audit row needs {name}")
        return None
    if not isinstance(value, str) or (required and not value):
        raise ValueError(f"audit {name} must be a non-empty string, not {value!r:.80}")
    return value[:_TEXT_MAX]


def append(
    conn: Connection,
    key: bytes,
    *,
    at: float,
    actor: str,
    address: str | None,
    action: str,
    target: str | None = None,
    site: str | None = None,
    detail: Mapping[str, Any] | None = None,
) -> int:
    """Append one row to the audit trail, chained to the last row, inside the caller's write transaction.

    Args:
        conn: a connection inside a store write transaction (``store._transaction()``): the row commits or rolls
            back with it.
        key: the audit key (``Secrets.audit_key``).
        at: dashboard clock, seconds since the epoch.
        actor: who: a user name, ``cli:<os user>`` or ``system``.
        address: from where (the client's address), or None.
        action: one of ``ACTIONS``.
        target: what it was done to (a user name, a result id), or None.
        site: the site concerned, or None.
        detail: more, as JSON (never a password or a payload).

    Returns:
        The new row's id.

    Raises:
        ValueError: an unknown action, an empty actor, a time that is not finite, or a detail that is not JSON.
        sqlite3.Error, psycopg.Error: the database failed.
    """
    if action not in ACTIONS:
        raise ValueError(f"unknown audit action {action!r:.80}; one of {', '.join(ACTIONS)}")
    if not isinstance(at, (int, float)) or not math.isfinite(at):
        raise ValueError(f"audit time must be a finite number of seconds, not {at!r:.80}")
    detail_text = json.dumps(dict(detail or {}), sort_keys=True, separators=(",", ":"), allow_nan=False)
    if conn.dialect.name == "postgresql":
        # Held to the end of the transaction: the next appender reads this row as its previous one.
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_LOCK_KEY)))
    last = conn.execute(sa.select(audit.c.id, audit.c.hmac).order_by(audit.c.id.desc()).limit(1)).first()
    row: dict[str, Any] = {
        "id": 1 if last is None else int(last.id) + 1,
        "at": float(at),
        "actor": _text("actor", actor, required=True),
        "address": _text("address", address),
        "action": action,
        "target": _text("target", target),
        "site": _text("site", site),
        "detail": detail_text,
    }
    row["hmac"] = _mac(key, "" if last is None else str(last.hmac), row)
    conn.execute(sa.insert(audit), row)
    return int(row["id"])


def record(
    store: DashboardStore,
    secrets: Secrets,
    *,
    actor: str,
    action: str,
    address: str | None = None,
    target: str | None = None,
    site: str | None = None,
    detail: Mapping[str, Any] | None = None,
    at: float | None = None,
) -> int:
    """Append one row in a transaction of its own (see ``append`` for the arguments; ``at`` defaults to now).

    Returns:
        The new row's id.
    """
    import time

    when = time.time() if at is None else at
    with store._transaction() as conn:
        return append(
            conn, secrets.audit_key, at=when, actor=actor, address=address, action=action, target=target,
            site=site, detail=detail,
        )  # fmt: skip


def open_secrets(store: DashboardStore, path: Path) -> Secrets:
    """Load the secret file for this store, creating it only while the audit trail is empty.

    A missing key file beside a trail that has rows was lost (or this is the wrong ``--secret-file``): a new key
    would make every old row fail ``verify``, so it is refused instead of created.

    Args:
        store: the dashboard's store.
        path: the secret file (``secrets.resolve_secret_path``).

    Returns:
        The keys.

    Raises:
        ConfigError: the file is missing while the trail has rows, or cannot be used (see ``load_secrets``).
    """
    from edgemed.dashboard.secrets import load_secrets

    if not path.exists():
        n = count(store)
        if n:
            raise ConfigError(
                f"the secret file {path} is missing, but the audit trail holds {n} rows chained with its key: "
                "restore the file from a backup or pass the --secret-file the dashboard uses (a new key would "
                "make the whole trail fail `audit verify`)"
            )
    return load_secrets(path, create=True)


def _chunks(store: DashboardStore, where: list[Any]) -> Iterator[Any]:
    """Every row matching ``where``, oldest first, read ``_CHUNK`` at a time (keyset on ``id``)."""
    after = 0
    while True:
        with store._read() as conn:
            chunk = conn.execute(
                sa.select(audit).where(audit.c.id > after, *where).order_by(audit.c.id).limit(_CHUNK)
            ).mappings().all()  # fmt: skip
        if not chunk:
            return
        yield from chunk
        after = int(chunk[-1]["id"])


def verify(store: DashboardStore, key: bytes) -> VerifyResult:
    """Check the whole chain, oldest row first, and stop at the first row that does not hold.

    Args:
        store: the dashboard's store.
        key: the audit key the rows were written with.

    Returns:
        ``ok`` with the number of rows when every row holds; otherwise the first broken row's id, time, action
        and why (an edited row, a missing row before it, or a chain written with another key).
    """
    previous, expected, checked = "", 1, 0
    for row in _chunks(store, []):
        row_id = int(row["id"])
        reason = None
        if row_id != expected:
            missing = f"row {expected} is" if row_id == expected + 1 else f"rows {expected} to {row_id - 1} are"
            reason = f"{missing} missing before it (deleted, or this row renumbered)"
        elif not hmac.compare_digest(_mac(key, previous, row), str(row["hmac"])):
            reason = (
                "its HMAC does not match: the row was edited, or the chain was written with another key "
                "(check --secret-file)"
                if checked == 0
                else "its HMAC does not match: the row was edited after it was written"
            )
        if reason is not None:
            return VerifyResult(False, checked, row_id, float(row["at"]), str(row["action"]), reason)
        previous, expected, checked = str(row["hmac"]), row_id + 1, checked + 1
    return VerifyResult(True, checked)


def _filters(
    since: float | None, until: float | None, action: str | None = None, actor: str | None = None
) -> list[Any]:
    where: list[Any] = []
    if since is not None:
        where.append(audit.c.at >= since)
    if until is not None:
        where.append(audit.c.at < until)
    if action:
        where.append(audit.c.action == action)
    if actor:
        where.append(audit.c.actor == actor)
    return where


def rows(
    store: DashboardStore,
    *,
    since: float | None = None,
    until: float | None = None,
    limit: int = 100,
    offset: int = 0,
    action: str | None = None,
    actor: str | None = None,
) -> list[dict[str, Any]]:
    """Audit rows, newest first, for the admin page.

    Args:
        store: the dashboard's store.
        since: only rows at or after this time (seconds since the epoch).
        until: only rows before this time.
        limit: at most this many rows.
        offset: skip this many (paging).
        action: only this action.
        actor: only this actor.

    Returns:
        Dicts with every column (``detail`` as its JSON text).
    """
    stmt = sa.select(audit).where(*_filters(since, until, action, actor)).order_by(audit.c.id.desc())
    with store._read() as conn:
        found = conn.execute(stmt.limit(max(0, limit)).offset(max(0, offset))).mappings().all()
    return [dict(row) for row in found]


def count(
    store: DashboardStore,
    *,
    since: float | None = None,
    until: float | None = None,
    action: str | None = None,
    actor: str | None = None,
) -> int:
    """How many rows ``rows`` would page through with the same filters."""
    stmt = sa.select(sa.func.count()).select_from(audit).where(*_filters(since, until, action, actor))
    with store._read() as conn:
        return int(conn.execute(stmt).scalar_one())


def iso_time(at: float) -> str:
    """``at`` (seconds since the epoch) as ISO 8601 UTC with milliseconds, e.g. ``2026-12-01T21:13:46.120Z``."""
    return datetime.fromtimestamp(at, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _cell(value: Any) -> str:
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def _csv_rows(store: DashboardStore, since: float | None, until: float | None) -> Iterator[list[Any]]:
    for row in _chunks(store, _filters(since, until)):
        yield [row["id"], iso_time(float(row["at"]))] + [_cell(row[name]) for name in CSV_COLUMNS[2:]]


def csv_chunks(store: DashboardStore, since: float | None = None, until: float | None = None) -> Iterator[str]:
    """The CSV of ``write_csv`` as text chunks (the header, then about a thousand rows each), for streaming.

    Args:
        store: the dashboard's store.
        since: only rows at or after this time.
        until: only rows before this time.

    Yields:
        CSV text.
    """
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(CSV_COLUMNS)
    for n, cells in enumerate(_csv_rows(store, since, until), 1):
        writer.writerow(cells)
        if n % _CHUNK == 0:
            yield buf.getvalue()
            buf.seek(0)
            buf.truncate()
    yield buf.getvalue()


def write_csv(store: DashboardStore, out: TextIO, since: float | None = None, until: float | None = None) -> int:
    """Write the audit rows of a period as CSV (header ``CSV_COLUMNS``), oldest first, streamed.

    ``at`` is ISO 8601 UTC; a cell a spreadsheet would run as a formula (starting ``=``, ``+``, ``-``, ``@``) is
    written with a leading apostrophe. ``hmac`` is kept, so an export can be checked against the database later.

    Args:
        store: the dashboard's store.
        out: a text stream (opened with ``newline=""`` when it is a file).
        since: only rows at or after this time.
        until: only rows before this time.

    Returns:
        The number of rows written.
    """
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    n = 0
    for cells in _csv_rows(store, since, until):
        writer.writerow(cells)
        n += 1
    return n
