"""In-memory stand-ins at the project's seams, for logic tests that need no broker.

``FakePublisher`` implements ``edgemed.publish.publisher.Link`` (and so ``Publisher``): it records every message
handed to it and acknowledges only when the test says so, the way a broker's PUBACK would arrive.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from edgemed.errors import BrokerRefusedError
from edgemed.publish.publisher import AckCallback


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
