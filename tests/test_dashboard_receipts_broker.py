"""Receipts and consumer state on a real mosquitto: what a device (or any subscriber) sees of the dashboard.

The dashboard runs as its own process (``python -m edgemed dashboard``), so that its last will is tested the way
it fires in the field: the process is SIGKILLed and the broker publishes ``offline`` for it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from broker_fixtures import Device, Mosquitto
from dashboard_helpers import make_result, wait_until
from paho.mqtt.enums import CallbackAPIVersion

from edgemed.dashboard.ingest import Ingest
from edgemed.dashboard.store import DashboardStore
from edgemed.envelope import encode
from edgemed.publish.config import MqttConfig
from edgemed.receipts import Lost, Progress, batch_payload, parse_receipt

STREAM = "0123456789abcdef"
STATE_TOPIC = "edgemed-consumer/dashboard/dash-1"
RECEIPTS = "edgemed/clinic-a/us-01/receipts"


class Watcher:
    """A test subscriber: every message on the filters, in order, with its retain flag."""

    def __init__(self, port: int, *filters: str) -> None:
        self.messages: list[tuple[str, dict[str, Any], bool]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.on_message: Any = None
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"watch-{uuid.uuid4().hex[:8]}")
        self.client.on_connect = lambda c, *a: c.subscribe([(f, 1) for f in filters])
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            self.close()
            raise RuntimeError("the watcher could not subscribe")

    def _on_message(self, client: object, userdata: object, msg: paho.MQTTMessage) -> None:
        body = json.loads(msg.payload) if msg.payload else {}
        with self._lock:
            self.messages.append((msg.topic, body, bool(msg.retain)))
        if self.on_message is not None:
            self.on_message(msg.topic, body)

    def last(self, topic: str) -> dict[str, Any] | None:
        with self._lock:
            bodies = [b for t, b, _ in self.messages if t == topic]
        return bodies[-1] if bodies else None

    def state(self) -> str | None:
        body = self.last(STATE_TOPIC)
        return None if body is None else body.get("state")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def start_dashboard(broker: Mosquitto, db: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    args = ["--broker", broker.url, "--db", str(db), "--port", "0", "--client-id", "dash-1"]
    return subprocess.Popen(
        [sys.executable, "-m", "edgemed", "dashboard", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log.open("ab"),
    )


@pytest.fixture
def dashboards() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def result(seq: int) -> bytes:
    return encode({**make_result(seq=seq), "stream": STREAM})


def test_a_device_sees_the_retained_receipt_and_the_consumer_state(
    broker: Mosquitto, tmp_path: Path, dashboards: list[subprocess.Popen[bytes]]
) -> None:
    db, log = tmp_path / "fleet.sqlite3", tmp_path / "dashboard.log"
    watcher = Watcher(broker.port, "edgemed-consumer/#", RECEIPTS)
    device = Device(broker.port)
    try:
        dashboards.append(start_dashboard(broker, db, log))
        assert wait_until(lambda: watcher.state() == "online", 30), log.read_text()
        online = watcher.last(STATE_TOPIC)
        assert online is not None and (online["schema"], online["consumer"], online["process"]) == (
            "edgemed.consumer/1",
            "dashboard",
            "dash-1",
        )
        for seq in range(5):
            device.send("results", result(seq))
        device.send("batches", batch_payload("clinic-a", "us-01", [result(5), result(6)]))
        device.send("lost", Lost("clinic-a", "us-01", STREAM, ((7, 8),), "not in the outbox").encode())
        device.send("results", result(10))

        def receipt() -> Progress | None:
            body = watcher.last(RECEIPTS)
            return None if body is None else parse_receipt(json.dumps(body).encode()).state

        assert wait_until(lambda: receipt() == Progress(8, ((9, 9),), 10), 15), (receipt(), log.read_text())
        # A device that connects later gets the latest receipt at once: it is retained.
        late = Watcher(broker.port, RECEIPTS)
        try:
            assert wait_until(lambda: late.messages != [], 10)
            _topic, body, retained = late.messages[0]
            assert retained and parse_receipt(json.dumps(body).encode()).state == Progress(8, ((9, 9),), 10)
            assert body["consumer"] == "dashboard" and body["stream"] == STREAM
        finally:
            late.close()

        dashboards[0].send_signal(signal.SIGKILL)
        dashboards[0].wait(10)
        assert wait_until(lambda: watcher.state() == "offline", 15)  # the last will
        will = watcher.last(STATE_TOPIC)
        assert will is not None and will["clean"] is False and will["reason"] == "connection lost"

        dashboards.append(start_dashboard(broker, db, log))
        assert wait_until(lambda: watcher.state() == "online", 30), log.read_text()
        dashboards[1].send_signal(signal.SIGTERM)
        assert dashboards[1].wait(20) == 0, log.read_text()
        stopped = watcher.last(STATE_TOPIC)
        assert stopped is not None and stopped["state"] == "offline" and stopped["clean"] is True
        assert stopped["reason"] == "stopped"
    finally:
        device.close()
        watcher.close()
    # Receipts are not stored as anything: the dashboard's own came back to it (3.1.1 fall back aside) or not.
    store = DashboardStore(db)
    try:
        assert store.dead_letter_counts() == {} and store.result_count() == 8
    finally:
        store.close()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_online_is_said_only_once_the_subscription_is_granted(broker: Mosquitto, tmp_path: Path, protocol: str) -> None:
    # A brand-new session (new database, new client id): what a device publishes as soon as it sees "online"
    # must reach the dashboard, so "online" must come after the broker granted the subscription.
    store = DashboardStore(tmp_path / "d.sqlite3")
    ingest = Ingest(MqttConfig(url=broker.url, protocol=protocol), store, client_id="dash-1")
    seen_subscribed: list[bool] = []
    device = Device(broker.port)
    watcher = Watcher(broker.port, STATE_TOPIC)

    def on_state(topic: str, body: dict[str, Any]) -> None:
        if body.get("state") == "online" and not seen_subscribed:
            seen_subscribed.append(ingest.link.subscribed)
            device.client.publish("edgemed/clinic-a/us-01/results", result(0), qos=1)

    watcher.on_message = on_state
    try:
        ingest.start()
        assert wait_until(lambda: seen_subscribed != [], 15)
        assert seen_subscribed == [True]
        assert wait_until(lambda: store.result_count() == 1, 10), ingest.snapshot()
    finally:
        watcher.close()
        device.close()
        ingest.stop()
        store.close()
    # The broker's own account: it granted the subscription before it received the first "online".
    lines = broker.log_path.read_text().splitlines()
    suback = next(i for i, line in enumerate(lines) if "Sending SUBACK to dash-1" in line)
    online = next(i for i, line in enumerate(lines) if "Received PUBLISH from dash-1" in line and STATE_TOPIC in line)
    assert suback < online, "\n".join(lines)
