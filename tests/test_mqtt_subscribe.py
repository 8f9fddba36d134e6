"""The MQTT core's receiving side against a real mosquitto on a loopback port: subscriptions restored on every
connection, manual acknowledgement only on the connection a message came on, MQTT 5 ``no_local``, shared
subscriptions passed through, a refused subscription surfaced, retained messages with automatic acknowledgement.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from broker_fixtures import Device, Mosquitto

from edgemed.errors import BrokerRefusedError
from edgemed.publish.config import MqttConfig
from edgemed.publish.mqtt import MqttLink
from edgemed.publish.publisher import Message, Subscription

TOPIC = "edgemed/clinic-a/us-01/results"


@dataclass
class Inbox:
    """Collects what a link receives (on its network thread)."""

    messages: list[Message] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, msg: Message) -> None:
        with self.lock:
            self.messages.append(msg)

    def payloads(self) -> list[bytes]:
        with self.lock:
            return [m.payload for m in self.messages]


def _wait(predicate: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _link(
    broker: Mosquitto, inbox: Inbox, *subs: Subscription, client_id: str = "edgemed-sub", **kw: object
) -> MqttLink:
    cfg = MqttConfig(url=broker.url, reconnect_min_s=0.1, reconnect_max_s=0.5)
    return MqttLink(
        cfg,
        status_topic=None,
        client_id=client_id,
        subscriptions=subs or [Subscription(TOPIC)],
        on_message=inbox,
        **kw,  # type: ignore[arg-type]
    )


def test_subscriptions_are_restored_when_the_broker_lost_the_session(mosquitto_factory: type[Mosquitto]) -> None:
    broker = mosquitto_factory(persistence=False).start()
    inbox = Inbox()
    link = _link(broker, inbox)
    link.start()
    try:
        assert link.wait_subscribed(10)
        broker.stop()  # no persistence: the restarted broker knows nothing of our subscription
        assert _wait(lambda: not link.connected)
        broker.start()
        assert link.wait_subscribed(15), broker.log_tail()
        device = Device(broker.port)
        try:
            device.send("results", b'{"n": 1}')
        finally:
            device.close()
        assert _wait(lambda: inbox.payloads() == [b'{"n": 1}'])
        assert link.connections == 2
    finally:
        link.stop(2)


def test_a_manual_ack_is_sent_only_on_the_connection_the_message_came_on(broker: Mosquitto) -> None:
    inbox = Inbox()
    link = _link(broker, inbox, manual_ack=True)
    link.start()
    device = Device(broker.port)
    try:
        assert link.wait_subscribed(10)
        device.send("results", b'{"n": 1}')
        assert _wait(lambda: len(inbox.messages) == 1)
        first = inbox.messages[0]
        assert first.qos == 1 and first.ack is not None
        broker.stop()  # SIGTERM: the session, with the unacknowledged message, is saved
        broker.start()
        assert _wait(lambda: len(inbox.messages) == 2, 15), broker.log_tail()  # redelivered: never acknowledged
        first.ack()  # stale: its connection is gone, so no PUBACK goes out with its old packet id
        link.stop(2)
        link.start()
        assert _wait(lambda: len(inbox.messages) == 3, 15), "the stale acknowledgement reached the broker"
        copy = inbox.messages[2]
        assert copy.payload == b'{"n": 1}' and copy.ack is not None
        copy.ack()  # on its own connection: the broker forgets the message
        time.sleep(0.3)
        link.stop(2)
        link.start()
        assert link.wait_subscribed(10)
        time.sleep(0.5)
        assert len(inbox.messages) == 3
    finally:
        device.close()
        link.stop(2)


def test_no_local_keeps_a_clients_own_messages_from_it_on_mqtt5(broker: Mosquitto) -> None:
    own, plain = Inbox(), Inbox()
    quiet = _link(broker, own, Subscription(TOPIC, no_local=True), client_id="edgemed-quiet")
    echo = _link(broker, plain, Subscription(TOPIC), client_id="edgemed-echo")
    for link in (quiet, echo):
        link.start()
    device = Device(broker.port)
    try:
        assert quiet.wait_subscribed(10) and echo.wait_subscribed(10)
        for link, body in ((quiet, b"from quiet"), (echo, b"from echo")):
            acked = threading.Event()
            link.publish(TOPIC, body, qos=1, on_ack=acked.set)
            assert acked.wait(5)
        device.send("results", b"from the device")
        assert _wait(lambda: len(plain.messages) == 3 and len(own.messages) == 2)
        assert sorted(own.payloads()) == [b"from echo", b"from the device"]  # not its own
        assert sorted(plain.payloads()) == [b"from echo", b"from quiet", b"from the device"]
    finally:
        device.close()
        for link in (quiet, echo):
            link.stop(2)


def test_a_shared_subscription_passes_through_and_splits_the_messages(broker: Mosquitto) -> None:
    inboxes = [Inbox(), Inbox()]
    shared = Subscription("$share/ingest/edgemed/+/+/results")
    links = [_link(broker, box, shared, client_id=f"edgemed-worker-{i}") for i, box in enumerate(inboxes)]
    for link in links:
        link.start()
    device = Device(broker.port)
    try:
        assert all(link.wait_subscribed(10) for link in links)
        for n in range(20):
            device.send("results", str(n).encode())
        assert _wait(lambda: sum(len(b.messages) for b in inboxes) == 20)
        time.sleep(0.2)
        got = [p for box in inboxes for p in box.payloads()]
        assert sorted(got) == sorted(str(n).encode() for n in range(20))  # each once, across the group
        assert all(box.messages for box in inboxes)  # and shared between both workers
        assert all(m.topic == TOPIC for box in inboxes for m in box.messages)  # the real topic, not the filter
    finally:
        device.close()
        for link in links:
            link.stop(2)


class RefusingBroker:
    """A one-purpose MQTT 3.1.1 peer on a free loopback port: accepts every CONNECT and refuses every SUBSCRIBE
    (SUBACK 0x80). mosquitto 2.0 grants any subscription and applies its ACL only when delivering, so a refused
    SUBACK has to come from here."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.2)
        self.port = self.server.getsockname()[1]
        self.subscribes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(0.2)
                self._session(conn)

    def _session(self, conn: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                header = conn.recv(1)
                if not header:
                    return
                length, shift = 0, 0
                while True:  # the remaining length: 7 bits per byte, high bit = more
                    byte = conn.recv(1)[0]
                    length |= (byte & 0x7F) << shift
                    shift += 7
                    if not byte & 0x80:
                        break
                body = b""
                while len(body) < length:
                    body += conn.recv(length - len(body))
            except TimeoutError:
                continue
            except (IndexError, OSError):  # the client went away mid-packet
                return
            kind = header[0] & 0xF0
            if kind == 0x10:  # CONNECT -> CONNACK accepted
                conn.sendall(b"\x20\x02\x00\x00")
            elif kind == 0x80:  # SUBSCRIBE -> SUBACK failure, same packet id
                self.subscribes += 1
                conn.sendall(b"\x90\x03" + body[:2] + b"\x80")
            elif kind == 0xC0:  # PINGREQ
                conn.sendall(b"\xd0\x00")
            elif kind == 0xE0:  # DISCONNECT
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.server.close()


def test_a_refused_subscription_is_surfaced_as_a_refusal() -> None:
    broker = RefusingBroker()
    cfg = MqttConfig(url=f"mqtt://127.0.0.1:{broker.port}", protocol="3.1.1", reconnect_min_s=0.1)
    link = MqttLink(
        cfg, status_topic=None, client_id="edgemed-sub", subscriptions=[Subscription(TOPIC)], on_message=Inbox()
    )
    link.start()
    try:
        assert link.wait_connected(10)
        assert not link.wait_subscribed(10) and broker.subscribes == 1
        with pytest.raises(BrokerRefusedError, match=rf"refused the subscription of client 'edgemed-sub' to {TOPIC} "):
            link.check()
        assert link.connected and TOPIC in (link.problem or "")
    finally:
        link.stop(2)
        broker.stop()


def test_a_retained_message_arrives_with_automatic_acknowledgement(broker: Mosquitto) -> None:
    device = Device(broker.port)
    try:
        device.send("receipts", b'{"through_seq": 41}', retain=True)
    finally:
        device.close()
    inbox = Inbox()
    link = _link(broker, inbox, Subscription("edgemed/clinic-a/us-01/receipts"))
    link.start()
    try:
        assert _wait(lambda: len(inbox.messages) == 1)
        msg = inbox.messages[0]
        assert (msg.payload, msg.retain, msg.ack) == (b'{"through_seq": 41}', True, None)
    finally:
        link.stop(2)
