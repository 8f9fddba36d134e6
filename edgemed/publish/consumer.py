"""The device's side of its consumer of record: what it hears (presence, receipts) and what a receipt makes it do.

With ``delivery.consumer`` in the profile, the device's link subscribes to its receipts
(``edgemed/{site}/{device_id}/receipts``) and to its consumer's state (``edgemed-consumer/{consumer}/+``), both
QoS 1 (``Consumer.subscriptions``). Messages arrive on the link's network thread: ``on_message`` and
``on_state`` only hand them over. The delivery thread calls ``Consumer.apply`` on every step, which

* releases the rows the receipts of this device's own stream settle (``edgemed.outbox.stream``; receipts of another
  stream, such as the one before a re-flash, and malformed ones are ignored, the latter logged once). Receipts
  are merged (a ``seq`` any of them settles is settled), so a late one from a lagging consumer process undoes
  nothing;
* sends again (makes unsent, for the delivery cursor to come back to) the rows the receipt lists as missing that
  were acknowledged more than a second ago (a row already sent again for that waits ``receipt_timeout_s`` before
  the next time), and the rows awaiting while receipts settle nothing new (after 2 s, then 4, 8, ... s up to
  ``receipt_timeout_s``; the consumer online for as long), in bounded rounds: the next once the last is receipted;
* announces lost the missing numbers the outbox no longer holds; evicted rows are announced by the outbox itself
  through ``Consumer.announce``.

While the consumer is offline (unknown counts as offline; the state is forgotten at every new connection, before
the retained states arrive again) the delivery publishes nothing from the outbox.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgemed.outbox import Outbox, OutboxConfig
from edgemed.outbox.stream import sequence_stream
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
    progress,
)

log = logging.getLogger("edgemed.publish.delivery")

NOT_HELD_REASON = "not in the outbox"
_RESEND_AFTER_S = 1.0  # a missing row acknowledged more recently may simply not have reached the consumer yet
_TIMEOUT_CHECK_S = 1.0  # how often the receipt timeout is checked (it scans the rows awaiting a receipt)
#: Most rows sent again at once when receipts stop coming (a round; see Consumer._timed_out).
_TIMEOUT_ROUND = 500
#: The first wait, without receipt progress, before a round is sent again; it doubles with each round that brings
#: none, up to ``receipt_timeout_s``, and starts again at this when a receipt settles more (see _timed_out).
_FIRST_WAIT_S = 2.0
_RESENT_PRUNE_AT = 4096  # rows remembered as sent again before the map is pruned of those past their hold
_EARLIER_WAIT_S = 2.0  # online this long without a receipt: the consumer has none to give (see _earlier_rows)
_HELD_RECEIPTS = 64  # receipts handed over and not yet read; they are cumulative, so the latest ones suffice


class Consumer:
    """One device's view of its consumer of record (see the module docstring)."""

    def __init__(self, consumer_id: str, *, site: str, device_id: str, stream: str, receipt_timeout_s: float) -> None:
        """Args:
        consumer_id: the profile's ``delivery.consumer``.
        site: the device's site.
        device_id: the device's id.
        stream: the data directory's ``seq`` stream (``edgemed.outbox.stream``).
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
        self._wait_s = min(_FIRST_WAIT_S, receipt_timeout_s)
        self._timeout_checked_at = 0.0
        self._announced: list[SeqRange] = []
        self._resent: dict[int, float] = {}  # row id -> when it was last sent again for being missing (monotonic)
        self._resent_prune_at = _RESENT_PRUNE_AT
        self._round: tuple[float, int] | None = None  # the timeout round under way: (sent before, its top seq)
        self._warned: set[str] = set()
        self.resent_total = 0
        self.lost_announced_total = 0
        # Rows an earlier process sent: their PUBACK may predate a broker crash that lost them, and this process
        # has no receipt timeout running for them yet (edgemed flush would wait out a whole timeout for nothing).
        self._started_wall = time.time()
        self._earlier_checked = False

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
        receipt = self._newest(outbox.committed_seq)
        if receipt is not None:
            lowest += self._take(outbox, receipt)
        if not self._earlier_checked:
            lowest += self._earlier_rows(outbox)
        now = time.monotonic()
        round_done = receipt is not None and self._round_settled()
        if round_done or now - self._timeout_checked_at >= _TIMEOUT_CHECK_S:
            self._timeout_checked_at = now
            lowest += self._timed_out(outbox, now)
        return min(lowest) if lowest else None

    def _newest(self, committed: int) -> Progress | None:
        """What every receipt of this stream handed over so far says, together: a newer state, or None when the
        receipts taken now add nothing to the one applied already.

        A receipt that speaks of a ``seq`` this outbox has not committed yet (``max_seq >= committed``) is not about
        this numbering: a data directory restored from a backup counts again from where the backup stopped, under
        the same stream. It is ignored (logged once); it would release results the consumer never stored.
        """
        with self._lock:
            raws, self._raw = list(self._raw), deque(maxlen=_HELD_RECEIPTS)
        merged = self._state
        seen = False
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
            if receipt.state.max_seq >= committed:
                self._warn_once(
                    "ahead",
                    "ignoring a receipt of the consumer %s that settles seq up to %d: this device has committed only "
                    "up to %d (its data directory restored from a backup?)",
                    receipt.consumer,
                    receipt.state.max_seq,
                    committed - 1,
                )
                continue
            seen = True
            # Merged, not compared: what is settled at the consumer stays settled, so a receipt computed earlier
            # (a lagging consumer process, a retained copy) can only add what it knows. Taken on its own, one
            # with the same through_seq and max_seq as a newer one but more holes listed rows as missing that the
            # newer one had released: they were sent again, or announced lost although they were stored.
            merged = receipt.state if merged is None else union(merged, receipt.state)
        return merged if seen else None

    def _take(self, outbox: Outbox, state: Progress) -> list[int]:
        if state != self._state:  # the consumer settled more (merged receipts only grow)
            self._progress_at = time.monotonic()
            self._wait_s = min(_FIRST_WAIT_S, self.receipt_timeout_s)
        self._state = state
        outbox.release(state)
        if not state.missing:
            return []
        out = []
        rows = self._not_just_resent(
            outbox.awaiting_rows(sent_before=time.time() - _RESEND_AFTER_S, within=state.missing)
        )
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

    def _earlier_rows(self, outbox: Outbox) -> list[int]:
        """Once per process: send again what an earlier process sent and the consumer has not receipted.

        Checked after the first receipt of this stream was applied (it released what the consumer holds), or once
        the consumer has been online for ``_EARLIER_WAIT_S`` without a retained receipt (a new database, or a
        broker restarted without persistence). A copy the consumer already has is dropped there by ``result_id``.
        """
        if self._state is None and self.presence.online_for_s() < _EARLIER_WAIT_S:
            return []
        self._earlier_checked = True
        rows = outbox.awaiting_rows(sent_before=self._started_wall)
        lowest = outbox.unsend(rows)
        if lowest is None:
            return []
        self.resent_total += len(rows)
        log.warning(
            "sending %d results again that an earlier run sent and the consumer %s has not receipted",
            len(rows),
            self.consumer_id,
        )
        return [lowest]

    def _not_just_resent(self, rows: list[int]) -> list[int]:
        """The rows of ``rows`` not sent again for being missing within the last ``receipt_timeout_s``.

        A copy sent again a second ago may sit behind thousands of messages at the broker while the consumer
        works through them; sending it again on every receipt (up to 4 a second) until it arrives multiplied the
        load on a consumer that was already behind, and with the broker's queue limit (``max_queued_messages``)
        made it drop more. A copy sent again gets the receipt timeout to arrive, as a first copy does.
        """
        if not rows:
            return rows
        now = time.monotonic()
        hold = self.receipt_timeout_s
        resent = self._resent
        due = [r for r in rows if now - resent.get(r, -math.inf) >= hold]
        resent.update(dict.fromkeys(due, now))
        if len(resent) > self._resent_prune_at:  # forget what is past its hold: a bounded map
            self._resent = {r: t for r, t in resent.items() if now - t < hold}
            self._resent_prune_at = max(_RESENT_PRUNE_AT, 2 * len(self._resent))
        return due

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

    def _round_settled(self) -> bool:
        """True when the consumer stored the last round of results sent again for want of a receipt."""
        return self._round is not None and self._state is not None and self._state.settles(self._round[1])

    def _timed_out(self, outbox: Outbox, now: float) -> list[int]:
        """Send again, a bounded round at a time, what waits for its receipt while receipts settle nothing new.

        The wait starts at ``_FIRST_WAIT_S`` and doubles with every round that brings no progress, up to
        ``receipt_timeout_s``: a tail the broker dropped (nothing above it stored, so no receipt lists it as
        missing) goes again after seconds, not after a whole timeout, while a consumer that is down or stuck
        gets a round at 2, 4, 8, ... s, at most one per ``receipt_timeout_s`` after that. All of it at once (a
        backlog of thousands) would double the load on a consumer that is merely slow and, with the broker's
        queue limit, make the broker drop more. A round is the oldest ``_TIMEOUT_ROUND`` rows; the next follows
        as soon as a receipt settles the last one (the consumer is keeping up), or after the next wait.
        """
        timeout = self._wait_s
        previous = self._round
        going_on = self._round_settled()
        if previous is not None and going_on:
            sent_before = previous[0]  # the rows that were stuck when the first round began
        elif self.presence.online_for_s() < timeout or now - self._progress_at < timeout:
            return []
        else:
            sent_before = time.time() - timeout
        rows = outbox.awaiting_oldest(sent_before=sent_before, limit=_TIMEOUT_ROUND)
        lowest = outbox.unsend(r for r, _ in rows)
        if lowest is None:
            self._round = None
            return []
        self._round = (sent_before, max(seq for _, seq in rows))
        self._progress_at = now  # without progress, the next round waits longer
        if not going_on:
            self._wait_s = min(self._wait_s * 2, self.receipt_timeout_s)
        self.resent_total += len(rows)
        if going_on:
            log.info("the consumer %s stored the last round: sending the next %d again", self.consumer_id, len(rows))
        else:
            log.warning(
                "the receipts of the consumer %s settled nothing new for %.0f s: sending %d results again that it "
                "has not receipted (at most %d at a time, the next round once these are receipted)",
                self.consumer_id,
                timeout,
                len(rows),
                _TIMEOUT_ROUND,
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
            stream=sequence_stream(data_dir),
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


def _settled_ranges(state: Progress) -> list[SeqRange]:
    out: list[SeqRange] = [(0, state.through_seq)] if state.through_seq >= 0 else []
    start = state.through_seq + 1
    for first, last in state.missing:
        if first > start:
            out.append((start, first - 1))
        start = last + 1
    if start <= state.max_seq:
        out.append((start, state.max_seq))
    return out


def union(a: Progress, b: Progress) -> Progress:
    """What two receipts of one stream say together: a ``seq`` either settles is settled."""
    ranges = [*_settled_ranges(a), *_settled_ranges(b)]
    return progress(-1, ranges, max_ranges=len(a.missing) + len(b.missing) + 1)
