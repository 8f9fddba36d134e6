"""Which ``seq`` of each device's stream the dashboard has settled, and the receipt that follows from it.

A ``seq`` is settled when its result or study decision is stored, when its payload is kept as a dead letter with
a readable ``seq`` (refused: sending it again would not help), or when the device announced it lost for good
(``edgemed.lost/1``). Each is one row of ``settled(site, device_id, stream, seq, how)``, written in the
transaction that stores what settles it, so a receipt computed from the table never runs ahead of the store.
Rows are never deleted: several ingest processes and restarts all compute the same receipt from them.

Cost. ``stream_progress`` keeps, per stream, a ``through_seq`` below which everything is settled, so a receipt
reads only the rows above it: normally the few results still in flight. Above a hole that is never filled (an
older device without receipts that lost results to a broker crash) rows pile up, so one receipt reads at most
``SCAN_ROWS`` of them (its ``max_seq`` then stops at the last one read, which the receipt format allows: the device
learns of the rest from later receipts), and contiguous rows right above ``through_seq`` advance it for good.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection
from sqlalchemy.dialects import postgresql, sqlite

from edgemed.dashboard.tables import lost_ranges, settled
from edgemed.dashboard.tables import stream_progress as progress_table
from edgemed.receipts import MAX_LOST_SEQS, MAX_RANGES, Lost, Progress, SeqRange, progress

#: Most ``settled`` rows above ``through_seq`` one receipt reads (about 10 ms of SQLite here).
SCAN_ROWS = 20_000
#: Chunks of ``SCAN_ROWS`` one receipt may read while each of them only advances ``through_seq`` (the catch-up
#: after an upgrade or a long hole filled at last).
ADVANCE_CHUNKS = 50
#: Most ``seq`` one lost announcement may settle: each becomes a row, written inside the ingest's batch transaction
#: (a million took 11 s on PostgreSQL, stalling every message of the batch). Devices split longer announcements
#: (``receipts.lost_messages``); more in one message is refused (a dead letter) rather than stalling or filling the
#: disk.
LOST_MAX_SEQS = MAX_LOST_SEQS

StreamKey = tuple[str, str, str]
"""``(site, device_id, stream)``: one device's ``seq`` stream (stream ``''`` for a device that names none)."""

# The islands of contiguous settled seqs among the next SCAN_ROWS rows above through_seq: each row says whether it
# starts an island, ends one, or both. The inner LIMIT is read from the primary key in order, so the window
# function never sees more than SCAN_ROWS rows. Written for both engines (no IS NOT between values, aliased
# subqueries).
_ISLANDS = sa.text(
    """
SELECT seq, (prev IS NULL OR prev <> seq - 1) AS starts, (nxt IS NULL OR nxt <> seq + 1) AS ends, n FROM (
    SELECT seq, lag(seq) OVER w AS prev, lead(seq) OVER w AS nxt, count(*) OVER () AS n FROM (
        SELECT seq FROM settled WHERE site = :site AND device_id = :device_id AND stream = :stream AND seq > :above
        ORDER BY seq LIMIT :n
    ) AS rows_above WINDOW w AS (ORDER BY seq)
) AS edges WHERE prev IS NULL OR prev <> seq - 1 OR nxt IS NULL OR nxt <> seq + 1
"""
)
_THROUGH = sa.text(
    "SELECT through_seq FROM stream_progress WHERE site = :site AND device_id = :device_id AND stream = :stream"
)
# The seqs of a lost range not settled yet, one row each: generate_series on PostgreSQL, a recursive CTE on SQLite.
_LOST_ROWS = {
    "postgresql": sa.text(
        "INSERT INTO settled(site, device_id, stream, seq, how) SELECT :site, :device_id, :stream, s, 'lost' "
        "FROM generate_series(CAST(:first AS BIGINT), CAST(:last AS BIGINT)) AS s ON CONFLICT DO NOTHING"
    ),
    "sqlite": sa.text(
        "WITH RECURSIVE n(s) AS (SELECT :first UNION ALL SELECT s + 1 FROM n WHERE s < :last) "
        "INSERT INTO settled(site, device_id, stream, seq, how) SELECT :site, :device_id, :stream, s, 'lost' "
        "FROM n WHERE true ON CONFLICT DO NOTHING"
    ),
}


def dialect_insert(conn: Connection, table: sa.Table) -> Any:
    """The dialect's INSERT construct (both have ``on_conflict_do_nothing``/``on_conflict_do_update``)."""
    return (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(table)


def greatest(a: Any, b: Any) -> Any:
    """The larger of two non-null values, in SQL both engines read (SQLite's max(a, b) is PostgreSQL's greatest)."""
    return sa.case((a >= b, a), else_=b)


def _settle_statement(conn: Connection) -> Any:
    stmt = dialect_insert(conn, settled)
    return stmt.on_conflict_do_update(
        index_elements=[settled.c.site, settled.c.device_id, settled.c.stream, settled.c.seq],
        set_={"how": stmt.excluded.how},
        where=(stmt.excluded.how == "stored") & (settled.c.how != "stored"),
    )


def _key(key: StreamKey) -> dict[str, str]:
    return {"site": key[0], "device_id": key[1], "stream": key[2]}


def settle(db: Connection, key: StreamKey, seq: int, how: str) -> None:
    """Record one settled ``seq`` (inside the caller's transaction).

    A ``seq`` settled twice keeps its first reason, except that ``stored`` wins: a result that arrives after the
    device announced it lost (a late copy from a broker queue) is stored, and counts as such.

    Args:
        db: the store's connection, in a transaction.
        key: the stream.
        seq: the settled ``seq``.
        how: ``stored``, ``rejected`` or ``lost``.
    """
    settle_many(db, [(*key, seq, how)])


def settle_many(db: Connection, rows: Iterable[tuple[str, str, str, int, str]]) -> None:
    """Record many settled seqs in one statement per batch (``settle`` for each, set-based).

    Args:
        db: the store's connection, in a transaction.
        rows: ``(site, device_id, stream, seq, how)``; a key repeated keeps the ``stored`` one if any.
    """
    unique: dict[tuple[str, str, str, int], str] = {}
    for site, device_id, stream, seq, how in rows:
        if unique.get((site, device_id, stream, seq)) != "stored":
            unique[(site, device_id, stream, seq)] = how
    if unique:
        params = [
            {"site": s, "device_id": d, "stream": st, "seq": q, "how": how} for (s, d, st, q), how in unique.items()
        ]
        db.execute(_settle_statement(db), params)


def through_seq(db: Connection, key: StreamKey) -> int:
    """The stream's recorded ``through_seq`` (-1 when none)."""
    row = db.execute(_THROUGH, _key(key)).first()
    return -1 if row is None else int(row[0])


def lost_seq_count(lost: Lost) -> int:
    """How many ``seq`` a lost announcement names."""
    return sum(last - first + 1 for first, last in lost.ranges)


def settle_lost(db: Connection, lost: Lost, received_at: float) -> None:
    """Record a device's lost announcement: its ranges, and a ``lost`` row for each ``seq`` not settled yet.

    Seqs at or below the stream's ``through_seq`` are settled already and get no row.

    Args:
        db: the store's connection, in a transaction.
        lost: the parsed announcement (its ``site``/``device_id`` match its topic).
        received_at: dashboard clock.
    """
    key = (lost.site, lost.device_id, lost.stream)
    floor = through_seq(db, key) + 1
    for first, last in lost.ranges:
        db.execute(
            dialect_insert(db, lost_ranges).on_conflict_do_nothing(),
            {**_key(key), "first_seq": first, "last_seq": last, "reason": lost.reason, "received_at": received_at},
        )
        if last < floor:
            continue
        db.execute(_LOST_ROWS[db.dialect.name], {**_key(key), "first": max(first, floor), "last": last})


def _islands(db: Connection, key: StreamKey, above: int) -> tuple[list[SeqRange], bool]:
    """The runs of settled seqs among the next ``SCAN_ROWS`` above ``above``, and whether more rows may follow."""
    rows = db.execute(_ISLANDS, {**_key(key), "above": above, "n": SCAN_ROWS}).all()
    runs: list[SeqRange] = []
    start = 0
    for seq, starts, ends, _n in rows:
        if starts:
            start = seq
        if ends:  # the last row read always ends a run: what follows it is not known yet
            runs.append((start, seq))
    return runs, bool(rows) and rows[0][3] >= SCAN_ROWS


def stream_progress(db: Connection, key: StreamKey) -> Progress:
    """Compute a stream's receipt from the store, and record how far its ``through_seq`` got.

    Args:
        db: a connection of its own, not in a transaction (the receipt thread's; WAL lets it read beside the
            ingest's writes on SQLite). The reads end before the new ``through_seq`` (which only ever grows) is
            written in a short transaction of its own: on SQLite a read transaction that then writes fails when
            the ingest committed meanwhile.
        key: the stream.

    Returns:
        ``through_seq``, the ``missing`` ranges above it (at most ``MAX_RANGES``) and ``max_seq``.

    Raises:
        sqlalchemy.exc.SQLAlchemyError: the database could not be read or written.
    """
    try:
        start = through_seq(db, key)
        through, state = start, Progress(start)
        for _ in range(ADVANCE_CHUNKS):
            runs, full = _islands(db, key, through)
            state = progress(through, runs, max_ranges=MAX_RANGES)
            advanced_to_end = full and not state.missing and state.through_seq == runs[-1][1]
            through = state.through_seq
            if not advanced_to_end:
                break
    finally:
        db.rollback()  # the read transaction ends here (nothing was written in it)
    if through > start:
        stmt = dialect_insert(db, progress_table)
        with db.begin():
            db.execute(
                stmt.on_conflict_do_update(
                    index_elements=[progress_table.c.site, progress_table.c.device_id, progress_table.c.stream],
                    set_={"through_seq": greatest(progress_table.c.through_seq, stmt.excluded.through_seq)},
                ),
                {**_key(key), "through_seq": through},
            )
    return state
