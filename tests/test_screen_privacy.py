"""Frames and maps reach the device's own screen and nothing else: not the broker, not the disk, not the log.

A real ``edgemed run --screen`` with a profile that has a broker (real mosquitto on a loopback port) triages a
BreastMNIST image (its class activation map drawn by the GAP model) and an ISIC dermoscopy photo, both under file
names that carry a record number. A subscriber on ``#`` keeps every message the broker gets; a plain HTTP client
reads the page's event stream. The stream must carry the frames (JPEG) and the map (PNG), which is what makes the
rest mean something. Then no MQTT payload, no file in the data directory (``results.jsonl``, the outbox database
read as raw bytes, free pages included) and no line of the log holds: JPEG or PNG magic or their base64 prefixes;
any piece (40 bytes or base64 characters) of the exact JPEG and PNG bytes the page received, of the frames' pixels
as the device holds them, or of the class activation map's values as the device computes them, raw or in base64 at
any of the three alignments (so an image embedded at any offset of a larger base64 blob is found); a list of 16 or
more numbers (a map or a frame written out as JSON); or the file names (on disk the outbox's ledger of processed
inputs keeps file paths on the device, as it always did, for resuming).
``test_the_leak_check_finds_what_it_looks_for`` shows the detector finds each of these where it is hidden.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from broker_fixtures import Mosquitto
from gap_model import gap_model_fixture
from process_helpers import Client
from screen_rig import ScreenRun, drop, pick_images, png_bytes

from edgemed.cam import CamComputer
from edgemed.capture.files import decode_image, sniff
from edgemed.config import BackendConfig
from edgemed.deploy import check_deployable
from edgemed.inference.classify import Classifier

__all__ = ["gap_model_fixture"]

NAMES = ("MRN0042137-left-breast.png", "MRN0042137-mole.jpg")
IMAGE_MARKS = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"/9j/", b"iVBOR", b"data:image/")
DATA_URL = re.compile(r"data:image/(jpeg|png);base64,([A-Za-z0-9+/=]+)")
#: A JSON (or Python) list of 16 or more numbers, flat or nested (rows of a 2-D array): a map (7x7 = 49 values) or
#: a frame written out as numbers. No message of ours has one (probabilities are one per class, latencies a dict).
_NUMBER = rb"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?"
NUMBER_LIST = re.compile(rb"\[\s*(?:" + _NUMBER + rb"\s*(?:\]\s*)*,\s*(?:\[\s*)*){15,}")
#: Raw bytes and base64 characters compared at a time: 32 of either (24 to 32 bytes of pixels or compressed data)
#: never occur by chance. Pieces are indexed every STRIDE positions, so any copy of WINDOW + STRIDE - 1 or more
#: contiguous bytes (or base64 characters), wherever it starts, holds an indexed piece.
WINDOW, STRIDE = 32, 8
#: The most of a raw frame indexed (its start and its middle): a frame of a camera is megabytes.
RAW_INDEXED = 1 << 16


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


def _pieces(blob: bytes) -> set[bytes]:
    """Every STRIDE-th WINDOW-long piece of ``blob`` raw, and of its base64 at each of the three alignments a base64
    encoding of a larger buffer can give it: an image embedded at any offset, whole or in part, is found."""
    found = {blob[i : i + WINDOW] for i in range(0, len(blob) - WINDOW + 1, STRIDE)}
    for shift in range(3):
        text = base64.b64encode(blob[shift:])[:-4]  # the last group may hold padding that no embedding shares
        found |= {text[i : i + WINDOW] for i in range(0, len(text) - WINDOW + 1, STRIDE)}
    return found


def _sample(raw: bytes) -> bytes:
    """The start and the middle of a large buffer (a copy of any part of a frame is as bad; these stand for it)."""
    if len(raw) <= 2 * RAW_INDEXED:
        return raw
    mid = len(raw) // 2
    return raw[:RAW_INDEXED] + raw[mid : mid + RAW_INDEXED]


class Leaks:
    """What must not leave the screen: the exact JPEG and PNG bytes the page received, the frames' pixels as the
    device holds them, the class activation map's values as the device computed them, and the file names."""

    def __init__(self, shown: list[bytes], frames: list[np.ndarray], cam: np.ndarray) -> None:
        self.index: dict[bytes, str] = {}
        self.rows: list[tuple[bytes, str]] = []
        for dtype in (np.float32, np.float64):  # the map as the device holds it, or widened
            self.index.update(dict.fromkeys(_pieces(cam.astype(dtype).tobytes()), "class map values"))
        for k, frame in enumerate(frames):
            raw = frame.tobytes()
            self.index.update(dict.fromkeys(_pieces(_sample(raw)), f"frame {k} pixels"))
            # Single rows too (a crop or a row-by-row copy), for rows that could not occur by chance.
            for i in range(0, frame.shape[0], max(1, frame.shape[0] // 32)):
                row = frame[i].tobytes()
                if len(set(row)) < 8 or len(row) < 24:
                    continue
                if len(row) >= WINDOW:
                    self.index.update(dict.fromkeys(_pieces(row), f"frame {k} pixels"))
                else:  # a row shorter than a piece (a 28-pixel BreastMNIST row) is searched whole
                    self.rows.append((row, f"frame {k} pixels"))
        for k, blob in enumerate(shown):
            self.index.update(dict.fromkeys(_pieces(blob), f"screen image {k}"))

    def __call__(self, blob: bytes, *, names: bool = True) -> list[str]:
        found = {f"mark {mark!r}" for mark in IMAGE_MARKS if mark in blob}
        if names:
            found |= {name for name in NAMES if name.encode() in blob}
        # URL-safe base64 differs from the standard alphabet in two characters: search both spellings.
        for text in {blob, blob.translate(bytes.maketrans(b"-_", b"+/"))}:
            index = self.index
            found |= {
                index[text[i : i + WINDOW]] for i in range(len(text) - WINDOW + 1) if text[i : i + WINDOW] in index
            }
        found |= {what for row, what in self.rows if row in blob}
        if NUMBER_LIST.search(blob):
            found.add("a list of numbers")
        return sorted(found)


def _shown_images(sse: str) -> dict[str, list[bytes]]:
    """The JPEG frames and PNG maps the page's event stream carried, decoded (the bytes the screen received)."""
    shown: dict[str, list[bytes]] = {"jpeg": [], "png": []}
    for kind, data in DATA_URL.findall(sse):
        blob = base64.b64decode(data)
        if blob not in shown[kind]:
            shown[kind].append(blob)
    return shown


def _device_cam(model: Path, image: np.ndarray) -> np.ndarray:
    """The class activation map the device computes for ``image`` (same file, same runtime, same arithmetic)."""
    deployable = check_deployable(model)
    backend = deployable.open_backend(BackendConfig())
    try:
        classifier = Classifier(backend, deployable.manifest, deployable.artifact)
        cam = CamComputer.build(classifier)
        assert cam is not None, "the GAP model has no class activation map"
        raw = backend.invoke(classifier.preprocess(image))
        return cam.compute(classifier.scores(raw).index, 0).values
    finally:
        backend.close()


def test_the_leak_check_finds_what_it_looks_for() -> None:
    """The detector itself can fail: each thing it guards is found when hidden the ways a leak would hide it."""
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    cam = rng.normal(size=(7, 7)).astype(np.float32)
    jpeg = b"\xff\xd8\xff\xe0" + rng.integers(0, 256, 3000, dtype=np.uint8).tobytes()
    leaks = Leaks([jpeg], [frame], cam)
    assert leaks(b'{"seq": 3, "level": "urgent", "probabilities": [0.93, 0.07]}') == []
    for shift in range(3):  # the JPEG inside a larger base64 blob, at each alignment (no "/9j/" prefix then)
        hidden = json.dumps({"blob": base64.b64encode(b"\0" * (shift + 1) + jpeg[10:]).decode()}).encode()
        assert "screen image 0" in leaks(hidden), shift
        pixels = base64.urlsafe_b64encode(b"\0" * shift + frame.tobytes()[100:400])
        assert "frame 0 pixels" in leaks(pixels), shift
        # A fragment of the screen's base64 from anywhere in it, cut anywhere (as a log line would quote it).
        text = base64.b64encode(jpeg).decode()
        assert "screen image 0" in leaks(f"oops {text[1001 + shift : 1001 + shift + 41]}".encode()), shift
    assert "frame 0 pixels" in leaks(b"x" + frame[14].tobytes() + b"y")
    assert "class map values" in leaks(b"\1\2" + cam.tobytes())
    assert "class map values" in leaks(base64.b64encode(b"\1" + cam.astype(np.float64).tobytes()))
    assert "a list of numbers" in leaks(json.dumps({"map": cam.round(3).tolist()}).encode())
    assert NAMES[0] in leaks(f"source {NAMES[0]}".encode())


def test_frames_and_maps_stay_on_the_screen(tmp_path: Path, gap_model: Path, broker: Mosquitto) -> None:
    picks = pick_images(gap_model)
    isic = decode_image(picks.isic.read_bytes(), picks.isic.name).image
    assert isic is not None
    frames = [picks.urgent, isic]  # what the device decoded: the pixels it holds in memory
    everything = Client(broker.port, "#")
    with ExitStack() as stack:  # the subscriber, the run and the stream are closed whatever fails, even at start
        stack.callback(everything.close)
        run = ScreenRun(tmp_path, gap_model, broker_url=broker.url)
        stack.callback(run.stop)
        stream = EventStream(run.port)
        stack.callback(stream.close)
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
        stream.close()
        code = run.stop()  # the run drains and exits: what it writes at the end is searched below too
        # Its last message (the offline status) is in the subscriber's hands before the subscriber closes.
        deadline = time.monotonic() + 10
        while not [1 for t, m, _ in list(everything.messages) if t.endswith("/status") and b'"offline"' in m]:
            assert time.monotonic() < deadline, f"no offline status after the run: {everything.topics()}"
            time.sleep(0.05)
    assert code == 0, run.stderr()
    with everything._lock:
        messages = list(everything.messages)
    topics = {t.rsplit("/", 1)[-1] for t, _, _ in messages}
    assert {"results", "health"} <= topics, topics

    # The page's stream did carry both frames and the map (which is what makes the rest mean something), and no
    # file name (not shown by default).
    shown = _shown_images(stream.text)
    assert len(shown["jpeg"]) >= 2 and len(shown["png"]) >= 1, {k: len(v) for k, v in shown.items()}
    assert not [n for n in NAMES if n in stream.text]
    leaks = Leaks(shown["jpeg"] + shown["png"], frames, _device_cam(gap_model, picks.urgent))
    assert "screen image 0" in leaks(stream.text.encode())  # the check finds the images where they are

    for topic, payload, _ in messages:
        assert not leaks(payload), (topic, leaks(payload))

    # Nothing of the images on disk (results.jsonl, the outbox database and its journal, free pages included:
    # the file's raw bytes are searched), and no file name or image data in the log.
    files = [p for p in run.data_dir.rglob("*") if p.is_file()]
    assert {"results.jsonl", "outbox.sqlite3"} <= {p.name for p in files}, files
    for path in files:
        assert sniff(path) != "image", path
        # Names are not checked here: the outbox's ledger of processed inputs keeps each file's path on the device
        # (0600), so that a restarted watch neither repeats nor skips a file (README, "The device runtime").
        found = leaks(path.read_bytes(), names=False)
        assert not found, (path.name, found)
    log = run.stderr().encode()
    assert not leaks(log), leaks(log)
