"""Durable results per second through the outbox to a local mosquitto, against paho's in-memory QoS 1 baseline.

Usage: python benchmarks/bench_outbox.py [--results 5000] [--runs 5]

Starts its own mosquitto on a free 127.0.0.1 port (the test fixture class is reused), then, for each run:

* ``durable``: Outbox (batched commits, synchronous=FULL) + Delivery + MqttLink. The clock runs from the first
  ``put()`` until the outbox is empty, i.e. until every result was committed to disk AND acknowledged by the broker.
* ``paho in-memory``: one paho client publishes the same payloads at QoS 1 with ``loop_start()``; the clock stops
  at the last ``on_publish``. Nothing survives a crash here: this is the speed a non-durable client gets.
* ``commit cost``: ``put()`` alone (no broker) with one power-safe commit per result vs batched commits.

Prints a Markdown table of medians over the runs. Numbers depend on the disk's fsync latency and on whatever else
is running; the docs record the machine they came from.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the Mosquitto helper lives with the test fixtures

from broker_fixtures import Mosquitto  # noqa: E402

from edgemed.outbox import Outbox, OutboxConfig  # noqa: E402
from edgemed.publish.config import MqttConfig  # noqa: E402
from edgemed.publish.delivery import Delivery  # noqa: E402
from edgemed.publish.mqtt import MqttLink  # noqa: E402

TOPIC = "edgemed/bench/dev/results"
# Process CPU time per result, keyed by commit_every (0 = the paho baseline): steadier than wall time on a
# machine shared with other work.
CPU_US: dict[int, list[float]] = {0: [], 1: [], 100: []}


def _payload(seq: int) -> tuple[str, bytes]:
    # About the size of a real result envelope (~900 bytes of JSON).
    rid = uuid.uuid4().hex
    body = {
        "schema": "edgemed.result/1",
        "result_id": rid,
        "seq": seq,
        "device_id": "bench-01",
        "site": "lab",
        "created_at": "2026-01-01T00:00:00.000Z",
        "clock_synced": True,
        "session_id": uuid.uuid4().hex,
        "model": {"name": "breast_cnn", "version": "1.0.0", "sha256": "a" * 64, "target": "int8"},
        "preprocess_sha256": "b" * 64,
        "runtime": {"backend": "ai_edge_litert", "delegate": "cpu", "degraded": False, "edgemed": "0.1.0"},
        "source": {"kind": "folder", "index": seq},
        "quality": {"passed": True, "blur": 123.456, "brightness": 0.5, "clipped_fraction": 0.001, "reason": None},
        "prediction": {"label": "malignant", "index": 1, "probabilities": {"benign": 0.2, "malignant": 0.8}},
        "triage": {"level": "urgent", "reason": "malignant probability 0.80 >= 0.50: refer today"},
        "latency_ms": {"capture": 1.2, "preprocess": 0.3, "inference": 0.01, "triage": 0.01, "total": 1.6},
    }
    return rid, json.dumps(body, separators=(",", ":")).encode()


def bench_durable(url: str, payloads: list[tuple[str, bytes]], cfg: OutboxConfig) -> float:
    with tempfile.TemporaryDirectory() as d:
        ob = Outbox(Path(d) / "outbox.sqlite3", cfg)
        link = MqttLink(MqttConfig(url=url), status_topic=None, client_id=f"bench-{uuid.uuid4().hex[:6]}")
        delivery = Delivery(ob, link)
        link.start()
        delivery.start()
        if not link.wait_connected(10):
            raise RuntimeError("benchmark broker not reachable")
        t0, c0 = time.perf_counter(), time.process_time()
        for seq, (rid, body) in enumerate(payloads):
            ob.put(rid, TOPIC, body, seq=seq)
        remaining = delivery.drain(120)
        elapsed = time.perf_counter() - t0
        CPU_US[cfg.commit_every].append((time.process_time() - c0) / len(payloads) * 1e6)
        delivery.stop()
        link.stop(2)
        ob.close()
    if remaining:
        raise RuntimeError(f"{remaining} results not acknowledged")
    return len(payloads) / elapsed


def bench_paho(port: int, payloads: list[tuple[str, bytes]]) -> float:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    done = threading.Event()
    acked = 0

    def on_publish(*_: object) -> None:
        nonlocal acked
        acked += 1
        if acked == len(payloads):
            done.set()

    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=f"bench-paho-{uuid.uuid4().hex[:6]}", protocol=paho.MQTTv5
    )
    client.on_publish = on_publish
    client.connect("127.0.0.1", port)
    client.loop_start()
    time.sleep(0.2)
    t0, c0 = time.perf_counter(), time.process_time()
    for _, body in payloads:
        client.publish(TOPIC, body, qos=1)
    if not done.wait(120):
        raise RuntimeError("paho baseline did not finish")
    elapsed = time.perf_counter() - t0
    CPU_US[0].append((time.process_time() - c0) / len(payloads) * 1e6)
    client.disconnect()
    client.loop_stop()
    return len(payloads) / elapsed


def bench_put(payloads: list[tuple[str, bytes]], cfg: OutboxConfig) -> float:
    with tempfile.TemporaryDirectory() as d:
        ob = Outbox(Path(d) / "outbox.sqlite3", cfg)
        t0 = time.perf_counter()
        for seq, (rid, body) in enumerate(payloads):
            ob.put(rid, TOPIC, body, seq=seq)
        ob.flush()
        elapsed = time.perf_counter() - t0
        ob.close()
    return len(payloads) / elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=int, default=5000)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    payloads = [_payload(i) for i in range(args.results)]
    small = payloads[: max(200, args.results // 10)]  # one fsync per result is slow: fewer of them
    batched = OutboxConfig(commit_every=100, commit_interval_s=0.05, synchronous="FULL")
    rows: dict[str, list[float]] = {
        k: []
        for k in (
            "durable (commit_every=100, FULL)",
            "paho in-memory QoS 1",
            "durable (commit_every=1, FULL)",
            "put only, commit_every=1, FULL",
            "put only, commit_every=1, NORMAL",
            "put only, commit_every=100, FULL",
        )
    }
    with tempfile.TemporaryDirectory() as d:
        broker = Mosquitto(Path(d), persistence=False).start()
        try:
            for _ in range(args.runs):
                rows["paho in-memory QoS 1"].append(bench_paho(broker.port, payloads))
                rows["durable (commit_every=100, FULL)"].append(bench_durable(broker.url, payloads, batched))
                rows["durable (commit_every=1, FULL)"].append(
                    bench_durable(broker.url, small, OutboxConfig(commit_every=1, synchronous="FULL"))
                )
                rows["put only, commit_every=1, FULL"].append(
                    bench_put(small, OutboxConfig(commit_every=1, synchronous="FULL"))
                )
                rows["put only, commit_every=1, NORMAL"].append(
                    bench_put(small, OutboxConfig(commit_every=1, synchronous="NORMAL"))
                )
                rows["put only, commit_every=100, FULL"].append(bench_put(payloads, batched))
        finally:
            broker.stop()
    base = statistics.median(rows["paho in-memory QoS 1"])
    print(f"{args.results} results of {len(payloads[0][1])} bytes, {args.runs} runs, medians\n")
    print("| path | results/s (median) | min | max | vs paho in-memory |")
    print("|---|---:|---:|---:|---:|")
    for name, vals in rows.items():
        med = statistics.median(vals)
        print(f"| {name} | {med:,.0f} | {min(vals):,.0f} | {max(vals):,.0f} | {med / base:.0%} |")
    durable, memory = rows["durable (commit_every=100, FULL)"], rows["paho in-memory QoS 1"]
    paired = [d / p for d, p in zip(durable, memory, strict=True)]
    print(
        f"\ndurable / in-memory, paired per run: median {statistics.median(paired):.0%} "
        f"(runs: {', '.join(f'{r:.0%}' for r in paired)})"
    )
    print(
        f"CPU per result (median): paho in-memory {statistics.median(CPU_US[0]):.0f} us, "
        f"durable batched {statistics.median(CPU_US[100]):.0f} us"
    )
    per_commit_ms = 1000.0 / statistics.median(rows["put only, commit_every=1, FULL"])
    print(f"\npower-safe commit (synchronous=FULL, one per result): {per_commit_ms:.2f} ms per result")
    return 0


if __name__ == "__main__":
    sys.exit(main())
