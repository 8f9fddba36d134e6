"""Device health: the periodic heartbeat published on ``edgemed/{site}/{device_id}/health``.

The monitor is fed by the runtime thread (one call per frame) and read by the heartbeat timer; a lock keeps the
two consistent. Latency percentiles are over a sliding window so a long-running device reports its present state.

A heartbeat (schema ``edgemed.health/1``) holds what the monitor measures itself: ``uptime_s``, ``frames``,
``errors``, ``recaptures``, ``fps``, ``latency_ms`` (``p50``, ``p95``), ``disk_free_mb``, ``cpu_temp_c``,
``cpu_percent`` and ``peak_rss_mb``; and what the runtime adds (``Device.health_payload``): ``device_id``,
``site``, ``delegate``, ``degraded``, ``degraded_reason``, ``pending`` and ``oldest_pending_s`` (results in the
outbox not yet acknowledged by the broker), ``awaiting_receipt`` and ``oldest_awaiting_s`` (results the broker
acknowledged that wait for the consumer's receipt; seconds since the oldest was acknowledged; null when none),
``consumer_online`` (only when the profile names a consumer of record), ``outbox_full``, ``source_state``
(``edgemed.capture.FrameSource``; ``idle`` before a source is open), ``connected``, ``source_reconnects`` (times a
stream or camera lost its connection and began reconnecting) and ``evicted_total`` (results deleted at the outbox
cap by ``on_full: evict_oldest`` since the run started).
"""

from __future__ import annotations

import glob
import shutil
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

HEALTH_SCHEMA = "edgemed.health/1"


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    pos = min(len(ordered) - 1, max(0, round(q / 100.0 * (len(ordered) - 1))))
    return ordered[pos]


def cpu_temperature_c() -> float | None:
    """Hottest thermal zone in degrees Celsius, or None where the system exposes none (containers, VMs)."""
    temps: list[float] = []
    for path in glob.glob("/sys/class/thermal/thermal_zone*/temp"):
        try:
            temps.append(int(Path(path).read_text().strip()) / 1000.0)
        except (OSError, ValueError):
            continue
    return max(temps) if temps else None


def _vm_hwm_mb() -> float | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:  # not Linux, or no procfs
        return None
    for line in status.splitlines():
        fields = line.split()
        if fields[:1] == ["VmHWM:"] and len(fields) >= 2 and fields[1].isdigit():
            return round(int(fields[1]) / 1024, 1)  # kB
    return None


def peak_rss_mb() -> float | None:
    """This process's peak resident memory in MB (what a device's memory budget must cover); None if unknown.

    Linux: ``VmHWM`` of this process image. ``getrusage``'s ``ru_maxrss`` is not used there because it survives
    fork and exec: a device runtime started by a large parent process would report the parent's peak.
    """
    hwm = _vm_hwm_mb()
    if hwm is not None:
        return hwm
    try:
        import resource
    except ImportError:  # Windows: the dashboard may run there; devices are Linux
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024, 1)  # bytes on macOS, else KiB


class HealthMonitor:
    """Counts frames and latencies and renders heartbeat payloads."""

    def __init__(self, window: int = 1000) -> None:
        self.started = time.monotonic()
        # CPU use between heartbeats: on a battery-powered probe or a fanless box the fleet team wants to see a
        # device that works harder than its frame rate explains (a fallback to CPU, a stuck loop, throttling).
        self._cpu_mark = (time.monotonic(), time.process_time())
        self._lock = threading.Lock()
        self._latencies: deque[float] = deque(maxlen=window)
        self._stamps: deque[float] = deque(maxlen=window)
        self.frames = 0
        self.errors = 0
        self.recaptures = 0

    def record(self, total_ms: float, level: str) -> None:
        """Account for one finished frame."""
        with self._lock:
            self.frames += 1
            self._latencies.append(total_ms)
            self._stamps.append(time.monotonic())
            if level == "error":
                self.errors += 1
            elif level == "recapture":
                self.recaptures += 1

    def fps(self) -> float:
        """Frames per second over the sliding window."""
        with self._lock:
            if len(self._stamps) < 2:
                return 0.0
            span = self._stamps[-1] - self._stamps[0]
            return (len(self._stamps) - 1) / span if span > 0 else 0.0

    def snapshot(self, **state: Any) -> dict[str, Any]:
        """A heartbeat payload; ``state`` adds what the monitor cannot know (delegate, pending, source state).

        ``data_dir`` in ``state`` is used to measure free disk space and is not published itself.
        """
        data_dir = state.pop("data_dir", None)
        with self._lock:
            lat = list(self._latencies)
            frames, errors, recaptures = self.frames, self.errors, self.recaptures
        disk_free_mb = None
        if data_dir is not None:
            disk_free_mb = round(shutil.disk_usage(data_dir).free / 1e6, 1)
        p50, p95 = _percentile(lat, 50), _percentile(lat, 95)
        return {
            "schema": HEALTH_SCHEMA,
            "uptime_s": round(time.monotonic() - self.started, 1),
            "frames": frames,
            "errors": errors,
            "recaptures": recaptures,
            "fps": round(self.fps(), 2),
            "latency_ms": {
                "p50": None if p50 is None else round(p50, 3),
                "p95": None if p95 is None else round(p95, 3),
            },
            "disk_free_mb": disk_free_mb,
            "cpu_temp_c": cpu_temperature_c(),
            "cpu_percent": self._cpu_percent(),
            "peak_rss_mb": peak_rss_mb(),
            **state,
        }

    def _cpu_percent(self) -> float | None:
        """CPU used by this process since the previous heartbeat, in percent of one core (200 = two cores busy)."""
        now, cpu = time.monotonic(), time.process_time()
        with self._lock:
            (then, cpu_then), self._cpu_mark = self._cpu_mark, (now, cpu)
        if now - then < 0.05:
            return None  # too short an interval to mean anything
        return round(100.0 * (cpu - cpu_then) / (now - then), 1)
