"""The acknowledgement log (``acked``): evidence of the broker's PUBACKs, and the replay window's payloads.

A bounded log of recently acknowledged ``result_id`` values shows that a result missing at the consumer was
accepted by the broker (a broker-side loss), not lost by the device. With ``replay_window_s`` it also keeps the
payloads of the last seconds' acknowledgements, which the delivery publishes again on every connection: a broker
that acknowledged before writing to disk may have lost them. (With a consumer of record the receipts replace
the replay window: the device then runs with it off, ``edgemed.publish.consumer``.)
"""

from __future__ import annotations

import sqlite3
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

from edgemed.errors import OutboxError
from edgemed.outbox.config import OutboxItem
from edgemed.outbox.store import OutboxStore

ACK_CHUNK = 500  # row ids per statement (SQLite allows 32,766 host parameters; older builds 999)


def item(row: tuple[Any, ...]) -> OutboxItem:
    """An ``OutboxItem`` from ``(row_id, result_id, topic, payload, time[, seq])`` as the queries select them."""
    seq = row[5] if len(row) > 5 and row[5] is not None else None
    return OutboxItem(int(row[0]), str(row[1]), str(row[2]), bytes(row[3]), float(row[4]), seq)


def chunks(ids: list[int]) -> Iterable[tuple[list[int], str]]:
    """``ids`` in chunks under SQLite's host-parameter limit, each with its ``?,?,...`` placeholders."""
    for start in range(0, len(ids), ACK_CHUNK):
        chunk = ids[start : start + ACK_CHUNK]
        yield chunk, ",".join("?" * len(chunk))


class AckLog(OutboxStore):
    """The ``acked`` table's evidence and replay payloads, on top of the outbox's file (``OutboxStore``)."""

    def _load_state(self) -> None:
        super()._load_state()
        # Replay: the payloads of recent acknowledgements are kept so that the delivery can publish them again
        # after a (re)connection. What is kept is decided on the monotonic clock, relative to the latest
        # acknowledgement rather than to "now": when a broker dies silently, or during an outage, no
        # acknowledgement arrives and nothing expires. ``_kept`` maps row id -> when it was acknowledged (or last
        # re-sent); ``_kept_order`` schedules the expiry checks so a commit touches only what expires, by primary key.
        self._kept: dict[int, float] = {}
        self._kept_order: deque[tuple[float, list[int]]] = deque()
        self._last_ack_mono = time.monotonic()
        self._load_kept_payloads()

    def replay_candidates(self) -> list[OutboxItem]:
        """The acknowledged results whose payloads are still kept, in production order (empty with replay off).

        Those are the results acknowledged within ``replay_window_s`` before the latest acknowledgement, plus
        any re-sent since. The delivery publishes them again on every connection: a broker that acknowledged
        them before writing them to disk has lost them if it crashed. Consumers drop the duplicates by
        ``result_id``.

        Returns:
            Items whose ``created_at`` is the wall-clock time of the (first) acknowledgement.
        """
        if self.cfg.replay_window_s <= 0:
            return []
        with self._lock:
            self._check_open()
            rows = self._db.execute(
                "SELECT row_id, result_id, topic, payload, acked_at FROM acked WHERE payload IS NOT NULL "
                "ORDER BY row_id"
            ).fetchall()
        return [item(r) for r in rows]

    def renew_replayed(self, row_ids: Iterable[int]) -> None:
        """Keep re-sent results for another window: the broker may crash again before it writes them.

        Args:
            row_ids: as carried by the items from ``replay_candidates()``.
        """
        ids = [int(r) for r in row_ids]
        if not ids or self.cfg.replay_window_s <= 0:
            return
        with self._lock:
            self._keep(ids)

    def acked_ids(self) -> set[str]:
        """The ``result_id`` of every acknowledgement still in the bounded evidence log (committed or not)."""
        with self._lock:
            self._check_open()
            return {str(r[0]) for r in self._db.execute("SELECT result_id FROM acked")}

    # -- internals (call with the lock held) -----------------------------------------------------------------

    def _log_acks(self, chunk: list[int], marks: str, now: float) -> None:
        """Log the rows ``chunk`` (still in the outbox) as acknowledged; with replay on, keep their payloads."""
        if not self.cfg.keep_acked:  # never 0 when replay is on (the config checks it)
            return
        kept = ", topic, payload" if self.cfg.replay_window_s > 0 else ""
        self._db.execute(
            f"INSERT OR IGNORE INTO acked(row_id, result_id, acked_at{kept}) "
            f"SELECT row_id, result_id, ?{kept} FROM outbox WHERE row_id IN ({marks})",
            (now, *chunk),
        )

    def _before_commit(self) -> None:
        super()._before_commit()
        if self.cfg.keep_acked and self._last_row > self.cfg.keep_acked:
            # Keep the acknowledgements of the last keep_acked results produced. Row ids grow by one per
            # result, so this is a range delete on the primary key: its cost is what it deletes, not the size
            # of the log (an OFFSET over the log scanned all 100,000 kept rows on every commit).
            # Rows still holding a replay payload stay: an outage can produce more than keep_acked results
            # while the ones acknowledged just before it still wait to be re-sent.
            self._db.execute(
                "DELETE FROM acked WHERE row_id <= ? AND payload IS NULL",
                (self._last_row - self.cfg.keep_acked,),
            )
        self._expire_payloads()

    def _keep(self, ids: list[int]) -> float:
        # Keep these rows' payloads for a window counted from now (monotonic); returns that time.
        mono = time.monotonic()
        self._kept.update(dict.fromkeys(ids, mono))
        self._kept_order.append((mono, ids))
        return mono

    def _expire_payloads(self) -> None:
        # Inside the commit's transaction. A payload goes once it was acknowledged (or re-sent) more than
        # replay_window_s before the latest acknowledgement: the broker has saved it by then, or has been
        # acknowledging newer results long enough to show it did not crash.
        if self.cfg.replay_window_s <= 0:
            return
        cutoff = self._last_ack_mono - self.cfg.replay_window_s
        while self._kept_order and self._kept_order[0][0] < cutoff:
            _, ids = self._kept_order.popleft()
            # A row re-sent since this entry was scheduled carries a newer time: it stays.
            expired = [i for i in ids if self._kept.get(i, cutoff) < cutoff]
            for i in expired:
                self._kept.pop(i, None)
            for chunk, marks in chunks(expired):
                self._db.execute(f"UPDATE acked SET topic = NULL, payload = NULL WHERE row_id IN ({marks})", chunk)

    def _load_kept_payloads(self) -> None:
        # Payloads kept by an earlier run (a power cut may have taken the broker down too): with replay on they
        # are re-sent on this run's first connection, then expire as usual; with replay off they are dropped once.
        try:
            flag = self._db.execute("SELECT value FROM meta WHERE key = 'replay_payloads'").fetchone()
            if self.cfg.replay_window_s <= 0:
                if flag is not None and flag[0]:
                    self._db.execute("UPDATE acked SET topic = NULL, payload = NULL WHERE payload IS NOT NULL")
                    self._db.execute("UPDATE meta SET value = 0 WHERE key = 'replay_payloads'")
                return
            self._db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('replay_payloads', 1)")
            ids = [int(r[0]) for r in self._db.execute("SELECT row_id FROM acked WHERE payload IS NOT NULL")]
        except sqlite3.Error as exc:
            raise OutboxError(f"cannot read the acknowledgement log of {self.path}: {exc}") from exc
        if ids:
            self._keep(ids)
