"""The dashboard's receipts: after each commit, each touched stream's receipt, computed from the store and published.

The writer thread only hands over the streams its commit touched (``notify``: a set insertion under a lock), so
computing and publishing never delay a commit. This thread computes each receipt from the database
(``settlement.stream_progress``, on a connection of its own from the engine: on SQLite WAL lets it read beside the
writer, on PostgreSQL it is one of the pool's), so it is right
whatever other ingest processes or earlier runs stored, and publishes it retained at QoS 1 on
``edgemed/{site}/{device_id}/receipts``: a device that reconnects gets the latest at once.

Rate limit: at most one receipt round per device every ``min_interval_s`` (0.25 s: four a second). A device whose
commits come during its quiet period is marked and served when the period ends, with the state of the store at
that moment: the latest state wins, and no commit is left without a receipt.

Again after each (re)connection (``republish``, once the subscription is granted): a broker restarted without
persistence has lost every retained receipt, and a device that reconnects to it would otherwise wait for the next
commit of its stream (or its ``receipt_timeout_s``) to hear of what is already stored. The streams that settled
something in the last ``REPUBLISH_WINDOW_S`` (the ``stream_seen`` table, at most ``REPUBLISH_MAX_STREAMS``, the
most recent first) are marked and served like any others.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import Connection
from sqlalchemy.exc import SQLAlchemyError

from edgemed.dashboard.db import Database, open_database
from edgemed.dashboard.settlement import StreamKey, stream_progress
from edgemed.receipts import Receipt, device_topic

log = logging.getLogger(__name__)

#: Shortest time between two receipt rounds for one device.
MIN_INTERVAL_S = 0.25
#: Wait after a failed read of the database before trying again (it is locked or failing; the writer says why).
RETRY_S = 1.0

#: How far back ``republish`` looks for streams, and how many it sends at most.
REPUBLISH_WINDOW_S = 24 * 3600.0
REPUBLISH_MAX_STREAMS = 10_000
_RECENT = sa.text(
    "SELECT site, device_id, stream FROM stream_seen WHERE seen_at >= :since ORDER BY seen_at DESC LIMIT :n"
)

#: Publishes one message: ``(topic, payload)``, QoS 1, retained (``MqttLink.publish`` in the ingest).
PublishReceipt = Callable[[str, bytes], None]


class ReceiptSender:
    """A thread that publishes the receipts of the streams the ingest's commits touched, rate-limited per device."""

    def __init__(
        self,
        db: Path | str | Database,
        publish: PublishReceipt,
        consumer_id: str,
        *,
        min_interval_s: float = MIN_INTERVAL_S,
        busy_timeout_s: float = 5.0,
    ) -> None:
        """Set up; nothing runs until ``start()``.

        Args:
            db: the dashboard database: the store's ``Database`` (``store.path`` on PostgreSQL; the thread takes
                its connections from that engine), or an SQLite file path or ``--db`` URL (opened again here).
            publish: sends one receipt (retained, QoS 1).
            consumer_id: the consumer the receipts name (``--consumer-id``).
            min_interval_s: shortest time between two receipt rounds for one device.
            busy_timeout_s: how long a read or write waits for another connection's lock.
        """
        self.db = db
        self.consumer_id = consumer_id
        self.min_interval_s = min_interval_s
        self._publish = publish
        self._busy_timeout_s = busy_timeout_s
        self._cond = threading.Condition()
        self._dirty: set[StreamKey] = set()
        self._last_round: dict[tuple[str, str], float] = {}
        self._stopping = False
        self._republish = False
        self._thread: threading.Thread | None = None
        #: Receipts published since start (tests and the page read it).
        self.sent = 0

    def start(self) -> None:
        """Start the thread (again after a ``stop()``)."""
        if self._thread is not None and self._thread.is_alive():
            return
        with self._cond:
            self._stopping = False
        self._thread = threading.Thread(target=self._run, name="edgemed-receipts", daemon=True)
        self._thread.start()

    def notify(self, keys: Iterable[StreamKey]) -> None:
        """Mark streams whose settled seqs a commit changed (any thread; never blocks on I/O).

        Args:
            keys: ``(site, device_id, stream)`` of each touched stream (repeats are fine).
        """
        with self._cond:
            before = len(self._dirty)
            self._dirty.update(keys)
            if len(self._dirty) != before:
                self._cond.notify()

    def republish(self) -> None:
        """Send again the receipts of the streams that settled something recently (any thread; never blocks on I/O).

        The ingest calls it each time the broker granted its subscription: after a broker restart the retained
        receipts may be gone.
        """
        with self._cond:
            self._republish = True
            self._cond.notify()

    def pending(self) -> int:
        """Streams waiting for their receipt."""
        with self._cond:
            return len(self._dirty)

    def stop(self, drain_s: float = 2.0) -> None:
        """Send the receipts still due (for up to ``drain_s``, quiet periods included), then end the thread.

        Args:
            drain_s: longest wait.
        """
        thread = self._thread
        if thread is None:
            return
        deadline = time.monotonic() + drain_s
        while self.pending() and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        with self._cond:
            self._stopping = True
            self._cond.notify()
        thread.join(max(0.5, deadline - time.monotonic()))
        self._thread = None

    # -- the thread ----------------------------------------------------------------------------------------------

    def _take_due(self) -> list[StreamKey] | None:
        """Wait for streams whose device's quiet period is over; None when stopping."""
        with self._cond:
            while not self._stopping:
                if self._republish:
                    return []  # the thread marks the recent streams first
                now = time.monotonic()
                due = [k for k in self._dirty if now - self._last_round.get(k[:2], -1e9) >= self.min_interval_s]
                if due:
                    self._dirty.difference_update(due)
                    for key in due:
                        self._last_round[key[:2]] = now
                    if len(self._last_round) > 4096:  # devices silent past their quiet period need no entry
                        old = [d for d, t in self._last_round.items() if now - t >= self.min_interval_s]
                        for device in old:
                            del self._last_round[device]
                    return due
                waits = [self.min_interval_s - (now - self._last_round[k[:2]]) for k in self._dirty]
                self._cond.wait(min(waits, default=1.0))
            return None

    def _run(self) -> None:
        database = self.db
        if not isinstance(database, Database):  # a path or URL: an engine of the thread's own
            database = open_database(database, busy_timeout_s=self._busy_timeout_s)
        try:
            while True:
                due = self._take_due()
                if due is None:
                    return
                try:
                    db = database.engine.connect()  # one pooled connection per round; a broken one is replaced
                except SQLAlchemyError as exc:
                    log.warning("cannot reach the dashboard database for receipts (%s); retrying", _one_line(exc))
                    self._retry(due, republish=not due)
                    continue
                with db:
                    if due:
                        self._send_all(db, due)
                        self._sent(due)
                    else:
                        self._mark_recent(db)
        finally:
            if database is not self.db:
                database.dispose()

    def _sent(self, due: list[StreamKey]) -> None:
        """Start each device's quiet period again from the end of its round. Counted from when the round was taken
        only, a round that took long to send (a busy database) was followed at once by the next, already due: two
        receipts milliseconds apart on the wire."""
        now = time.monotonic()
        with self._cond:
            for key in due:
                self._last_round[key[:2]] = now

    def _send_all(self, db: Connection, due: list[StreamKey]) -> None:
        for i, key in enumerate(due):
            try:
                self._send(db, key)
            except SQLAlchemyError as exc:
                log.warning("cannot compute receipts from the dashboard database (%s); retrying", _one_line(exc))
            except Exception:
                # Whatever failed (the MQTT client, a bug), this thread must live on: a stream whose receipt is
                # never sent again keeps its device's results on disk for good.
                log.exception("could not publish a receipt for %s/%s; retrying", key[0], key[1])
            else:
                continue
            self._retry(due[i:])
            return

    def _retry(self, keys: list[StreamKey], *, republish: bool = False) -> None:
        self.notify(keys)
        with self._cond:  # a stop() ends the wait
            self._republish = self._republish or republish
            self._cond.wait_for(lambda: self._stopping, RETRY_S)

    def _mark_recent(self, db: Connection) -> None:
        with self._cond:
            self._republish = False
        try:
            rows = db.execute(_RECENT, {"since": time.time() - REPUBLISH_WINDOW_S, "n": REPUBLISH_MAX_STREAMS}).all()
            db.rollback()
        except SQLAlchemyError as exc:
            log.warning("cannot read which receipts to send again (%s); retrying", _one_line(exc))
            self._retry([], republish=True)
            return
        self.notify((str(site), str(device_id), str(stream)) for site, device_id, stream in rows)

    def _send(self, db: Connection, key: StreamKey) -> None:
        site, device_id, stream = key
        receipt = Receipt(self.consumer_id, site, device_id, stream, stream_progress(db, key))
        self._publish(device_topic(site, device_id, "receipts"), receipt.encode())
        self.sent += 1


def _one_line(exc: SQLAlchemyError) -> str:
    """The driver's message on one line (SQLAlchemy's own adds the statement, which says nothing to an operator)."""
    orig = getattr(exc, "orig", None)
    return " ".join(str(orig if orig is not None else exc).split())[:300]
