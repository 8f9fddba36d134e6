"""The device's side of its consumer of record: what it hears (presence, receipts) and what a receipt makes it do.

With ``delivery.consumer`` in the profile, the device's link subscribes to its receipts
(``edgemed/{site}/{device_id}/receipts``) and to its consumer's state (``edgemed-consumer/{consumer}/+``), both
QoS 1 (``Consumer.subscriptions``). Messages arrive on the link's network thread: ``on_message`` and
``on_state`` only hand them over. The delivery thread calls ``Consumer.apply`` on every step, which

* releases the rows a receipt of this device's own stream settles (``receipts.stream_id``; receipts of another
  stream, such as the one before a re-flash, and malformed ones are ignored, the latter logged once);
* sends again (makes unsent, for the delivery cursor to come back to) the rows the receipt lists as missing that
  were acknowledged more than a second ago, and every row awaiting longer than ``receipt_timeout_s`` while no
  receipt advanced for as long (and the consumer was online for as long);
* announces lost the missing numbers the outbox no longer holds; evicted rows are announced by the outbox itself
  through ``Consumer.announce``.

While the consumer is offline (unknown counts as offline; the state is forgotten at every new connection, before
the retained states arrive again) the delivery publishes nothing from the outbox.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgemed.identity import load_or_create_secret
from edgemed.outbox import Outbox, OutboxConfig
from edgemed.publish.config import DeliveryConfig
from edgemed.publish.publisher import Message, Subscription
from edgemed.receipts import (
    ConsumerPresence,
    Progress,
    SeqRange,
    consumer_filter,
    device_topic,
    lost_messages,
    merge_ranges,
    parse_receipt,
    stream_id,
)

log = logging.getLogger("edgemed.publish.delivery")

NOT_HELD_REASON = "not in the outbox"
_RESEND_AFTER_S = 1.0  # a missing row acknowledged more recently may simply not have reached the consumer yet
_TIMEOUT_CHECK_S = 1.0  # how often the receipt timeout is checked (it scans the rows awaiting a receipt)
_HELD_RECEIPTS = 64  # receipts handed over and not yet read; they are cumulative, so the latest ones suffice


class Consumer:
    """One device's view of its consumer of record (see the module docstring)."""

    def __init__(self, consumer_id: str, *, site: str, device_id: str, stream: str, receipt_timeout_s: float) -> None:
        """Args:
        consumer_id: the profile's ``delivery.consumer``.
        site: the device's site.
        device_id: the device's id.
        stream: ``receipts.stream_id`` of the data directory's secret.
        receipt_timeout_s: the profile's ``delivery.receipt_timeout_s``.
        """
        self.consumer_id = consumer_id
        self.site, self.device_id, self.stream = site, device_id, stream
        self.receipt_timeout_s = receipt_timeout_s
        self.presence = ConsumerPresence(consumer_id)
        self.receipts_topic = device_topic(site, device_id, "receipts")
        self.lost_topic = device_topic(site, device_id, "lost")
        #: Called (from the network thread) when something arrived that the delivery thread should act on.
        self.wake: Callable[[], None] = lambda: None
        self._lock = threading.Lock()
        self._raw: deque[bytes] = deque(maxlen=_HELD_RECEIPTS)
        self._state: Progress | None = None
        self._progress_at = time.monotonic()
        self._timeout_checked_at = 0.0
        self._announced: list[SeqRange] = []
        self._warned: set[str] = set()
        self.resent_total = 0
        self.lost_announced_total = 0

    @property
    def subscriptions(self) -> tuple[Subscription, ...]:
        """What the device's link subscribes to on every connection."""
        return (Subscription(self.receipts_topic, qos=1), Subscription(consumer_filter(self.consumer_id), qos=1))

    @property
    def online(self) -> bool:
        """True while the consumer says it is online."""
        return self.presence.online

    @property
    def receipted(self) -> Progress | None:
        """The latest receipt of this stream applied, or None before the first."""
        return self._state

    # -- network thread --------------------------------------------------------------------------------------

    def on_message(self, msg: Message) -> None:
        """A message of one of ``subscriptions``: kept for the delivery thread (network thread; never blocks)."""
        if msg.topic == self.receipts_topic:
            with self._lock:
                self._raw.append(msg.payload)
            self.wake()
        elif self.presence.update(msg.topic, msg.payload):
            self.wake()

    def on_state(self, state: str) -> None:
        """The link's state: at each new connection the consumer's state is unknown until its retained states
        arrive again with the subscription."""
        if state == "online":
            self.presence.reset()

    def announce(self, ranges: list[SeqRange], reason: str) -> list[tuple[str, bytes]]:
        """The ``edgemed.lost/1`` messages for ``ranges`` (the outbox's ``LostAnnouncer``)."""
        messages = lost_messages(self.site, self.device_id, self.stream, ranges, reason)
        self.lost_announced_total += len(messages)
        return [(self.lost_topic, m.encode()) for m in messages]

    # -- delivery thread -------------------------------------------------------------------------------------

    def apply(self, outbox: Outbox) -> int | None:
        """Act on what arrived: release, send again, announce lost (see the module docstring).

        Returns:
            The lowest row id made unsent again (the delivery cursor comes back before it), or None.

        Raises:
            OutboxError: the outbox could not be written.
        """
        lowest: list[int] = []
        receipt = self._newest()
        if receipt is not None:
            lowest += self._take(outbox, receipt)
        now = time.monotonic()
        if now - self._timeout_checked_at >= _TIMEOUT_CHECK_S:
            self._timeout_checked_at = now
            lowest += self._timed_out(outbox, now)
        return min(lowest) if lowest else None

    def _newest(self) -> Progress | None:
        with self._lock:
            raws, self._raw = list(self._raw), deque(maxlen=_HELD_RECEIPTS)
        best: Progress | None = None
        for raw in raws:
            try:
                receipt = parse_receipt(raw)
            except ValueError as exc:
                self._warn_once("malformed", "ignoring a malformed receipt on %s: %s", self.receipts_topic, exc)
                continue
            if receipt.stream != self.stream or receipt.consumer != self.consumer_id:
                self._warn_once(
                    f"other:{receipt.consumer}:{receipt.stream}",
                    "ignoring receipts of consumer %s for stream %s (this device is %s's stream %s)",
                    receipt.consumer,
                    receipt.stream or "(none)",
                    self.consumer_id,
                    self.stream,
                )
                continue
            state = receipt.state
            if best is None or (state.through_seq, state.max_seq) >= (best.through_seq, best.max_seq):
                best = state
        old = self._state
        if best is None or (old is not None and (best.through_seq, best.max_seq) < (old.through_seq, old.max_seq)):
            return None  # older than one applied already (several consumer processes publish receipts)
        return best

    def _take(self, outbox: Outbox, state: Progress) -> list[int]:
        old = self._state
        if old is None or state.through_seq > old.through_seq or state.max_seq > old.max_seq:
            self._progress_at = time.monotonic()
        self._state = state
        outbox.release(state)
        if not state.missing:
            return []
        out = []
        rows = outbox.awaiting_rows(sent_before=time.time() - _RESEND_AFTER_S, within=state.missing)
        lowest = outbox.unsend(rows)
        if lowest is not None:
            out.append(lowest)
            self.resent_total += len(rows)
        lost = self._not_yet_announced(outbox.not_held(state.missing))
        if lost:
            written = outbox.announce_lost(lost, NOT_HELD_REASON)
            self._announced = merge_ranges([*self._announced, *lost])
            log.error(
                "the consumer %s misses %d results this device no longer holds (seq %s): announced lost (%d messages)",
                self.consumer_id,
                sum(b - a + 1 for a, b in lost),
                ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in lost[:5]) + (" ..." if len(lost) > 5 else ""),
                written,
            )
        return out

    def _not_yet_announced(self, ranges: list[SeqRange]) -> list[SeqRange]:
        out: list[SeqRange] = []
        for first, last in ranges:
            start = first
            for a, b in self._announced:
                if b < start or a > last:
                    continue
                if a > start:
                    out.append((start, a - 1))
                start = max(start, b + 1)
            if start <= last:
                out.append((start, last))
        return out

    def _timed_out(self, outbox: Outbox, now: float) -> list[int]:
        timeout = self.receipt_timeout_s
        if self.presence.online_for_s() < timeout or now - self._progress_at < timeout:
            return []
        rows = outbox.awaiting_rows(sent_before=time.time() - timeout)
        lowest = outbox.unsend(rows)
        if lowest is None:
            return []
        self._progress_at = now  # the next round of re-sending waits another timeout
        self.resent_total += len(rows)
        log.warning(
            "no receipt from the consumer %s for %.0f s: sending %d results again that it has not receipted",
            self.consumer_id,
            timeout,
            len(rows),
        )
        return [lowest]

    def _warn_once(self, key: str, fmt: str, *args: object) -> None:
        if key in self._warned:
            log.debug(fmt, *args)
            return
        if len(self._warned) < 64:
            self._warned.add(key)
        log.warning(fmt, *args)


@dataclass(frozen=True)
class Backlog:
    """What a device still holds on disk, by state.

    Attributes:
        unsent: results not yet acknowledged by the broker.
        awaiting: results the broker acknowledged that wait for the consumer's receipt.
        consumer: the consumer of record, or None without one.
        consumer_online: whether it is online (None without one).
    """

    unsent: int = 0
    awaiting: int = 0
    consumer: str | None = None
    consumer_online: bool | None = None

    @property
    def total(self) -> int:
        """Every result still on disk."""
        return self.unsent + self.awaiting

    def describe(self) -> str:
        """One line for the end of a run or a flush, e.g. "12 results sent, awaiting the dashboard's receipt"."""
        parts = []
        if self.awaiting:
            parts.append(f"{self.awaiting} results sent, awaiting the {self.consumer}'s receipt")
        if self.unsent:
            held = " (held while the consumer is offline)" if self.consumer and not self.consumer_online else ""
            parts.append(f"{self.unsent} results not yet acknowledged by the broker{held}")
        if self.consumer is not None and not self.consumer_online:
            parts.append(f"consumer {self.consumer} offline")
        return "; ".join(parts) if self.total else "nothing on disk"


@dataclass(frozen=True)
class ConsumerRoute:
    """Who the device is to its consumer of record, for ``edgemed flush`` (the run builds its own).

    Attributes:
        delivery: the profile's ``delivery`` section (``consumer`` set).
        site: the device's site.
        device_id: the device's id.
    """

    delivery: DeliveryConfig
    site: str
    device_id: str

    def consumer(self, data_dir: Path) -> Consumer | None:
        """The consumer of record for the device whose data directory is ``data_dir`` (None when none is named).

        Raises:
            OutboxError: the data directory's device secret cannot be read or created.
        """
        if self.delivery.consumer is None:
            return None
        return Consumer(
            self.delivery.consumer,
            site=self.site,
            device_id=self.device_id,
            stream=stream_id(load_or_create_secret(data_dir)),
            receipt_timeout_s=self.delivery.receipt_timeout_s,
        )


def effective_outbox_config(cfg: OutboxConfig | None, consumer: Consumer | None) -> OutboxConfig:
    """The outbox settings a device runs with: with a consumer of record the replay window is off (receipts
    replace it), said once in the log.

    Args:
        cfg: the profile's ``outbox`` section (None: the defaults).
        consumer: the consumer of record, or None.
    """
    cfg = cfg or OutboxConfig()
    if consumer is None or cfg.replay_window_s <= 0:
        return cfg
    log.warning(
        "outbox.replay_window_s (%g s) is ignored: the consumer of record %s receipts every result, and a result "
        "stays on the device until it does (remove replay_window_s, or delivery.consumer)",
        cfg.replay_window_s,
        consumer.consumer_id,
    )
    return cfg.model_copy(update={"replay_window_s": 0.0})
