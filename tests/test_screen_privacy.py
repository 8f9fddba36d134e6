"""Frames and maps reach the device's own screen and nothing else: not the broker, not the disk, not the log.

A real ``edgemed run --screen`` with a profile that has a broker (real mosquitto on a loopback port) triages a
BreastMNIST image (its class activation map drawn by the GAP model) and an ISIC dermoscopy photo, both under file
names that carry a record number. A subscriber on ``#`` keeps every message the broker gets; a plain HTTP client
reads the page's event stream. The stream must carry the frame (JPEG) and the map (PNG), which is what makes the
rest mean something: then no MQTT payload holds JPEG or PNG bytes, their base64 prefixes, the frames' pixel bytes or
the file names; after the run the data directory holds no image file and no image bytes (its ledger of processed
inputs keeps file paths on the device, as it always did, for resuming); the log names no file.
"""

from __future__ import annotations

import base64
import http.client
import threading
import time
from pathlib import Path

import numpy as np
from broker_fixtures import Mosquitto
from gap_model import gap_model_fixture
from process_helpers import Client
from screen_rig import ScreenRun, drop, pick_images, png_bytes

from edgemed.capture.files import decode_image, sniff

__all__ = ["gap_model_fixture"]

NAMES = ("MRN0042137-left-breast.png", "MRN0042137-mole.jpg")
IMAGE_MARKS = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"/9j/", b"iVBOR", b"data:image/")


class EventStream:
    """The page's ``/events`` read by a plain HTTP client on a thread, kept whole (bounded by ``stop``)."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.conn.request("GET", "/events", headers={"Accept": "text/event-stream"})
        self.response = self.conn.getresponse()
        assert self.response.status == 200, self.response.status
        assert self.response.getheader("Content-Type", "").startswith("text/event-stream")
        self.text = ""
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, name="sse-reader", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            while line := self.response.readline():
                with self._lock:
                    self.text += line.decode("utf-8")
        except (OSError, ValueError):  # the test closed the connection, or the run ended it: the text is kept
            return

    def count(self, marker: str) -> int:
        with self._lock:
            return self.text.count(marker)

    def wait_for_count(self, marker: str, n: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.count(marker) < n:
            assert time.monotonic() < deadline, f"the event stream carried {marker!r} fewer than {n} times"
            time.sleep(0.05)

    def wait_for(self, marker: str, timeout_s: float) -> None:
        self.wait_for_count(marker, 1, timeout_s)

    def close(self) -> None:
        self.conn.close()
        self._thread.join(10)


def _pixel_runs(image: np.ndarray) -> list[bytes]:
    """Rows of the frame as the device holds it (uint8, row-major) that could not occur in text by chance: each is
    at least 28 bytes with 8 or more distinct values. The whole frame and its base64 are checked besides."""
    rows = [image[i].tobytes() for i in range(0, image.shape[0], max(1, image.shape[0] // 16))]
    return [r for r in rows if len(r) >= 28 and len(set(r)) >= 8]


def _leaks(blob: bytes, frames: list[np.ndarray], *, names: bool = True) -> list[str]:
    found = [mark.decode("latin-1") for mark in IMAGE_MARKS if mark in blob]
    if names:
        found += [name for name in NAMES if name.encode() in blob]
    for k, frame in enumerate(frames):
        raw = frame.tobytes()
        if raw in blob or base64.b64encode(raw)[:64] in blob:
            found.append(f"frame {k} whole")
        found += [f"frame {k} pixel row" for run in _pixel_runs(frame) if run in blob]
    return found


def test_frames_and_maps_stay_on_the_screen(tmp_path: Path, gap_model: Path, broker: Mosquitto) -> None:
    picks = pick_images(gap_model)
    isic = decode_image(picks.isic.read_bytes(), picks.isic.name).image
    assert isic is not None
    frames = [picks.urgent, isic]  # what the device decoded: the pixels it holds in memory
    everything = Client(broker.port, "#")
    run = ScreenRun(tmp_path, gap_model, broker_url=broker.url)
    stream = EventStream(run.port)
    try:
        drop(run.watched, NAMES[0], png_bytes(picks.urgent))
        stream.wait_for("data:image/jpeg;base64,", 30)  # the frame went to the screen...
        stream.wait_for("data:image/png;base64,", 30)  # ...with its class activation map
        drop(run.watched, NAMES[1], picks.isic)
        deadline = time.monotonic() + 30
        while len([t for t in everything.topics() if t.endswith("/results")]) < 2:
            assert time.monotonic() < deadline, f"results on the broker: {everything.topics()}"
            time.sleep(0.05)
        stream.wait_for_count("data:image/jpeg;base64,", 2, 15)  # the photo's frame too
        time.sleep(1.5)  # a heartbeat and a status message or two as well
    finally:
        stream.close()
        code = run.stop()
        everything.close()
    assert code == 0, run.stderr()
    with everything._lock:
        messages = list(everything.messages)
    topics = {t.rsplit("/", 1)[-1] for t, _, _ in messages}
    assert {"results", "health"} <= topics, topics
    for topic, payload, _ in messages:
        assert not _leaks(payload, frames), (topic, _leaks(payload, frames))

    # The page's stream did carry both frames and a map, and no file name (not shown by default).
    assert stream.count("data:image/jpeg;base64,") >= 2 and stream.count("data:image/png;base64,") >= 1
    assert not [n for n in NAMES if n in stream.text]
    assert "data:image/" in str(_leaks(stream.text.encode(), frames))  # the check finds images where they are

    # Nothing of the images on disk, and no file name or image data in the log.
    files = [p for p in run.data_dir.rglob("*") if p.is_file()]
    assert files, "the run wrote its outbox and results"
    for path in files:
        assert sniff(path) != "image", path
        # Names are not checked here: the outbox's ledger of processed inputs keeps each file's path on the device
        # (0600), so that a restarted watch neither repeats nor skips a file (README, "The device runtime").
        leaks = _leaks(path.read_bytes(), frames, names=False)
        assert not leaks, (path.name, leaks)
    log = run.stderr().encode()
    assert not _leaks(log, frames), _leaks(log, frames)
