"""Simulated devices for the fleet-scale tests: the device's own delivery parts, many devices in one process.

    python tests/fleet_devices.py --broker mqtt://127.0.0.1:PORT --folder DIR --site fleet \
        --device dev-00 --device dev-01 ... --results 500 --rate 100 --consumer dashboard --receipt-timeout 2

Each device is wired exactly as ``edgemed run`` wires a profile with ``delivery.consumer`` (see
``edgemed.runtime.Device``): its own data directory (locked, with its ``seq`` stream from
``edgemed.outbox.stream``), an ``Outbox`` with the profile defaults (commit every 100 results or 50 ms,
``synchronous=FULL``), a ``Consumer`` of record, a ``Delivery`` and an ``MqttLink`` (MQTT 5, QoS 1, fixed client id
``edgemed-{site}-{device_id}``, persistent session, retained online/offline status and last will). What it
publishes are real ``edgemed.result/1`` envelopes built by ``edgemed.envelope.build_result`` (the runtime's own
encoder), so the only thing left out is the model and the camera in front. A result leaves a device's outbox only
when a receipt of its consumer covers it: the run ends when every outbox is empty (exit 0) or when ``--timeout``
passes (exit 10, the counts say what is left).

At the end one JSON line per device goes to stdout: ``{"device_id", "stream", "committed", "left", "resent",
"published"}``, then ``{"done": true, ...}``. Progress (results committed) goes to ``--progress FILE`` every 0.2 s, so
a test can act mid-stream without reading the devices' files.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from edgemed.envelope import EnvelopeContext, build_result, encode, new_result_id, study_envelope
from edgemed.lock import DataDirLock
from edgemed.outbox import OUTBOX_FILENAME, Outbox, OutboxConfig
from edgemed.outbox.stream import sequence_stream
from edgemed.publish.config import MqttConfig
from edgemed.publish.consumer import Consumer, effective_outbox_config
from edgemed.publish.delivery import Delivery
from edgemed.publish.mqtt import MqttLink
from edgemed.receipts import device_topic
from edgemed.types import Frame, Prediction, QualityReport, StudyResult, TriageResult

LABELS = ("normal_benign", "malignant")


class SimulatedDevice:
    """One device: data directory, outbox, consumer, delivery and link, as ``edgemed run`` builds them."""

    def __init__(self, folder: Path, url: str, *, site: str, device_id: str, consumer: str, receipt_timeout_s: float):
        self.site, self.device_id = site, device_id
        self.data_dir = folder / device_id
        self.lock = DataDirLock(self.data_dir)  # creates the data directory, 0700
        self.lock.acquire()
        self.stream = sequence_stream(self.data_dir)
        self.topic = device_topic(site, device_id, "results")
        self.ctx = EnvelopeContext(
            device_id=device_id,
            site=site,
            model={"name": "breast_cnn", "version": "1.0.0", "sha256": "0" * 64, "target": "int8"},
            preprocess_sha256="1" * 64,
            backend="ai_edge_litert",
            delegate="cpu",
            degraded=False,
            stream=self.stream,
        )
        self.consumer = Consumer(
            consumer, site=site, device_id=device_id, stream=self.stream, receipt_timeout_s=receipt_timeout_s
        )
        self.outbox = Outbox(self.data_dir / OUTBOX_FILENAME, effective_outbox_config(OutboxConfig(), self.consumer))
        self.link = MqttLink(
            MqttConfig(url=url, protocol="5", reconnect_min_s=0.2, reconnect_max_s=1.0),
            status_topic=device_topic(site, device_id, "status"),
            client_id=f"edgemed-{site}-{device_id}",
            subscriptions=self.consumer.subscriptions,
            on_message=self.consumer.on_message,
            on_state=self.consumer.on_state,
        )
        self.delivery = Delivery(self.outbox, self.link, consumer=self.consumer)

    def start(self) -> None:
        self.link.start()
        self.delivery.start()

    def produce_one(self) -> int:
        """Commit-queue one result (durable at the outbox's next batch commit); returns its ``seq``."""
        seq = self.outbox.next_seq()
        malignant = seq % 7 == 0  # a mix of levels, as a clinic's stream has
        probabilities = (0.2, 0.8) if malignant else (0.9, 0.1)
        level = "urgent" if malignant else "routine"
        envelope = build_result(
            self.ctx,
            frame=Frame(index=seq, source_kind="folder"),
            seq=seq,
            created_at=time.time(),
            clock_synced=True,
            session_id=None,
            quality=QualityReport(True, 120.0, 0.5, 0.001),
            prediction=Prediction(LABELS, probabilities),
            triage=TriageResult(level, f"{LABELS[1]} probability {probabilities[1]:.2f}", {"label": LABELS[1]}),
            latency_ms={"preprocess": 0.3, "inference": 4.2, "total": 5.1},
        )
        self.outbox.put(envelope["result_id"], self.topic, encode(envelope), seq=seq)
        return seq

    def produce_study(self, first_seq: int, last_seq: int) -> int:
        """Commit-queue the study decision over ``first_seq..last_seq`` (on the same ``seq`` counter)."""
        seq = self.outbox.next_seq()
        study = StudyResult(
            seq=seq,
            result_id=new_result_id(),
            created_at=time.time(),
            clock_synced=True,
            session_id=None,
            source_kind="folder",
            first_seq=first_seq,
            last_seq=last_seq,
            decision=TriageResult("urgent", "2 of 5 frames malignant", {"frames": last_seq - first_seq + 1}),
        )
        topic = device_topic(self.site, self.device_id, "studies")
        self.outbox.put(study.result_id, topic, encode(study_envelope(self.ctx, study)), seq=seq)
        return seq

    def report(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "stream": self.stream,
            "committed": self.outbox.committed_seq,
            "left": self.outbox.pending_count(),
            "resent": self.consumer.resent_total,
            "published": self.delivery.published_total,
        }

    def stop(self) -> None:
        self.delivery.stop()
        self.link.stop(2)
        self.outbox.close()
        self.lock.release()


def _produce(
    devices: list[SimulatedDevice], results: int, rate: float, progress: Path | None, study_every: int
) -> None:
    """Round-robin over the devices, ``rate`` results per second per device (0 = as fast as they take them)."""
    start = time.monotonic()
    written_at = 0.0
    firsts: dict[str, int] = {}
    for i in range(results):
        for dev in devices:
            seq = dev.produce_one()
            firsts.setdefault(dev.device_id, seq)
            if study_every and (i + 1) % study_every == 0:
                dev.produce_study(firsts.pop(dev.device_id), seq)
        if rate:
            ahead = (i + 1) / rate - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
        if progress is not None and time.monotonic() - written_at > 0.2:
            written_at = time.monotonic()
            _write_progress(progress, (i + 1) * len(devices))
    for dev in devices:
        dev.outbox.flush()
    if progress is not None:
        _write_progress(progress, results * len(devices))


def _write_progress(path: Path, n: int) -> None:
    # Whole or not at all: a reader never sees a half-written number.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(str(n))
    tmp.replace(path)


def _drain(devices: list[SimulatedDevice], timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    left = sum(d.outbox.pending_count() for d in devices)
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        for dev in devices:
            dev.link.check()
            dev.delivery.check()
        left = sum(d.outbox.pending_count() for d in devices)
    return left


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--broker", required=True)
    ap.add_argument("--folder", type=Path, required=True, help="one data directory per device is made in it")
    ap.add_argument("--site", default="fleet")
    ap.add_argument("--device", action="append", required=True, help="a device id (repeat)")
    ap.add_argument("--results", type=int, default=500, help="results per device")
    ap.add_argument("--rate", type=float, default=100.0, help="results per second per device (0 = no pacing)")
    ap.add_argument("--consumer", default="dashboard", help="delivery.consumer")
    ap.add_argument("--receipt-timeout", type=float, default=60.0, help="delivery.receipt_timeout_s")
    ap.add_argument("--ready-timeout", type=float, default=30.0, help="longest wait for the consumer to be online")
    ap.add_argument("--timeout", type=float, default=90.0, help="longest wait for every receipt after producing")
    ap.add_argument("--progress", type=Path, default=None, help="file rewritten with the results committed so far")
    ap.add_argument("--study-every", type=int, default=0, help="a study decision after every N results (0 = none)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="fleet-devices: %(name)s: %(message)s")
    devices = [
        SimulatedDevice(
            args.folder,
            args.broker,
            site=args.site,
            device_id=device_id,
            consumer=args.consumer,
            receipt_timeout_s=args.receipt_timeout,
        )
        for device_id in args.device
    ]
    try:
        for dev in devices:
            dev.start()
        deadline = time.monotonic() + args.ready_timeout
        while not all(d.consumer.online for d in devices):  # the devices publish nothing while it is offline
            if time.monotonic() > deadline:
                print(json.dumps({"error": "the consumer did not come online", "done": False}), flush=True)
                return 11
            time.sleep(0.05)
        _produce(devices, args.results, args.rate, args.progress, args.study_every)
        left = _drain(devices, args.timeout)
        for dev in devices:
            print(json.dumps(dev.report()), flush=True)
        print(json.dumps({"done": True, "left": left}), flush=True)
        return 0 if left == 0 else 10
    finally:
        for dev in devices:
            dev.stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
