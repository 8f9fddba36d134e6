"""The seam between delivery and MQTT: what a publisher must do, what a received message is, the callback types.

The ``Delivery`` class depends on ``Publisher`` only, never on paho or ``MqttLink``: the way httpx's transport seam
(``handle_request``) makes a 40-line in-memory mock possible, an in-memory publisher (``tests/fakes.py``) tests the
delivery logic without a broker. ``Link`` adds what the runtime needs around it (start, wait, stop with a reason).
``MqttLink`` (``publish.mqtt``) is the one real implementation of both; it also subscribes and receives, for the
dashboard's ingest. Nothing here imports paho.

Delivery contract of ``publish(..., on_ack=f)``: ``f`` is called once, from the publisher's network thread, when
the broker acknowledged the QoS 1 message successfully (PUBACK, and on MQTT 5 a reason code below 0x80); never
otherwise: not for QoS 0, not for a refused message, not for one lost with its connection or client.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

#: Called once when the broker acknowledged a message (from the network thread; must not block).
AckCallback = Callable[[], None]
#: Called with ``"online"``, ``"offline"`` or ``"refused"`` when the link's state changes (network thread).
StateCallback = Callable[[str], None]


class Message(NamedTuple):
    """One message the broker delivered (a tuple: made for every message on the network thread, it must be cheap).

    Attributes:
        topic: the topic it was published on.
        payload: its bytes, as sent.
        qos: the QoS it was delivered with (0 or 1).
        retain: True when the broker sent it as the topic's retained message.
        ack: with manual acknowledgement, sends its PUBACK on the connection it came on, and does nothing once
            that connection is gone (the broker then sends the message again on the next one). None when there
            is nothing to acknowledge: QoS 0, or a link that acknowledges by itself.
    """

    topic: str
    payload: bytes
    qos: int
    retain: bool
    ack: AckCallback | None


#: Called with every received message, from the network thread: hand it on, never block or do I/O there.
MessageCallback = Callable[[Message], None]


@dataclass(frozen=True)
class Subscription:
    """One topic filter the link subscribes to on every connection, the first and every reconnection.

    Attributes:
        topic_filter: an MQTT filter (``+`` and ``#`` wildcards); a shared subscription ``$share/GROUP/filter``
            is passed to the broker unchanged.
        qos: the most QoS the broker should deliver with (0 or 1).
        no_local: MQTT 5: the broker does not send this client the messages it publishes itself (for a consumer
            that publishes under the filter it reads). MQTT 3.1.1 has no such option: the handler then sees its
            own messages and must skip them.
        retained_if_new: MQTT 5 retain handling 1: the broker sends the topics' retained messages only when the
            subscription is new, not again when a resumed session subscribes once more. Otherwise (and always on
            MQTT 3.1.1) every SUBSCRIBE brings every retained message again, flagged ``Message.retain``.
    """

    topic_filter: str
    qos: int = 1
    no_local: bool = False
    retained_if_new: bool = False

    def __post_init__(self) -> None:
        if not self.topic_filter:
            raise ValueError("a subscription needs a topic filter, for example edgemed/+/+/results")
        if self.qos not in (0, 1):
            raise ValueError(f"subscription QoS must be 0 or 1, not {self.qos} (edgemed does not use QoS 2)")


class Publisher(Protocol):
    """What the delivery needs from a connection to the broker."""

    @property
    def connected(self) -> bool:
        """True between an accepted connection and its loss."""
        ...

    @property
    def epoch(self) -> int:
        """Bumped when messages handed over but not acknowledged were dropped from memory (a new client after a
        protocol fall back): the delivery must publish them again from the outbox."""
        ...

    @property
    def connections(self) -> int:
        """Bumped at every accepted connection, the first included (the delivery then re-sends its replay window;
        unacknowledged messages are re-sent by the publisher itself within one epoch)."""
        ...

    def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, on_ack: AckCallback | None = None
    ) -> None:
        """Hand one message over; while disconnected it is held (QoS 1) and sent after the reconnection.

        Raises:
            ConfigError: the topic or QoS is invalid.
        """
        ...

    def check(self) -> None:
        """Raise the broker's refusal, if it refused us.

        Raises:
            BrokerRefusedError: wrong credentials or certificate, or a message or subscription refused.
        """
        ...


class Link(Publisher, Protocol):
    """A ``Publisher`` with the lifecycle the runtime drives: start, wait for the broker, stop with a reason."""

    def start(self) -> None:
        """Start connecting in the background (an unreachable broker is retried, never an error)."""
        ...

    def wait_connected(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for a connection; True when connected."""
        ...

    def stop(self, timeout_s: float = 5.0, *, abnormal: str | None = None, extra: dict[str, Any] | None = None) -> None:
        """Say ``offline`` (why: ``abnormal``; ``extra`` fields) and disconnect cleanly within ``timeout_s``."""
        ...


@runtime_checkable
class Listening(Protocol):
    """A ``Link`` handed to the runtime that can also receive (a device with a consumer of record hears its
    receipts and its consumer's state this way). ``MqttLink`` takes the same three things as constructor
    arguments instead; the in-memory publisher of the tests (``tests/fakes.py``) implements this."""

    def listen(
        self, subscriptions: Sequence[Subscription], on_message: MessageCallback, on_state: StateCallback
    ) -> None:
        """Subscribe to ``subscriptions`` on every connection from now on; hand every message to ``on_message``
        and every change of the link's state to ``on_state`` (both from the network thread)."""
        ...
