"""The screen benchmark's own arithmetic (benchmarks/_screen_bench.py, _screen_report.py): cheap, no run, no browser.

The steady window, the rate over it, the CPU interpolated at its ends and the CAM share are what the published
numbers rest on, so they are checked here on results whose answers are known.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from _screen_bench import WARMUP_S, _at, summarise_run
from _screen_browser import process_tree
from _screen_report import markdown


def _row(t: float, total: float, cam: float | None = None) -> dict[str, Any]:
    stamp = datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    latency = {"capture": 1.0, "inference": total - 1.0 - (cam or 0.0), "total": total}
    if cam is not None:
        latency["cam"] = cam
    return {"created_at": stamp, "latency_ms": latency, "triage": {"level": "routine"}}


def test_rate_cpu_and_cam_share_over_the_steady_window() -> None:
    t0 = 1_700_000_000.0
    # 100 fps for 3 s; results in the first WARMUP_S second are start-up and must not count.
    rows = [_row(t0 + i / 100, total=5.0, cam=0.5) for i in range(300)]
    rows[:50] = [_row(t0 + i / 100, total=50.0) for i in range(50)]  # slow, CAM-less start: outside the window
    # edgemed uses 4 ms of CPU per frame (0.4 s per s), the browser 0.2 s per s.
    samples = [(t0 + k * 0.1, 10 + 0.4 * k * 0.1, 3 + 0.2 * k * 0.1) for k in range(40)]
    out = summarise_run(rows, samples, shown_at=None, page={"n": 31, "first": 0.0, "last": 2000.0})
    assert out["fps"] == pytest.approx(100, rel=0.02)
    assert out["window_frames"] == pytest.approx(300 - WARMUP_S * 100, abs=2)
    assert out["stages_ms"]["total"] == pytest.approx(5.0)
    assert out["cam_share"] == pytest.approx(0.1)
    assert out["run_cpu_ms_per_frame"] == pytest.approx(4.0, rel=0.02)
    assert out["browser_cpu_pct_of_core"] == pytest.approx(20.0, rel=0.02)
    assert out["page_fps"] == pytest.approx(15.0)


def test_the_window_waits_for_the_page() -> None:
    t0 = 1_700_000_000.0
    rows = [_row(t0 + i / 100, total=5.0) for i in range(400)]
    samples = [(t0 + k * 0.1, 0.0, 0.0) for k in range(50)]
    out = summarise_run(rows, samples, shown_at=t0 + 2.0, page=None)
    assert out["window_frames"] == pytest.approx(200, abs=2)
    assert out["cam_share"] is None and "page_fps" not in out


def test_too_short_a_window_is_an_error_not_a_number() -> None:
    t0 = 1_700_000_000.0
    rows = [_row(t0 + i / 100, total=5.0) for i in range(110)]
    with pytest.raises(RuntimeError, match="raise --frames"):
        summarise_run(rows, [(t0, 0.0, 0.0), (t0 + 2, 1.0, 1.0)], shown_at=None, page=None)


def test_interpolation_and_the_ends() -> None:
    samples = [(0.0, 0.0, 10.0), (1.0, 2.0, 20.0), (2.0, 2.0, 40.0)]
    assert _at(samples, 0.5, 1) == pytest.approx(1.0)
    assert _at(samples, 1.5, 2) == pytest.approx(30.0)
    assert _at(samples, -1.0, 1) == 0.0 and _at(samples, 5.0, 2) == 40.0


def test_process_tree_finds_a_grandchild() -> None:
    child = subprocess.Popen(["sh", "-c", "sleep 30 & wait"])
    tree = [child.pid]
    try:
        deadline = time.monotonic() + 10
        while len(tree) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
            tree = process_tree(child.pid)
        assert len(tree) == 2 and tree[0] == child.pid
    finally:
        for pid in reversed(tree):  # the sleep first, by its id, then the shell
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        child.wait(10)


def _comparison(name: str, a: str, b: str, fps: tuple[float, float], cam_share: float | None) -> dict[str, Any]:
    run = {"cam_frames": 10, "window_frames": 10, "loadavg_1m": 1.5}
    stages = {"cam": 0.1, "total": 1.0}

    def summary(f: float) -> dict[str, Any]:
        return {
            "fps": f,
            "run_cpu_ms_per_frame": 1.0,
            "browser_cpu_pct_of_core": 9.0,
            "browser_cpu_ms_per_frame": 0.5,
            "page_fps": 14.8,
            "cam_share": cam_share,
            "stages_ms": stages,
        }

    out = {
        "comparison": f"{name}, x", "workload": "ISIC", "ratio": fps[1] / fps[0], "paired_ratio": fps[1] / fps[0],
        "paired_ratios": [fps[1] / fps[0]], "summary": {a: summary(fps[0]), b: summary(fps[1])},
        "per_run": {a: [run], b: [run]}, "paired_ratio_by_config": {b: fps[1] / fps[0]},
    }  # fmt: skip
    if name == "screen":
        out["summary"]["screen on, stream only"] = summary(fps[1])
        out["paired_ratio_by_config"]["screen on, stream only"] = fps[1] / fps[0]
    return out


def test_report_states_the_command_and_whether_each_target_was_met() -> None:
    data = {
        "command": "python benchmarks/bench_runtime.py --reference r.tflite --screen",
        "frames": 1000, "runs": 3, "threads": 2, "delivery": "offline", "warmup_s": 1.0,
        "models": {"GAP model": {"file": "g.tflite", "input": "28x28 gray", "feature_map": [1, 7, 7, 64]}},
        "machine_before": {"cpus": 2, "loadavg_1_5_15": [0.5, 0.5, 0.5]},
        "machine_after": {"cpus": 2, "loadavg_1_5_15": [1.0, 1.0, 1.0]},
        "comparisons": [
            _comparison("screen", "screen off", "screen on", (200.0, 150.0), None),
            _comparison("CAM", "map off", "cam", (150.0, 140.0), 0.1),
        ],
        "occlusion": {"reference CNN": {"model": "r.tflite", "alone": None,
                                        "live": {"request_to_map_ms": 40.0, "all_ms": [40.0], "fps_cap": 30.0}}},
    }  # fmt: skip
    text = markdown(data)
    assert text.splitlines()[2] == f"Command: `{data['command']}`"
    assert "on/off 0.75 paired (>= 0.90): missed" in text
    assert "10.0% of the frame (< 20%): met" in text
    assert "| 150.0 (0.75) |" in text  # the stream-only column
    assert "GAP model `g.tflite` (28x28 gray, feature map 7x7x64)" in text
    assert "load average (1 min) 0.50 before, 1.50-1.50 after each run, 1.00 at the end. edgemed and Chromium" in text
