"""Helpers shared by the benchmark scripts: data location, a loopback mosquitto, the real dashboard as a child
process, per-thread profiling, CPU accounting, medians and the results folder.

Every server here listens on 127.0.0.1 only, on a free port, and is stopped by its own process id (the dashboard
by its own process group) when the ``with`` block ends, also after an error or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import cProfile
import io
import json
import os
import pstats
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def data_root() -> Path:
    """Larger data sets: ``$EDGEMED_DATA`` or ``../shared/data`` beside the repository."""
    return Path(os.environ.get("EDGEMED_DATA", ROOT.parent / "shared" / "data")).resolve()


def cine_file() -> Path:
    """The 30-frame JPEG-baseline ultrasound cine: from the data folder when present, else the repository's copy."""
    shared = data_root() / "dicom" / "examples_ybr_color.dcm"
    return shared if shared.exists() else ROOT / "data" / "dicom" / "examples_ybr_color.dcm"


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation between the closest ranks."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) a running process has used so far, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def write_results(name: str, data: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/NAME.json`` (with the command line and the time it ran) and return its path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    meta = {
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpus": os.cpu_count(),
    }
    path.write_text(json.dumps({**meta, **data}, indent=2) + "\n")
    return path


def result_payload(site: str, device_id: str, seq: int, stream: str | None = None) -> tuple[str, bytes]:
    """A valid ``edgemed.result/1`` envelope of about the size of a real one (950 bytes of compact JSON).

    Returns:
        Its result id and its bytes.
    """
    rid = uuid.uuid4().hex
    head: dict[str, Any] = {"schema": "edgemed.result/1", "result_id": rid, "seq": seq, "device_id": device_id}
    if stream is not None:
        head["stream"] = stream
    body = {
        **head,
        "site": site,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
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


class Mosquitto:
    """A real mosquitto on a free 127.0.0.1 port for the duration of a benchmark (stopped by PID).

    ``defaults=True`` keeps every mosquitto default that shapes delivery (``max_inflight_messages`` 20,
    ``max_queued_messages`` 1000, no persistence): only the listener and anonymous access are configured, as a
    hospital's broker out of the box. ``defaults=False`` lifts the queue and in-flight limits (the older
    benchmarks' setting, kept for ``bench_runtime.py``'s comparability with its earlier figures). ``extra``: more
    configuration lines, appended.
    """

    def __init__(self, *, defaults: bool = False, extra: tuple[str, ...] = ()) -> None:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(exe).exists():
            raise SystemExit("mosquitto is not installed: sudo apt-get install -y mosquitto")
        self.exe = exe
        self.defaults = defaults
        self.extra = extra
        self.port = free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self.dir = Path(tempfile.mkdtemp(prefix="edgemed-bench-broker-"))

    def __enter__(self) -> Mosquitto:
        conf = self.dir / "mosquitto.conf"
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous true"]
        if os.geteuid() == 0:
            lines.append("user root")  # run as root, mosquitto would switch to a user that may not exist here
        if not self.defaults:
            lines += ["max_queued_messages 100000", "max_inflight_messages 0"]
        lines += list(self.extra)
        conf.write_text("\n".join(lines) + "\n")
        self.proc = subprocess.Popen([self.exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.__exit__()
        raise SystemExit("mosquitto did not start within 10 s")

    def cpu_s(self) -> float:
        return process_cpu_s(self.proc.pid)

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


# Runs an `edgemed` command in this interpreter, instrumented (only for --profile): "cprofile" / "cprofile-cpu" put
# every thread under its own cProfile (wall clock / thread CPU clock) and write the merged stats at exit (and the
# main thread's alone beside them); "threads" samples each Python thread's CPU time
# from /proc every 20 ms (no profiler overhead) and writes {thread name: CPU s} plus the process total as JSON.
# SIGINT/SIGTERM stop edgemed cleanly, so the file is written also for the dashboard.
_INSTRUMENTED = r"""
import json, os, sys, threading, time
sys.path.insert(0, sys.argv.pop(1))
mode, out = sys.argv.pop(1), sys.argv.pop(1)
from _common import ThreadProfiler, thread_cpu_s
from edgemed.cli import main
if mode.startswith("cprofile"):
    with ThreadProfiler(cpu=mode == "cprofile-cpu") as prof:
        code = main(sys.argv[1:])
    prof.dump(out)
else:
    seen, done = {}, threading.Event()
    def sample():
        while not done.wait(0.02):
            for t in threading.enumerate():
                cpu = thread_cpu_s(t.native_id)
                if cpu is not None:
                    seen[f"{t.name}#{t.native_id}"] = cpu
    threading.Thread(target=sample, name="bench-sampler", daemon=True).start()
    code = main(sys.argv[1:])
    done.set()
    t = os.times()
    json.dump({"threads": seen, "process": t.user + t.system}, open(out, "w"))
sys.exit(code)
"""


def instrumented_cmd(mode: str, out: Path, edgemed_args: list[str]) -> list[str]:
    """The command line that runs ``edgemed EDGEMED_ARGS`` instrumented (``mode``: ``cprofile``, ``cprofile-cpu``
    or ``threads``)."""
    return [sys.executable, "-c", _INSTRUMENTED, str(Path(__file__).parent), mode, str(out), *edgemed_args]


def thread_cpu_s(native_id: int | None) -> float | None:
    """CPU seconds one thread of this process has used, from /proc (None once it has ended)."""
    if native_id is None:
        return None
    try:
        fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Dashboard:
    """The real ``edgemed dashboard`` (ingest, store and page) as a child process on a loopback broker.

    Args:
        broker_url: the broker it subscribes to.
        db: its SQLite file.
        consumer_id: ``--consumer-id`` (the consumer of record the devices name); None leaves the option out.
        profile_to: run it under ``ThreadProfiler(cpu=True)`` and write the merged profile there (pstats format).
        wrapper: a command the dashboard runs under (``strace ...``); its CPU is then the wrapper's, not counted.
    """

    def __init__(
        self,
        broker_url: str,
        db: Path,
        *,
        consumer_id: str | None = "dashboard",
        profile_to: Path | None = None,
        wrapper: tuple[str, ...] = (),
    ) -> None:
        self.broker_url, self.db, self.consumer_id, self.profile_to = broker_url, db, consumer_id, profile_to
        self.wrapper = wrapper
        self.port = free_port()
        self.log = db.with_suffix(".log")

    def __enter__(self) -> Dashboard:
        args = ["dashboard", "--broker", self.broker_url, "--db", str(self.db), "--port", str(self.port)]
        if self.consumer_id is not None:  # None: a dashboard from before receipts (issue 11), for comparisons
            args += ["--consumer-id", self.consumer_id]
        if self.profile_to is not None:
            cmd = instrumented_cmd("cprofile-cpu", self.profile_to, args)
        else:
            cmd = [sys.executable, "-m", "edgemed", *args]
        cmd = [*self.wrapper, *cmd]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        # /api/summary needs a login: a viewer of the benchmark's own, with a password made for this run only.
        password = secrets.token_urlsafe(16)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "edgemed",
                "dashboard",
                "users",
                "add",
                "bench",
                "--db",
                str(self.db),
                "--role",
                "viewer",
                "--password-stdin",
            ],
            input=password + "\n",
            text=True,
            check=True,
            capture_output=True,
            env=env,
            timeout=60,
        )
        self._password = password
        self._http: Any = None
        self._log = self.log.open("wb")
        # A session of its own: the whole group gets the signal, and Ctrl-C on the benchmark does not reach it
        # before the benchmark stops it in order.
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=self._log, env=env, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            with contextlib.suppress(OSError, ValueError, KeyError):
                if self.summary()["ingest"]["subscribed"]:
                    return self
            time.sleep(0.1)
        self.__exit__()
        raise SystemExit(f"the dashboard did not start within 30 s; its log:\n{self.log.read_text()[-3000:]}")

    def summary(self) -> dict[str, Any]:
        import httpx

        try:  # an httpx error is not an OSError: said as one, so that the start-up wait keeps trying
            if self._http is None:
                self._http = self._login()
            answer = self._http.get("/api/summary")
            answer.raise_for_status()
        except httpx.HTTPError as exc:
            raise OSError(f"the dashboard did not answer /api/summary: {exc}") from exc
        return dict(answer.json())

    def _login(self) -> Any:
        import httpx  # the central extra, which a benchmark that starts the dashboard has

        base = f"http://127.0.0.1:{self.port}"
        http = httpx.Client(base_url=base, timeout=2, headers={"Origin": base})
        form = http.get("/login")
        found = re.search(r'name="csrf" value="([^"]+)"', form.text)
        if found is None:
            http.close()
            raise OSError("the dashboard's login page has no form yet")
        data = {"name": "bench", "password": self._password, "csrf": found.group(1), "next": "/"}
        answer = http.post("/login", data=data)
        if answer.status_code != 303:
            http.close()
            raise OSError(f"the benchmark's login failed: {answer.status_code}")
        return http

    def cpu_s(self) -> float:
        return process_cpu_s(self.proc.pid)

    def __exit__(self, *exc: object) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()


class ThreadProfiler:
    """cProfile for every thread of this process (cProfile alone sees only the thread that enabled it).

    Threads started inside the ``with`` block get a profiler of their own on their first Python call; at the
    end the profiles are merged. Threads already running are not seen (start the work inside the block).

    Args:
        cpu: time with each thread's CPU clock (``time.thread_time``: where the CPU goes) instead of the wall
            clock (cProfile's default: where a thread waits, too, e.g. for a lock another thread holds).
    """

    def __init__(self, *, cpu: bool = False) -> None:
        self._timer = time.thread_time if cpu else None
        self._profiles: list[tuple[str, cProfile.Profile]] = []
        self._lock = threading.Lock()

    def _new(self) -> cProfile.Profile:
        prof = cProfile.Profile(self._timer) if self._timer is not None else cProfile.Profile()
        with self._lock:
            self._profiles.append((threading.current_thread().name, prof))
        return prof

    def _start_in_thread(self, frame: object, event: str, arg: object) -> None:
        sys.setprofile(None)
        self._new().enable()

    def __enter__(self) -> ThreadProfiler:
        threading.setprofile(self._start_in_thread)
        self._new().enable()
        return self

    def __exit__(self, *exc: object) -> None:
        threading.setprofile(None)  # type: ignore[arg-type]
        with self._lock:
            for _, prof in self._profiles:
                prof.disable()

    def stats(self, thread: str | None = None) -> pstats.Stats:
        """The merged profile of every thread, or of the threads named ``thread``."""
        with self._lock:
            profiles = [p for name, p in self._profiles if p.getstats() and thread in (None, name)]
        merged = pstats.Stats(profiles[0])
        for prof in profiles[1:]:
            merged.add(prof)
        return merged

    def dump(self, path: Path | str) -> None:
        """Write the merged profile to ``path`` and the main thread's alone beside it (``*-main.pstats``)."""
        self.stats().dump_stats(str(path))
        self.stats("MainThread").dump_stats(str(path).removesuffix(".pstats") + "-main.pstats")


def top_functions(stats_file: Path | str, n: int = 25, sort: str = "tottime") -> str:
    """The ``n`` most expensive functions of a pstats file, as text (paths shortened to the repository)."""
    buf = io.StringIO()
    st = pstats.Stats(str(stats_file), stream=buf)
    st.strip_dirs().sort_stats(sort).print_stats(n)
    return buf.getvalue()


@contextlib.contextmanager
def temp_dir(prefix: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
