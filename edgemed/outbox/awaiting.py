"""Receipt state: rows the broker acknowledged that wait for the consumer's receipt, and what a receipt does.

With a consumer of record (``delivery.consumer``) the broker's PUBACK no longer removes a result: ``mark_sent``
stamps it ``sent_at`` (awaiting receipt), and only a receipt of the consumer releases it (``release``). A result
the consumer lists as missing, or one that waits too long, is made unsent again (``unsend``) so that the delivery
sends it once more, the same bytes under the same ``result_id`` and ``seq``. Numbers the consumer misses that the
outbox no longer holds are announced lost (``not_held``, ``announce_lost``).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Sequence

from edgemed.outbox.acklog import chunks
from edgemed.outbox.queue import OutboxQueue
from edgemed.receipts import Progress, SeqRange


class OutboxReceipts(OutboxQueue):
    """The awaiting-receipt half of the outbox (see the module docstring)."""

    def mark_sent(self, row_ids: Iterable[int]) -> None:
        """The broker acknowledged these rows: those with a ``seq`` now await their receipt; those without (lost
        announcements) leave, as every row does on PUBACK without a consumer.

        Args:
            row_ids: row ids of committed rows; unknown (already released) ids are ignored.

        Raises:
            OutboxError: the disk refused the write.
        """
        ids = [int(r) for r in row_ids]
        if not ids:
            return
        with self._lock:
            self._check_open()
            now = time.time()
            try:
                self._begin()
                stamped = removed = 0
                for chunk, marks in chunks(ids):
                    self._log_acks(chunk, marks, now)
                    before = self._db.total_changes
                    self._db.execute(
                        f"UPDATE outbox SET sent_at = ? WHERE row_id IN ({marks}) AND seq IS NOT NULL "
                        "AND sent_at IS NULL",
                        (now, *chunk),
                    )
                    stamped += self._db.total_changes - before
                    removed += self._delete(f"row_id IN ({marks}) AND seq IS NULL", chunk)
            except sqlite3.Error as exc:
                raise self._write_error(exc) from exc
            self._awaiting += stamped
            self._pending -= removed
            self._touch()

    def awaiting_count(self) -> int:
        """Results the broker acknowledged that wait for the consumer's receipt."""
        with self._lock:
            return self._awaiting

    def oldest_awaiting_s(self) -> float | None:
        """Seconds since the longest-waiting result awaiting a receipt was acknowledged, or None when none is."""
        with self._lock:
            self._check_open()
            if self._awaiting == 0:
                return None
            row = self._db.execute("SELECT MIN(sent_at) FROM outbox WHERE sent_at IS NOT NULL").fetchone()
        return None if row is None or row[0] is None else max(0.0, time.time() - float(row[0]))

    @property
    def committed_seq(self) -> int:
        """Every ``seq`` below this was handed out to a committed result (or study decision)."""
        with self._lock:
            return self._seq_committed

    def release(self, state: Progress) -> int:
        """Remove every row whose ``seq`` the consumer's receipt says is settled, whatever its state.

        Args:
            state: the receipt's ``through_seq``, ``missing`` and ``max_seq`` (of this device's own stream).

        Returns:
            How many rows left.

        Raises:
            OutboxError: the disk refused the write.
        """
        where, params = _settled(state)
        with self._lock:
            self._check_open()
            try:
                self._begin()
                sql = f"SELECT COUNT(*), COUNT(sent_at) FROM outbox WHERE {where}"
                rows, awaited = self._db.execute(sql, params).fetchone()
                if rows:
                    self._delete(where, params)
            except sqlite3.Error as exc:
                raise self._write_error(exc) from exc
            self._pending -= int(rows)
            self._awaiting -= int(awaited)
            if rows:
                self._touch()
            return int(rows)

    def awaiting_rows(self, *, sent_before: float, within: Sequence[SeqRange] | None = None) -> list[int]:
        """Row ids awaiting a receipt since before ``sent_before`` (wall clock), optionally only those whose
        ``seq`` lies in ``within``; in production order."""
        with self._lock:
            self._check_open()
            if self._awaiting == 0:
                return []
            if within is None:
                sql = "SELECT row_id FROM outbox WHERE sent_at IS NOT NULL AND sent_at < ? ORDER BY row_id"
                return [int(r[0]) for r in self._db.execute(sql, (sent_before,))]
            out: list[int] = []
            for first, last in within:
                out += [
                    int(r[0])
                    for r in self._db.execute(
                        "SELECT row_id FROM outbox WHERE seq IS NOT NULL AND seq BETWEEN ? AND ? "
                        "AND sent_at IS NOT NULL AND sent_at < ?",
                        (first, last, sent_before),
                    )
                ]
            return sorted(out)

    def unsend(self, row_ids: Iterable[int]) -> int | None:
        """Make rows awaiting a receipt unsent again, so that the delivery sends them once more.

        Returns:
            The lowest row id made unsent (the delivery's cursor must come back before it), or None when none was.

        Raises:
            OutboxError: the disk refused the write.
        """
        ids = sorted({int(r) for r in row_ids})
        if not ids:
            return None
        with self._lock:
            self._check_open()
            changed = 0
            try:
                self._begin()
                for chunk, marks in chunks(ids):
                    before = self._db.total_changes
                    self._db.execute(
                        f"UPDATE outbox SET sent_at = NULL WHERE row_id IN ({marks}) AND sent_at IS NOT NULL", chunk
                    )
                    changed += self._db.total_changes - before
            except sqlite3.Error as exc:
                raise self._write_error(exc) from exc
            self._awaiting -= changed
            if changed:
                self._touch()
            return ids[0] if changed else None

    def not_held(self, ranges: Sequence[SeqRange]) -> list[SeqRange]:
        """The parts of ``ranges`` below ``committed_seq`` that no row of the outbox holds (lost for good)."""
        out: list[SeqRange] = []
        with self._lock:
            self._check_open()
            top = self._seq_committed - 1
            for first, last in ranges:
                last = min(last, top)
                if first > last:
                    continue
                held = self._db.execute(
                    "SELECT DISTINCT seq FROM outbox WHERE seq IS NOT NULL AND seq BETWEEN ? AND ? ORDER BY seq",
                    (first, last),
                )
                start = first
                for (seq,) in held:
                    if seq > start:
                        out.append((start, int(seq) - 1))
                    start = int(seq) + 1
                if start <= last:
                    out.append((start, last))
        return out

    def announce_lost(self, ranges: Sequence[SeqRange], reason: str) -> int:
        """Write (durably, now) the announcements that ``ranges`` are lost for good, through the announcer set by
        ``set_lost_announcer``; they are sent like results and leave on their PUBACK.

        Returns:
            How many announcement messages were written (0 without an announcer).

        Raises:
            OutboxError: the disk refused the write.
        """
        with self._lock:
            self._check_open()
            try:
                self._begin()
                written = self._write_announcements(list(ranges), reason)
            except sqlite3.Error as exc:
                raise self._write_error(exc) from exc
            self._commit()
            return written


def _settled(state: Progress) -> tuple[str, tuple[int, ...]]:
    """The WHERE clause of the rows a receipt settles: up to ``max_seq``, outside every ``missing`` range."""
    where = "seq IS NOT NULL AND seq <= ?"
    params: list[int] = [state.max_seq]
    if state.missing:
        where += " AND NOT (" + " OR ".join("seq BETWEEN ? AND ?" for _ in state.missing) + ")"
        for first, last in state.missing:
            params += [first, last]
    return where, tuple(params)
