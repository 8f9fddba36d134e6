"""In-memory stand-ins at the project's seams, for logic tests that need no broker.

``FakePublisher`` implements ``edgemed.publish.publisher.Link`` (and so ``Publisher``): it records every message
handed to it and acknowledges only when the test says so, the way a broker's PUBACK would arrive. It also
implements ``Listening``: ``deliver()`` plays a message arriving from the broker (a receipt, a consumer's state)
and ``reconnect()`` tells the listener the link is online again, as ``MqttLink`` does from its network thread.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from edgemed.errors import BrokerRefusedError
from edgemed.publish.publisher import AckCallback, Message, MessageCallback, StateCallback, Subscription
from edgemed.receipts import CONSUMER_SCHEMA, Progress, Receipt, consumer_topic


@dataclass
class Sent:
    """One message handed to the publisher."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    on_ack: AckCallback | None


class FakePublisher:
    """A broker connection in memory: ``ack()`` plays the PUBACKs, ``drop()``/``reconnect()``/``new_client()`` the
    connection's life, ``refusal`` what ``check()`` raises."""

    def __init__(self, *, connected: bool = True) -> None:
        self.connected, self.epoch, self.connections = connected, 0, int(connected)
        self.sent: list[Sent] = []
        self.refusal: str | None = None
        self.stopped: dict[str, Any] | None = None
        self._unacked: list[Sent] = []  # QoS 1 messages held by the "client", oldest first
        self._lock = threading.Lock()
        self.subscriptions: tuple[Subscription, ...] = ()
        self._on_message: MessageCallback | None = None
        self._on_state: StateCallback | None = None

    def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, on_ack: AckCallback | None = None
    ) -> None:
        with self._lock:
            self.sent.append(Sent(topic, payload, qos, retain, on_ack))
            if qos == 1:
                self._unacked.append(self.sent[-1])

    def ack(self, n: int | None = None) -> int:
        """Acknowledge the oldest ``n`` (default all) unacknowledged messages, as PUBACKs would; returns how many."""
        with self._lock:
            count = len(self._unacked) if n is None else min(n, len(self._unacked))
            done, self._unacked = self._unacked[:count], self._unacked[count:]
        for sent in done:
            if sent.on_ack is not None:
                sent.on_ack()
        return len(done)

    def unacked(self) -> int:
        with self._lock:
            return len(self._unacked)

    def drop(self) -> None:
        self.connected = False

    def reconnect(self) -> None:
        self.connected, self.connections = True, self.connections + 1
        if self._on_state is not None:
            self._on_state("online")

    def listen(
        self, subscriptions: Sequence[Subscription], on_message: MessageCallback, on_state: StateCallback
    ) -> None:
        self.subscriptions = tuple(subscriptions)
        self._on_message, self._on_state = on_message, on_state

    def deliver(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """A message from the broker on one of the subscribed topics, handed over as the network thread would."""
        if self._on_message is None:
            raise AssertionError("nothing listens: the device has no consumer of record")
        self._on_message(Message(topic, payload, 1, retain, None))

    def consumer_state(self, consumer: str, state: str, process: str = "edgemed-dashboard") -> None:
        """The retained state of one process of a consumer (``edgemed-consumer/{consumer}/{process}``)."""
        body = f'{{"schema":"{CONSUMER_SCHEMA}","state":"{state}","consumer":"{consumer}","process":"{process}"}}'
        self.deliver(consumer_topic(consumer, process), body.encode(), retain=True)

    def receipt(
        self,
        site: str,
        device_id: str,
        stream: str,
        through_seq: int,
        missing: Sequence[tuple[int, int]] = (),
        max_seq: int | None = None,
        consumer: str = "dashboard",
    ) -> None:
        """A receipt (``edgemed.receipt/1``) of the consumer, built with the contract module."""
        top = max_seq if max_seq is not None else max([through_seq, *(b for _, b in missing)]) + (1 if missing else 0)
        state = Progress(through_seq, tuple(missing), top)
        self.deliver(f"edgemed/{site}/{device_id}/receipts", Receipt(consumer, site, device_id, stream, state).encode())

    def new_client(self) -> None:
        """A protocol fall back: the messages held in memory are gone, and the epoch says so."""
        with self._lock:
            self._unacked.clear()
            self.epoch += 1

    def check(self) -> None:
        if self.refusal is not None:
            raise BrokerRefusedError(self.refusal)

    def start(self) -> None:
        pass

    def wait_connected(self, timeout_s: float) -> bool:
        return self.connected

    def stop(self, timeout_s: float = 5.0, *, abnormal: str | None = None, extra: dict[str, Any] | None = None) -> None:
        self.stopped = {"abnormal": abnormal, **(extra or {})}
