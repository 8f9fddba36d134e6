"""Third-party notices stay off stderr by default and come back with ``--log-level DEBUG``.

The real ``edgemed run`` (LiteRT's XNNPACK notice, OpenCV's and FFmpeg's complaints about an unreadable video)
and the real ``edgemed convert`` (TensorFlow's ``fully_quantize:`` line, LiteRT's notice from the converter's own
interpreters), each in a child process as a user runs them: by default every line on stderr is edgemed's own.
The filter itself (``edgemed.stderr_filter``) is also checked against a stand-in that writes to file descriptor 2
as native code does, including a fatal abort.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from demo_model import demo_model_fixture  # noqa: F401  # the demo_model fixture

ROOT = Path(__file__).resolve().parent.parent


def edgemed(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENCV_", "TF_CPP_"))}
    return subprocess.run(
        [sys.executable, "-m", "edgemed", *args], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env
    )


def foreign(stderr: str) -> list[str]:
    """The stderr lines that are not edgemed's own."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("edgemed")]


def _run_args(model: Path, source: Path, data: Path) -> list[str]:
    return ["run", "--model", str(model), "--source", str(source), "--device-id", "q-01", "--data-dir", str(data)]


def test_run_prints_only_edgemeds_own_lines(int8_model: Path, data_dir: Path, tmp_path: Path) -> None:
    images = _run_args(int8_model, data_dir / "isic_samples", tmp_path / "a")
    quiet = edgemed(*images, "--quiet", "--max-frames", "2")
    assert quiet.returncode == 10, quiet.stderr
    assert foreign(quiet.stderr) == [], quiet.stderr
    loud = edgemed(*images, "--quiet", "--max-frames", "2", "--log-level", "DEBUG")
    assert "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." in loud.stderr  # hidden, not lost

    video = tmp_path / "broken.mp4"
    video.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)  # an MP4 header and no movie
    broken = edgemed(*_run_args(int8_model, video, tmp_path / "b"))
    assert broken.returncode == 4, broken.stderr  # the source is unusable: edgemed says so, once, in its words
    assert foreign(broken.stderr) == [], broken.stderr
    assert re.search(
        r"moov atom not found|\[ WARN:",
        edgemed(*_run_args(int8_model, video, tmp_path / "c"), "--log-level", "DEBUG").stderr,
    )


def test_a_damaged_jpeg_leaves_no_libjpeg_warning_on_stderr(int8_model: Path, data_dir: Path, tmp_path: Path) -> None:
    """libjpeg prints "Corrupt JPEG data: ..." from the capture thread's decoder for a JPEG damaged inside."""
    folder = tmp_path / "scans"
    folder.mkdir()
    good = (data_dir / "isic_samples" / "ISIC_0000014.jpg").read_bytes()
    damaged = bytearray(good)
    for i in range(2000, len(damaged) - 2000, 97):  # scan data overwritten; markers at both ends intact
        damaged[i] = 0x55
    (folder / "a.jpg").write_bytes(bytes(damaged))
    (folder / "b.jpg").write_bytes(good)
    quiet = edgemed(*_run_args(int8_model, folder, tmp_path / "q"), "--quiet")
    assert quiet.returncode == 10, quiet.stderr
    assert foreign(quiet.stderr) == [], quiet.stderr
    loud = edgemed(*_run_args(int8_model, folder, tmp_path / "l"), "--quiet", "--log-level", "DEBUG")
    assert "Corrupt JPEG data" in loud.stderr  # hidden, not lost


@pytest.mark.slow
def test_convert_prints_only_edgemeds_own_lines(demo_model: Path, tmp_path: Path) -> None:
    keras = next(demo_model.glob("*.keras"))
    args = ["convert", str(keras), "--calibration", str(ROOT / "data" / "breastmnist_28.npz"), "--no-progress"]
    quiet = edgemed(*args, "--out", str(tmp_path / "a"))
    assert quiet.returncode == 0, quiet.stderr
    assert foreign(quiet.stderr) == [], quiet.stderr
    assert "accepted" in quiet.stdout  # the converter's own report is untouched
    loud = edgemed(*args, "--out", str(tmp_path / "b"), "--log-level", "DEBUG")
    assert loud.returncode == 0 and "fully_quantize: " in loud.stderr  # hidden, not lost


_NATIVE = """
import os, sys
from edgemed.stderr_filter import LITERT_NOTICES, filtered_stderr
print("before", file=sys.stderr, flush=True)
with filtered_stderr(LITERT_NOTICES):
    os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\\n")
    os.write(2, b"E0000 a real problem\\n")
    os.write(2, b"\\rprogress 1/2\\rprogress 2/2\\n")
    if sys.argv[1] == "abort":
        os.write(2, b"F0000 Check failed: fatal\\n")
        os.abort()
print("after", file=sys.stderr, flush=True)
"""


@pytest.mark.parametrize("how", ["return", "abort"])
def test_the_filter_drops_only_the_notices_and_keeps_a_fatal_message(how: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _NATIVE, how], capture_output=True, text=True, timeout=60, env=env)
    assert "XNNPACK" not in proc.stderr
    assert "E0000 a real problem" in proc.stderr and "progress 2/2" in proc.stderr
    assert proc.stderr.index("before") < proc.stderr.index("a real problem")
    if how == "abort":
        assert proc.returncode != 0 and "F0000 Check failed: fatal" in proc.stderr  # the filter outlived us
    else:
        assert proc.returncode == 0 and proc.stderr.rstrip().endswith("after")  # order kept, stderr restored


def _count(device: Path, sql: str) -> int:
    if not (device / "outbox.sqlite3").exists():
        return 0
    db = sqlite3.connect(f"file:{device / 'outbox.sqlite3'}?mode=ro", uri=True, timeout=10)
    try:
        return int(db.execute(sql).fetchone()[0])
    except sqlite3.OperationalError:  # not created yet
        return 0
    finally:
        db.close()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_whole_group_leaves_the_shutdown_lines_on_stderr(
    sig: signal.Signals, int8_model: Path, data_dir: Path, tmp_path: Path
) -> None:
    """Ctrl-C signals the terminal's whole foreground process group, ``systemctl stop`` every process of the
    service: the stderr filter, a child of edgemed, gets the signal too and must outlive edgemed's shutdown."""
    folder, device = tmp_path / "watch", tmp_path / "device"
    folder.mkdir()
    cmd = [sys.executable, "-m", "edgemed", *_run_args(int8_model, Path(f"watch:{folder}"), device), "--quiet"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENCV_", "TF_CPP_"))}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while _count(device, "SELECT COUNT(*) FROM sources") < 1:  # the watch has taken stock of the folder
            assert proc.poll() is None and time.monotonic() < deadline, "the run did not start in time"
            time.sleep(0.05)
        shutil.copy(data_dir / "isic_samples" / "ISIC_0000014.jpg", folder / "new.jpg")
        while _count(device, "SELECT COUNT(*) FROM outbox WHERE topic LIKE '%/results'") < 1:  # the loop runs
            assert proc.poll() is None and time.monotonic() < deadline, "the run did not read the new file"
            time.sleep(0.05)
        os.killpg(proc.pid, sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert f"received {sig.name}: stopping capture, draining" in err, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "edgemed: 1 frames" in err, err  # the end-of-run summary, written after the drain, is there too
