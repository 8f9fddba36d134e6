"""Results per second from a device's outbox to stored-and-receipted at the real dashboard, against paho QoS 1.

    python benchmarks/bench_outbox.py [--results 5000] [--runs 5] [--profile]

What runs (all on this machine; nothing but 127.0.0.1):

* a real mosquitto started by this script on a free loopback port, with its DEFAULT settings (only the listener
  and anonymous access configured: ``max_inflight_messages`` 20, ``max_queued_messages`` 1000, no persistence);
* the real dashboard, ``edgemed dashboard --consumer-id dashboard`` (its ingest, its SQLite store with
  ``synchronous=FULL``, its receipts), as a child process, started once for the whole benchmark.

Then, for each of ``--runs`` rounds, in this order (interleaved, so drift on a shared machine hits every path):

* ``paho QoS 1 pub -> sub`` (the baseline): one paho client in this process publishes the payloads at QoS 1
  (``loop_start()``, paho's default in-flight window), and an independent paho subscriber in a child process,
  subscribed at QoS 1, receives them. The clock runs from the first publish to the subscriber's last message.
  Nothing is written to disk: this is the speed of the bare protocol on this broker.
* ``edgemed, consumer, single``: ``Outbox`` (the device's default settings: batched commits, ``synchronous=FULL``)
  + ``Delivery`` with ``delivery.consumer: dashboard`` + ``MqttLink``, one result per message on ``.../results``.
  The clock runs from the first ``put()`` until the outbox is empty, i.e. until every result was committed on the
  device, published, stored by the dashboard in its database, receipted, and released from the device's disk.
* ``edgemed, consumer, batched``: the same with ``publish.batch`` on (``--batch-results`` per message).
* ``edgemed, no consumer``: today's behaviour for comparison (a PUBACK releases a result; the clock stops at the
  last PUBACK, the dashboard is still storing).

After each edgemed round the script checks in the dashboard's database that every ``seq`` of that round's device
is stored exactly once (a benchmark that lost results would be measuring the wrong thing) and stops otherwise.

Reported: medians over the rounds of results/s, min and max, the ratio to the baseline (of the medians, and the
median of per-round paired ratios), and CPU per result of this process (device side), the dashboard and the
broker. Targets (issue 11): batched or single, stored-and-receipted >= 50% of the baseline and >= 5,000/s.

``--profile`` adds one round of each path with a consumer, with every thread of this process under cProfile and a
dashboard of its own under cProfile too, both timing each thread's CPU clock (where the CPU goes, not where a
thread waits), and prints the functions that spend it (stats files in the results folder).

Writes ``benchmarks/results/outbox.json`` and prints a Markdown table (also to ``benchmarks/results/outbox.md``).
Numbers depend on the disk's fsync latency and on whatever else runs; compare ratios between machines.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    RESULTS,
    ROOT,
    Dashboard,
    Mosquitto,
    ThreadProfiler,
    median,
    result_payload,
    temp_dir,
    top_functions,
    write_results,
)
from _device import DeviceSide

SITE = "bench"
BASELINE_TOPIC = "bench/baseline/results"  # outside edgemed/#: the dashboard must not ingest the baseline
LIMIT_S = 300.0  # no single round may take longer than this

# The independent subscriber of the baseline: QoS 1, clean session; prints "ready" once subscribed, then, after the
# last expected message (or 2 s without one: the broker dropped some), the wall time of the last message, the count
# and its CPU time.
SUBSCRIBER = r"""
import sys, time, json, threading
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
port, topic, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
got = 0; last = 0.0; done = threading.Event(); ready = threading.Event()
def on_message(c, u, m):
    global got, last
    got += 1; last = time.time()
    if got == n: done.set()
c = paho.Client(CallbackAPIVersion.VERSION2, client_id=sys.argv[4], protocol=paho.MQTTv5)
c.on_message = on_message
c.on_subscribe = lambda *a: ready.set()
c.connect("127.0.0.1", port); c.loop_start(); c.subscribe(topic, qos=1)
if not ready.wait(10): sys.exit("not subscribed")
cpu0 = time.process_time()
print("ready", flush=True)
seen = -1
while not done.wait(2):
    if got == seen: break  # 2 s without a message: report what arrived
    seen = got
print(json.dumps({"last": last, "got": got, "cpu_s": time.process_time() - cpu0}), flush=True)
c.disconnect(); c.loop_stop()
"""


@dataclass
class Round:
    """One measured pass of one path."""

    rate: float
    cpu_us: dict[str, float] = field(default_factory=dict)  # per result: "device"/"publisher", "dashboard", ...
    extra: dict[str, Any] = field(default_factory=dict)


def bench_paho(broker: Mosquitto, dash: Dashboard, n: int) -> Round:
    """The baseline: paho QoS 1 from a publisher here to a subscriber in a child process, nothing on disk."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    payloads = [result_payload("bench", "baseline", i)[1] for i in range(n)]
    tag = uuid.uuid4().hex[:6]
    sub = subprocess.Popen(
        [sys.executable, "-c", SUBSCRIBER, str(broker.port), BASELINE_TOPIC, str(n), f"bench-sub-{tag}"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert sub.stdout is not None
        if sub.stdout.readline().strip() != "ready":
            raise RuntimeError("the baseline subscriber did not subscribe")
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{tag}", protocol=paho.MQTTv5)
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        time.sleep(0.2)  # connected and idle
        cpu0, dash0, broker0 = time.process_time(), dash.cpu_s(), broker.cpu_s()
        t0 = time.time()
        for body in payloads:
            client.publish(BASELINE_TOPIC, body, qos=1)
        line = sub.stdout.readline()
        cpu1, broker1 = time.process_time(), broker.cpu_s()
        client.disconnect()
        client.loop_stop()
        report = json.loads(line)
        sub.wait(10)
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.wait(5)
    # With mosquitto's default max_queued_messages (1000), a QoS 1 subscriber slower than its publisher loses what
    # queues beyond it. The rate counted is then what the subscriber took in per second (its capacity), and the
    # loss is reported beside it: that is the ceiling of a plain subscriber, and the hole receipts close.
    elapsed = report["last"] - t0
    return Round(
        report["got"] / elapsed,
        {
            "publisher": (cpu1 - cpu0) / n * 1e6,
            "subscriber": report["cpu_s"] / max(1, report["got"]) * 1e6,
            "broker": (broker1 - broker0) / n * 1e6,
        },
        {"lost_by_broker": n - report["got"], "dashboard_cpu_us_idle": (dash.cpu_s() - dash0) / n * 1e6},
    )


def stored_seqs(db: Path, device_id: str) -> tuple[int, int]:
    """(rows, distinct seq) the dashboard's database holds for one device."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as con:
        rows, distinct = con.execute(
            "SELECT count(*), count(DISTINCT seq) FROM results WHERE site = ? AND device_id = ?", (SITE, device_id)
        ).fetchone()
    return int(rows), int(distinct)


def wait_stored(db: Path, device_id: str, n: int, quiet_s: float) -> tuple[int, int]:
    """Wait until the database holds ``n`` distinct seq of the device, or nothing new arrived for ``quiet_s``."""
    counts = stored_seqs(db, device_id)
    changed = time.monotonic()
    while counts[1] < n and time.monotonic() - changed < quiet_s:
        time.sleep(0.05)
        now = stored_seqs(db, device_id)
        if now != counts:
            counts, changed = now, time.monotonic()
    return counts


def bench_edgemed(
    broker: Mosquitto,
    dash: Dashboard,
    n: int,
    *,
    consumer: bool,
    batch: int,
    label: str,
    profile: Path | None,
    window: int = 0,
) -> Round:
    """One device (fresh data directory, fresh device id) putting ``n`` results as fast as it can."""
    device_id = f"{label}-{uuid.uuid4().hex[:8]}"
    with temp_dir("edgemed-bench-outbox-") as data_dir:
        side = DeviceSide(
            data_dir,
            broker.url,
            site=SITE,
            device_id=device_id,
            consumer="dashboard" if consumer else None,
            batch=batch,
        )
        payloads = [result_payload(SITE, device_id, i, side.stream) for i in range(n)]
        profiler = ThreadProfiler(cpu=True) if profile is not None else None
        if profiler is not None:
            profiler.__enter__()
        try:
            side.start()
            if not side.wait_ready(20):
                raise RuntimeError(f"{label}: the device did not connect (or see its consumer online) within 20 s")
            cpu0, dash0, broker0 = time.process_time(), dash.cpu_s(), broker.cpu_s()
            t0 = time.perf_counter()
            for seq, (rid, body) in enumerate(payloads):
                while window and side.outbox.pending_count() >= window:
                    time.sleep(0.001)  # diagnosis: at most `window` results not yet released
                side.put(rid, body, seq)
            remaining = side.wait_empty(LIMIT_S)
            elapsed = time.perf_counter() - t0
            cpu1, dash1, broker1 = time.process_time(), dash.cpu_s(), broker.cpu_s()
            stats = side.stats()
        finally:
            side.stop()
            if profiler is not None:
                profiler.__exit__()
                assert profile is not None
                profiler.dump(profile)
    if remaining:
        raise RuntimeError(f"{label}: {remaining} of {n} results still on the device after {LIMIT_S:.0f} s")
    rows, distinct = wait_stored(dash.db, device_id, n, 3.0)
    if consumer and distinct != n:
        raise RuntimeError(f"{label}: the dashboard stored {distinct} distinct seq of {n} (rows {rows})")
    # Without a consumer the device is done at the last PUBACK; what the broker then dropped (its default queue
    # limit, while the dashboard falls behind) never reaches the store. Counted, not hidden.
    return Round(
        n / elapsed,
        {
            "device": (cpu1 - cpu0) / n * 1e6,
            "dashboard": (dash1 - dash0) / n * 1e6,
            "broker": (broker1 - broker0) / n * 1e6,
        },
        {"lost_at_dashboard": n - distinct, "duplicates_stored": rows - distinct, **stats},
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=int, default=5000, help="results per round and path (default 5000)")
    ap.add_argument("--runs", type=int, default=5, help="rounds; medians are reported (default 5)")
    ap.add_argument("--batch-results", type=int, default=100, help="results per batch message (default 100)")
    ap.add_argument("--profile", action="store_true", help="add one profiled round of each edgemed path")
    ap.add_argument(
        "--window",
        type=int,
        default=0,
        metavar="N",
        help="diagnosis only: the producer waits while N results are on the device (not yet released), as a "
        "delivery window on unreceipted results would (default 0: no limit, as edgemed has it)",
    )
    ap.add_argument(
        "--max-queued",
        type=int,
        default=None,
        metavar="N",
        help="diagnosis only: set mosquitto's max_queued_messages to N (default: mosquitto's own default, 1000)",
    )
    ap.add_argument("--out", default="outbox", help="name of the results files in benchmarks/results/")
    args = ap.parse_args()
    if not 100 <= args.results <= 200_000 or not 1 <= args.runs <= 50:
        ap.error("--results must be 100-200000 and --runs 1-50")

    paths = {
        "paho QoS 1 pub -> sub (baseline, in memory)": None,
        "edgemed, consumer, single results": (True, 0),
        f"edgemed, consumer, batched ({args.batch_results}/message)": (True, args.batch_results),
        "edgemed, no consumer (PUBACK releases; to the broker only)": (False, 0),
    }
    rounds: dict[str, list[Round]] = {name: [] for name in paths}
    profiles: dict[str, str] = {}
    extra = (f"max_queued_messages {args.max_queued}",) if args.max_queued is not None else ()
    with temp_dir("edgemed-bench-dash-") as folder, Mosquitto(defaults=True, extra=extra) as broker:
        with Dashboard(broker.url, folder / "fleet.sqlite3") as dash:
            for i in range(args.runs):
                for name, how in paths.items():
                    if how is None:
                        r = bench_paho(broker, dash, args.results)
                    else:
                        consumer, batch = how
                        label = ("b" if batch else "s") if consumer else "n"
                        r = bench_edgemed(
                            broker,
                            dash,
                            args.results,
                            consumer=consumer,
                            batch=batch,
                            label=label,
                            profile=None,
                            window=args.window,
                        )
                    rounds[name].append(r)
                    print(f"  round {i + 1}/{args.runs}: {name}: {r.rate:,.0f} results/s", file=sys.stderr)
        if args.profile:
            # A dashboard of its own for the profiled rounds, so its profile holds only them; CPU clocks.
            for name, how in paths.items():
                if how is None or not how[0]:
                    continue
                kind = "batched" if how[1] else "single"
                stats = RESULTS / f"{args.out}-device-{kind}.pstats"
                dash_stats = RESULTS / f"{args.out}-dashboard-{kind}.pstats"
                with Dashboard(broker.url, folder / f"profiled-{kind}.sqlite3", profile_to=dash_stats) as dash:
                    r = bench_edgemed(broker, dash, args.results, consumer=True, batch=how[1], label="p", profile=stats)
                print(f"  profiled: {name}: {r.rate:,.0f} results/s", file=sys.stderr)
                profiles[f"the device side, {name}"] = str(stats.relative_to(ROOT))
                profiles[f"the dashboard, {name}"] = str(dash_stats.relative_to(ROOT))
    report(args, rounds, profiles)
    return 0


def report(args: argparse.Namespace, rounds: dict[str, list[Round]], profiles: dict[str, str]) -> None:
    names = list(rounds)
    base_name = names[0]
    base = median([r.rate for r in rounds[base_name]])
    rows = []
    for name in names:
        rates = [r.rate for r in rounds[name]]
        paired = [r.rate / b.rate for r, b in zip(rounds[name], rounds[base_name], strict=True)]
        cpu_keys = rounds[name][0].cpu_us.keys()
        rows.append(
            {
                "path": name,
                "rates": rates,
                "median": median(rates),
                "ratio_of_medians": median(rates) / base,
                "paired_ratio": median(paired),
                "paired_ratios": paired,
                "cpu_us_per_result": {k: median([r.cpu_us[k] for r in rounds[name]]) for k in cpu_keys},
                "extra": [r.extra for r in rounds[name]],
            }
        )
    lines = [
        f"{args.results} results of about 950 bytes per round, {args.runs} rounds, medians; mosquitto defaults"
        f"{f' but max_queued_messages {args.max_queued}' if args.max_queued is not None else ''}"
        f"{f'; producer window {args.window} results (diagnosis)' if args.window else ''}; "
        f"{os.cpu_count()} CPUs",
        "",
        "| path | results/s (median) | min | max | vs baseline (paired) | CPU µs/result | lost (of "
        f"{args.results}) / sent again, per round |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for row in rows:
        cpu = ", ".join(f"{k} {v:.0f}" for k, v in row["cpu_us_per_result"].items())
        lost = [e.get("lost_by_broker", e.get("lost_at_dashboard", 0)) for e in row["extra"]]
        again = [e.get("resent", 0) for e in row["extra"]]
        lines.append(
            f"| {row['path']} | {row['median']:,.0f} | {min(row['rates']):,.0f} | {max(row['rates']):,.0f} | "
            f"{row['ratio_of_medians']:.0%} ({row['paired_ratio']:.0%}) | {cpu} | "
            f"{', '.join(map(str, lost))} / {', '.join(map(str, again))} |"
        )
    lines.append("")
    for row in rows[1:3]:
        ok = row["median"] >= 5000 and row["ratio_of_medians"] >= 0.5
        lines.append(
            f"- {row['path']}: {row['median']:,.0f}/s, {row['ratio_of_medians']:.0%} of the baseline "
            f"(target >= 5,000/s and >= 50%: {'met' if ok else 'missed'}); "
            f"paired per round: {', '.join(f'{p:.0%}' for p in row['paired_ratios'])}"
        )
    for name, path in profiles.items():
        lines += ["", f"CPU profile of {name} ({path}), by own CPU time:", "```", top_functions(ROOT / path, 25), "```"]
    text = "\n".join(lines)
    print(text)
    (RESULTS / f"{args.out}.md").write_text(
        "python benchmarks/bench_outbox.py " + " ".join(sys.argv[1:]) + "\n\n" + text + "\n"
    )
    write_results(
        args.out, {"results_per_round": args.results, "rounds": args.runs, "rows": rows, "profiles": profiles}
    )


if __name__ == "__main__":
    sys.exit(main())
