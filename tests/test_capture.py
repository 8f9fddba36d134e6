"""Capture sources: files, folders, video, watch mode, a real MJPEG-over-HTTP server, and a camera faked at the
OpenCV seam (there is no /dev/video* on these machines)."""

from __future__ import annotations

import itertools
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from pydantic import ValidationError

from edgemed.capture import CaptureConfig, open_source
from edgemed.capture import stream as stream_mod
from edgemed.errors import EXIT_SOURCE, CaptureError, ConfigError
from edgemed.types import Frame

DATA = Path(__file__).resolve().parent.parent / "data"
ISIC = sorted((DATA / "isic_samples").glob("*.jpg"))


def isic_bgr(i: int, size: tuple[int, int] = (320, 240)) -> np.ndarray:
    return np.asarray(cv2.resize(cv2.imread(str(ISIC[i % len(ISIC)])), size, interpolation=cv2.INTER_AREA))


# ---------------------------------------------------------------- files and folders


def test_folder_is_read_in_natural_order_with_consecutive_indices(tmp_path: Path) -> None:
    for n in (10, 2, 1):
        cv2.imwrite(str(tmp_path / f"img{n}.png"), isic_bgr(n))
    (tmp_path / "labels.csv").write_text("not an image\n")
    src = open_source(str(tmp_path))
    frames = list(src)
    assert src.kind == "folder" and src.state == "ended"
    assert [f.name for f in frames] == ["img1.png", "img2.png", "img10.png"]
    assert [f.index for f in frames] == [0, 1, 2]
    for n, frame in zip((1, 2, 10), frames, strict=True):
        assert frame.image is not None and frame.source_kind == "folder"
        assert np.array_equal(frame.image, cv2.cvtColor(isic_bgr(n), cv2.COLOR_BGR2RGB))  # PNG is lossless
        assert frame.captured_at > 0


def test_unreadable_file_keeps_its_index_and_the_folder_goes_on(tmp_path: Path) -> None:
    cv2.imwrite(str(tmp_path / "a1.png"), isic_bgr(0))
    (tmp_path / "a2.jpg").write_bytes(b"this is not a jpeg at all")
    cv2.imwrite(str(tmp_path / "a3.png"), isic_bgr(1))
    frames = list(open_source(str(tmp_path)))
    assert [f.index for f in frames] == [0, 1, 2]
    assert frames[1].image is None and frames[1].error is not None
    assert frames[1].error.startswith("a2.jpg: ") and "re-export" in frames[1].error
    assert frames[0].image is not None and frames[2].image is not None


def test_real_dermoscopy_jpegs_decode_as_rgb() -> None:
    from PIL import Image

    src = open_source(str(ISIC[0]))
    (frame,) = list(src)
    assert src.kind == "image"
    with Image.open(ISIC[0]) as pil:
        reference = np.asarray(pil.convert("RGB"))
    assert frame.image is not None and frame.image.shape == reference.shape
    # Two JPEG decoders differ by rounding only; swapped channels would differ by tens of levels.
    assert np.abs(frame.image.astype(int) - reference.astype(int)).mean() < 1.5


def test_gray_and_sixteen_bit_images(tmp_path: Path) -> None:
    gray = cv2.cvtColor(isic_bgr(3), cv2.COLOR_BGR2GRAY)
    cv2.imwrite(str(tmp_path / "g.png"), gray)
    cv2.imwrite(str(tmp_path / "w.png"), gray.astype(np.uint16) * 4 + 1000)
    (g,) = list(open_source(str(tmp_path / "g.png")))
    (w,) = list(open_source(str(tmp_path / "w.png")))
    assert g.image is not None and g.image.ndim == 2 and np.array_equal(g.image, gray)
    assert w.image is not None and w.image.dtype == np.uint8 and w.image.min() == 0 and w.image.max() == 255


def test_image_is_found_by_content_not_extension(tmp_path: Path) -> None:
    (tmp_path / "photo.bin").write_bytes(ISIC[2].read_bytes())
    src = open_source(str(tmp_path / "photo.bin"))
    assert src.kind == "image"
    (frame,) = list(src)
    assert frame.image is not None and frame.image.ndim == 3


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda p: p / "missing", "no such file or folder"),
        (lambda p: p, "no image or DICOM files"),
        (lambda p: (p / "notes.txt").write_text("hello") and p / "notes.txt", "not a readable image, DICOM or video"),
    ],
    ids=["missing", "empty-folder", "not-media"],
)
def test_unusable_source_is_a_capture_error_naming_it(tmp_path: Path, make: Any, words: str) -> None:
    target = make(tmp_path)
    with pytest.raises(CaptureError, match=words) as info:
        open_source(str(target))
    assert str(target) in str(info.value)
    assert info.value.exit_code == EXIT_SOURCE == 4


# ---------------------------------------------------------------- video, loop, fps cap, roi, stop


@pytest.fixture
def video(tmp_path: Path) -> Path:
    path = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (320, 240))
    assert writer.isOpened()
    for i in range(8):
        writer.write(isic_bgr(i))
    writer.release()
    return path


def test_video_file_yields_every_frame_in_rgb(video: Path) -> None:
    src = open_source(str(video))
    frames = list(src)
    assert src.kind == "video" and len(frames) == 8 and [f.index for f in frames] == list(range(8))
    for i, frame in enumerate(frames):
        assert frame.image is not None and frame.image.shape == (240, 320, 3)
        expected = cv2.cvtColor(isic_bgr(i), cv2.COLOR_BGR2RGB).reshape(-1, 3).mean(axis=0)
        assert np.abs(frame.image.reshape(-1, 3).mean(axis=0) - expected).max() < 4.0  # lossy codec


def test_loop_replays_a_finite_source_with_continuing_indices(video: Path) -> None:
    frames = list(open_source(str(video), CaptureConfig(loop=3)))
    assert [f.index for f in frames] == list(range(24))
    assert frames[0].image is not None and frames[8].image is not None
    assert np.array_equal(frames[0].image, frames[8].image)


def test_fps_cap_paces_delivery(video: Path) -> None:
    start = time.monotonic()
    frames = list(open_source(str(video), CaptureConfig(fps_cap=40.0)))
    elapsed = time.monotonic() - start
    assert len(frames) == 8
    assert elapsed >= 7 / 40 * 0.9  # seven intervals between eight frames
    gaps = np.diff([f.captured_at for f in frames])
    assert gaps.min() > 1 / 40 * 0.5


def test_roi_crops_every_frame_and_a_roi_outside_the_first_frame_is_a_config_error(video: Path) -> None:
    frames = list(open_source(str(video), CaptureConfig(roi=(10, 20, 100, 50))))
    full = list(open_source(str(video)))
    assert frames[0].image is not None and frames[0].image.shape == (50, 100, 3)
    assert full[0].image is not None and np.array_equal(frames[0].image, full[0].image[20:70, 10:110])
    # Outside the first frame, it would fail every frame of the video: a configuration error naming the real key.
    src = open_source(str(video), CaptureConfig(roi=(300, 0, 100, 100)))
    with pytest.raises(ConfigError, match=r"\(source\.roi\) lies outside the 320x240 first frame") as info:
        list(src)
    assert info.value.exit_code == 2 and src.state == "failed"


def test_stop_event_ends_iteration_promptly(video: Path) -> None:
    stop = threading.Event()
    src = open_source(str(video), CaptureConfig(loop=1000, fps_cap=50.0), stop=stop)
    got = []
    for frame in src:
        got.append(frame.index)
        if len(got) == 3:
            stop.set()
    assert got == [0, 1, 2]
    assert src.state == "stopped"


def test_config_rejects_unknown_keys_and_bad_values() -> None:
    with pytest.raises(ValidationError):
        CaptureConfig(fps=5)  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="roi"):
        CaptureConfig(roi=(0, 0, 0, 10))
    with pytest.raises(ValidationError):
        CaptureConfig(loop=0)
    assert CaptureConfig(extensions=["PNG", ".Jpg"]).extensions == [".png", ".jpg"]


def test_import_is_cheap() -> None:
    code = "import sys, edgemed.capture; print(sorted(m for m in ('cv2', 'pydicom', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------- watch mode


def test_watch_yields_new_files_once_settled_and_ends_on_stop(tmp_path: Path) -> None:
    cv2.imwrite(str(tmp_path / "old.png"), isic_bgr(0))  # present before watching: not read
    stop = threading.Event()
    cfg = CaptureConfig(watch_poll_s=0.05, watch_settle_s=0.2)
    src = open_source(f"watch:{tmp_path}", cfg, stop=stop)
    assert src.kind == "watch"
    encoded = [cv2.imencode(".png", isic_bgr(i))[1].tobytes() for i in (1, 2)]

    def writer() -> None:
        # The first file is written in two halves with a pause, like a device streaming it to disk.
        with (tmp_path / "new1.png").open("wb") as fh:
            fh.write(encoded[0][: len(encoded[0]) // 2])
            fh.flush()
            time.sleep(0.12)
            fh.write(encoded[0][len(encoded[0]) // 2 :])
        time.sleep(0.1)
        (tmp_path / "new2.png").write_bytes(encoded[1])

    got: list[Frame] = []
    thread = threading.Thread(target=writer)
    thread.start()
    deadline = time.monotonic() + 10
    for frame in src:
        got.append(frame)
        if len(got) == 2 or time.monotonic() > deadline:
            stop.set()
    thread.join()
    assert [f.name for f in got] == ["new1.png", "new2.png"]
    assert all(f.error is None and f.image is not None for f in got)
    assert got[0].image is not None and np.array_equal(got[0].image, cv2.cvtColor(isic_bgr(1), cv2.COLOR_BGR2RGB))


def test_watch_of_a_missing_folder_is_a_capture_error(tmp_path: Path) -> None:
    with pytest.raises(CaptureError, match="no such folder"):
        open_source(f"watch:{tmp_path / 'nope'}")


# ---------------------------------------------------------------- camera through a fake at the OpenCV seam


def test_real_camera_absent_is_a_clear_error() -> None:
    with pytest.raises(CaptureError, match=r"camera:0: cannot open /dev/video0.*ls /dev/video"):
        open_source("camera:0")
    with pytest.raises(CaptureError, match="camera index must be a number"):
        open_source("camera:front")


class FakeCapture:
    """Plays a script of frames (None = a failed read), like cv2.VideoCapture."""

    def __init__(self, script: list[np.ndarray | None], opened: bool = True) -> None:
        self.script = list(script)
        self.opened = opened
        self.released = False

    def isOpened(self) -> bool:  # OpenCV's method name
        return self.opened

    def read(self) -> tuple[bool, np.ndarray | None]:
        if not self.script:
            return False, None
        image = self.script.pop(0)
        # cv2.VideoCapture.read() returns a new array on every call; so does the fake.
        return (image is not None), (None if image is None else image.copy())

    def release(self) -> None:
        self.released = True


def test_camera_drops_black_and_repeated_frames_and_reconnects(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b, c = isic_bgr(0), isic_bgr(1), isic_bgr(2)
    black = np.zeros_like(a)
    captures = iter(
        [
            FakeCapture([black, a, a.copy(), b, None]),  # warm-up black, a, a repeated, b, then the cable is pulled
            FakeCapture([], opened=False),  # still unplugged
            FakeCapture([c]),  # back
        ]
    )
    calls: list[tuple[Any, int, list[int]]] = []

    def fake(target: Any, api: int, params: list[int]) -> FakeCapture:
        calls.append((target, api, params))
        return next(captures)

    monkeypatch.setattr(stream_mod, "video_capture", fake)
    stop = threading.Event()
    cfg = CaptureConfig(reconnect_initial_s=0.01, reconnect_max_s=0.02, camera_width=640)
    src = open_source("camera:2", cfg, stop=stop)
    states = []
    got = []
    for frame in src:
        got.append(frame)
        states.append(src.state)
        if len(got) == 3:
            stop.set()
    assert calls[0][0] == 2 and calls[0][1] == cv2.CAP_V4L2
    assert calls[0][2] == [cv2.CAP_PROP_FRAME_WIDTH, 640]
    assert [f.index for f in got] == [0, 1, 2]
    for frame, expected in zip(got, (a, b, c), strict=True):
        assert frame.image is not None and np.array_equal(frame.image, cv2.cvtColor(expected, cv2.COLOR_BGR2RGB))
        assert frame.source_kind == "camera"
    assert src.reconnects == 1 and len(calls) == 3
    assert states == ["open", "open", "open"]


def test_frozen_stream_is_treated_as_lost_after_the_stale_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = isic_bgr(0), isic_bgr(1)

    class Frozen(FakeCapture):
        def read(self) -> tuple[bool, np.ndarray | None]:
            time.sleep(0.01)
            return True, a.copy()

    captures = iter([Frozen([]), FakeCapture([b])])
    monkeypatch.setattr(stream_mod, "video_capture", lambda *args: next(captures))
    stop = threading.Event()
    cfg = CaptureConfig(stale_timeout_s=0.2, reconnect_initial_s=0.01)
    src = open_source("rtsp://user:secret@127.0.0.1:1/live", cfg, stop=stop)
    got = []
    start = time.monotonic()
    for frame in src:
        got.append(frame)
        if len(got) == 2:
            stop.set()
    assert time.monotonic() - start >= 0.2
    assert len(got) == 2 and src.reconnects == 1  # the frozen picture was delivered once, not for 0.2 s
    assert got[1].image is not None and np.array_equal(got[1].image, cv2.cvtColor(b, cv2.COLOR_BGR2RGB))
    assert got[0].name == "rtsp://***@127.0.0.1:1/live"  # credentials never leave in a name or a log


# ---------------------------------------------------------------- a real MJPEG-over-HTTP server


class MjpegServer:
    """Serves real ISIC frames as multipart/x-mixed-replace JPEG on 127.0.0.1, and can be stopped and restarted."""

    def __init__(self, port: int = 0) -> None:
        self.frames = [cv2.imencode(".jpg", isic_bgr(i))[1].tobytes() for i in range(4)]
        self.stopping = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                return None

            def do_GET(self) -> None:  # http.server's method name
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                i = 0
                try:
                    while not server.stopping.is_set():
                        jpg = server.frames[i % len(server.frames)]
                        i += 1
                        head = b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpg)
                        self.wfile.write(head + jpg + b"\r\n")
                        time.sleep(0.02)
                except (BrokenPipeError, ConnectionResetError):
                    return

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def test_http_mjpeg_stream_reconnects_after_the_server_restarts() -> None:
    server = MjpegServer()
    url = f"http://127.0.0.1:{server.port}/stream.mjpg"
    stop = threading.Event()
    cfg = CaptureConfig(reconnect_initial_s=0.05, reconnect_max_s=0.2, open_timeout_s=2, read_timeout_s=2)
    src = open_source(url, cfg, stop=stop)
    assert src.kind == "stream"
    frames: list[Frame] = []
    seen_states: list[str] = []

    def reader() -> None:
        for frame in src:
            frames.append(frame)
            if stop.is_set():
                break

    def poll_states(until: float) -> None:
        while time.monotonic() < until:
            seen_states.append(src.state)
            time.sleep(0.01)

    thread = threading.Thread(target=reader)
    thread.start()
    before = 0
    try:
        deadline = time.monotonic() + 15
        while len(frames) < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(frames) >= 5, "no frames from the local MJPEG server"
        server.stop()
        poll_states(time.monotonic() + 1.0)
        assert "reconnecting" in seen_states
        before = len(frames)
        server = MjpegServer(port=server.port)
        deadline = time.monotonic() + 15
        while len(frames) < before + 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(frames) >= before + 5, "no frames after the server came back"
        assert src.state == "open" and src.reconnects >= 1  # type: ignore[attr-defined]
    finally:
        stop.set()
        thread.join(timeout=10)
        server.stop()
    assert not thread.is_alive()
    assert [f.index for f in frames] == list(range(len(frames)))
    assert all(f.image is not None and f.image.shape == (240, 320, 3) for f in frames)
    # within one connection, consecutive delivered frames are never identical (repeats are dropped); across the
    # restart the server begins its cycle again, so a repeat there is a genuinely new frame
    for part in (frames[:before], frames[before:]):
        assert all(not np.array_equal(x.image, y.image) for x, y in itertools.pairwise(part))


def test_stream_gives_up_when_told_to() -> None:
    server = MjpegServer()
    port = server.port
    server.stop()  # nothing listens on this port any more
    cfg = CaptureConfig(reconnect_initial_s=0.05, reconnect_max_s=0.1, reconnect_give_up_s=0.4, open_timeout_s=1)
    src = open_source(f"http://127.0.0.1:{port}/stream.mjpg", cfg)
    start = time.monotonic()
    with pytest.raises(CaptureError, match="no connection for"):
        list(src)
    assert src.state == "failed"
    assert 0.3 < time.monotonic() - start < 10


def test_close_from_another_thread_never_releases_a_capture_mid_read(monkeypatch: pytest.MonkeyPatch) -> None:
    frames = [isic_bgr(i) for i in range(4)]

    class Slow(FakeCapture):
        reading = False
        released_while_reading = False

        def read(self) -> tuple[bool, np.ndarray | None]:
            self.reading = True
            time.sleep(0.1)
            self.reading = False
            return super().read()

        def release(self) -> None:
            self.released_while_reading = self.released_while_reading or self.reading
            super().release()

    cap = Slow(frames * 50)
    monkeypatch.setattr(stream_mod, "video_capture", lambda *args: cap)
    src = open_source("camera:0")
    got: list[Frame] = []
    thread = threading.Thread(target=lambda: got.extend(src))
    thread.start()
    deadline = time.monotonic() + 10
    while len(got) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    src.close()
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert cap.released and not cap.released_while_reading
    assert src.state == "closed" and 2 <= len(got) < 200


def test_recursive_folder_skips_dicomdir_and_hidden_entries(tmp_path: Path) -> None:
    study = tmp_path / "PAT1" / "STUDY2"
    study.mkdir(parents=True)
    cv2.imwrite(str(study / "b.png"), isic_bgr(0))
    cv2.imwrite(str(tmp_path / "PAT1" / "a.png"), isic_bgr(1))
    (tmp_path / ".cache").mkdir()
    cv2.imwrite(str(tmp_path / ".cache" / "thumb.png"), isic_bgr(2))
    (tmp_path / "DICOMDIR").write_bytes((DATA / "dicom" / "US1_UNCR.dcm").read_bytes())
    assert [f.name for f in open_source(str(tmp_path / "PAT1"))] == ["a.png"]
    with pytest.raises(CaptureError, match="no image or DICOM files"):
        open_source(str(tmp_path))  # DICOMDIR is an index, not an image
    frames = list(open_source(str(tmp_path), CaptureConfig(recursive=True)))
    assert [f.name for f in frames] == ["a.png", "b.png"]


def test_reconnect_backoff_doubles_up_to_its_cap_and_state_says_reconnecting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    attempts: list[float] = []
    states: list[str] = []
    src: Any = None

    def never_opens(*args: Any) -> FakeCapture:
        attempts.append(time.monotonic())
        if src is not None:
            states.append(src.state)
        return FakeCapture([], opened=False)

    monkeypatch.setattr(stream_mod, "video_capture", never_opens)
    cfg = CaptureConfig(reconnect_initial_s=0.05, reconnect_max_s=0.2, reconnect_give_up_s=1.0)
    src = open_source("rtsp://127.0.0.1:1/live", cfg)
    assert src.state == "connecting"
    with pytest.raises(CaptureError, match=r"rtsp://127.0.0.1:1/live: no connection for 1 s"):
        list(src)
    gaps = np.diff(attempts)
    assert len(gaps) >= 4
    assert gaps[0] == pytest.approx(0.05, abs=0.04)
    assert gaps[1] == pytest.approx(0.10, abs=0.04)
    assert all(g == pytest.approx(0.2, abs=0.06) for g in gaps[3:])  # capped at reconnect_max_s
    assert set(states[1:]) == {"reconnecting"}
    assert src.state == "failed"


@pytest.mark.parametrize("numbers", [[1, 2, 10, 11, 100, 3], [0, 9, 99, 999, 1000, 20]])
def test_natural_order_compares_numbers_as_numbers(tmp_path: Path, numbers: list[int]) -> None:
    for n in numbers:
        cv2.imwrite(str(tmp_path / f"scan_{n}.png"), isic_bgr(n))
    names = [f.name for f in open_source(str(tmp_path))]
    assert names == [f"scan_{n}.png" for n in sorted(numbers)]


def test_a_server_that_accepts_and_drops_at_once_is_backed_off_and_given_up(monkeypatch: pytest.MonkeyPatch) -> None:
    attempts: list[float] = []

    def accepts_then_drops(*args: Any) -> FakeCapture:
        attempts.append(time.monotonic())
        return FakeCapture([None])  # opens, then the first read fails

    monkeypatch.setattr(stream_mod, "video_capture", accepts_then_drops)
    cfg = CaptureConfig(reconnect_initial_s=0.05, reconnect_max_s=0.1, reconnect_give_up_s=0.5)
    src = open_source("http://127.0.0.1:1/cam.mjpg", cfg)
    with pytest.raises(CaptureError, match="no connection for"):
        list(src)
    assert 4 <= len(attempts) <= 10  # about 0.5 s of 0.05-0.1 s waits, not thousands of immediate retries
    assert src.state == "failed"


def test_truncated_jpeg_is_an_error_frame_not_a_half_gray_picture(tmp_path: Path) -> None:
    data = ISIC[0].read_bytes()
    (tmp_path / "c1.jpg").write_bytes(data[: int(len(data) * 0.95)])
    (tmp_path / "c2.jpg").write_bytes(data + b"\x00" * 16)  # padding after the end marker is harmless
    frames = list(open_source(str(tmp_path)))
    assert (
        frames[0].image is None
        and frames[0].error == "c1.jpg: the JPEG file is truncated; copy it again from the device"
    )
    assert frames[1].image is not None and frames[1].error is None
