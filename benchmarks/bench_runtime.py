"""How much does `edgemed run` cost on top of the unavoidable work?

For each model and workload it runs, each in its own process (thread pools of different runtimes interfere when
they share one, STACK.md):

* **baseline**: a minimal loop that only reads, decodes, resizes, quantizes and invokes the same frames with the
  same model (LiteRT, same thread count), and nothing else;
* **bare invoke**: ``interpreter.invoke()`` alone on one preprocessed frame (the floor);
* **edgemed run**: the full device pipeline (capture, quality gate, preprocessing, inference, triage, envelope,
  durable outbox, QoS 1 publishing to a real mosquitto on a loopback port, with its default settings). By default
  with receipts on: the real dashboard runs beside it (``edgemed dashboard --consumer-id dashboard``, a child
  process) and the device's profile names it as consumer of record (``delivery.consumer: dashboard``) with
  ``publish.batch`` on, as the ultrasound cine example profile has it; a run ends once every result is receipted
  (exit 0). ``--no-consumer`` runs today's delivery (PUBACK releases); ``--batch off`` sends one result per
  message; ``--offline`` runs without any broker (results stay in the outbox, exit 10): what is left when
  publishing costs nothing, the bound of what batching can win.

It reports frames per second (median of ``--runs`` runs), the paired ratio to the baseline, steady-state CPU ms
per frame of edgemed run and of the baseline (each command also run on one pass of the source, to take start-up
out) and the framework's share beyond the baseline, the per-stage split of edgemed run, time from process start
to the first result, and peak RSS of each process. Results go to ``benchmarks/results/runtime.json`` (``--out``)
and a markdown table on stdout.

``--profile`` adds, per workload, one edgemed run with each Python thread's CPU sampled from /proc (no profiler
overhead: where the CPU per frame goes, by thread) and one under cProfile on every thread (which functions; the
profiler inflates small Python functions, so read its split as relative). Both are printed and saved beside the
JSON (``*-threads.json``, ``*.pstats``).

    python benchmarks/bench_runtime.py --reference out/reference_int8.tflite --mobile out/mobilenet_int8.tflite
    python benchmarks/bench_runtime.py --reference out/reference_int8.tflite --workload cine --profile
    python benchmarks/bench_runtime.py --reference out/reference_int8.tflite --workload cine --offline \
        --out benchmarks/results/runtime-offline.json

``--screen`` measures instead what the nurse's screen (issue 15) costs: the run with the screen off vs on with a
headless Chromium showing the page, the class activation map off vs on with the GAP model, and occlusion maps
(``benchmarks/_screen_bench.py``; ``benchmarks/results/screen.json`` and ``screen.md``):

    python benchmarks/bench_runtime.py --reference out/reference_int8.tflite --screen --runs 5 --frames 3000

Workloads: the 12 full-resolution ISIC dermoscopy JPEGs (``EDGEMED_DATA``/isic_samples, else the
repository's copy) looped to >= 1,000 frames, and the 30-frame ultrasound
cine DICOM (JPEG baseline; ``EDGEMED_DATA``/dicom/examples_ybr_color.dcm, default ../shared/data, else the
repository's copy) looped to >= 1,000 frames.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    ROOT,
    Dashboard,
    Mosquitto,
    cine_file,
    data_root,
    instrumented_cmd,
    median,
    temp_dir,
    top_functions,
)

BASELINE = r"""
import sys, time, json, os, resource
from pathlib import Path
import numpy as np, cv2
from ai_edge_litert.interpreter import Interpreter
model, source = sys.argv[1], Path(sys.argv[2])
loops, threads, height, width, channels = (int(v) for v in sys.argv[3:8])
itp = Interpreter(model_path=model, num_threads=threads)
itp.allocate_tensors()
inp, out = itp.get_input_details()[0], itp.get_output_details()[0]
scale, zp = inp["quantization"]
lut = np.clip(np.round(np.arange(256, dtype=np.float32) / 255.0 / scale) + zp, -128, 127).astype(inp["dtype"])
def frames():
    if source.is_dir():
        files = sorted(source.glob("*.jpg"))
        for _ in range(loops):
            for f in files:
                yield cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB)
    else:
        # The fastest decode known to us, the same as edgemed's for colour JPEG-baseline cine: each encapsulated
        # frame straight to libjpeg-turbo via OpenCV (pydicom + Pillow + a colour transform is 2.7x slower).
        import pydicom
        from pydicom.encaps import generate_frames
        for _ in range(loops):
            ds = pydicom.dcmread(source)
            for buf in generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)):
                bgr = cv2.imdecode(np.frombuffer(buf, np.uint8), cv2.IMREAD_COLOR)
                yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
t0 = time.perf_counter(); n = 0; first = None
for img in frames():
    if channels == 1:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    small = cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA)
    x = lut[small].reshape(1, height, width, channels)
    itp.set_tensor(inp["index"], x); itp.invoke(); _ = itp.get_tensor(out["index"])
    n += 1
    if first is None: first = time.perf_counter()
elapsed = time.perf_counter() - first
rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"frames": n, "fps": (n - 1) / elapsed, "rss_mb": rss_mb}))
"""

BARE = r"""
import sys, time, json, statistics
import numpy as np
from ai_edge_litert.interpreter import Interpreter
itp = Interpreter(model_path=sys.argv[1], num_threads=int(sys.argv[2])); itp.allocate_tensors()
inp = itp.get_input_details()[0]
itp.set_tensor(inp["index"], np.zeros(inp["shape"], inp["dtype"]))
for _ in range(50): itp.invoke()
ts = []
for _ in range(2000):
    t = time.perf_counter(); itp.invoke(); ts.append((time.perf_counter() - t) * 1e3)
print(json.dumps({"invoke_ms": statistics.median(ts)}))
"""


def run_child(code_or_args: list[str], ok: tuple[int, ...] = (0,)) -> tuple[str, float, float]:
    """Run a child process to completion; return its stdout, its peak RSS (MB) and its CPU seconds (wait4)."""
    # This checkout's edgemed, also when the benchmark is started from another directory (the venv may hold another).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(code_or_args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    out_chunks: list[str] = []
    err_chunks: list[str] = []
    t_out = threading.Thread(target=lambda: out_chunks.append(proc.stdout.read()))  # type: ignore[union-attr]
    t_err = threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()))  # type: ignore[union-attr]
    t_out.start()
    t_err.start()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    t_out.join()
    t_err.join()
    if proc.returncode not in ok:
        raise RuntimeError(f"{code_or_args[:4]} exited {proc.returncode}: {''.join(err_chunks)[-2000:]}")
    return "".join(out_chunks), usage.ru_maxrss / 1024.0, usage.ru_utime + usage.ru_stime


def _epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def model_input(model: Path) -> tuple[int, int, int]:
    manifest = json.loads(next(model.parent.glob("*.manifest.json")).read_text())
    spec = manifest["input"]
    return spec["height"], spec["width"], spec["channels"]


@dataclass
class Setup:
    """What runs beside `edgemed run`: a broker, the dashboard as consumer, and the profile that names it."""

    broker: Mosquitto | None
    dashboard: Dashboard | None
    profile: Path | None  # the device profile YAML (delivery.consumer, publish.batch); None = flags only

    def cpu_s(self) -> tuple[float, float]:
        return (
            self.broker.cpu_s() if self.broker else 0.0,
            self.dashboard.cpu_s() if self.dashboard else 0.0,
        )


def profile_text(*, consumer: bool, batch: bool) -> str:
    """The device profile of the benchmark's `edgemed run`: receipts from the dashboard, batching on or off."""
    text = "# written by benchmarks/bench_runtime.py\nprofile: bench-runtime\ndevice:\n  id: bench\n"
    if consumer:
        text += "delivery:\n  consumer: dashboard\n"
    return text + f"publish:\n  batch:\n    enabled: {'true' if batch else 'false'}\n"


def write_profile(folder: Path, *, consumer: bool, batch: bool) -> Path:
    path = folder / "bench-runtime.yaml"
    path.write_text(profile_text(consumer=consumer, batch=batch))
    return path


def edgemed_run(
    model: Path, source: Path, loops: int, threads: int, setup: Setup, instrument: tuple[str, Path] | None = None
) -> dict[str, Any]:
    """One `edgemed run` process; stage latencies come from the results it wrote to results.jsonl.

    ``instrument``: (mode, file) to run it under ``_common.instrumented_cmd`` (``--profile``).
    """
    data_dir = Path(tempfile.mkdtemp(prefix="edgemed-bench-"))
    try:
        start = time.time()
        broker_cpu0, dash_cpu0 = setup.cpu_s()
        args = ["run", "--model", str(model), "--source", str(source), "--loop", str(loops)]
        args += ["--threads", str(threads), "--device-id", "bench", "--data-dir", str(data_dir), "--quiet"]
        args += ["--profile", str(setup.profile)] if setup.profile else []
        args += ["--broker", setup.broker.url] if setup.broker else []
        cmd = instrumented_cmd(*instrument, args) if instrument else [sys.executable, "-m", "edgemed", *args]
        # Offline, results stay pending (exit 10); with a broker every one was acknowledged or receipted (0).
        _, rss, cpu_s = run_child(cmd, ok=(0,) if setup.broker else (10,))
        broker_cpu1, dash_cpu1 = setup.cpu_s()
        rows = [json.loads(line) for line in (data_dir / "results.jsonl").read_text().splitlines()]
        # Publishing runs off the inference thread, so its latency is not inside the envelope: it is the time from
        # a result's creation to the broker's PUBACK, which the outbox records for acknowledged results (in its
        # acknowledgement log, where this version of the outbox keeps one).
        acked: dict[str, float] = {}
        with contextlib.suppress(sqlite3.Error), sqlite3.connect(data_dir / "outbox.sqlite3") as db:
            acked = dict(db.execute("SELECT result_id, acked_at FROM acked").fetchall())
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    publish_ms = [(acked[r["result_id"]] - _epoch(r["created_at"])) * 1e3 for r in rows if r["result_id"] in acked]
    stamps = [_epoch(r["created_at"]) for r in rows]
    stages = {
        k: median([r["latency_ms"].get(k, 0.0) for r in rows])
        for k in ("capture", "quality", "preprocess", "inference", "triage", "total")
    }
    stages["publish"] = median(publish_ms) if publish_ms else float("nan")
    return {
        "frames": len(rows),
        "acked": len(publish_ms),
        "fps": (len(rows) - 1) / (stamps[-1] - stamps[0]),
        "rss_mb": rss,
        "cpu_s": cpu_s,
        "broker_cpu_s": broker_cpu1 - broker_cpu0,
        "dashboard_cpu_s": dash_cpu1 - dash_cpu0,
        "first_result_s": stamps[0] - start,
        "stages_ms": stages,
        "levels": sorted({r["triage"]["level"] for r in rows}),
    }


def bench(
    name: str, model: Path, source: Path, frames_per_loop: int, args: argparse.Namespace, setup: Setup
) -> dict[str, Any]:
    loops = math.ceil(args.frames / frames_per_loop)
    h, w, c = model_input(model)
    base_runs, run_runs = [], []
    cpu_base, cpu_run, cpu_broker, cpu_dash = [], [], [], []

    def baseline(n_loops: int) -> dict[str, Any]:
        argv = [str(model), str(source), str(n_loops), str(args.threads), str(h), str(w), str(c)]
        out, rss, cpu_s = run_child([sys.executable, "-c", BASELINE, *argv])
        return {**json.loads(out), "rss_mb": rss, "cpu_s": cpu_s}

    for i in range(args.runs):  # interleaved, so drift on a shared machine hits both alike
        base_runs.append(baseline(loops))
        run_runs.append(edgemed_run(model, source, loops, args.threads, setup))
        # CPU per frame in the steady state: the same command on one pass of the source tells start-up apart
        # (imports, model load, broker connect), so (CPU of the long run - CPU of the short) / (frame difference).
        short_base = baseline(1)
        short_run = edgemed_run(model, source, 1, args.threads, setup)
        extra = run_runs[-1]["frames"] - short_run["frames"]
        cpu_base.append((base_runs[-1]["cpu_s"] - short_base["cpu_s"]) / extra * 1e3)
        cpu_run.append((run_runs[-1]["cpu_s"] - short_run["cpu_s"]) / extra * 1e3)
        cpu_broker.append((run_runs[-1]["broker_cpu_s"] - short_run["broker_cpu_s"]) / extra * 1e3)
        cpu_dash.append((run_runs[-1]["dashboard_cpu_s"] - short_run["dashboard_cpu_s"]) / extra * 1e3)
        print(
            f"  {name} run {i + 1}/{args.runs}: baseline {base_runs[-1]['fps']:.1f} fps, "
            f"edgemed run {run_runs[-1]['fps']:.1f} fps, CPU ms/frame {cpu_base[-1]:.2f} / {cpu_run[-1]:.2f}",
            file=sys.stderr,
        )
    out, _, _ = run_child([sys.executable, "-c", BARE, str(model), str(args.threads)])
    base_fps = median([r["fps"] for r in base_runs])
    run_fps = median([r["fps"] for r in run_runs])
    return {
        "workload": name,
        "model": model.name,
        "frames": run_runs[0]["frames"],
        "runs": args.runs,
        "baseline_fps": base_fps,
        "run_fps": run_fps,
        "ratio": run_fps / base_fps,
        # The machine's speed drifts between runs (a shared VM): each edgemed run against the baseline run just
        # before it is the steadier comparison.
        "paired_ratio": median([r["fps"] / b["fps"] for r, b in zip(run_runs, base_runs, strict=True)]),
        "paired_ratios": [r["fps"] / b["fps"] for r, b in zip(run_runs, base_runs, strict=True)],
        "per_run_fps": [[b["fps"], r["fps"]] for r, b in zip(run_runs, base_runs, strict=True)],
        "bare_invoke_ms": json.loads(out)["invoke_ms"],
        "run_stages_ms": {k: median([r["stages_ms"][k] for r in run_runs]) for k in run_runs[0]["stages_ms"]},
        "run_first_result_s": median([r["first_result_s"] for r in run_runs]),
        "run_peak_rss_mb": max(r["rss_mb"] for r in run_runs),
        "baseline_peak_rss_mb": max(r["rss_mb"] for r in base_runs),
        "levels": run_runs[0]["levels"],
        # The yardstick for the framework's own cost: CPU it spends per frame beyond the baseline's.
        "cpu_ms_per_frame": {
            "baseline": median(cpu_base),
            "run": median(cpu_run),
            "broker": median(cpu_broker),
            "dashboard": median(cpu_dash),
            "framework_share": median([(r - b) / b for r, b in zip(cpu_run, cpu_base, strict=True)]),
            "framework_ms": median([r - b for r, b in zip(cpu_run, cpu_base, strict=True)]),
        },
    }


# Where the CPU of a run goes, by stage: the inclusive (cumulative) CPU time of each stage's entry points in the
# thread-CPU cProfile (--profile). The stages do not overlap; what no stage covers is "the rest" (the run loop,
# start-up, imports). Keys: (path suffix of the file, function name).
_STAGES: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("capture thread: read + decode + pacing", (("capture/prefetch.py", "produce"),)),
    ("quality gate", (("edgemed/quality.py", "check_quality"),)),
    ("gray conversion for gate + model", (("edgemed/preprocess.py", "to_colour_mode"),)),
    ("preprocess", (("edgemed/preprocess.py", "__call__"),)),
    ("inference (invoke)", (("inference/backends.py", "invoke"),)),
    ("scores + triage", (("inference/classify.py", "scores"), ("edgemed/triage.py", "triage"))),
    (
        "envelope + result id + encode",
        (
            ("edgemed/envelope.py", "result_envelope"),
            ("edgemed/envelope.py", "encode"),
            ("edgemed/envelope.py", "new_result_id"),
        ),
    ),
    ("outbox put (producer side)", (("outbox", "put"), ("outbox", "next_seq"), ("outbox", "is_full"))),
    ("outbox commit thread", (("outbox", "_commit_loop"),)),
    ("delivery thread (publish, acks, receipts)", (("publish/delivery.py", "_run"),)),
    ("MQTT network thread (paho)", (("publish/mqtt.py", "_run"),)),
    ("heartbeat thread", (("edgemed/uplink.py", "_heartbeat_loop"),)),
    (
        "sessions, results.jsonl, health, printer",
        (
            ("edgemed/sessions.py", "add"),
            ("edgemed/sessions.py", "before"),
            ("edgemed/local_copy.py", "append"),
            ("edgemed/health.py", "record"),
            ("edgemed/summary.py", "add"),
        ),
    ),
)


def stage_split(stats_file: Path) -> dict[str, float]:
    """CPU seconds per stage (``_STAGES``) of a thread-CPU profile, plus ``total`` and ``the rest``."""
    import pstats

    st = pstats.Stats(str(stats_file))
    entries = st.stats  # type: ignore[attr-defined]
    out: dict[str, float] = {}
    for label, keys in _STAGES:
        out[label] = sum(
            cum
            for (filename, _line, func), (_cc, _nc, _tt, cum, _callers) in entries.items()
            if any(func == name and part in filename.replace("\\", "/") for part, name in keys)
        )
    total = float(st.total_tt)  # type: ignore[attr-defined]
    out["the rest (run loop, start-up, imports)"] = total - sum(out.values())
    out["total"] = total
    return out


def thread_cpu(model: Path, source: Path, loops: int, args: argparse.Namespace, setup: Setup, out: Path) -> Any:
    """CPU seconds by thread name of one instrumented run, and its frame count."""
    run = edgemed_run(model, source, loops, args.threads, setup, ("threads", out))
    sampled = json.loads(out.read_text())
    by_thread: dict[str, float] = {}
    for key, cpu in sampled["threads"].items():
        label = key.split("#")[0]
        if label != "bench-sampler":
            by_thread[label] = by_thread.get(label, 0.0) + cpu
    by_thread["native threads (LiteRT workers, sqlite, other C)"] = sampled["process"] - sum(by_thread.values())
    return run["frames"], by_thread


def profile_runs(
    name: str, model: Path, source: Path, frames_per_loop: int, args: argparse.Namespace, setup: Setup
) -> dict[str, Any]:
    """Steady-state CPU per frame by thread (sampled, no profiler), and cProfiles of the run (``--profile``):
    wall clock (the main thread's is the critical path of the frame rate) and thread CPU (where the CPU goes)."""
    loops = math.ceil(args.frames / frames_per_loop)
    stem = f"{args.out.with_suffix('')}-{name.split()[0].lower()}"
    frames_long, long = thread_cpu(model, source, loops, args, setup, Path(f"{stem}-threads.json"))
    frames_short, short = thread_cpu(model, source, 1, args, setup, Path(f"{stem}-threads-short.json"))
    per_frame = {
        k: (v - short.get(k, 0.0)) / (frames_long - frames_short) * 1e3
        for k, v in sorted(long.items(), key=lambda kv: -kv[1])
    }
    Path(f"{stem}-threads.json").write_text(json.dumps({"steady_cpu_ms_per_frame": per_frame}, indent=2) + "\n")
    Path(f"{stem}-threads-short.json").unlink()
    wall, cpu = Path(f"{stem}-wall.pstats"), Path(f"{stem}-cpu.pstats")
    edgemed_run(model, source, loops, args.threads, setup, ("cprofile", wall))
    edgemed_run(model, source, loops, args.threads, setup, ("cprofile-cpu", cpu))
    stages = stage_split(cpu)
    main_wall = Path(str(wall).removesuffix(".pstats") + "-main.pstats")
    return {
        "frames": frames_long,
        "steady_cpu_ms_per_frame_by_thread": per_frame,
        "cprofile_cpu_ms_per_frame_by_stage": {k: v / frames_long * 1e3 for k, v in stages.items()},
        "files": [os.path.relpath(p, ROOT) for p in (Path(f"{stem}-threads.json"), wall, main_wall, cpu)],
        "top_cpu": top_functions(cpu, 30),
        "top_main_thread_wall": top_functions(main_wall, 30),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, required=True, help="int8 reference CNN (.tflite + manifest)")
    parser.add_argument("--mobile", type=Path, help="int8 compact mobile model (.tflite + manifest)")
    parser.add_argument("--frames", type=int, default=1000, help="frames per workload (default 1000)")
    parser.add_argument("--runs", type=int, default=5, help="runs per configuration; medians are reported")
    parser.add_argument("--threads", type=int, default=2, help="interpreter threads (default 2)")
    parser.add_argument(
        "--workload", choices=("all", "isic", "cine"), default="all", help="which workload(s) to run (default all)"
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--offline",
        action="store_true",
        help="run edgemed without a broker (results stay in the outbox): shows what publishing costs",
    )
    mode.add_argument(
        "--no-consumer",
        action="store_true",
        help="no dashboard and no delivery.consumer: a PUBACK releases a result (the behaviour before receipts)",
    )
    parser.add_argument(
        "--batch", choices=("on", "off"), default="on", help="publish.batch in the device profile (default on)"
    )
    parser.add_argument("--profile", action="store_true", help="add a per-thread CPU run and a cProfile run")
    screen = parser.add_argument_group("the nurse's screen (--screen; benchmarks/_screen_bench.py)")
    screen.add_argument(
        "--screen",
        action="store_true",
        help="instead: screen off vs on with headless Chromium on the page, CAM off vs on, occlusion (screen.json)",
    )
    screen.add_argument("--gap", type=Path, help="int8 GAP model with a CAM (default: built once into --gap-cache)")
    screen.add_argument("--gap-cache", type=Path, default=Path("/work/bench-cache/screen"), help="GAP model cache")
    screen.add_argument("--run-timeout", type=float, default=600, help="longest one run may take, s (default 600)")
    parser.add_argument("--out", type=Path, help="results JSON (default results/runtime.json, --screen: screen.json)")
    args = parser.parse_args()
    if not 30 <= args.frames <= 100_000 or not 1 <= args.runs <= 20:
        parser.error("--frames must be 30-100000 and --runs 1-20")
    if args.screen and (args.mobile or args.profile):
        parser.error("--screen measures the reference CNN and the GAP model: leave out --mobile and --profile")
    default_out = ROOT / "benchmarks" / "results" / ("screen.json" if args.screen else "runtime.json")
    args.out = (args.out or default_out).resolve()

    jpegs = isic_dir()
    models = [("reference CNN", args.reference)] + ([("compact mobile", args.mobile)] if args.mobile else [])
    rows, profiles = [], []
    with temp_dir("edgemed-cine-") as folder, contextlib.ExitStack() as stack:
        cine = folder / "cine.dcm"
        shutil.copy(cine_file(), cine)
        consumer = not (args.offline or args.no_consumer)
        broker = None if args.offline else stack.enter_context(Mosquitto(defaults=True))
        dash = stack.enter_context(Dashboard(broker.url, folder / "fleet.sqlite3")) if broker and consumer else None
        profile = None if args.offline else write_profile(folder, consumer=consumer, batch=args.batch == "on")
        setup = Setup(broker, dash, profile)
        if args.screen:
            return screen_main(args, setup, profile_text(consumer=consumer, batch=args.batch == "on"), folder, cine)
        for label, model in models:
            workloads = [("isic", "ISIC JPEG 722-1504 px", jpegs, 12), ("cine", "US cine DICOM 30 fr", cine, 30)]
            for key, wname, source, per_loop in workloads:
                if args.workload not in ("all", key):
                    continue
                print(f"benchmarking {label} on {wname} ...", file=sys.stderr)
                row = bench(wname, model, source, per_loop, args, setup)
                rows.append({"model_kind": label, **row})
                if args.profile:
                    profiles.append(
                        {
                            "model_kind": label,
                            "workload": wname,
                            **profile_runs(f"{key} {label}", model, source, per_loop, args, setup),
                        }
                    )
    delivery = "offline" if args.offline else ("receipts" if consumer else "PUBACK") + f", batch {args.batch}"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python benchmarks/bench_runtime.py " + " ".join(sys.argv[1:]), "delivery": delivery}
    out = {**meta, "threads": args.threads, "rows": rows, "profiles": profiles}
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print_table(rows, profiles, delivery)
    return 0


def isic_dir() -> Path:
    """The 12 ISIC dermoscopy JPEGs: from the data folder (``EDGEMED_DATA``) when present, else the repository's."""
    shared = data_root() / "isic_samples"
    return shared if any(shared.glob("*.jpg")) else ROOT / "data" / "isic_samples"


def screen_main(args: argparse.Namespace, setup: Setup, base_profile: str, folder: Path, cine: Path) -> int:
    """``--screen``: the screen's and the CAM's cost (``_screen_bench.py``), to screen.json and screen.md."""
    from _screen_bench import run_screen_bench
    from _screen_report import markdown

    workloads = [("ISIC dermoscopy JPEGs", isic_dir(), 12), ("US cine DICOM 30 fr", cine, 30)]
    keys = {"ISIC dermoscopy JPEGs": "isic", "US cine DICOM 30 fr": "cine"}
    chosen = [w for w in workloads if args.workload in ("all", keys[w[0]])]
    delivery = "offline" if args.offline else ("receipts" if setup.dashboard else "PUBACK") + f", batch {args.batch}"
    data = run_screen_bench(args, setup, base_profile, folder, chosen, sorted(isic_dir().glob("*.jpg"))[:3])
    data = {"command": "python benchmarks/bench_runtime.py " + " ".join(sys.argv[1:]), "delivery": delivery, **data}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    text = markdown(data)
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


def print_table(rows: list[dict[str, Any]], profiles: list[dict[str, Any]], delivery: str) -> None:
    print(f"delivery: {delivery}\n")
    print(
        "| model | workload | frames | baseline fps | edgemed run fps | ratio (paired) | capture / quality / "
        "preprocess / inference / triage / publish (to PUBACK) ms | first result s | peak RSS MB (run / baseline) "
        "| bare invoke ms "
        "| CPU ms/frame baseline / run (+ broker, + dashboard) | framework CPU share |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        s = r["run_stages_ms"]
        cpu = r["cpu_ms_per_frame"]
        print(
            f"| {r['model_kind']} | {r['workload']} | {r['frames']} | {r['baseline_fps']:.1f} | "
            f"{r['run_fps']:.1f} | {r['ratio']:.2f} ({r['paired_ratio']:.2f}) | "
            f"{s['capture']:.2f} / {s['quality']:.2f} / {s['preprocess']:.2f} / {s['inference']:.3f} / "
            f"{s['triage']:.3f} / {s['publish']:.1f} | "
            f"{r['run_first_result_s']:.2f} | "
            f"{r['run_peak_rss_mb']:.0f} / {r['baseline_peak_rss_mb']:.0f} | {r['bare_invoke_ms']:.3f} | "
            f"{cpu['baseline']:.2f} / {cpu['run']:.2f} (+ {cpu['broker']:.3f}, + {cpu['dashboard']:.3f}) | "
            f"{cpu['framework_share']:+.0%} |"
        )
    for r in rows:
        print(
            f"\n{r['model_kind']}, {r['workload']}: paired ratios " + ", ".join(f"{x:.2f}" for x in r["paired_ratios"])
        )
    for p in profiles:
        print(f"\nprofile of {p['model_kind']} on {p['workload']} ({', '.join(p['files'])}):")
        print("steady-state CPU ms per frame by thread (sampled from /proc, no profiler):")
        for k, v in p["steady_cpu_ms_per_frame_by_thread"].items():
            print(f"  {k:50s} {v:6.3f}")
        print("cProfile (thread CPU clock; the profiler inflates Python-heavy stages), CPU ms per frame by stage:")
        for k, v in p["cprofile_cpu_ms_per_frame_by_stage"].items():
            print(f"  {k:50s} {v:6.3f}")
        print("cProfile, thread CPU clock, all threads:")
        print(p["top_cpu"])
        print("cProfile, wall clock, main (inference) thread: where a frame waits")
        print(p["top_main_thread_wall"])


if __name__ == "__main__":
    sys.exit(main())
