"""Occlusion maps and CAMs for ``bench_runtime.py --screen``: what one costs alone, and on a live run.

* :data:`ALONE`: a child process (its own LiteRT, like the other benchmarks' loops) that times
  ``edgemed.cam.occlusion_map`` on real frames, with no run beside it, and ``CamComputer.compute`` (the map from the
  last invoke's feature map) when the model has a CAM.
* :func:`live_occlusion`: an ``edgemed run --screen`` at a camera's rate (``--fps-cap``) and a plain HTTP client of
  the page (its token, its event stream): ``POST /occlusion``, then the time until the ``map`` event arrives. The
  runtime thread keeps classifying meanwhile and shares the interpreter (the lock), as on a device.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _common import median
from _screen_bench import child_env

ALONE = r"""
import json, sys, time
from pathlib import Path
import cv2, numpy as np
from edgemed.cam import CamComputer, occlusion_map
from edgemed.deploy import check_deployable
from edgemed.inference import BackendConfig
from edgemed.inference.classify import Classifier
model, threads, repeats = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
dep = check_deployable(model)
clf = Classifier(dep.open_backend(BackendConfig(threads=threads)), dep.manifest, dep.artifact)
cam = CamComputer.build(clf)
occ_ms, cam_ms, shapes = [], [], set()
for seq, path in enumerate(sys.argv[4:]):
    image = cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB)
    if clf.gray:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    k = int(np.argmax(clf.scores(clf.backend.invoke(clf.preprocess(image))).probabilities))
    for _ in range(repeats):
        t = time.perf_counter(); m = occlusion_map(clf, image, k, seq); occ_ms.append((time.perf_counter() - t) * 1e3)
        shapes.add(m.values.shape)
    if cam is not None:
        clf.backend.invoke(clf.preprocess(image))
        for _ in range(200):
            t = time.perf_counter(); cam.compute(k, seq); cam_ms.append((time.perf_counter() - t) * 1e3)
occ_ms.sort(); cam_ms.sort()
print(json.dumps({"occlusion_ms": occ_ms[len(occ_ms) // 2], "occlusion_ms_max": occ_ms[-1],
                  "occlusion_grids": sorted(shapes), "cam_compute_ms": cam_ms[len(cam_ms) // 2] if cam_ms else None}))
"""


def occlusion_alone(model: Path, images: list[Path], threads: int, repeats: int = 5) -> dict[str, Any]:
    """``occlusion_map`` (and ``CamComputer.compute``) timed in a child process: medians in ms."""
    cmd = [sys.executable, "-c", ALONE, str(model), str(threads), str(repeats), *map(str, images)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False, env=child_env())
    if proc.returncode != 0:
        raise RuntimeError(f"timing occlusion on {model.name} failed: {proc.stderr[-2000:]}")
    return dict(json.loads(proc.stdout.splitlines()[-1]))


class PageClient:
    """The page's side of the screen protocol, for timing: the token from ``GET /``, the ``/events`` stream."""

    def __init__(self, url: str) -> None:
        m = re.match(r"http://127\.0\.0\.1:(\d+)/", url)
        if m is None:
            raise ValueError(f"not a loopback screen URL: {url}")
        self.port = int(m.group(1))
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.request("GET", "/")
        page = conn.getresponse().read().decode()
        conn.close()
        token = re.search(r'name="edgemed-screen-token" content="([^"]+)"', page)
        if token is None:
            raise RuntimeError("the screen's page carries no edgemed-screen-token meta tag")
        self.token = token.group(1)
        self.events: list[tuple[float, str]] = []
        self._changed = threading.Condition()
        self._stream = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        self._stream.request("GET", "/events")
        self._resp = self._stream.getresponse()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            while line := self._resp.fp.readline():
                if line.startswith(b"event: "):
                    with self._changed:
                        self.events.append((time.perf_counter(), line[7:].strip().decode()))
                        self._changed.notify_all()
        except OSError:
            return  # the run ended and closed the stream

    def frames(self) -> list[float]:
        """When each ``frame`` event arrived (``time.perf_counter`` seconds)."""
        with self._changed:
            return [t for t, name in self.events if name == "frame"]

    def occlusion_ms(self, timeout_s: float = 60.0) -> float:
        """POST /occlusion, then wait (bounded) for the next ``map`` event: milliseconds from request to map."""
        with self._changed:
            seen = len(self.events)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        t0 = time.perf_counter()
        conn.request("POST", "/occlusion", body=b"", headers={"X-Edgemed-Screen": self.token})
        status = conn.getresponse().status
        conn.close()
        if status != 202:
            raise RuntimeError(f"POST /occlusion answered {status}, not 202")
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                maps = [t for t, name in self.events[seen:] if name == "map"]
                if maps:
                    return (maps[0] - t0) * 1e3
                if not self._changed.wait(max(0.0, deadline - time.monotonic())):
                    raise RuntimeError(f"no map event within {timeout_s} s of POST /occlusion")

    def close(self) -> None:
        self._stream.close()


def live_occlusion(
    model: Path, source: Path, args: argparse.Namespace, profile: Path, requests: int = 5, fps_cap: float = 30.0
) -> dict[str, Any]:
    """Request-to-map times of ``POST /occlusion`` on a live ``edgemed run --screen`` (offline, ``--fps-cap``)."""
    data_dir = Path(tempfile.mkdtemp(prefix="edgemed-bench-occlusion-"))
    cmd = [sys.executable, "-m", "edgemed", "run", "--model", str(model), "--source", str(source)]
    cmd += ["--loop", "1000", "--fps-cap", str(fps_cap), "--threads", str(args.threads), "--device-id", "bench"]
    cmd += ["--data-dir", str(data_dir), "--quiet", "--profile", str(profile)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=child_env())
    try:
        url = None
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()  # type: ignore[union-attr]
            if not line:
                break
            if m := re.search(r"screen: (http://127\.0\.0\.1:\d+/)", line):
                url = m.group(1)
        if url is None:
            raise RuntimeError("no screen URL on edgemed's stderr within 60 s")
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # type: ignore[union-attr]
        client = PageClient(url)
        while not any(name == "frame" for _, name in client.events):  # 409 until a frame is classified
            if time.monotonic() > deadline:
                raise RuntimeError("the screen pushed no frame within 60 s")
            time.sleep(0.05)
        times = [client.occlusion_ms() for _ in range(requests)]
        client.close()
    finally:
        proc.send_signal(signal.SIGINT)  # the run drains and exits by itself
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        shutil.rmtree(data_dir, ignore_errors=True)
    return {"requests": requests, "fps_cap": fps_cap, "request_to_map_ms": median(times), "all_ms": times}
