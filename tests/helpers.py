"""Helpers shared by the end-to-end tests: the ``edgemed`` command in a child process, and an independent consumer."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any


class Collector:
    """Independent consumer keeping every payload per topic (persistent session, QoS 1)."""

    def __init__(self, port: int, *, username: str | None = None, password: str | None = None) -> None:
        import paho.mqtt.client as paho

        self.by_topic: dict[str, list[dict[str, Any]]] = {}
        self.retained: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="e2e-dashboard", clean_session=False)
        self.client.on_connect = lambda c, *a: c.subscribe("edgemed/#", qos=1)
        self.client.on_subscribe = lambda *a: self._ready.set()
        self.client.on_message = self._on_message
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self._ready.wait(10), "collector could not subscribe"

    def _on_message(self, _c: object, _u: object, msg: Any) -> None:
        body = json.loads(msg.payload)
        with self._lock:
            if msg.retain:
                self.retained[msg.topic] = body
            else:
                self.by_topic.setdefault(msg.topic.rsplit("/", 1)[1], []).append(body)

    def results(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.by_topic.get("results", []))

    def wait_results(self, n: int, timeout_s: float = 15.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        while len({r["result_id"] for r in self.results()}) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.results()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def envelope_context() -> Any:
    """An ``EnvelopeContext`` of a device ``us-01`` at ``clinic_a`` running an int8 model on the CPU."""
    from edgemed.envelope import EnvelopeContext

    return EnvelopeContext(
        device_id="us-01",
        site="clinic_a",
        model={"name": "m", "version": "1", "sha256": "0" * 64, "target": "int8"},
        preprocess_sha256="1" * 64,
        backend="ai_edge_litert",
        delegate="cpu",
        degraded=False,
    )


def run_edgemed(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m edgemed ARGS`` in a child process, its output captured as text."""
    return subprocess.run([sys.executable, "-m", "edgemed", *args], capture_output=True, text=True, timeout=timeout)


def edgemed_run_command(profile: Path, *args: str) -> list[str]:
    """The command line of ``edgemed run --profile PROFILE ARGS`` in a child process of this interpreter."""
    return [sys.executable, "-m", "edgemed", "run", "--profile", str(profile), *args]


def run_offline(profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``edgemed run`` without a broker to completion: exit 10, every result pending in the outbox."""
    proc = subprocess.run(edgemed_run_command(profile, *args), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 10, proc.stderr  # offline: every result stays pending in the outbox
    return proc
