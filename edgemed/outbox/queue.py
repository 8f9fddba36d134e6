"""The queue: results in (``put``), out to the delivery (``pending``), gone on PUBACK (``ack_many``), and the caps.

Rows are handed out in production order (``row_id``), only once committed, and only while not yet acknowledged
by the broker (``sent_at`` is NULL). The caps (``max_pending``, ``max_age_s``) count every row still on disk,
whether it waits for the broker or for the consumer's receipt.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable

from edgemed.outbox.acklog import AckLog, chunks, item
from edgemed.outbox.config import OutboxFullError, OutboxItem
from edgemed.receipts import SeqRange, to_ranges
from edgemed.types import InputDone

log = logging.getLogger("edgemed.outbox")

# Puts one "not full" answer of is_full() admits with on_full=block: what one frame produces (its result and the
# study decisions it closes) is kept even when the cap is reached while it is being processed.
_ADMITTED_PUTS = 4
EVICTED_REASON = "evicted (outbox.on_full: evict_oldest)"

#: Builds the messages that announce ``seq`` ranges lost, with a reason: ``[(topic, payload), ...]``.
LostAnnouncer = Callable[[list[SeqRange], str], list[tuple[str, bytes]]]


class OutboxQueue(AckLog):
    """Put, hand out, acknowledge, cap (see ``edgemed.outbox``)."""

    def _load_state(self) -> None:
        super()._load_state()
        self._awaiting = int(self._db.execute("SELECT COUNT(*) FROM outbox WHERE sent_at IS NOT NULL").fetchone()[0])
        self._announcer: LostAnnouncer | None = None

    # -- writing ---------------------------------------------------------------------------------------------

    def put(
        self,
        result_id: str,
        topic: str,
        payload: bytes,
        seq: int | None = None,
        done: tuple[str, InputDone] | None = None,
        pass_state: tuple[str, str] | None = None,
    ) -> int:
        """Queue one result; it becomes durable (and publishable) at the next batch commit.

        Args:
            result_id: the envelope's unique id, kept through every retry.
            topic: the MQTT topic to publish it on.
            payload: the envelope as JSON bytes (opaque here).
            seq: the sequence number from ``next_seq()`` inside ``payload``. Passing it makes the persisted
                counter advance only with committed results, so a crash never leaves a gap in the published
                sequence (a consumer may read a gap as a lost result); it is also what a receipt releases by.
            done: ``(source, row)``: the ledger row this result brings its input to (see ``edgemed.ledger``);
                it is written in the same transaction as the result.
            pass_state: ``(source, JSON)``: the source's pass state after this result (``edgemed.resume``),
                written in the same transaction.

        Returns:
            The row id, increasing in production order.

        Raises:
            OutboxFullError: the cap is reached and ``on_full`` is ``block``, unless ``is_full()`` said there was
                room since: a producer that asks it before each frame keeps what that frame produces (up to a few
                results past the cap) and pauses before the next frame, instead of losing a result.
            OutboxError: the disk refused the write.
        """
        with self._lock:
            self._check_open()
            if not self._take_admission() and self._at_cap():
                if self.cfg.on_full == "block":
                    age = "no age cap" if self.cfg.max_age_s is None else f"max age {self.cfg.max_age_s:g} s"
                    raise OutboxFullError(
                        f"the outbox {self.path} holds {self._pending} unacknowledged results "
                        f"(cap {self.cfg.max_pending}, {age}); results are kept, "
                        "new ones are refused until the broker (and the consumer, if one is named) is reachable again"
                    )
                self._evict()
            try:
                self._begin()
                row_id = self._insert(result_id, topic, payload, seq)
            except sqlite3.Error as exc:
                raise self._write_error(exc) from exc
            if done is not None:
                self._ledger_done[(done[0], done[1].path)] = done[1]
            if pass_state is not None:
                self._ledger_passes[pass_state[0]] = pass_state[1]
            if seq is not None:
                self._seq_explicit = True
                self._seq_durable = max(self._seq_durable, seq + 1)
            self._touch()
            if self._uncommitted >= self.cfg.commit_every:
                self._commit()
            return row_id

    def next_seq(self) -> int:
        """Hand out the next per-device sequence number.

        The counter is persisted with the next commit: up to the highest ``seq`` passed to ``put()`` once
        callers pass it, otherwise up to the last number handed out.

        Returns:
            0 for the first result ever produced from this data directory, then 1, 2, ...
        """
        self._check_open()
        with self._seq_lock:
            seq = self._seq
            self._seq += 1
            return seq

    def ack(self, row_id: int) -> None:
        """Remove one result the broker acknowledged.

        Args:
            row_id: as returned by ``put()`` or carried by an ``OutboxItem``.
        """
        self.ack_many((row_id,))

    def ack_many(self, row_ids: Iterable[int]) -> None:
        """Remove results the broker acknowledged, and log their ids as evidence of delivery.

        The deletions become durable with the next commit; a crash before it re-sends them (a duplicate the
        consumer drops by ``result_id``), never loses them.

        Args:
            row_ids: row ids of committed results; unknown ids are ignored.

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
                # Set-based, in chunks: two statements per chunk instead of two per result (acknowledgements arrive
                # in batches of up to the delivery's in-flight window).
                removed = awaited = 0
                for chunk, marks in chunks(ids):
                    self._log_acks(chunk, marks, now)
                    if self._awaiting:
                        sql = f"SELECT COUNT(*) FROM outbox WHERE sent_at IS NOT NULL AND row_id IN ({marks})"
                        awaited += int(self._db.execute(sql, chunk).fetchone()[0])
                    removed += self._delete(f"row_id IN ({marks})", chunk)
            except sqlite3.Error as exc:
                raise self._write_error(exc) from exc
            self._pending -= removed
            self._awaiting -= awaited
            if self.cfg.replay_window_s > 0:
                self._last_ack_mono = self._keep(ids)
            self._touch()

    # -- reading ---------------------------------------------------------------------------------------------

    def pending(self, limit: int, after_row: int = 0) -> list[OutboxItem]:
        """The oldest committed results not yet acknowledged by the broker, in production order.

        Args:
            limit: at most this many.
            after_row: only rows with a larger row id (a delivery cursor).

        Returns:
            Items ordered by ``row_id``; uncommitted results are not included (they are not durable yet), nor
            results awaiting a receipt (they were acknowledged; ``edgemed.outbox.awaiting`` sends them again).
        """
        with self._lock:
            self._check_open()
            rows = self._db.execute(
                "SELECT row_id, result_id, topic, payload, created_at, seq FROM outbox "
                "WHERE row_id > ? AND row_id <= ? AND sent_at IS NULL ORDER BY row_id LIMIT ?",
                (after_row, self._committed_max_row, limit),
            ).fetchall()
        return [item(r) for r in rows]

    def pending_count(self) -> int:
        """Results still on disk (committed or not): not yet acknowledged by the broker, or awaiting a receipt."""
        with self._lock:
            return self._pending

    def unsent_count(self) -> int:
        """Results not yet acknowledged by the broker (committed or not)."""
        with self._lock:
            return self._pending - self._awaiting

    def oldest_pending_s(self) -> float | None:
        """Age in seconds of the oldest result kept on disk, or None when there is none."""
        with self._lock:
            self._check_open()
            row = self._db.execute("SELECT created_at FROM outbox ORDER BY row_id LIMIT 1").fetchone()
        return None if row is None else max(0.0, time.time() - float(row[0]))

    def oldest_unsent_s(self) -> float | None:
        """Age in seconds of the oldest result not yet acknowledged by the broker, or None when there is none."""
        with self._lock:
            self._check_open()
            if self._awaiting == 0:
                return self.oldest_pending_s()
            row = self._db.execute(
                "SELECT created_at FROM outbox WHERE sent_at IS NULL ORDER BY row_id LIMIT 1"
            ).fetchone()
        return None if row is None else max(0.0, time.time() - float(row[0]))

    def is_full(self) -> bool:
        """True when the size or age cap is reached and the policy is to block new results.

        The producer's admission check: with ``on_full=block``, a False answer admits the calling thread's next
        few puts (the results of one frame), and ``put()`` keeps them even when the cap is reached meanwhile (the
        age cap can be crossed while a frame is being classified); a True answer withdraws it. Ask it before each
        frame and pause while it is True.
        """
        with self._lock:
            full = self.cfg.on_full == "block" and self._at_cap()
            if self.cfg.on_full == "block":
                # Per thread: the health thread asks too, and its answer must not withdraw the producer's admission
                # while the frame admitted is being classified.
                self._admitted[threading.get_ident()] = 0 if full else _ADMITTED_PUTS
            return full

    def set_lost_announcer(self, announcer: LostAnnouncer | None) -> None:
        """With a consumer of record: rows evicted at the cap are announced lost (``edgemed.lost/1``) by durable
        rows this builds, written in the eviction's transaction; lost announcements themselves are never evicted.

        Args:
            announcer: builds the announcement messages; None = evict silently but for the count and the log.
        """
        with self._lock:
            self._announcer = announcer

    # -- internals (call with the lock held) -----------------------------------------------------------------

    def _insert(self, result_id: str, topic: str, payload: bytes, seq: int | None) -> int:
        cur = self._db.execute(
            "INSERT INTO outbox(result_id, topic, payload, created_at, seq) VALUES (?, ?, ?, ?, ?)",
            (result_id, topic, payload, time.time(), seq),
        )
        row_id = int(cur.lastrowid or 0)
        self._last_row = row_id
        self._pending += 1
        return row_id

    def _delete(self, where: str, params: Iterable[object]) -> int:
        before = self._db.total_changes
        self._db.execute(f"DELETE FROM outbox WHERE {where}", tuple(params))
        return self._db.total_changes - before

    def _take_admission(self) -> bool:
        """Whether this put was admitted by the calling thread's last ``is_full()``; uses one admitted put."""
        left = self._admitted.get(threading.get_ident(), 0) if self._admitted else 0
        if left:
            self._admitted[threading.get_ident()] = left - 1
        return left > 0

    def _at_cap(self) -> bool:
        if self._pending >= self.cfg.max_pending:
            return True
        if self.cfg.max_age_s is None or self._pending == 0:
            return False
        row = self._db.execute("SELECT created_at FROM outbox ORDER BY row_id LIMIT 1").fetchone()
        return row is not None and time.time() - float(row[0]) > self.cfg.max_age_s

    def _evict(self) -> None:
        # With an announcer the victims are rows with a seq: an announcement evicted would lose what it says.
        only = " WHERE seq IS NOT NULL" if self._announcer is not None else ""
        over = max(0, self._pending - self.cfg.max_pending + 1)
        try:
            self._begin()
            victims = self._db.execute(
                f"SELECT row_id, seq, sent_at FROM outbox{only} ORDER BY row_id LIMIT ?", (over,)
            ).fetchall()
            if self.cfg.max_age_s is not None:
                cut = time.time() - self.cfg.max_age_s
                old = self._db.execute(
                    f"SELECT row_id, seq, sent_at FROM outbox{only or ' WHERE 1'} AND created_at < ?", (cut,)
                ).fetchall()
                victims = list({int(r[0]): r for r in [*victims, *old]}.values())
            evicted = 0
            for chunk, marks in chunks([int(r[0]) for r in victims]):
                evicted += self._delete(f"row_id IN ({marks})", chunk)
            self._pending -= evicted
            self._awaiting -= sum(1 for r in victims if r[2] is not None)
            seqs = [int(r[1]) for r in victims if r[1] is not None]
            if self._announcer is not None and seqs:
                self._write_announcements(to_ranges(seqs), EVICTED_REASON)
        except sqlite3.Error as exc:
            raise self._write_error(exc) from exc
        self.evicted_total += evicted
        log.warning(
            "outbox %s at its cap: evicted the %d oldest results not yet delivered (on_full=evict_oldest; "
            "%d evicted since start)",
            self.path,
            evicted,
            self.evicted_total,
        )

    def _write_announcements(self, ranges: list[SeqRange], reason: str) -> int:
        """Rows announcing the ``seq`` ranges lost, in the open transaction; returns how many were written."""
        if self._announcer is None or not ranges:
            return 0
        messages = self._announcer(ranges, reason)
        for topic, payload in messages:
            self._insert(f"lost-{self._last_row + 1}-{time.time_ns()}", topic, payload, None)
        return len(messages)
