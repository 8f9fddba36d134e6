"""Helpers shared by the benchmark scripts: data location, a loopback mosquitto, medians."""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def data_root() -> Path:
    """Larger data sets: ``$EDGEMED_DATA`` or ``../shared/data`` beside the repository."""
    return Path(os.environ.get("EDGEMED_DATA", ROOT.parent / "shared" / "data")).resolve()


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Mosquitto:
    """A real mosquitto on a free 127.0.0.1 port for the duration of a benchmark (stopped by PID)."""

    def __init__(self) -> None:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(exe).exists():
            raise SystemExit("mosquitto is not installed: sudo apt-get install -y mosquitto")
        self.exe = exe
        self.port = free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self.dir = Path(tempfile.mkdtemp(prefix="edgemed-bench-broker-"))

    def __enter__(self) -> Mosquitto:
        conf = self.dir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\nuser root\n"
            "max_queued_messages 100000\nmax_inflight_messages 0\n"
        )
        self.proc = subprocess.Popen([self.exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.proc.kill()
        raise SystemExit("mosquitto did not start within 10 s")

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
