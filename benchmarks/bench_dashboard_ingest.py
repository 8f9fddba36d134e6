"""Throughput of the dashboard's ingest alone: results stored per second from a fast QoS 1 publisher.

    python benchmarks/bench_dashboard_ingest.py [--results 3000] [--runs 3] [--strace]

Starts a mosquitto on a free 127.0.0.1 port (``max_inflight_messages`` 20, the default, so the dashboard gets
the default in-flight window; ``max_queued_messages 0`` so the broker drops nothing while the dashboard catches
up: this measures the ingest, not the broker's queue) and the real ``edgemed dashboard`` as a child process. A
paho publisher (QoS 1, 100 in flight) then sends ``--results`` result envelopes of about 950 bytes as fast as it
can, and the script reads the dashboard's database until every one is stored. Reported: results stored per second
from the first publish to the last commit, per run and the median.

With ``--strace`` (needs strace) the dashboard runs under ``strace -f -e trace=fsync,fdatasync`` and the script
prints its fsync/fdatasync count beside the number of PUBACKs it sent: group commit shows as far fewer fsyncs
than messages.

Unlike ``bench_outbox.py`` nothing here is a device: no outbox, no receipts are waited for. Writes
``benchmarks/results/dashboard_ingest.json`` and prints a short table.
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Dashboard, Mosquitto, median, result_payload, temp_dir, write_results

SITE, DEVICE = "clinic-a", "us-01"


def one_run(n: int, use_strace: bool) -> dict[str, float]:
    import paho.mqtt.client as paho

    with temp_dir("edgemed-bench-ingest-") as folder, Mosquitto(extra=("max_queued_messages 0",), defaults=True) as b:
        db = folder / "fleet.sqlite3"
        strace_out = folder / "strace.txt"
        wrap = ("strace", "-f", "-e", "trace=fsync,fdatasync", "-o", str(strace_out)) if use_strace else ()
        with Dashboard(b.url, db, consumer_id=None, wrapper=wrap) as dash:
            client = paho.Client(
                paho.CallbackAPIVersion.VERSION2,
                client_id=f"bench-device-{uuid.uuid4().hex[:6]}",
                protocol=paho.MQTTv311,
            )
            client.max_inflight_messages_set(100)
            client.connect("127.0.0.1", b.port)
            client.loop_start()
            payloads = [result_payload(SITE, DEVICE, i)[1] for i in range(n)]
            cpu0 = dash.cpu_s()
            t0 = time.monotonic()
            for p in payloads:
                client.publish(f"edgemed/{SITE}/{DEVICE}/results", p, qos=1)
            stored = 0
            deadline = time.monotonic() + 300
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as con:
                while stored < n and time.monotonic() < deadline:
                    time.sleep(0.02)
                    stored = con.execute("SELECT count(*) FROM results").fetchone()[0]
            elapsed = time.monotonic() - t0
            cpu = dash.cpu_s() - cpu0 if not use_strace else float("nan")  # under strace: its CPU, not the ingest's
            client.disconnect()
            client.loop_stop()
        out = {"stored": stored, "seconds": elapsed, "rate": stored / elapsed, "dashboard_cpu_us": cpu / n * 1e6}
        if use_strace:
            calls = [x for x in strace_out.read_text().splitlines() if "fsync(" in x or "fdatasync(" in x]
            out["fsyncs"] = len(calls)
    if stored < n:
        raise SystemExit(f"only {stored} of {n} results were stored within 300 s")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=int, default=3000, help="results per run (default 3000)")
    ap.add_argument("--runs", type=int, default=3, help="runs; the median is reported (default 3)")
    ap.add_argument("--strace", action="store_true", help="count the dashboard's fsync/fdatasync calls")
    args = ap.parse_args()
    if not 100 <= args.results <= 100_000 or not 1 <= args.runs <= 20:
        ap.error("--results must be 100-100000 and --runs 1-20")
    if args.strace and shutil.which("strace") is None:
        ap.error("--strace needs strace: sudo apt-get install -y strace")
    runs = []
    for i in range(args.runs):
        runs.append(one_run(args.results, args.strace))
        print(f"  run {i + 1}/{args.runs}: {runs[-1]['rate']:,.0f} results/s", file=sys.stderr)
    rate = median([r["rate"] for r in runs])
    write_results("dashboard_ingest", {"results_per_run": args.results, "runs": runs, "median_rate": rate})
    print("| run | stored | s | results/s | dashboard CPU µs/result |" + (" fsyncs |" if args.strace else ""))
    print("|---|---:|---:|---:|---:|" + ("---:|" if args.strace else ""))
    for i, r in enumerate(runs, 1):
        fs = f" {r['fsyncs']} |" if args.strace else ""
        print(f"| {i} | {r['stored']} | {r['seconds']:.2f} | {r['rate']:,.0f} | {r['dashboard_cpu_us']:.0f} |{fs}")
    print(f"\nmedian: {rate:,.0f} results/s stored ({args.results} per run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
