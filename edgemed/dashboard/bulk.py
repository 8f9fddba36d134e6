"""The results and study decisions of one batch, written set-based: one statement per table, not per message.

The store files a batch in one transaction. Message by message that is five statements per result (a savepoint,
the insert, its settled row, its device's last_seen, the release); here it is one multi-row
``INSERT ... ON CONFLICT (result_id) DO NOTHING RETURNING result_id`` per table, one look-up of the ids that were
already stored, one set-based write of the settled rows and one of the devices, all under one savepoint.

The outcome of each message is what the message-by-message path gives: the first copy of a ``result_id`` is
``stored`` (or a ``duplicate`` of the row already kept), a later copy is a ``duplicate`` when it names the same
device, stream and seq and a conflict (a dead letter) when it names another. When the database refuses anything
in the set (a constraint, a value it cannot hold), the savepoint is rolled back and the store files the same
messages one by one, each in a savepoint of its own, so the one it refuses becomes a dead letter alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError

from edgemed.dashboard.rollup import count_results
from edgemed.dashboard.rows import result_row, row_key, study_row
from edgemed.dashboard.tables import devices, results, settled, studies
from edgemed.dashboard.validate import Filing

#: A ``result_id`` already stored for another device, stream or seq: the message is a dead letter with this reason.
CONFLICT = "result_id is already stored for another result (another device, stream or seq)"


@dataclass(frozen=True)
class Conflict:
    """The outcome of a message whose ``result_id`` names another result: the store files it as a dead letter."""

    reason: str = CONFLICT


Outcome = str | Conflict


class Refused(Exception):
    """The database refused something in the set (it is rolled back): file these messages one by one."""


# Statements written in the ON CONFLICT syntax both engines share, run through the driver directly (``?`` becomes
# psycopg's ``%s``): SQLAlchemy's per-row parameter processing cost about a third of a batch's time on SQLite.
_TOUCH = (
    "INSERT INTO devices (site, device_id, last_seen) VALUES (?, ?, ?) ON CONFLICT (site, device_id) DO UPDATE SET "
    "last_seen = CASE WHEN devices.last_seen >= excluded.last_seen THEN devices.last_seen ELSE excluded.last_seen END"
)
_SETTLE = (
    "INSERT INTO settled (site, device_id, stream, seq, how) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (site, device_id, stream, seq) DO UPDATE SET how = excluded.how "
    "WHERE excluded.how = 'stored' AND settled.how <> 'stored'"
)
#: Rows per multi-row INSERT on SQLite (it allows 32,766 parameters in one statement).
CHUNK_ROWS = 1000
_PG_ARRAY = {sa.Text: "text[]", sa.BigInteger: "bigint[]", sa.Integer: "integer[]", sa.Float: "float8[]"}


def _pg_types(table: sa.Table, names: Sequence[str]) -> list[str]:
    return [next(t for kind, t in _PG_ARRAY.items() if isinstance(table.c[n].type, kind)) for n in names]


def _unnest(table: sa.Table, names: Sequence[str], tail: str) -> str:
    """PostgreSQL: one INSERT of any number of rows, passed as one array per column.

    A statement of fixed shape, so psycopg prepares it once; a multi-row VALUES list of 8,000 placeholders cost
    more to parse in the client than the insert took in the server.
    """
    arrays = ", ".join(f"%s::{t}" for t in _pg_types(table, names))
    return f"INSERT INTO {table.name} ({', '.join(names)}) SELECT * FROM unnest({arrays}) {tail}"


def _columns(rows: Sequence[tuple[Any, ...]], width: int) -> tuple[list[Any], ...]:
    return tuple([row[i] for row in rows] for i in range(width))


def run_many(
    conn: Connection, table: sa.Table, names: Sequence[str], sql: str, rows: Sequence[tuple[Any, ...]]
) -> None:
    """Insert rows with one statement: executemany of ``INSERT ... VALUES (?, ...) <tail>`` on SQLite, one
    ``unnest`` INSERT on PostgreSQL (the rows' keys must then be distinct: one statement touches a row once)."""
    if not rows:
        return
    if conn.dialect.name == "postgresql":
        tail = sql[sql.index(" ON CONFLICT") :]
        conn.exec_driver_sql(_unnest(table, names, tail), _columns(rows, len(names)))
    else:
        conn.exec_driver_sql(sql, list(rows))


def touch_devices(conn: Connection, seen: dict[tuple[str, str], float]) -> None:
    """Devices heard from now: added when new, ``last_seen`` moved forward (never back) when known.

    Args:
        conn: in the store's transaction.
        seen: ``(site, device_id) -> when``.
    """
    run_many(
        conn, devices, ("site", "device_id", "last_seen"), _TOUCH, [(s, d, at) for (s, d), at in sorted(seen.items())]
    )


def settle_stored(conn: Connection, keys: Sequence[tuple[str, str, str, int]]) -> None:
    """``settlement.settle(..., "stored")`` for each key, in one executemany (keys may repeat)."""
    names = ("site", "device_id", "stream", "seq", "how")
    run_many(conn, settled, names, _SETTLE, [(*key, "stored") for key in sorted(set(keys))])


def _insert_returning(conn: Connection, table: sa.Table, rows: list[dict[str, Any]]) -> set[str]:
    """Insert the rows (``ON CONFLICT (result_id) DO NOTHING``); the ids actually inserted."""
    names = [c.name for c in table.columns]
    tail = "ON CONFLICT (result_id) DO NOTHING RETURNING result_id"
    if conn.dialect.name == "postgresql":
        return _copy_returning(conn, table, names, [tuple(row[n] for n in names) for row in rows], tail)
    inserted: set[str] = set()
    for start in range(0, len(rows), CHUNK_ROWS):
        chunk = rows[start : start + CHUNK_ROWS]
        values = ", ".join(["(" + ", ".join("?" * len(names)) + ")"] * len(chunk))
        sql = f"INSERT INTO {table.name} ({', '.join(names)}) VALUES {values} {tail}"
        params = tuple(row[name] for row in chunk for name in names)
        inserted.update(r[0] for r in conn.exec_driver_sql(sql, params))
    return inserted


def _copy_returning(
    conn: Connection, table: sa.Table, names: Sequence[str], rows: Sequence[tuple[Any, ...]], tail: str
) -> set[str]:
    """PostgreSQL: COPY the rows into a session-private staging table, then one INSERT ... SELECT into ``table``.

    COPY sends the rows as one stream the server parses; the ``unnest`` arrays it replaces were converted in
    Python one element at a time by the driver, about half of an ingest worker's CPU (bench_ingest: 2 workers
    4,900 -> 10,000 results/s). The staging table is created on first use in each database session (``IF NOT
    EXISTS``: cheap, and right even after a rolled-back transaction took an earlier creation with it) and emptied
    before each use; ``ON COMMIT DELETE ROWS`` leaves nothing behind between transactions. Rows go into ``table``
    in ``result_id`` order, so two workers lock overlapping ids in the same order.
    """
    import psycopg

    raw = conn.connection.dbapi_connection
    if not isinstance(raw, psycopg.Connection):  # the engine is built on psycopg 3 (db.py)
        raise TypeError(f"expected a psycopg connection, not {type(raw).__name__}")
    staging = f"edgemed_staging_{table.name}"
    cols = ", ".join(names)
    try:
        with raw.cursor() as cur:
            cur.execute(
                f"CREATE TEMP TABLE IF NOT EXISTS {staging} (LIKE {table.name} INCLUDING DEFAULTS) "
                "ON COMMIT DELETE ROWS"
            )
            cur.execute(f"DELETE FROM {staging}")
            with cur.copy(f"COPY {staging} ({cols}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            cur.execute(f"INSERT INTO {table.name} ({cols}) SELECT {cols} FROM {staging} ORDER BY result_id {tail}")
            return {str(r[0]) for r in cur.fetchall()}
    except psycopg.Error as exc:
        # As SQLAlchemy would have raised it through exec_driver_sql: the store tells a message the database
        # refuses (DataError: a NUL in a text, IntegrityError) from a database that fails by these classes.
        raise DBAPIError.instance(
            f"COPY {staging}", None, exc, psycopg.Error, hide_parameters=True, dialect=conn.dialect
        ) from exc


def _insert_new(conn: Connection, table: sa.Table, rows: list[dict[str, Any]]) -> tuple[set[str], dict[str, Any]]:
    """Insert the rows (one per ``result_id``); the ids inserted, and the key stored under each one that was not."""
    inserted = _insert_returning(conn, table, rows)
    missing = [row["result_id"] for row in rows if row["result_id"] not in inserted]
    kept: dict[str, Any] = {}
    if missing:
        cols = (table.c.result_id, table.c.site, table.c.device_id, table.c.stream, table.c.seq)
        for rid, *key in conn.execute(sa.select(*cols).where(table.c.result_id.in_(missing))):
            kept[rid] = tuple(key)
    return inserted, kept


def _file_table(
    conn: Connection, table: sa.Table, items: list[tuple[int, dict[str, Any]]], now: float
) -> dict[int, Outcome]:
    first: dict[str, dict[str, Any]] = {}
    for _, row in items:
        first.setdefault(row["result_id"], row)
    rows = list(first.values())  # in the batch's order: SQLite's rowid then orders the export within a commit
    if conn.dialect.name == "postgresql":
        # In result_id order: two workers inserting overlapping ids (a redelivery) then lock them in the same
        # order and wait for each other instead of deadlocking (SQLite has one writer at a time anyway).
        rows.sort(key=lambda row: str(row["result_id"]))
    inserted, kept = _insert_new(conn, table, rows)
    for rid in inserted:
        kept[rid] = row_key(first[rid])
    out: dict[int, Outcome] = {}
    stored_keys: list[tuple[str, str, str, int]] = []
    seen: dict[tuple[str, str], float] = {}
    for index, row in items:
        rid, key = row["result_id"], row_key(row)
        if kept.get(rid) != key:
            out[index] = Conflict()  # stores nothing: its seq must not be receipted as stored
            continue
        fresh = rid in inserted and first[rid] is row
        out[index] = "stored" if fresh else "duplicate"
        stored_keys.append(key)  # a duplicate settles again, harmlessly
        seen[(key[0], key[1])] = now
    settle_stored(conn, stored_keys)
    touch_devices(conn, seen)
    if table is results:
        count_results(conn, (first[rid] for rid in inserted))
    return out


def file_set(conn: Connection, filings: Sequence[tuple[int, Filing]], now: float) -> dict[int, Outcome]:
    """File results and study decisions (not retained) set-based, under one savepoint.

    Args:
        conn: in the store's transaction.
        filings: ``(position in the batch, filing)``, each of kind ``results`` or ``studies`` with a body.
        now: dashboard clock (``received_at``).

    Returns:
        The outcome per position: ``"stored"``, ``"duplicate"`` or a ``Conflict``.

    Raises:
        Refused: the database refused something (nothing of the set is kept); file them one by one.
        sqlalchemy.exc.SQLAlchemyError: the database failed (the whole batch fails).
    """
    by_table: dict[str, list[tuple[int, dict[str, Any]]]] = {"results": [], "studies": []}
    try:
        for index, filing in filings:
            body = filing.body or {}
            build = result_row if filing.kind == "results" else study_row
            by_table[filing.kind].append((index, build(body, now, filing.payload)))
    except (KeyError, ValueError, TypeError) as exc:
        raise Refused(str(exc)) from exc
    out: dict[int, Outcome] = {}
    savepoint = conn.begin_nested()
    try:
        for name, table in (("results", results), ("studies", studies)):
            if by_table[name]:
                out.update(_file_table(conn, table, by_table[name], now))
    except (sa.exc.IntegrityError, sa.exc.DataError, ValueError, TypeError, OverflowError) as exc:
        savepoint.rollback()
        raise Refused(type(exc).__name__) from exc
    except BaseException:
        savepoint.rollback()
        raise
    savepoint.commit()
    return out
