"""Group commit for the ingest: messages are committed in batches, durably, and acknowledged only after.

The broker may forget a message once we acknowledge it (PUBACK), so the dashboard acknowledges only what a
durable commit holds: the store commits with ``synchronous=FULL`` (the write-ahead log is fsynced at every commit,
so a power cut loses nothing acknowledged). One fsync per message would cap the ingest at the disk's fsync rate,
so messages that arrive together share one commit:

* the writer thread takes the first waiting message, then whatever follows it closely: it stops collecting when
  no message came for ``gap_s`` (the broker sends its in-flight window, 20 messages with mosquitto's defaults, as
  one burst and waits for our acknowledgements), after ``window_s`` at most (a bound on the added latency), or at
  ``max_batch``. Waiting for more than the broker has in flight would only add latency: it sends no more until
  we acknowledge;
* it classifies and stores the batch in one transaction, then sends the PUBACKs.

A failed commit (disk full, database locked by another process, an I/O error) is retried with capped exponential
back-off, for as long as it takes: the batch stays in memory, unacknowledged, and so does what arrives meanwhile
(at QoS 1 the broker sends no more than its in-flight window; heartbeats at QoS 0 are dropped beyond
``max_held_qos0``, the next one replaces them). The log says so once per back-off step and the page shows it;
once a commit works again everything held back is stored and acknowledged, without a restart.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgemed.dashboard.validate import Filing

log = logging.getLogger(__name__)


@dataclass
class Held:
    """One received message on its way to the store; ``ack`` sends its PUBACK (None at QoS 0).

    ``retain``: the broker sent it as the topic's retained message (again at a new subscription).
    """

    topic: str
    payload: bytes
    received_at: float
    ack: Callable[[], None] | None
    filing: Filing | None = None
    retain: bool = False


class StoreWriter:
    """The ingest's writer thread: batches, commits (retrying a failing database) and then acknowledges."""

    def __init__(
        self,
        *,
        classify: Callable[[str, bytes, bool], Filing],
        store: Callable[[list[Filing], float], list[str]],
        on_outcome: Callable[[str, str], None],
        retry_min_s: float = 0.5,
        retry_max_s: float = 30.0,
        window_s: float = 0.02,
        gap_s: float = 0.002,
        max_batch: int = 500,
        max_held_qos0: int = 1000,
    ) -> None:
        """Set up; nothing runs until ``start()``.

        Args:
            classify: turns a topic, payload and retain flag into a ``Filing`` (never raises on input).
            store: stores filings in one transaction and returns their outcomes; raises when the database fails.
            on_outcome: called with the topic and outcome of every stored message (counters, log).
            retry_min_s: first delay after a failed commit; doubles up to ``retry_max_s``.
            retry_max_s: longest delay between two attempts.
            window_s: longest time a batch waits for more messages after its first.
            gap_s: a batch is closed when no message arrived for this long.
            max_batch: most messages in one commit.
            max_held_qos0: QoS 0 messages (heartbeats) held while the database fails; newer ones are dropped.
        """
        self._classify = classify
        self._store = store
        self._on_outcome = on_outcome
        self.retry_min_s, self.retry_max_s = retry_min_s, retry_max_s
        self.window_s, self.gap_s, self.max_batch = window_s, gap_s, max_batch
        self.max_held_qos0 = max_held_qos0
        self._queue: queue.Queue[Held] = queue.Queue()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._in_batch = 0
        self._error: str | None = None
        self._failing_since: float | None = None
        self._retry_at: float | None = None
        self._dropped_qos0 = 0
        self.commits = 0

    # -- control (any thread) ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the writer thread (again after a ``stop()``)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._discard_queued()  # arrived after the last stop(): never acknowledged, the broker sends them again
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="edgemed-ingest-writer", daemon=True)
        self._thread.start()

    def submit(self, held: Held) -> None:
        """Queue one received message (the link's network thread calls this; it never blocks)."""
        if held.ack is None and self._error is not None and self._queue.qsize() >= self.max_held_qos0:
            with self._lock:
                self._dropped_qos0 += 1
            return
        self._queue.put(held)

    def stop(self, drain_s: float = 2.0) -> None:
        """Commit and acknowledge what is queued (for up to ``drain_s``), then end the thread.

        What is still queued afterwards was never acknowledged: the broker sends it again to the next session.

        Args:
            drain_s: longest wait for the queue to empty.
        """
        deadline = time.monotonic() + drain_s
        while self.held() and self._error is None and time.monotonic() < deadline:
            time.sleep(0.01)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(max(1.0, deadline - time.monotonic()))
        self._thread = None
        self._discard_queued()
        with self._lock:
            self._in_batch = 0

    def _discard_queued(self) -> None:
        while True:  # dropped unacknowledged: the broker sends them again to the next session
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break

    def held(self) -> int:
        """Messages received and not yet committed."""
        with self._lock:
            return self._queue.qsize() + self._in_batch

    def status(self) -> dict[str, Any]:
        """``store_error`` (None while writes work), ``held``, ``retry_in_s``, ``failing_since``, ``dropped_qos0``."""
        with self._lock:
            retry_at = self._retry_at
            out = {
                "store_error": self._error,
                "failing_since": self._failing_since,
                "retry_in_s": None if retry_at is None else round(max(0.0, retry_at - time.monotonic()), 1),
                "dropped_qos0": self._dropped_qos0,
            }
        out["held"] = self.held()
        return out

    # -- the thread ----------------------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            batch = self._take()
            if not batch:
                continue
            if self._commit(batch):
                for held in batch:
                    if held.ack is not None:
                        held.ack()
            with self._lock:
                self._in_batch = 0

    def _take(self) -> list[Held]:
        try:
            first = self._queue.get(timeout=0.1)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self.window_s
        while len(batch) < self.max_batch:
            wait = min(self.gap_s, deadline - time.monotonic())
            if wait <= 0:
                break
            try:
                batch.append(self._queue.get(timeout=wait))
            except queue.Empty:
                break
        with self._lock:
            self._in_batch = len(batch)
        return batch

    def _commit(self, batch: list[Held]) -> bool:
        for held in batch:
            if held.filing is None:
                held.filing = self._classify(held.topic, held.payload, held.retain)
        delay, attempts = self.retry_min_s, 0
        while True:
            try:
                outcomes = self._store([h.filing for h in batch if h.filing is not None], batch[0].received_at)
            except Exception as exc:  # noqa: BLE001 - a failed commit (full, locked, I/O) is retried, never fatal
                attempts += 1
                self._failed(exc, len(batch), delay, attempts)
                if self._stop.wait(delay):
                    return False  # stopping: unacknowledged, so the broker keeps it for the next session
                delay = min(delay * 2, self.retry_max_s)
                continue
            self.commits += 1
            self._recovered(attempts)
            for held, outcome in zip(batch, outcomes, strict=True):
                self._on_outcome(held.topic, outcome)
            return True

    def _failed(self, exc: Exception, in_batch: int, delay: float, attempts: int) -> None:
        message = f"cannot write to the dashboard database ({exc}); messages are held back, unacknowledged"
        with self._lock:
            first = self._error is None
            self._error = message
            if self._failing_since is None:
                self._failing_since = time.time()
            self._retry_at = time.monotonic() + delay
        # Once per back-off step while the delay grows, then every tenth attempt (5 min at the 30 s cap).
        if delay < self.retry_max_s or attempts % 10 == 0 or first:
            log.error(
                "cannot write to the dashboard database (%s): %d messages held back, unacknowledged at the broker; "
                "retrying in %.1f s (attempt %d)",
                exc,
                self._queue.qsize() + in_batch,
                delay,
                attempts,
            )

    def _recovered(self, attempts: int) -> None:
        if not attempts:
            return
        with self._lock:
            since = self._failing_since or time.time()
            self._error = None
            self._failing_since = None
            self._retry_at = None
            dropped, self._dropped_qos0 = self._dropped_qos0, 0
        log.warning(
            "the dashboard database takes writes again after %.0f s and %d failed attempts; the messages held back "
            "are stored and acknowledged%s",
            time.time() - since,
            attempts,
            f" ({dropped} heartbeats were dropped meanwhile)" if dropped else "",
        )
