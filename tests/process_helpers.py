"""Helpers for the tests of the dashboard's separate processes, ACL and metrics: start ``edgemed dashboard ...``
as a subprocess, watch topics, publish as a device, read the page's API.

Every wait is bounded; every process a test starts is stopped by the ``procs`` fixture.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from dashboard_helpers import make_result, wait_until
from paho.mqtt.enums import CallbackAPIVersion

from edgemed.envelope import encode
from edgemed.receipts import Progress, parse_receipt

ROOT = Path(__file__).parents[1]


def stream_of(device_id: str) -> str:
    """A 16-hex-digit stream id per device."""
    return uuid.uuid5(uuid.NAMESPACE_DNS, device_id).hex[:16]


def result(device_id: str, seq: int, *, site: str = "clinic-a", level: str = "routine") -> bytes:
    return encode({**make_result(device_id=device_id, site=site, seq=seq, level=level), "stream": stream_of(device_id)})


def edgemed(*args: str, log: Path) -> subprocess.Popen[bytes]:
    """``python -m edgemed ARGS`` from this worktree, stderr appended to ``log``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "edgemed", *args], env=env, stdout=subprocess.DEVNULL, stderr=log.open("ab")
    )


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


class Client:
    """A paho client (MQTT 5) that records every message on its filters; ``publish`` waits for the PUBACK."""

    def __init__(
        self,
        port: int,
        *filters: str,
        username: str | None = None,
        password: str | None = None,
        client_id: str | None = None,
    ) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id or f"c-{uuid.uuid4().hex[:8]}", protocol=paho.MQTTv5
        )
        if username:
            self.client.username_pw_set(username, password)
        self.client.on_message = self._on_message
        if filters:
            self.client.on_connect = lambda c, *a: c.subscribe([(f, 1) for f in filters])
            self.client.on_subscribe = lambda *a: self._ready.set()
        else:
            self.client.on_connect = lambda *a: self._ready.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not self._ready.wait(10):
            self.close()
            raise RuntimeError(f"the test client could not connect or subscribe on port {port}")

    def _on_message(self, client: object, userdata: object, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(5)

    def topics(self) -> list[str]:
        with self._lock:
            return [t for t, _, _ in self.messages]

    def last(self, topic: str) -> dict[str, Any] | None:
        with self._lock:
            bodies = [p for t, p, _ in self.messages if t == topic]
        return json.loads(bodies[-1]) if bodies and bodies[-1] else None

    def receipt(self, topic: str) -> Progress | None:
        body = self.last(topic)
        return None if body is None else parse_receipt(json.dumps(body).encode()).state

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def get(url: str, timeout_s: float = 10.0) -> tuple[int, bytes, str]:
    """GET ``url``: (status, body, content type), also for an error status."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as answer:
            return answer.status, answer.read(), answer.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers.get("Content-Type", "")


def answers(url: str) -> bool:
    """Whether a server answers at ``url`` yet (for a bounded wait after starting it)."""
    try:
        get(url, timeout_s=2.0)
    except OSError:
        return False
    return True


def get_json(url: str) -> Any:
    status, body, _ = get(url)
    assert status == 200, (status, body[:200])
    return json.loads(body)


def online(watcher: Client, consumer: str, process: str) -> bool:
    body = watcher.last(f"edgemed-consumer/{consumer}/{process}")
    return body is not None and body.get("state") == "online"


__all__ = ["Client", "answers", "edgemed", "get", "get_json", "online", "procs", "result", "stream_of", "wait_until"]
