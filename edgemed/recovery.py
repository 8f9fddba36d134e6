"""What a damaged outbox still holds, copied into a new one; and the ``seq`` mark that survives the damage.

When the outbox file is found damaged at start (it is not a database, ``PRAGMA quick_check`` fails, or its
write-ahead log is damaged in a way SQLite would silently skip: ``edgemed.walcheck``), the outbox moves the
damaged files aside, byte for byte, and starts a new file. This module then reads the damaged copy the portable
way (the ``sqlite3`` shell's ``.recover`` is not on every device, and Python's sqlite3 has no equivalent): table
by table and row-id range by row-id range, halving every range that fails until single rows, so that an
unreadable page costs only the rows on it. Pending results keep their ``row_id`` (their order), ``result_id``,
payload and ``seq`` (read from the payload when the damaged file predates that column); they all start unsent
(``sent_at`` NULL), so a result that was awaiting its consumer's receipt is simply sent again. The acknowledgement
log and the ledger of processed inputs are copied too.

**Sequence numbers are never reused.** ``DATA_DIR/outbox.seq`` holds the committed sequence counter: the outbox
writes it (and fsyncs it with ``synchronous=FULL``) after every commit that numbers new results and before any of
them can be published, so it is never behind anything published. Every start continues at the higher of the
database's counter and the mark (a database can lose its last commits without damage to find: its ``-wal`` deleted);
a recovered outbox continues at the highest of the mark, the damaged file's own counter, and the highest ``seq`` in
the recovered payloads. Why not reserve blocks of numbers ahead (one fsync per block instead of one per commit)?
Every crash would then skip to the end of the block, and consumers rightly read a gap in ``seq`` as lost results: up
to a block of false alarms. The mark costs one small fsync per commit (a commit holds up to ``commit_every``
results; with ``commit_every=1`` that doubles the fsyncs per result: docs/delivery.md), and a crash between a commit
and its mark leaves the mark behind the database, which the next start ignores: no gap.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from edgemed import recovery_swap, walcheck
from edgemed.datadir import open_private, private_dir
from edgemed.errors import OutboxError
from edgemed.walcheck import WalDamage

log = logging.getLogger(__name__)

_WINDOW = 5000  # row ids per query before halving starts
# table -> (key column, selected columns); all are rowid tables, so ranges of the key are cheap to read.
TABLES: dict[str, tuple[str, str]] = {
    "outbox": ("row_id", "row_id, result_id, topic, payload, created_at, seq"),
    "acked": ("row_id", "row_id, result_id, acked_at, topic, payload"),
    "inputs": ("id", "source, path, size, mtime_ns, sha256, frames_done, frames_total"),
    "sources": ("id", "source, complete, started_at"),
}


@dataclass
class Salvaged:
    """The rows read back from a damaged outbox file.

    Attributes:
        rows: per table, the rows that could be read, in key order.
        unreadable: per table, the row ids that could not be read (each may have held a row or been a gap);
            None when not even the table's extent could be read.
        meta: the ``meta`` table (``seq``, ...) when readable.
        row_counter: the outbox's AUTOINCREMENT counter (``sqlite_sequence``) when readable: the highest row id
            ever handed out, also to results acknowledged and deleted since.
        opened: SQLite could open the file at all.
    """

    rows: dict[str, list[tuple[Any, ...]]] = field(default_factory=dict)
    unreadable: dict[str, list[int] | None] = field(default_factory=dict)
    meta: dict[str, int] = field(default_factory=dict)
    row_counter: int | None = None
    opened: bool = True


@dataclass(frozen=True)
class OutboxRecovery:
    """What happened to a damaged outbox at start; ``describe()`` says it in one line.

    Attributes:
        moved_to: where the damaged file was moved (kept byte for byte, with its ``-wal``/``-shm``).
        reason: what was wrong with it.
        pending: unacknowledged results recovered into the new outbox (they are sent as usual).
        lost_at_most: row ids of unacknowledged results that could not be read (an upper bound of lost results),
            or None when the damaged file could not be read at all.
        acked: acknowledgement-log rows recovered.
        inputs: ledger rows recovered.
        next_seq: where the sequence continues (never a number already used).
    """

    moved_to: Path
    reason: str
    pending: int
    lost_at_most: int | None
    acked: int
    inputs: int
    next_seq: int

    def describe(self) -> str:
        """One line for the log and the end of the run."""
        if self.lost_at_most is None:
            lost = "nothing could be read from it"
        elif self.lost_at_most:
            lost = f"up to {self.lost_at_most} results on unreadable pages are lost"
        else:
            lost = "nothing unreadable"
        return (
            f"the outbox is corrupt ({self.reason}): recovered {self.pending} pending results, "
            f"{self.acked} acknowledgement records and {self.inputs} ledger rows into a new outbox; {lost}; "
            f"seq continues at {self.next_seq}; the damaged file is kept as {self.moved_to}"
        )


def recover(
    path: Path,
    reason: str,
    wal_damage: WalDamage | None,
    *,
    connect: Callable[[Path], sqlite3.Connection],
    mark: int | None,
) -> OutboxRecovery:
    """Replace the damaged outbox ``path`` with a new one holding everything that could be read from it.

    Nothing is moved until the new outbox is complete: the damaged file is hard-linked (copied only where the
    file system has no hard links) into a private working folder with a copy of its ``-wal`` (repaired on the way
    when ``wal_damage``), read there read-only, and a new outbox is written beside them; only then are the
    damaged files renamed to ``outbox.sqlite3.corrupt-<UTC time>`` and the new one renamed into place, a swap
    written down first so that a crash in the middle is finished at the next start (``edgemed.recovery_swap``).
    The free space each step needs is checked before it, and a failure on the way (a full disk) leaves the
    damaged file where it was, and the next start tries again.

    Args:
        path: the outbox file.
        reason: what is wrong with it, for the report.
        wal_damage: the write-ahead log's damage, when that is what is wrong.
        connect: opens (and creates the schema of) an outbox at a path, as the outbox does.
        mark: the ``outbox.seq`` mark.

    Raises:
        OutboxError: the recovery could not be written; the damaged file is untouched.
    """
    work = path.with_name(f".{path.name}.recovering-{os.getpid()}")
    try:
        shutil.rmtree(work, ignore_errors=True)
        private_dir(work)
        copy = work / "damaged.sqlite3"
        wal = path.with_name(path.name + "-wal")
        _need_room(path, _size(wal), reason, "a copy of its write-ahead log")
        _link_or_copy(path, copy, reason)
        if wal_damage is not None:
            walcheck.repair(wal, wal_damage, work / "damaged.sqlite3-wal")
        elif wal.exists():
            _copy(wal, work / "damaged.sqlite3-wal")
        found = salvage(copy)
        (work / "damaged.sqlite3").unlink()  # a copy frees its space now; a link costs nothing
        _need_room(path, _new_size(found), reason, "the new outbox with what was recovered")
        fresh = work / "outbox.sqlite3"
        db = connect(fresh)
        try:
            next_seq = _restore(db, found, mark)
        finally:
            db.close()
        target = _corrupt_name(path)
        result = _report(target, reason, found, next_seq)
        recovery_swap.swap(path, target, fresh, _fields(result))
    except (OSError, sqlite3.Error) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise OutboxError(
            f"the outbox {path} is damaged ({reason}) and cannot be recovered now: {why}; free disk space in the "
            "data directory and start again (the damaged file is untouched)"
        ) from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def finish_interrupted(path: Path) -> OutboxRecovery | None:
    """Finish a recovery whose swap a crash interrupted (see ``edgemed.recovery_swap``), before the outbox opens;
    working folders a crash left behind are removed (on a disk the backlog filled, they hold space).

    Returns:
        Its report when there was one to finish, else None.

    Raises:
        OutboxError: the swap could not be finished.
    """
    try:
        done = recovery_swap.finish(path)
    except OSError as exc:
        raise OutboxError(
            f"a recovery of the outbox {path} was interrupted and cannot be finished: {exc}; free disk space or "
            "fix the permissions of the data directory and start again"
        ) from exc
    for stale in recovery_swap.working_folders(path):
        shutil.rmtree(stale, ignore_errors=True)
    if done is None:
        return None
    target, report = done
    return OutboxRecovery(moved_to=target, **report)


def _fields(result: OutboxRecovery) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(result).items() if k != "moved_to"}


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _new_size(found: Salvaged) -> int:
    """A generous estimate of the new outbox's size: its rows' bytes, a quarter more for the b-tree pages, and
    the schema's pages (written with a rollback journal: no write-ahead log to hold the data a second time)."""
    data = sum(len(v) if isinstance(v, (bytes, str)) else 8 for rows in found.rows.values() for r in rows for v in r)
    return data * 5 // 4 + (256 << 10)


def _need_room(path: Path, needed: int, reason: str, what: str) -> None:
    free = shutil.disk_usage(path.parent).free
    if needed <= free:
        return
    mib = 1 << 20
    raise OutboxError(
        f"the outbox {path} is damaged ({reason}); recovering it needs about {needed / mib:.1f} MB free in "
        f"{path.parent} for {what}, and {free / mib:.1f} MB are free: free at least "
        f"{math.ceil((needed - free) / mib)} MB there and start again (the damaged file is untouched)"
    )


def _link_or_copy(src: Path, dst: Path, reason: str) -> None:
    # A hard link reads the damaged file where it is, at no cost in space: salvage() opens it read-only, so it
    # is never written. Only a file system without hard links (FAT on an SD card) makes a copy.
    try:
        os.link(src, dst)
        return
    except OSError as exc:
        log.debug("no hard link for the damaged outbox (%s): copying it", exc.strerror)
    _need_room(src, _size(src), reason, "a working copy of the damaged file")
    _copy(src, dst)


def _copy(src: Path, dst: Path) -> None:
    fd = open_private(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    with os.fdopen(fd, "wb") as out, src.open("rb") as fh:
        shutil.copyfileobj(fh, out, 1 << 20)


def _corrupt_name(path: Path) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
        n += 1
    return target


def _restore(db: sqlite3.Connection, found: Salvaged, mark: int | None) -> int:
    """Write the salvaged rows into the new outbox ``db``; returns the seq it continues at."""
    rows = found.rows
    payloads = [r[3] for r in rows.get("outbox", [])] + [r[4] for r in rows.get("acked", []) if r[4] is not None]
    top = highest_seq(payloads)
    next_seq = max(mark or 0, found.meta.get("seq", 0), 0 if top is None else top + 1)
    # A rollback journal while the rows go in: in the write-ahead log they would take their space twice until
    # the checkpoint (on a disk the backlog filled, that may be the difference).
    db.execute("PRAGMA journal_mode=DELETE")
    db.execute("BEGIN IMMEDIATE")
    # sent_at stays NULL: whatever was awaiting a receipt is sent again (a duplicate the consumer drops).
    db.executemany(
        "INSERT INTO outbox(row_id, result_id, topic, payload, created_at, seq) VALUES (?, ?, ?, ?, ?, ?)",
        [_with_seq(r) for r in rows.get("outbox", [])],
    )
    db.executemany(
        "INSERT OR IGNORE INTO acked(row_id, result_id, acked_at, topic, payload) VALUES (?, ?, ?, ?, ?)",
        rows.get("acked", []),
    )
    db.executemany(
        "INSERT OR IGNORE INTO inputs(source, path, size, mtime_ns, sha256, frames_done, frames_total) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        rows.get("inputs", []),
    )
    db.executemany(
        "INSERT OR IGNORE INTO sources(source, complete, started_at) VALUES (?, ?, ?)", rows.get("sources", [])
    )
    db.execute("UPDATE meta SET value = ? WHERE key = 'seq'", (next_seq,))
    _restore_row_counter(db, found)
    if found.meta.get("replay_payloads"):
        db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('replay_payloads', 1)")
    db.execute("COMMIT")
    mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise sqlite3.OperationalError(f"the new outbox could not be put back in WAL mode ({mode})")
    # Nothing may be left in a log: the file alone is moved into place.
    busy, frames, done = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    if busy or frames != done:
        raise sqlite3.OperationalError(f"the new outbox could not be checkpointed ({done} of {frames} pages)")
    return next_seq


def _restore_row_counter(db: sqlite3.Connection, found: Salvaged) -> None:
    """Continue row ids after every one the damaged file used. Explicit row ids above set the counter only up to
    the highest pending row; without this, new results would get the row ids of recovered acknowledgement
    records: ``ack_many``'s INSERT OR IGNORE would drop their proof of delivery, replay would re-send the old
    payloads under them, and the ``keep_acked`` trimming, which counts in row ids, would cut the wrong rows."""
    ids = [int(r[0]) for table in ("outbox", "acked") for r in found.rows.get(table, [])]
    top = max([*ids, found.row_counter or 0], default=0)
    db.execute("DELETE FROM sqlite_sequence WHERE name = 'outbox'")
    if top:
        db.execute("INSERT INTO sqlite_sequence(name, seq) VALUES ('outbox', ?)", (top,))


def _report(moved: Path, reason: str, found: Salvaged, next_seq: int) -> OutboxRecovery:
    bad = found.unreadable.get("outbox") if found.opened else None
    lost: int | None = None
    if bad is not None:
        # An unreadable row id may have held a pending result, or one acknowledged (and deleted) long ago.
        acked = {int(r[0]) for r in found.rows.get("acked", [])}
        lost = sum(1 for row_id in bad if row_id not in acked)
    return OutboxRecovery(
        moved_to=moved,
        reason=reason,
        pending=len(found.rows.get("outbox", [])),
        lost_at_most=lost,
        acked=len(found.rows.get("acked", [])),
        inputs=len(found.rows.get("inputs", [])),
        next_seq=next_seq,
    )


def salvage(path: Path) -> Salvaged:
    """Read every row that can still be read from the outbox file ``path``, without writing to it.

    Never raises for damage: what cannot be read is reported in ``unreadable``.
    """
    out = Salvaged()
    try:
        # Read-only: the file may be a hard link to the damaged outbox itself.
        db = sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True, isolation_level=None, timeout=5.0)
    except sqlite3.Error:
        out.opened = False
        return out
    try:
        try:
            db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        except sqlite3.DatabaseError:
            out.opened = False
            return out
        out.meta = _meta(db)
        out.row_counter = _row_counter(db)
        for table, (key, cols) in TABLES.items():
            if table == "outbox" and not _has_seq(db):
                cols = cols.removesuffix(", seq")  # written before receipts: the payloads say their seq
            rows, bad = _table(db, table, key, cols)
            out.rows[table] = rows
            out.unreadable[table] = bad
    finally:
        db.close()
    return out


def _has_seq(db: sqlite3.Connection) -> bool:
    try:
        return "seq" in {str(r[1]) for r in db.execute("PRAGMA table_info(outbox)")}
    except sqlite3.DatabaseError:
        return False  # the schema is unreadable: the payloads still say their seq


def _with_seq(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """An outbox row as ``(row_id, result_id, topic, payload, created_at, seq)``."""
    if len(row) >= 6:
        return row[:6]
    payload = row[3]
    return (*row, payload_seq(payload) if isinstance(payload, (bytes, str)) else None)


def payload_seq(payload: bytes | str) -> int | None:
    """The ``seq`` of a JSON envelope, or None when it has none (or is not JSON)."""
    try:
        seq = json.loads(payload).get("seq")
    except (ValueError, AttributeError, TypeError):
        return None
    return seq if isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0 else None


def _meta(db: sqlite3.Connection) -> dict[str, int]:
    try:
        return {str(k): int(v) for k, v in db.execute("SELECT key, value FROM meta")}
    except (sqlite3.DatabaseError, ValueError, TypeError):
        meta: dict[str, int] = {}  # the table as a whole is unreadable: each key on its own below
    for key in ("seq", "replay_payloads"):  # one by one: a damaged page may hold only some of them
        try:
            row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        except sqlite3.DatabaseError:
            continue
        if row is not None:
            meta[key] = int(row[0])
    return meta


def _row_counter(db: sqlite3.Connection) -> int | None:
    try:
        row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
    except sqlite3.DatabaseError:
        return None
    return None if row is None else int(row[0])


def _bounds(db: sqlite3.Connection, table: str, key: str) -> tuple[int, int] | None:
    """The table's key range; each end looked up on its own when MIN/MAX fails. None: not even that is readable."""
    try:
        lo, hi = db.execute(f"SELECT MIN({key}), MAX({key}) FROM {table}").fetchone()
        return (int(lo), int(hi)) if lo is not None else (1, 0)
    except sqlite3.DatabaseError:
        ends: list[int | None] = []
    for order in ("", "DESC"):  # each end of the b-tree on its own: one side may still be readable
        try:
            row = db.execute(f"SELECT {key} FROM {table} ORDER BY {key} {order} LIMIT 1").fetchone()
            ends.append(None if row is None else int(row[0]))
        except sqlite3.DatabaseError:
            ends.append(None)
    # Both are numbered by the outbox's AUTOINCREMENT counter.
    top = _row_counter(db) if table in ("outbox", "acked") else None
    lo, hi = ends[0] or 1, ends[1] or top
    return None if hi is None else (lo, hi)


def _table(db: sqlite3.Connection, table: str, key: str, cols: str) -> tuple[list[tuple[Any, ...]], list[int] | None]:
    bounds = _bounds(db, table, key)
    if bounds is None:
        return [], None
    rows: list[tuple[Any, ...]] = []
    bad: list[int] = []
    sql = f"SELECT {cols} FROM {table} WHERE {key} BETWEEN ? AND ? ORDER BY {key}"
    for lo, hi in _windows(*bounds):
        stack = [(lo, hi)]
        while stack:
            a, b = stack.pop()
            try:
                rows.extend(db.execute(sql, (a, b)).fetchall())
            except sqlite3.DatabaseError:
                if a == b:
                    bad.append(a)
                else:
                    mid = (a + b) // 2
                    stack += [(mid + 1, b), (a, mid)]  # the lower half first: rows stay in key order
    return rows, bad


def _windows(lo: int, hi: int) -> Iterator[tuple[int, int]]:
    start = lo
    while start <= hi:
        yield start, min(hi, start + _WINDOW - 1)
        start += _WINDOW


def highest_seq(payloads: list[bytes]) -> int | None:
    """The highest ``seq`` in JSON envelopes (results, study decisions); unparsable payloads are skipped."""
    best = None
    for payload in payloads:
        try:
            seq = json.loads(payload).get("seq")
        except (ValueError, AttributeError, TypeError):
            continue
        if isinstance(seq, int) and (best is None or seq > best):
            best = seq
    return best


class SeqMark:
    """``DATA_DIR/outbox.seq``: the sequence counter as last committed (see the module docstring).

    Opened once; each write is one ``pwrite`` of a fixed-width line (the file never changes size, so
    ``fdatasync`` has no metadata to flush) and, when ``sync``, one ``fdatasync``.
    """

    _WIDTH = 21  # 20 digits and a newline: any 64-bit value

    def __init__(self, path: Path, *, sync: bool) -> None:
        """Open (or create, 0600) the mark.

        Raises:
            OSError: it cannot be opened.
        """
        self.path = path
        self.sync = sync
        self._fd = open_private(path, os.O_RDWR | os.O_CREAT)
        self._written: int | None = None

    def read(self) -> int | None:
        """The mark, or None when there is none (a data directory from before the mark existed) or it is garbled."""
        text = os.pread(self._fd, self._WIDTH, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None

    def write(self, value: int) -> None:
        """Record ``value`` (durably when ``sync``); a no-op when it is already the recorded value.

        Raises:
            OSError: the disk refused the write.
        """
        if value == self._written:
            return
        os.pwrite(self._fd, f"{value:020d}\n".encode(), 0)
        if self.sync:
            os.fdatasync(self._fd)
        self._written = value

    def close(self) -> None:
        """Close the file; safe to call twice."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
