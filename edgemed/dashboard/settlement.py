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

import sqlite3

from edgemed.receipts import MAX_RANGES, Lost, Progress, SeqRange, progress

#: Most ``settled`` rows above ``through_seq`` one receipt reads (about 10 ms of SQLite here).
SCAN_ROWS = 20_000
#: Chunks of ``SCAN_ROWS`` one receipt may read while each of them only advances ``through_seq`` (the catch-up
#: after an upgrade or a long hole filled at last).
ADVANCE_CHUNKS = 50
#: Most ``seq`` one lost announcement may settle: each becomes a row. A device announces what it evicted or could
#: not find, a few thousand at most; more is refused (dead letter) rather than filling the disk.
LOST_MAX_SEQS = 1_000_000

StreamKey = tuple[str, str, str]
"""``(site, device_id, stream)``: one device's ``seq`` stream (stream ``''`` for a device that names none)."""

# The islands of contiguous settled seqs among the next SCAN_ROWS rows above through_seq: each row says whether it
# starts an island, ends one, or both. The inner LIMIT is read from the primary key in order, so the window
# function never sees more than SCAN_ROWS rows.
_ISLANDS = """
SELECT seq, prev IS NOT seq - 1 AS starts, next IS NOT seq + 1 AS ends, n FROM (
    SELECT seq, lag(seq) OVER w AS prev, lead(seq) OVER w AS next, count(*) OVER () AS n FROM (
        SELECT seq FROM settled WHERE site = ? AND device_id = ? AND stream = ? AND seq > ? ORDER BY seq LIMIT ?
    ) WINDOW w AS (ORDER BY seq)
) WHERE starts OR ends
"""


def settle(db: sqlite3.Connection, key: StreamKey, seq: int, how: str) -> None:
    """Record one settled ``seq`` (inside the caller's transaction).

    A ``seq`` settled twice keeps its first reason, except that ``stored`` wins: a result that arrives after the
    device announced it lost (a late copy from a broker queue) is stored, and counts as such.

    Args:
        db: the store's connection, in a transaction.
        key: the stream.
        seq: the settled ``seq``.
        how: ``stored``, ``rejected`` or ``lost``.
    """
    db.execute(
        "INSERT INTO settled(site, device_id, stream, seq, how) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT(site, device_id, stream, seq) DO UPDATE SET how = excluded.how "
        "WHERE excluded.how = 'stored' AND how <> 'stored'",
        (*key, seq, how),
    )


def through_seq(db: sqlite3.Connection, key: StreamKey) -> int:
    """The stream's recorded ``through_seq`` (-1 when none)."""
    row = db.execute(
        "SELECT through_seq FROM stream_progress WHERE site = ? AND device_id = ? AND stream = ?", key
    ).fetchone()
    return -1 if row is None else int(row[0])


def lost_seq_count(lost: Lost) -> int:
    """How many ``seq`` a lost announcement names."""
    return sum(last - first + 1 for first, last in lost.ranges)


def settle_lost(db: sqlite3.Connection, lost: Lost, received_at: float) -> None:
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
            "INSERT OR IGNORE INTO lost_ranges(site, device_id, stream, first_seq, last_seq, reason, received_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (*key, first, last, lost.reason, received_at),
        )
        if last < floor:
            continue
        db.execute(
            "WITH RECURSIVE n(s) AS (SELECT ? UNION ALL SELECT s + 1 FROM n WHERE s < ?) "
            "INSERT OR IGNORE INTO settled(site, device_id, stream, seq, how) SELECT ?, ?, ?, s, 'lost' FROM n",
            (max(first, floor), last, *key),
        )


def _islands(db: sqlite3.Connection, key: StreamKey, above: int) -> tuple[list[SeqRange], bool]:
    """The runs of settled seqs among the next ``SCAN_ROWS`` above ``above``, and whether more rows may follow."""
    rows = db.execute(_ISLANDS, (*key, above, SCAN_ROWS)).fetchall()
    runs: list[SeqRange] = []
    start = 0
    for seq, starts, ends, _n in rows:
        if starts:
            start = seq
        if ends:  # the last row read always ends a run: what follows it is not known yet
            runs.append((start, seq))
    return runs, bool(rows) and rows[0][3] >= SCAN_ROWS


def stream_progress(db: sqlite3.Connection, key: StreamKey) -> Progress:
    """Compute a stream's receipt from the store, and record how far its ``through_seq`` got.

    Args:
        db: a connection of its own (a reader: WAL lets it run beside the ingest's writes); it commits the new
            ``through_seq``, which only ever grows.
        key: the stream.

    Returns:
        ``through_seq``, the ``missing`` ranges above it (at most ``MAX_RANGES``) and ``max_seq``.

    Raises:
        sqlite3.Error: the database could not be read or written.
    """
    start = through_seq(db, key)
    through, state = start, Progress(start)
    for _ in range(ADVANCE_CHUNKS):
        runs, full = _islands(db, key, through)
        state = progress(through, runs, max_ranges=MAX_RANGES)
        advanced_to_end = full and not state.missing and state.through_seq == runs[-1][1]
        through = state.through_seq
        if not advanced_to_end:
            break
    if through > start:
        with db:
            db.execute(
                "INSERT INTO stream_progress(site, device_id, stream, through_seq) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(site, device_id, stream) "
                "DO UPDATE SET through_seq = max(through_seq, excluded.through_seq)",
                (*key, through),
            )
    return state
