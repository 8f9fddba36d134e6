"""``bench_runtime.py --screen``: what the nurse's screen (issue 15) and the class activation map cost a run.

Every measured configuration is a real ``edgemed run`` process on the same frames, delivery set-up and model as
``bench_runtime.py``'s own rows; the configurations of one comparison run interleaved (and in alternating order,
so drift on the shared machine hits both alike), and the summary is the median over ``--runs`` runs plus the
median of the per-run paired ratios:

* **screen off vs on**: the reference CNN; off is today's run, on is ``--screen`` with a real headless Chromium
  (``/usr/bin/chromium``, loopback only) showing the page, as the device's kiosk browser would. One Chromium
  serves all runs (started before them, so its start-up is not timed); it sits on ``about:blank`` during the off
  runs and its CPU is reported separately from edgemed's.
* **CAM off vs on**: the GAP model (the ``best`` recipe, converted with its feature-map output), both with the
  screen and the browser on, ``screen.class_map`` ``off`` vs ``cam``: the ``cam`` stage of each result (median over
  frames) against the frame's total, and the fps of both.
* **occlusion**: ``edgemed.cam.occlusion_map`` timed in a process of its own on real frames (``_screen_occlusion.py``),
  and the request-to-map time of ``POST /occlusion`` on a live run.

The rate is measured over a steady window, the same rule for every configuration: results created from
``WARMUP_S`` after the first one (and, with a browser, not before the page showed its first frame) to the last.
CPU comes from /proc, sampled every ``SAMPLE_S`` and interpolated at the window's ends.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from _common import ROOT, median, process_cpu_s
from _screen_browser import Browser

#: Results in the first second of a run are start-up (imports are done, caches and the page are not warm).
WARMUP_S = 1.0
#: How often the CPU of edgemed and of Chromium is read from /proc.
SAMPLE_S = 0.1
URL_LINE = re.compile(r"screen: (http://127\.0\.0\.1:\d+/)")
STAGES = ("capture", "quality", "preprocess", "inference", "ood", "cam", "triage", "total")


@dataclass(frozen=True)
class Config:
    """One measured configuration of ``edgemed run``."""

    name: str
    screen: bool
    class_map: str = "cam"  # screen.class_map; only matters for a model with a CAM
    # Who reads the page: "browser" (Chromium shows it) or "stream" (the bench reads /events and throws it away:
    # the device's own cost of encoding and sending frames, without a browser on the same cores).
    page: str = "browser"


def child_env() -> dict[str, str]:
    """The environment of the measured processes: this checkout's edgemed, whatever the working directory."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def write_profile(folder: Path, base: str, cfg: Config) -> Path:
    """The run's device profile: ``bench_runtime.py``'s (delivery, batching) plus the screen section."""
    path = folder / f"bench-screen-{cfg.name.replace(' ', '-')}.yaml"
    text = base
    if cfg.screen:
        # Quoted: YAML 1.1 reads a bare off as false.
        text += f'screen:\n  enabled: true\n  port: 0\n  class_map: "{cfg.class_map}"\n'
    path.write_text(text)
    return path


def _epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _at(samples: list[tuple[float, float, float]], t: float, col: int) -> float:
    """Column ``col`` of the samples, linearly interpolated at time ``t``."""
    for (t0, *a), (t1, *b) in itertools.pairwise(samples):
        if t0 <= t <= t1:
            return a[col - 1] + (b[col - 1] - a[col - 1]) * (t - t0) / max(t1 - t0, 1e-9)
    return (samples[0] if t < samples[0][0] else samples[-1])[col]


def one_run(
    model: Path,
    source: Path,
    loops: int,
    args: argparse.Namespace,
    setup: Any,
    profile: Path,
    cfg: Config,
    browser: Browser | None,
    extra: tuple[str, ...] = (),
) -> dict[str, Any]:
    """One ``edgemed run``; the browser (if any) is pointed at its screen as soon as the URL is logged."""
    data_dir = Path(tempfile.mkdtemp(prefix="edgemed-bench-screen-"))
    cmd = [sys.executable, "-m", "edgemed", "run", "--model", str(model), "--source", str(source)]
    cmd += ["--loop", str(loops), "--threads", str(args.threads), "--device-id", "bench"]
    cmd += ["--data-dir", str(data_dir), "--quiet", "--profile", str(profile), *extra]
    cmd += ["--broker", setup.broker.url] if setup.broker else []
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=child_env())
        err: list[str] = []
        url: list[str] = []
        got_url = threading.Event()

        def read_stderr() -> None:
            for line in proc.stderr:  # type: ignore[union-attr]
                err.append(line)
                if not url and (m := URL_LINE.search(line)):
                    url.append(m.group(1))
                    got_url.set()

        samples: list[tuple[float, float, float]] = []

        def sample() -> None:
            while proc.poll() is None:
                try:
                    samples.append((time.time(), process_cpu_s(proc.pid), browser.cpu_s() if browser else 0.0))
                except (OSError, IndexError):
                    break  # edgemed exited between poll() and the read
                time.sleep(SAMPLE_S)

        threads = [threading.Thread(target=read_stderr, daemon=True), threading.Thread(target=sample, daemon=True)]
        for t in threads:
            t.start()
        shown_at, stream, page, stream_from = None, None, None, 0
        if cfg.screen:
            deadline = time.monotonic() + 60
            while not got_url.wait(0.05):
                if time.monotonic() > deadline or proc.poll() is not None:
                    proc.kill()
                    raise RuntimeError(f"no screen URL on edgemed's stderr: {''.join(err)[-2000:]}")
            if cfg.page == "browser" and browser is not None:
                browser.open(url[0])
                shown: Any = browser.shown_seq
            else:
                from _screen_occlusion import PageClient  # it imports this module

                stream = PageClient(url[0])
                shown = stream.frames
            deadline = time.monotonic() + 60
            while not shown():
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the page showed no frame within 60 s (or the run ended first)")
                time.sleep(0.02)
            shown_at = time.time()
            if stream is not None:
                stream_from = len(stream.frames())
            elif browser is not None:
                browser.count_frames()
        code = proc.wait(args.run_timeout)
        for t in threads:
            t.join(10)
        if stream is not None:
            times = stream.frames()[stream_from:]
            page = {"n": len(times), "first": times[0] * 1e3, "last": times[-1] * 1e3} if times else None
            stream.close()
        elif shown_at is not None and browser is not None:
            page = browser.counted()
            browser.blank()
        if code not in ((0,) if setup.broker else (10,)):
            raise RuntimeError(f"edgemed run exited {code}: {''.join(err)[-2000:]}")
        rows = [json.loads(line) for line in (data_dir / "results.jsonl").read_text().splitlines()]
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    return {**summarise_run(rows, samples, shown_at, page), "loadavg_1m": os.getloadavg()[0]}


def summarise_run(
    rows: list[dict[str, Any]],
    samples: list[tuple[float, float, float]],
    shown_at: float | None,
    page: dict[str, Any] | None,
) -> dict[str, Any]:
    """Rate, stage medians and CPU of one run over its steady window (see the module docstring)."""
    stamps = [_epoch(r["created_at"]) for r in rows]
    start = max(stamps[0] + WARMUP_S, shown_at or 0.0)
    window = [(t, r) for t, r in zip(stamps, rows, strict=True) if t >= start]
    if len(window) < 30:
        raise RuntimeError(f"only {len(window)} results in the steady window: raise --frames")
    t_a, t_b = window[0][0], window[-1][0]
    frames = len(window) - 1  # frames completed between the window's first and last result
    stages = {k: median([r["latency_ms"][k] for _, r in window if k in r["latency_ms"]]) for k in STAGES}
    cam = [r["latency_ms"]["cam"] / r["latency_ms"]["total"] for _, r in window if "cam" in r["latency_ms"]]
    out: dict[str, Any] = {
        "frames": len(rows),
        "window_frames": len(window),
        "window_s": t_b - t_a,
        "fps": frames / (t_b - t_a),
        "stages_ms": stages,
        "cam_frames": len(cam),
        "cam_share": median(cam) if cam else None,
        "levels": sorted({r["triage"]["level"] for r in rows}),
        "run_cpu_ms_per_frame": (_at(samples, t_b, 1) - _at(samples, t_a, 1)) / frames * 1e3,
        "browser_cpu_pct_of_core": (_at(samples, t_b, 2) - _at(samples, t_a, 2)) / (t_b - t_a) * 100,
        "browser_cpu_ms_per_frame": (_at(samples, t_b, 2) - _at(samples, t_a, 2)) / frames * 1e3,
        "page_connected_after_first_result_s": None if shown_at is None else shown_at - stamps[0],
    }
    if page is not None and page.get("n", 0) > 1:
        out["page_frames"] = page["n"]
        out["page_fps"] = (page["n"] - 1) / ((page["last"] - page["first"]) / 1e3)
    return out


def compare(
    label: str,
    workload: str,
    model: Path,
    source: Path,
    per_loop: int,
    configs: tuple[Config, ...],
    args: argparse.Namespace,
    setup: Any,
    base_profile: str,
    folder: Path,
    browser: Browser,
) -> dict[str, Any]:
    """``configs[0]`` (the baseline) against the others (``configs[1]`` the one the summary's ratio is of),
    interleaved over ``--runs`` runs."""
    loops = math.ceil(args.frames / per_loop)
    runs: dict[str, list[dict[str, Any]]] = {c.name: [] for c in configs}
    for i in range(args.runs):
        for cfg in configs if i % 2 == 0 else configs[::-1]:  # alternate the order: drift hits both alike
            profile = write_profile(folder, base_profile, cfg)
            runs[cfg.name].append(one_run(model, source, loops, args, setup, profile, cfg, browser))
        b = runs[configs[1].name][-1]
        print(
            f"  {label} run {i + 1}/{args.runs}: "
            + ", ".join(f"{c.name} {runs[c.name][-1]['fps']:.1f} fps" for c in configs)
            + f"; browser {b['browser_cpu_pct_of_core']:.0f}% of a core"
            + (f", cam {b['stages_ms']['cam']:.3f} ms of {b['stages_ms']['total']:.3f}" if b["cam_frames"] else ""),
            file=sys.stderr,
        )
    base = runs[configs[0].name]
    paired_by = {c.name: [o["fps"] / b["fps"] for o, b in zip(runs[c.name], base, strict=True)] for c in configs[1:]}
    paired = paired_by[configs[1].name]

    def med(rs: list[dict[str, Any]], key: str) -> float | None:
        vals = [r[key] for r in rs if r.get(key) is not None]
        return median(vals) if vals else None

    summary = {
        c.name: {
            "fps": med(rs, "fps"),
            "run_cpu_ms_per_frame": med(rs, "run_cpu_ms_per_frame"),
            "browser_cpu_pct_of_core": med(rs, "browser_cpu_pct_of_core"),
            "browser_cpu_ms_per_frame": med(rs, "browser_cpu_ms_per_frame"),
            "page_fps": med(rs, "page_fps"),
            "cam_share": med(rs, "cam_share"),
            "stages_ms": {k: median([r["stages_ms"][k] for r in rs]) for k in STAGES},
        }
        for c in configs
        for rs in (runs[c.name],)
    }
    return {
        "comparison": label,
        "model": model.name,
        "workload": workload,
        "runs": args.runs,
        "configs": [c.__dict__ for c in configs],
        "summary": summary,
        "ratio": summary[configs[1].name]["fps"] / summary[configs[0].name]["fps"],  # type: ignore[operator]
        "paired_ratio": median(paired),
        "paired_ratios": paired,
        "paired_ratio_by_config": {name: median(rs) for name, rs in paired_by.items()},
        "per_run": runs,
    }


def _code_key() -> str:
    """A digest of what the GAP model is built from (converter, manifest code, training data), for its cache."""
    digest = hashlib.sha256()
    files = sorted((ROOT / "converters").glob("*.py")) + sorted((ROOT / "edgemed").glob("manifest*.py"))
    for path in [*files, ROOT / "data" / "breastmnist_28.npz"]:
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:12]


def gap_model(args: argparse.Namespace) -> Path:
    """The GAP model's int8 file: ``--gap``, else built once (``converters.testing.build_gap_model``, TensorFlow
    in a child process) into ``--gap-cache``, keyed on the converter's code and the data, and reused."""
    if args.gap is not None:
        return Path(args.gap).resolve()
    folder = args.gap_cache / f"gap-{_code_key()}"
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / "gap_model.json"
    if marker.is_file() and Path(json.loads(marker.read_text())["tflite"]).is_file():
        return Path(json.loads(marker.read_text())["tflite"])
    print(f"building the GAP model into {folder} (once; TensorFlow in a child process) ...", file=sys.stderr)
    code = (
        "import sys; from pathlib import Path; from converters.testing import build_gap_model; "
        "print(build_gap_model(Path(sys.argv[1])))"
    )
    env = {**child_env(), "KERAS_HOME": str(folder / "keras-home"), "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(folder)], capture_output=True, text=True, env=env, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"building the GAP model failed:\n{proc.stderr[-3000:]}")
    tflite = Path(proc.stdout.strip().splitlines()[-1]).resolve()
    marker.write_text(json.dumps({"tflite": str(tflite)}) + "\n")
    return tflite


def model_info(model: Path) -> dict[str, Any]:
    """What the report says of a model: its file, input and feature-map output (from its manifest)."""
    manifest = json.loads(next(model.parent.glob("*.manifest.json")).read_text())
    arts = manifest["artifacts"]
    art = next(a for a in (arts if isinstance(arts, list) else arts.values()) if a.get("file") == model.name)
    spec = manifest["input"]
    fmap = [o["shape"] for o in art.get("outputs", []) if o.get("role") == "feature_map"]
    return {
        "file": model.name,
        "input": f"{spec['height']}x{spec['width']} {spec['colour_mode']}",
        "feature_map": fmap[0] if fmap else None,
    }


def machine_load() -> dict[str, Any]:
    """How busy the machine was: load averages and the CPU count (other work on it shows up here)."""
    one, five, fifteen = os.getloadavg()
    return {"cpus": os.cpu_count(), "loadavg_1_5_15": [one, five, fifteen]}


def run_screen_bench(
    args: argparse.Namespace,
    setup: Any,
    base_profile: str,
    folder: Path,
    workloads: list[tuple[str, Path, int]],
    images: list[Path],
) -> dict[str, Any]:
    """All of ``--screen``: screen off vs on, CAM off vs on, occlusion (timed alone on ``images``); returns what
    goes to the JSON file."""
    from _screen_occlusion import live_occlusion, occlusion_alone

    reference = args.reference.resolve()
    gap = gap_model(args)
    load_before = machine_load()
    browser = Browser(folder)
    comparisons = []
    try:
        off, on = Config("screen off", screen=False), Config("screen on", screen=True)
        stream = Config("screen on, stream only", screen=True, page="stream")
        map_off, map_cam = Config("map off", screen=True, class_map="off"), Config("cam", screen=True)
        for name, source, per_loop in workloads:
            print(f"screen off vs on, reference CNN, {name} ...", file=sys.stderr)
            comparisons.append(
                compare(
                    f"screen, {name}",
                    name,
                    reference,
                    source,
                    per_loop,
                    (off, on, stream),
                    args,
                    setup,
                    base_profile,
                    folder,
                    browser,
                )
            )
            print(f"CAM off vs on (screen and browser on), GAP model, {name} ...", file=sys.stderr)
            comparisons.append(
                compare(
                    f"CAM, {name}",
                    name,
                    gap,
                    source,
                    per_loop,
                    (map_off, map_cam),
                    args,
                    setup,
                    base_profile,
                    folder,
                    browser,
                )
            )
    finally:
        browser.close()
    occlusion: dict[str, Any] = {}
    occ_profile = folder / "bench-occlusion.yaml"
    occ_profile.write_text("profile: bench-occlusion\ndevice:\n  id: bench\nscreen:\n  enabled: true\n  port: 0\n")
    for label, model in (("reference CNN", reference), ("GAP model", gap)):
        print(f"occlusion, {label} ...", file=sys.stderr)
        occlusion[label] = {
            "model": model.name,
            "alone": occlusion_alone(model, images, args.threads),
            "live": live_occlusion(model, workloads[0][1], args, occ_profile),
        }
    return {
        "frames": args.frames,
        "runs": args.runs,
        "threads": args.threads,
        "warmup_s": WARMUP_S,
        "models": {"reference CNN": model_info(reference), "GAP model": model_info(gap)},
        "machine_before": load_before,
        "machine_after": machine_load(),
        "comparisons": comparisons,
        "occlusion": occlusion,
    }
