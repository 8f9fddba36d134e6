"""Throughput of the dashboard's ingest against a real mosquitto (a measurement, not a test; pytest skips it).

    PYTHONPATH=$PWD:$PWD/tests python tests/bench_dashboard_ingest.py [N] [--strace]

Publishes N results (default 3000) as fast as a QoS 1 publisher can to a mosquitto on a free loopback port
(max_inflight_messages 20, the default; max_queued_messages 0 so that the broker drops nothing while the
dashboard catches up), with `edgemed dashboard` running as a subprocess, and reports results stored per second
from the first publish to the last commit. With --strace the dashboard runs under `strace -f -c` and the script
prints its fsync/fdatasync counts beside the number of PUBACKs it sent.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import paho.mqtt.client as paho
from broker_fixtures import Mosquitto, free_port
from dashboard_helpers import make_result


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 3000
    use_strace = "--strace" in sys.argv and shutil.which("strace") is not None
    folder = Path(tempfile.mkdtemp(prefix="edgemed-bench-"))
    broker = Mosquitto(folder / "broker", persistence=False).start()
    db = folder / "fleet.sqlite3"
    port = free_port()
    cmd = [sys.executable, "-m", "edgemed", "dashboard", "--broker", broker.url, "--db", str(db), "--port", str(port)]
    strace_out = folder / "strace.txt"
    if use_strace:
        cmd = ["strace", "-f", "-e", "trace=fsync,fdatasync", "-o", str(strace_out), *cmd]
    # A session of its own: SIGINT then reaches the dashboard also when strace is its parent.
    dash = subprocess.Popen(cmd, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/summary", timeout=1) as resp:
                    if json.loads(resp.read())["ingest"]["subscribed"]:
                        break
            except OSError:
                pass
            time.sleep(0.1)
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-device", protocol=paho.MQTTv311)
        client.max_inflight_messages_set(100)
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        payloads = [json.dumps(make_result(seq=i)).encode() for i in range(n)]
        t0 = time.monotonic()
        for p in payloads:
            client.publish("edgemed/clinic-a/us-01/results", p, qos=1)
        stored = 0
        deadline = time.monotonic() + 300
        while stored < n and time.monotonic() < deadline:
            time.sleep(0.02)
            with sqlite3.connect(db) as con:
                stored = con.execute("SELECT count(*) FROM results").fetchone()[0]
        elapsed = time.monotonic() - t0
        client.disconnect()
        client.loop_stop()
        print(f"{stored} of {n} results stored in {elapsed:.2f} s: {stored / elapsed:.0f} results/s")
    finally:
        os.killpg(dash.pid, signal.SIGINT)
        try:
            dash.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(dash.pid, signal.SIGKILL)
            dash.wait(5)
        broker.stop()
    if use_strace:
        calls = [x for x in strace_out.read_text().splitlines() if "fsync(" in x or "fdatasync(" in x]
        print(f"the dashboard called fsync/fdatasync {len(calls)} times for {n} PUBACKs")
    shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
