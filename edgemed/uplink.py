"""What the run loop asks of delivery: is it still healthy, is there room for another result, and, at the end,
has the broker taken everything (waiting a bounded time). The heartbeat runs here too.

The link (an ``edgemed.publish.publisher.Link``: ``MqttLink`` on a device) and the delivery thread
(``edgemed.publish.delivery``) are built, started and stopped by the runtime (``Device._start_delivery``); an
``Uplink`` without them is a device working offline: results stay in the outbox until ``edgemed flush``.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgemed.outbox import Outbox
    from edgemed.publish.delivery import Delivery
    from edgemed.publish.publisher import Link

log = logging.getLogger("edgemed.runtime")

_ALERT_EVERY_S = 10.0  # how often a run blocked on a full outbox says so (log and heartbeat)
_FIRST_HEARTBEAT_WAIT_S = 10.0


class Uplink:
    """Back-pressure, the bounded drain and the heartbeat, over one outbox and (when online) one link."""

    def __init__(
        self,
        outbox: Outbox,
        stop: threading.Event,
        *,
        health_topic: str,
        heartbeat: Callable[[], dict[str, Any]],
        interval_s: float,
    ) -> None:
        """Args:
        outbox: the device's outbox.
        stop: set when the run stops; ends the heartbeat and any wait for room.
        health_topic: where heartbeats go.
        heartbeat: builds the current heartbeat payload.
        interval_s: seconds between heartbeats (``health.interval_s``).
        """
        self.outbox = outbox
        self.stop = stop
        self.link: Link | None = None
        self.delivery: Delivery | None = None
        self._health_topic = health_topic
        self._heartbeat = heartbeat
        self._interval_s = interval_s

    @property
    def connected(self) -> bool:
        """True while the link is connected to the broker (never when offline)."""
        return self.link is not None and self.link.connected

    def attach(self, link: Link, delivery: Delivery) -> None:
        """Go online through a started link and delivery thread, and start the heartbeat."""
        self.link, self.delivery = link, delivery
        threading.Thread(target=self._heartbeat_loop, args=(link,), name="edgemed-health", daemon=True).start()

    def check(self) -> None:
        """Raise what stopped delivery, if anything did.

        Raises:
            BrokerRefusedError: the broker refused the device (credentials, certificate): exit 5.
            OutboxError: acknowledged results could not be removed from the outbox: exit 7.
        """
        if self.link is not None and self.delivery is not None:
            self.link.check()
            self.delivery.check()

    def publish_health(self) -> None:
        """Publish one heartbeat now (not retained; QoS 0: a missed heartbeat is replaced by the next)."""
        if self.link is None:
            return
        payload = json.dumps(self._heartbeat(), separators=(",", ":")).encode()
        self.link.publish(self._health_topic, payload, qos=0, retain=False, on_ack=None)

    def wait_for_room(self) -> None:
        """Return once the outbox can take another result (at once, unless it is at its cap with
        ``on_full: block``), or when the run stops."""
        # The cap is a policy, not a loss: the device stops taking frames and says so on the health topic until
        # the broker has acknowledged enough to make room.
        alerted = -math.inf
        while self.outbox.is_full() and not self.stop.is_set():
            if time.monotonic() - alerted > _ALERT_EVERY_S:
                log.error(
                    "outbox full (%d results pending): not accepting frames until the broker catches up",
                    self.outbox.pending_count(),
                )
                self.publish_health()
                alerted = time.monotonic()
            self.stop.wait(0.5)

    def drain(self, timeout_s: float) -> int:
        """Wait up to ``timeout_s`` for every pending result to be delivered (acknowledged by the broker, or with a
        consumer of record receipted by it), then send a last heartbeat.

        Returns:
            How many results are still pending on disk (all of them when offline).

        Raises:
            BrokerRefusedError: the broker refused the device while draining.
            OutboxError: delivery failed while draining.
        """
        if self.link is None or self.delivery is None:
            return self.outbox.pending_count()
        # Drained in short slices so that a broker refusal (wrong password, bad certificate) that arrives after the
        # last frame still ends the run with exit 5 instead of waiting out the whole timeout.
        deadline = time.monotonic() + timeout_s
        pending = self.outbox.pending_count()
        consumer = self.delivery.consumer
        if pending and timeout_s > 0 and not self.link.connected:
            log.warning(
                "%d results pending: waiting up to %g s for the broker (run.drain_timeout_s)", pending, timeout_s
            )
        elif pending and timeout_s > 0 and consumer is not None and not consumer.online:
            log.warning(
                "%d results pending: waiting up to %g s for the consumer %s to come online (run.drain_timeout_s)",
                pending,
                timeout_s,
                consumer.consumer_id,
            )
        while True:
            remaining = self.delivery.drain(min(0.25, max(0.0, deadline - time.monotonic())))
            self.check()
            if remaining == 0 or time.monotonic() >= deadline:
                break
        self.publish_health()
        return remaining

    def _heartbeat_loop(self, link: Link) -> None:
        # A first heartbeat as soon as the link is up, not one interval later: the dashboard then knows the
        # backlog of a run that ends (or is killed) before its first interval.
        if link.wait_connected(min(self._interval_s, _FIRST_HEARTBEAT_WAIT_S)) and not self.stop.is_set():
            self.publish_health()
        while not self.stop.wait(self._interval_s):
            self.publish_health()
