"""Receipts through a real mosquitto: a stand-in consumer (paho, with the contract module ``edgemed.receipts``)
stores what the device publishes, says it is online and publishes receipts; ``edgemed run`` exits 0 once every
result is receipted, and with the consumer offline it exits 10 with its results on disk, which ``edgemed flush``
delivers once the consumer is back. The real dashboard's side is tested with the dashboard."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import paho.mqtt.client as paho
import pytest
import yaml
from broker_fixtures import Mosquitto
from helpers import run_edgemed

from edgemed import receipts

DATA = Path(__file__).resolve().parent.parent / "data"
SITE, DEV = "ward", "probe-01"


class StandInConsumer:
    """The consumer of record in a few lines: stores each ``seq`` once per stream and receipts what it stored."""

    def __init__(self, port: int, *, online: bool = True) -> None:
        self.stored: dict[str, set[int]] = {}
        self.messages: dict[str, int] = {}
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self.state_topic = receipts.consumer_topic("dashboard", "standin")
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="standin", clean_session=False)
        self.client.will_set(self.state_topic, self._state("offline"), qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self._ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self._ready.wait(10), "the stand-in consumer could not subscribe"
        self.say("online" if online else "offline")

    def _state(self, state: str) -> bytes:
        body = {"schema": receipts.CONSUMER_SCHEMA, "state": state, "consumer": "dashboard", "process": "standin"}
        return json.dumps(body).encode()

    def say(self, state: str) -> None:
        self.client.publish(self.state_topic, self._state(state), qos=1, retain=True).wait_for_publish(5)

    def _on_connect(self, client: paho.Client, *_: Any) -> None:
        client.subscribe([(f"edgemed/+/+/{kind}", 1) for kind in ("results", "studies", "batches", "lost")])

    def _on_message(self, client: paho.Client, _u: object, msg: Any) -> None:
        kind = msg.topic.rsplit("/", 1)[1]
        body = json.loads(msg.payload)
        with self._lock:
            self.messages[kind] = self.messages.get(kind, 0) + 1
            if kind == "lost":
                envelopes = [{"stream": body["stream"], "seq": s} for a, b in body["ranges"] for s in range(a, b + 1)]
            else:
                envelopes = body["results"] if kind == "batches" else [body]
            for envelope in envelopes:
                self.stored.setdefault(envelope["stream"], set()).add(envelope["seq"])
            stream = envelopes[0]["stream"]
            state = receipts.progress(-1, receipts.to_ranges(self.stored[stream]))
        receipt = receipts.Receipt("dashboard", SITE, DEV, stream, state)
        client.publish(receipts.device_topic(SITE, DEV, "receipts"), receipt.encode(), qos=1, retain=True)

    def seqs(self) -> list[int]:
        with self._lock:
            return sorted(s for seqs in self.stored.values() for s in seqs)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _profile(tmp_path: Path, model: Path, url: str, n: int, **sections: Any) -> Path:
    scans = tmp_path / "scans"
    scans.mkdir()
    for i, image in enumerate(np.load(DATA / "breastmnist_28.npz")["train_images"][:n]):
        cv2.imwrite(str(scans / f"img{i:03d}.png"), image)
    raw = {
        "profile": "receipts-broker-test",
        "device": {"id": DEV, "site": SITE, "data_dir": str(tmp_path / "data")},
        "model": {"path": str(model)},
        "source": {"uri": str(scans)},
        "mqtt": {"url": url},
        "delivery": {"consumer": "dashboard", "receipt_timeout_s": 5},
        "run": {"print_results": False},
        **sections,
    }
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _on_disk(tmp_path: Path) -> int:
    with sqlite3.connect(tmp_path / "data" / "outbox.sqlite3") as db:
        return int(db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])


@pytest.mark.parametrize("batch", [False, True], ids=["single", "batched"])
def test_a_run_exits_0_once_its_consumer_receipted_every_result(
    int8_model: Path, tmp_path: Path, broker: Mosquitto, batch: bool
) -> None:
    profile = _profile(
        tmp_path, int8_model, broker.url, 40, run={"print_results": False, "drain_timeout_s": 20},
        publish={"batch": {"enabled": batch}},
    )  # fmt: skip
    consumer = StandInConsumer(broker.port)
    try:
        done = run_edgemed("run", "--profile", str(profile))
        assert done.returncode == 0, done.stderr
        assert consumer.seqs() == list(range(40))  # every result once (no study: unrelated images)
        assert ("batches" in consumer.messages) == batch and ("results" in consumer.messages) != batch
    finally:
        consumer.close()
    assert _on_disk(tmp_path) == 0
    assert "pending 0" in done.stderr


def test_with_its_consumer_offline_a_run_exits_10_and_flush_delivers_once_it_is_back(
    int8_model: Path, tmp_path: Path, broker: Mosquitto
) -> None:
    profile = _profile(tmp_path, int8_model, broker.url, 12, run={"print_results": False, "drain_timeout_s": 2})
    consumer = StandInConsumer(broker.port, online=False)
    try:
        done = run_edgemed("run", "--profile", str(profile))
        assert done.returncode == 10, done.stderr
        assert "consumer dashboard offline" in done.stderr and "Traceback" not in done.stderr
        assert consumer.seqs() == [] and _on_disk(tmp_path) == 12  # nothing published, everything kept
        consumer.say("online")
        started = time.monotonic()
        flushed = run_edgemed("flush", "--profile", str(profile), "--timeout", "30")
        assert flushed.returncode == 0, flushed.stderr
        assert time.monotonic() - started < 30
        assert consumer.seqs() == list(range(12))
    finally:
        consumer.close()
    assert _on_disk(tmp_path) == 0
