"""Drains the durable outbox through a publisher, in order; a result leaves on its PUBACK, or on its receipt.

One background thread moves committed results from the outbox to the publisher, keeping at most ``max_inflight``
unacknowledged; acknowledgements arrive on the publisher's network thread and are handed back to this thread,
which records them in batches. Without a consumer of record, a PUBACK deletes the result: the broker has taken
responsibility for it. With one (``delivery.consumer``, ``edgemed.publish.consumer``), a PUBACK only marks it
awaiting receipt, and the consumer's receipt deletes it; results the consumer misses are sent again, and nothing
is published from the outbox while the consumer is offline. Delivery is therefore at least once: after a crash,
a reconnect or a protocol fall back a result may be sent again, with the same ``result_id`` and ``seq``, and the
consumer drops the duplicate.

With ``publish.batch`` the results go several to a message (``edgemed.publish.batching``); one PUBACK then
acknowledges every row of the batch.

``Delivery`` knows the publisher only through the ``Publisher`` protocol (``publish.publisher``): ``MqttLink`` in
production, an in-memory publisher in the delivery logic tests (``tests/test_delivery_logic.py``).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from edgemed.errors import OutboxError
from edgemed.lock import DataDirLock
from edgemed.outbox import OUTBOX_FILENAME, Outbox, OutboxConfig
from edgemed.publish.batching import Batcher
from edgemed.publish.config import BatchConfig, MqttConfig
from edgemed.publish.consumer import Backlog, Consumer, ConsumerRoute, effective_outbox_config
from edgemed.publish.publisher import Publisher

log = logging.getLogger(__name__)

_IDLE_POLL_S = 0.05
# With a consumer of record: most messages published and not yet receipted (see Delivery._receipt_room). Half of
# mosquitto's default queue per client, so one device alone never overflows the consumer's queue.
_UNRECEIPTED_MESSAGES = 500
# Acknowledgements are recorded in the outbox in batches at most this often (sooner when the in-flight window
# is full, or when stopping): one statement per PUBACK would hold the outbox lock, which the producing thread
# needs for every result, thousands of times a second. They only become durable at the next commit anyway.
_ACK_BATCH_S = 0.02


class Delivery:
    """The background drain of one outbox through one publisher."""

    def __init__(
        self,
        outbox: Outbox,
        publisher: Publisher,
        *,
        max_inflight: int = 500,
        consumer: Consumer | None = None,
        batch: Batcher | None = None,
    ) -> None:
        """Prepare the drain; nothing runs until ``start()``.

        Args:
            outbox: where results wait (``pending()``/``ack_many()``/``mark_sent()`` are called from this object's
                thread).
            publisher: the connection to the broker (``MqttLink``); it need not be connected yet.
            max_inflight: most results published and not yet acknowledged at any time. 500 measured 18% faster
                than 100 (benchmarks/bench_outbox.py) and no faster at 1,000; after a reconnect at most this many
                are sent again, each with its result_id.
            consumer: the consumer of record whose receipts release results (its ``subscriptions``,
                ``on_message`` and ``on_state`` must be wired to the publisher's link); None = PUBACK releases.
                The outbox then announces evicted rows lost through it.
            batch: groups results into ``edgemed.batch/1`` messages; None = one result per message.

        Raises:
            ValueError: ``max_inflight`` is smaller than 1.
        """
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be at least 1, not {max_inflight}")
        self.outbox = outbox
        self.publisher = publisher
        self.max_inflight = max_inflight
        self.consumer = consumer
        self.batch = batch
        self.messages_total = 0
        self.published_total = 0
        self.acked_total = 0
        self._lock = threading.Lock()
        self._acked: list[int] = []
        self._inflight: set[int] = set()
        self._cursor = 0
        self._epoch = publisher.epoch
        self._was_connected = False
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._error: OutboxError | None = None
        self._thread: threading.Thread | None = None
        self._acks_flushed_at = 0.0
        self._connections_seen = 0
        self.replayed_total = 0
        # Woken by commits, not by every put(): results become publishable only once committed.
        outbox.add_commit_listener(self.wake)
        if consumer is not None:
            consumer.wake = self.wake
            outbox.set_lost_announcer(consumer.announce)

    def start(self) -> None:
        """Start the drain thread (idempotent)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="edgemed-delivery", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Tell the drain that new results may have been committed (the outbox does so on every commit, and the
        drain also polls every 50 ms)."""
        if not self._wake.is_set():  # set() takes the condition lock even when set: this runs on every commit
            self._wake.set()

    def check(self) -> None:
        """Raise the outbox error that stopped the drain, if any.

        Raises:
            OutboxError: acknowledged results could not be removed from the outbox.
        """
        if self._error is not None:
            raise OutboxError(str(self._error)) from self._error

    def backlog(self) -> Backlog:
        """What is still on disk, by state, and whether the consumer (if any) is online."""
        consumer = self.consumer
        return Backlog(
            unsent=self.outbox.unsent_count(),
            awaiting=self.outbox.awaiting_count(),
            consumer=consumer.consumer_id if consumer is not None else None,
            consumer_online=consumer.online if consumer is not None else None,
        )

    def drain(self, timeout_s: float) -> int:
        """Commit what was put, then wait until every result is delivered (acknowledged, or receipted with a
        consumer) or ``timeout_s`` passed.

        Args:
            timeout_s: longest wait.

        Returns:
            How many results are still pending (0 when everything was delivered).
        """
        self.outbox.flush()
        deadline = time.monotonic() + timeout_s
        while self.outbox.pending_count() > 0 and time.monotonic() < deadline and self._error is None:
            self.wake()
            time.sleep(0.01)
        self.outbox.flush()  # make the deletions durable, so a restart does not re-send what arrived
        return self.outbox.pending_count()

    def stop(self) -> None:
        """Stop the drain thread after it has recorded the acknowledgements received so far."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        self._wake.set()
        thread.join(timeout=5.0)

    # -- drain thread ----------------------------------------------------------------------------------------

    def _on_ack(self, row_id: int) -> None:
        # Runs on the publisher's network thread: only hand the row id over, never touch the outbox here.
        with self._lock:
            first = not self._acked
            self._acked.append(row_id)
        if first:  # one wake-up per batch of acknowledgements, not one per PUBACK
            self._wake.set()

    def _on_batch_ack(self, row_ids: tuple[int, ...]) -> None:
        # One PUBACK for every row of a batch (network thread: hand over only).
        with self._lock:
            first = not self._acked
            self._acked.extend(row_ids)
        if first:
            self._wake.set()

    def _run(self) -> None:
        while True:
            stopping = self._stop.is_set()
            # Cleared before the step, not after the wait: a commit that lands during the step must wake the next
            # wait, or its batch would sit until the idle poll.
            self._wake.clear()
            try:
                self._step(publish=not stopping, flush_acks=stopping)
            except OutboxError as exc:
                self._error = exc
                log.error("delivery stopped: %s", exc)
                return
            except Exception as exc:
                # Anything else (an SQLite read error, a bug) would end this thread silently: the run would go on
                # producing, never send again, and wait out its drain for nothing. Reported like an outbox failure,
                # so check() ends the run and says why; every result stays on disk.
                self._error = OutboxError(
                    f"the delivery stopped on an unexpected error ({type(exc).__name__}: {exc}); every result "
                    "is kept in the outbox and sent by the next run or `edgemed flush`"
                )
                log.exception("delivery stopped: %s", self._error)
                return
            if stopping:
                return
            self._wake.wait(self._idle_wait())

    def _idle_wait(self) -> float:
        with self._lock:
            waiting = bool(self._acked)
        if not waiting:
            return _IDLE_POLL_S
        return min(_IDLE_POLL_S, max(0.0, self._acks_flushed_at + _ACK_BATCH_S - time.monotonic()))

    def _step(self, *, publish: bool, flush_acks: bool = False) -> None:
        now = time.monotonic()
        publisher = self.publisher
        epoch = publisher.epoch  # read once: the publisher may replace its client at any moment
        if (
            flush_acks
            or epoch != self._epoch  # record what arrived before replaying from the outbox
            or now - self._acks_flushed_at >= _ACK_BATCH_S
            or len(self._inflight) >= self.max_inflight
            or not publisher.connected
        ):
            with self._lock:
                acked, self._acked = self._acked, []
            self._acks_flushed_at = now
            if acked:
                if self.consumer is None:
                    self.outbox.ack_many(acked)
                else:
                    self.outbox.mark_sent(acked)  # awaiting the consumer's receipt
                self._inflight.difference_update(acked)
                self.acked_total += len(acked)
        if epoch != self._epoch:
            # The publisher replaced its client: what the old one held in memory is gone; replay from the outbox.
            self._epoch = epoch
            self._inflight.clear()
            self._cursor = 0
        if self.consumer is not None:
            again = self.consumer.apply(self.outbox)
            if again is not None:  # rows made unsent for sending again: the cursor comes back for them
                self._cursor = min(self._cursor, again - 1)
        if not publish or not publisher.connected:
            return
        if self.consumer is not None and not self.consumer.online:
            return  # kept on disk until the consumer is back (heartbeats and status are not sent from here)
        connections = publisher.connections
        if connections != self._connections_seen:
            self._connections_seen = connections
            if self.consumer is None:
                self._replay()  # on every connection, the first of a run included (a power cut may take both down)
        room = self.max_inflight - len(self._inflight)
        if self.consumer is not None:
            room = min(room, self._receipt_room())
        if room <= 0:
            return
        self._publish(room)

    def _receipt_room(self) -> int:
        """How many more rows may go out before the consumer's receipts catch up.

        Without this bound a device publishes as fast as the broker acknowledges, faster than a consumer stores:
        the broker then drops what exceeds its queue for the consumer (mosquitto's ``max_queued_messages``, 1000
        by default), and a dropped tail is sent again only after a receipt timeout (measured: one result per
        message fell from thousands a second to 41, benchmarks/results/outbox.md). The bound counts messages,
        not results: ``_UNRECEIPTED_MESSAGES`` messages of up to ``publish.batch.max_results`` results each.
        """
        per_message = self.batch.cfg.max_results if self.batch is not None else 1
        return _UNRECEIPTED_MESSAGES * per_message - self.outbox.awaiting_count() - len(self._inflight)

    def _publish(self, room: int) -> None:
        items = self.outbox.pending(room, after_row=self._cursor)
        if not items:
            return
        self._cursor = items[-1].row_id
        # After the cursor came back, rows still in flight (sent, no PUBACK yet) are not sent a second time.
        items = [item for item in items if item.row_id not in self._inflight]
        publisher = self.publisher
        if self.batch is None:
            for item in items:
                self._inflight.add(item.row_id)
                publisher.publish(item.topic, item.payload, on_ack=partial(self._on_ack, item.row_id))
            self.published_total += len(items)
            self.messages_total += len(items)
            return
        for message in self.batch.messages(items):
            self._inflight.update(message.row_ids)
            publisher.publish(message.topic, message.payload, on_ack=partial(self._on_batch_ack, message.row_ids))
            self.published_total += len(message.row_ids)
            self.messages_total += 1

    def _replay(self) -> None:
        # The connection is (back) up. If the broker crashed, whatever it acknowledged but had not yet written to
        # disk is gone: publish again what the outbox still keeps (outbox.replay_window_s; untracked, since these
        # already left the outbox; the consumer drops the duplicates by result_id), and keep it for another
        # window in case the broker crashes again before saving.
        items = self.outbox.replay_candidates()
        if not items:
            return
        for item in items:
            self.publisher.publish(item.topic, item.payload, on_ack=None)
        self.outbox.renew_replayed(item.row_id for item in items)
        self.replayed_total += len(items)
        log.warning(
            "connected to the broker: re-sent %d results it acknowledged shortly before (outbox.replay_window_s "
            "%.1f s), in case it lost them",
            len(items),
            self.outbox.cfg.replay_window_s,
        )


@dataclass(frozen=True)
class FlushResult:
    """What ``flush_outbox`` did.

    Attributes:
        sent: results delivered (acknowledged, or receipted with a consumer) that left the outbox.
        remaining: results still on disk.
        backlog: the remaining ones by state.
    """

    sent: int
    remaining: int
    backlog: Backlog = field(default_factory=Backlog)


# How long flush waits for the first connection before it says that it is waiting (a broker on this machine
# answers in milliseconds; anything slower is worth a line).
_QUIET_CONNECT_S = 1.0


def flush_outbox(
    data_dir: Path,
    cfg: MqttConfig,
    timeout_s: float,
    *,
    client_id: str | None = None,
    status_topic: str | None = None,
    timeout_name: str = "--timeout",
    outbox_cfg: OutboxConfig | None = None,
    route: ConsumerRoute | None = None,
    batch: BatchConfig | None = None,
) -> FlushResult:
    """Send whatever is pending in a data directory's outbox (``edgemed flush``).

    When the broker does not answer at once, one WARNING says how long the wait can last and which setting
    bounds it (``timeout_name``), instead of a silent wait.

    Args:
        data_dir: the device's data directory; it is locked for the duration.
        cfg: broker settings (TLS and credentials included).
        timeout_s: longest time to wait for the broker, its acknowledgements and (with a consumer) the receipts.
        client_id: MQTT client id; default ``cfg.client_id`` or one derived from the data directory.
        status_topic: where to publish a retained status; None = none.
        timeout_name: the option that set ``timeout_s``, named in the waiting message.
        outbox_cfg: the profile's outbox settings (acknowledgement log, replay window, commit level); default
            ``OutboxConfig()``.
        route: the consumer of record and the device's identity, when the profile names a consumer: results
            then leave only on its receipts.
        batch: the profile's ``publish.batch`` (used when enabled; needs ``route`` or is ignored without it).

    Returns:
        How many results were sent and how many are still on disk.

    Raises:
        OutboxLockedError: another process owns the data directory.
        BrokerRefusedError: the broker refused the credentials or certificate, or plaintext policy forbids it.
        OutboxError: the outbox cannot be read or written.
    """
    data_dir = Path(data_dir)
    with DataDirLock(data_dir):
        consumer = route.consumer(data_dir) if route is not None else None
        outbox = Outbox(data_dir / OUTBOX_FILENAME, effective_outbox_config(outbox_cfg, consumer))
        try:
            pending = outbox.pending_count()
            if pending == 0:
                return FlushResult(0, 0)
            digest = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:16]
            from edgemed.publish.mqtt import MqttLink  # paho is imported only where a broker is used

            link = MqttLink(
                cfg,
                status_topic=status_topic,
                client_id=client_id or cfg.client_id or f"edgemed-flush-{digest}",
                subscriptions=consumer.subscriptions if consumer is not None else (),
                on_message=consumer.on_message if consumer is not None else None,
                on_state=consumer.on_state if consumer is not None else None,
            )
            batcher = None
            if batch is not None and batch.enabled and route is not None:
                batcher = Batcher(batch, site=route.site, device_id=route.device_id)
            delivery = Delivery(outbox, link, consumer=consumer, batch=batcher)
            link.start()
            delivery.start()
            try:
                deadline = time.monotonic() + timeout_s
                if not link.wait_connected(min(_QUIET_CONNECT_S, timeout_s)):
                    link.check()
                    log.warning(
                        "%d results pending: waiting up to %g s for the broker %s (%s)",
                        pending,
                        timeout_s,
                        cfg.url,
                        timeout_name,
                    )
                remaining = outbox.pending_count()
                while remaining and time.monotonic() < deadline:
                    link.check()
                    delivery.check()
                    remaining = delivery.drain(min(0.5, max(0.0, deadline - time.monotonic())))
                link.check()
                return FlushResult(pending - remaining, remaining, delivery.backlog())
            finally:
                delivery.stop()
                link.stop(timeout_s=2.0)
        finally:
            outbox.close()


def flush(
    data_dir: Path,
    cfg: MqttConfig,
    timeout_s: float,
    *,
    client_id: str | None = None,
    status_topic: str | None = None,
    outbox_cfg: OutboxConfig | None = None,
) -> int:
    """Send whatever is pending in a data directory's outbox; see ``flush_outbox``.

    Returns:
        How many results are still pending (0 = everything delivered).

    Raises:
        OutboxLockedError: another process owns the data directory.
        BrokerRefusedError: the broker refused the credentials or certificate, or plaintext policy forbids it.
        OutboxError: the outbox cannot be read or written.
    """
    return flush_outbox(
        data_dir, cfg, timeout_s, client_id=client_id, status_topic=status_topic, outbox_cfg=outbox_cfg
    ).remaining
