"""Central ingest at fleet scale: results stored per second by 1 and 2 ingest workers, SQLite and PostgreSQL.

    python benchmarks/bench_ingest.py [--results 40000] [--batch 100] [--devices 20] [--runs 3] [--latency-s 8]
                                      [--only postgresql-2 ...] [--profile postgresql-2]

One run of this script starts one mosquitto (its defaults: 20 messages in flight and 1,000 queued per client, no
persistence) and one temporary PostgreSQL 15 cluster (PostgreSQL's defaults: fsync and synchronous_commit on; as
the postgres user when run as root), and builds one message stream before any clock starts: ``--devices``
devices, each on its own seq stream, ``--results`` real ``edgemed.result/1`` envelopes (about 950 bytes each, as
``edgemed.envelope`` encodes them) in ``edgemed.batch/1`` messages of ``--batch`` results. Each configuration gets
that same stream, the same broker and a fresh database:

  bare          a bare paho subscriber (one process) that json-decodes every message and looks at each result
  sqlite-1/2    1 or 2 `edgemed dashboard ingest --db FILE --group G` workers on one SQLite file
  postgresql-1/2  the same on one PostgreSQL database (--db postgresql://...)

A throughput run starts the workers, waits until each says ``online`` (its subscriptions granted), publishes the
whole stream at QoS 1 as fast as the broker takes it (the publisher finishes long before the store: its time is
reported) and counts the stored results (every 0.25 s, every 20 ms for the last 5%) until every one is there.
Results/s = results / (last stored - first publish). Runs alternate between configurations, ``--runs`` times; the
medians are reported, with each process's CPU per result. Then, for every store configuration, a latency run
publishes the stream paced at half that configuration's median rate for ``--latency-s`` seconds and measures, per
message, publish -> its last result stored (polled every 20 ms: up to 20 ms of the figure is the poll), p50 and
p95.

Workers run with the consumer's defaults (receipts published after every commit, at most four a second per
device). Between configurations every worker's session is removed from the broker, so a stopped worker never
takes a share of the next stream. ``--profile CONFIG`` adds one run of CONFIG with every worker under a per-thread
CPU profiler (benchmarks/_profiled.py) and prints where their CPU goes. A profiler charges every call, so it
inflates functions made of many small calls (strict_json.check_strings looks three times dearer under it than it
is): time a suspect stage alone before acting on the ranking.

Writes benchmarks/results/ingest.json (every run, the medians, the settings and the command) and ingest.md (the
table), and prints the table. Bounded: every wait has a deadline, and every process and the database are removed
at the end, also after an error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _central import ROOT, Broker, Postgres, Worker, batch_stream
from _common import median
from _ingest_report import StoreReader, percentile, table, top_functions, verdicts

CONFIGS = ["bare", "sqlite-1", "sqlite-2", "postgresql-1", "postgresql-2"]
RESULTS_DIR = ROOT / "benchmarks" / "results"
RUN_DEADLINE_S = 180.0


class Bench:
    """The broker, the database server, the stream and the clients every run shares."""

    def __init__(self, broker: Broker, pg: Postgres, folder: Path, stream: list[tuple[str, bytes, int]]) -> None:
        import paho.mqtt.client as paho

        self.broker, self.pg, self.folder, self.stream = broker, pg, folder, stream
        self.total = sum(n for _, _, n in stream)
        self.batch = stream[0][2]
        self.states: dict[str, str] = {}
        self.publisher = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-stream", protocol=paho.MQTTv5)
        self.publisher.max_inflight_messages_set(100)
        self.publisher.max_queued_messages_set(0)
        self.publisher.on_message = self._on_state
        subscribed = threading.Event()
        self.publisher.on_subscribe = lambda *a: subscribed.set()
        self.publisher.connect("127.0.0.1", broker.port)
        self.publisher.loop_start()
        self.publisher.subscribe("edgemed-consumer/dashboard/+", qos=1)
        if not subscribed.wait(10):
            raise SystemExit("the benchmark's own client could not subscribe to the consumer states")
        self.runs = 0

    def _on_state(self, client: Any, userdata: Any, msg: Any) -> None:
        try:
            self.states[msg.topic.rsplit("/", 1)[1]] = json.loads(msg.payload).get("state", "") if msg.payload else ""
        except ValueError:
            self.states[msg.topic.rsplit("/", 1)[1]] = ""

    def publish(self, pace_per_s: float = 0.0, limit_s: float | None = None) -> tuple[float, list[float]]:
        """Publish the stream (paced at ``pace_per_s`` messages/s when given); (seconds, each publish's time)."""
        t0 = time.monotonic()
        at, infos = [], []
        for i, (topic, payload, _) in enumerate(self.stream):
            if pace_per_s:
                due = t0 + i / pace_per_s
                if limit_s is not None and due - t0 > limit_s:
                    break
                time.sleep(max(0.0, due - time.monotonic()))
            at.append(time.monotonic())
            infos.append(self.publisher.publish(topic, payload, qos=1))
        for info in infos:
            info.wait_for_publish(60)
        return time.monotonic() - t0, at

    # -- one configuration ------------------------------------------------------------------------------------

    def start_workers(self, config: str, profile: Path | None = None) -> tuple[list[Worker], str]:
        engine, n = config.rsplit("-", 1)
        self.runs += 1
        name = f"{engine[:2]}{n}r{self.runs}"
        if engine == "postgresql":
            self.pg.execute(f"CREATE DATABASE bench_{name}")
            db = self.pg.url(f"bench_{name}")
        else:
            db = str(self.folder / f"{name}.sqlite3")
        group = f"bench-{name}"
        workers = [
            Worker(
                db=db,
                broker_url=self.broker.url,
                client_id=f"{group}-{i}",
                group=group,
                log=self.folder / f"{group}-{i}.log",
                profile=profile.with_name(f"{profile.stem}-{i}.pstats") if profile else None,
            )
            for i in range(int(n))
        ]
        deadline = time.monotonic() + 60
        while not all(self.states.get(w.client_id) == "online" for w in workers):
            dead = [w for w in workers if not w.alive()]
            if dead or time.monotonic() > deadline:
                for w in workers:
                    w.stop()
                tail = dead[0].log.read_text(errors="replace")[-3000:] if dead else "(still starting after 60 s)"
                raise SystemExit(f"ingest worker of {config} did not come online:\n{tail}")
            time.sleep(0.05)
        return workers, db

    def end(self, workers: list[Worker], db: str) -> None:
        for w in workers:
            w.stop()
        if db.startswith("postgresql://"):
            self.pg.execute(f"DROP DATABASE IF EXISTS {db.rsplit('/', 1)[1]} WITH (FORCE)")
        else:
            for suffix in ("", "-wal", "-shm"):
                Path(db + suffix).unlink(missing_ok=True)

    def throughput(self, config: str, profile: Path | None = None) -> dict[str, Any]:
        if config == "bare":
            return self._bare()
        workers, db = self.start_workers(config, profile)
        try:
            with StoreReader(db) as count:
                cpu0 = [w.cpu_s() for w in workers], self.pg.cpu_s(), self.broker.cpu_s()
                t0 = time.monotonic()
                published_s, _ = self.publish()
                stored, t_end = count.wait_for(self.total, t0 + RUN_DEADLINE_S, poll_s=0.02)
                cpu = sum(w.cpu_s() for w in workers) - sum(cpu0[0]), self.pg.cpu_s() - cpu0[1]
                broker_cpu = self.broker.cpu_s() - cpu0[2]
                disk = count.disk_bytes()
        finally:
            self.end(workers, db)
        seconds = t_end - t0
        out = {"stored": stored, "seconds": seconds, "rate": stored / seconds, "published_s": published_s}
        out["disk_bytes_per_result"] = disk / max(stored, 1)
        out["cpu_us_per_result"] = {
            "workers": cpu[0] / stored * 1e6,
            "postgresql": cpu[1] / stored * 1e6 if config.startswith("postgresql") else 0.0,
            "mosquitto": broker_cpu / stored * 1e6,
        }
        if stored < self.total:
            out["incomplete"] = f"only {stored} of {self.total} stored within {RUN_DEADLINE_S:.0f} s"
        return out

    def _bare(self) -> dict[str, Any]:
        script = Path(__file__).with_name("_bare_subscriber.py")
        cmd = [sys.executable, str(script), str(self.broker.port), str(self.total)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise SystemExit("the bare subscriber did not subscribe")
            broker0 = self.broker.cpu_s()
            t0 = time.monotonic()
            published_s, _ = self.publish()
            report = json.loads(proc.stdout.readline() or "{}")
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        n = report.get("results", 0)
        seconds = report.get("last", t0) - t0
        return {
            "stored": n,
            "seconds": seconds,
            "rate": n / seconds if seconds > 0 else 0.0,
            "published_s": published_s,
            "cpu_us_per_result": {
                "subscriber": report.get("cpu_s", 0.0) / max(n, 1) * 1e6,
                "mosquitto": (self.broker.cpu_s() - broker0) / max(n, 1) * 1e6,
            },
        }

    def latency(self, config: str, rate: float, limit_s: float) -> dict[str, Any]:
        """Publish paced at ``rate`` results/s; per message, publish -> its last result stored."""
        workers, db = self.start_workers(config)
        try:
            with StoreReader(db) as count:
                pace = rate / self.batch
                seen: dict[tuple[str, int], float] = {}
                stop = threading.Event()
                since = [time.time()]
                poller = threading.Thread(target=count.watch_last, args=(self.batch, since, seen, stop), daemon=True)
                poller.start()
                wall0 = time.time()
                _, at = self.publish(pace, limit_s)
                keys = [(t.split("/")[2], self._last_seq(i)) for i, (t, _, _) in enumerate(self.stream[: len(at)])]
                deadline = time.monotonic() + 60
                while len(seen) < len(keys) and time.monotonic() < deadline:
                    pending = [at[i] for i, k in enumerate(keys) if k not in seen]
                    since[0] = wall0 + (min(pending) - at[0]) - 0.05 if pending else since[0]
                    time.sleep(0.05)
                stop.set()
                poller.join(5)
        finally:
            self.end(workers, db)
        lat = [seen[k] - at[i] for i, k in enumerate(keys) if k in seen]
        return {
            "rate": rate,
            "messages": len(keys),
            "stored_messages": len(lat),
            "p50_s": percentile(lat, 50),
            "p95_s": percentile(lat, 95),
            "max_s": max(lat, default=float("nan")),
        }

    def _last_seq(self, index: int) -> int:
        devices = len({t for t, _, _ in self.stream})
        return (index // devices + 1) * self.batch - 1

    def close(self) -> None:
        self.publisher.disconnect()
        self.publisher.loop_stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=int, default=40_000, help="results in the stream (default 40000)")
    ap.add_argument("--batch", type=int, default=100, help="results per edgemed.batch/1 message (default 100)")
    ap.add_argument("--devices", type=int, default=20, help="devices (seq streams) in the stream (default 20)")
    ap.add_argument("--runs", type=int, default=3, help="throughput runs per configuration; medians (default 3)")
    ap.add_argument("--latency-s", type=float, default=8.0, help="length of each latency run (default 8 s; 0 = none)")
    ap.add_argument("--only", nargs="+", choices=CONFIGS, default=None, help="configurations to run (default all)")
    ap.add_argument("--profile", choices=CONFIGS[1:], default=None, help="one more run of CONFIG, profiled")
    args = ap.parse_args()
    if not 1 <= args.batch <= 1000 or not 1 <= args.devices <= 1000 or not 1 <= args.runs <= 20:
        ap.error("--batch must be 1-1000, --devices 1-1000 and --runs 1-20")
    messages = args.results // args.batch
    if args.results % (args.batch * args.devices) or not args.devices <= messages <= 1000:
        ap.error(
            "--results must be a multiple of --batch x --devices, in at most 1000 messages (mosquitto's default "
            "queue per client is 1,000 messages: a longer stream would be dropped by the broker, not measured)"
        )
    if not 0 <= args.latency_s <= 60:
        ap.error("--latency-s must be 0-60")
    configs = args.only or CONFIGS
    stream = batch_stream(args.devices, args.results, args.batch)
    size = sum(len(p) for _, p, _ in stream) / args.results
    print(f"stream: {args.results:,} results of {size:.0f} bytes, {messages} batches of {args.batch}", file=sys.stderr)
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    lat: dict[str, dict[str, Any]] = {}
    profile_text = ""
    with Broker() as broker, Postgres() as pg, tempfile.TemporaryDirectory(prefix="edgemed-bench-ingest-") as tmp:
        bench = Bench(broker, pg, Path(tmp), stream)
        try:
            for i in range(args.runs):
                for config in configs:
                    runs[config].append(bench.throughput(config))
                    r = runs[config][-1]
                    print(f"  run {i + 1}/{args.runs} {config}: {r['rate']:,.0f} results/s", file=sys.stderr)
            for config in configs:
                if config != "bare" and args.latency_s:
                    rate = median([r["rate"] for r in runs[config]]) / 2
                    lat[config] = bench.latency(config, rate, args.latency_s)
                    p95 = lat[config]["p95_s"] * 1e3
                    print(f"  latency {config} at {rate:,.0f}/s: p95 {p95:.0f} ms", file=sys.stderr)
            if args.profile:
                prof = Path(tmp) / "ingest.pstats"
                bench.throughput(args.profile, profile=prof)
                profile_text = top_functions(sorted(Path(tmp).glob("ingest-*.pstats")))
        finally:
            bench.close()
    text = table(configs, runs, lat, args.batch)
    medians = {c: median([r["rate"] for r in runs[c]]) for c in configs}
    incomplete = [r["incomplete"] for rs in runs.values() for r in rs if "incomplete" in r]
    _write(args, configs, runs, lat, medians, incomplete, text, size)
    print(text)
    if profile_text:
        (RESULTS_DIR / "ingest-profile.txt").write_text(profile_text)
        print(f"\nwhere the {args.profile} workers' CPU goes (per-thread CPU profile, by own time):\n{profile_text}")
    print("\n" + "\n".join(verdicts(medians, lat)))
    for problem in incomplete:
        print(f"incomplete run: {problem}", file=sys.stderr)
    return 1 if incomplete else 0


def _write(
    args: argparse.Namespace,
    configs: list[str],
    runs: dict[str, list[dict[str, Any]]],
    lat: dict[str, dict[str, Any]],
    medians: dict[str, float],
    incomplete: list[str],
    text: str,
    size: float,
) -> None:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpus": os.cpu_count(),
        # Other work on the machine takes CPU from every configuration alike (runs alternate): say how much.
        "load_average_1_5_15_at_end": [round(x, 2) for x in os.getloadavg()],
        "results": args.results,
        "batch": args.batch,
        "devices": args.devices,
        "result_bytes": round(size),
        "broker": "mosquitto, defaults (max_inflight_messages 20, max_queued_messages 1000, no persistence)",
        "postgresql": "15, defaults (fsync on, synchronous_commit on, shared_buffers 128MB, max_connections 100)",
    }
    data = {**meta, "configs": configs, "runs": runs, "median_rate": medians, "latency": lat}
    data["incomplete"] = incomplete
    (RESULTS_DIR / "ingest.json").write_text(json.dumps(data, indent=2) + "\n")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    head = f"`{meta['command']}` ({meta['when']}, {meta['cpus']} CPUs, load average at the end {load})"
    (RESULTS_DIR / "ingest.md").write_text(f"{head}\n\n{text}\n")


if __name__ == "__main__":
    sys.exit(main())
