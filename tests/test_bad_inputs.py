"""Bad files inside a source never end a run: each becomes one `error` result whose advice fits the file.

Every case runs the real `python -m edgemed run` on the real int8 model over real images from data/, with the
bad file at the first, a middle and the last position of a folder, a `watch:` folder and a DICOM folder.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from broker_fixtures import Mosquitto
from helpers import Collector, run_edgemed

from edgemed.capture import open_source
from edgemed.errors import CaptureError

DATA = Path(__file__).resolve().parent.parent / "data"
DICOM = DATA / "dicom"
BAD_AT = (0, 3, 6)  # first, a middle and the last of 7 inputs
PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"


def _png(i: int) -> bytes:
    image = np.load(DATA / "breastmnist_28.npz")["test_images"][i]
    return bytes(cv2.imencode(".png", image)[1].tobytes())


def _garbage(n: int = 3000) -> bytes:
    rng = random.Random(n)
    return bytes(rng.randrange(256) for _ in range(n))


# kind -> (bytes of the bad image file, what its error must say)
IMAGE_BAD: dict[str, tuple[Callable[[], bytes], str]] = {
    "empty": (lambda: b"", "the file is empty (0 bytes)"),
    "truncated": (lambda: _png(0)[:60], "the image cannot be decoded"),
    "garbage": (_garbage, "not a readable image"),
    "wrong-extension": (lambda: PDF, "not a readable image"),
}
DICOM_BAD: dict[str, tuple[Callable[[], bytes], str]] = {
    "empty": (lambda: b"", "the file is empty (0 bytes)"),
    "truncated": (lambda: (DICOM / "US1_UNCR.dcm").read_bytes()[:200_000], "truncated"),
    "garbage": (_garbage, "not a readable DICOM file"),
    "wrong-extension": (lambda: PDF, "not a readable DICOM file"),
    "damaged-header": (lambda: _damaged_vr(), "DICOM header is damaged"),
}


def _damaged_vr() -> bytes:
    """US1_UNCR.dcm with the value representation of PhotometricInterpretation overwritten by two stray bytes.

    pydicom raised NotImplementedError for it on first access, which ended the run.
    """
    data = (DICOM / "US1_UNCR.dcm").read_bytes()
    at = data.index(b"\x28\x00\x04\x00CS") + 4
    return data[:at] + b"\x43\xcf" + data[at + 2 :]


def _image_folder(folder: Path, kind: str) -> None:
    folder.mkdir()
    make, _ = IMAGE_BAD[kind]
    for i in range(7):
        (folder / f"f{i}.png").write_bytes(make() if i in BAD_AT else _png(i))


def _dicom_folder(folder: Path, kind: str) -> None:
    folder.mkdir()
    make, _ = DICOM_BAD[kind]
    good = ["US1_UNCR.dcm", "OBXXXX1A.dcm", "gdcm-US-ALOKA-16.dcm", "US1_J2KR.dcm"]
    for i in range(7):
        target = folder / f"f{i}.dcm"
        if i in BAD_AT:
            target.write_bytes(make())
        else:
            shutil.copy(DICOM / good[i % len(good)], target)


def _check(results: list[dict[str, Any]], expected_words: str, kind: str) -> None:
    by_index = {r["source"]["index"]: r for r in results}
    assert sorted(by_index) == list(range(7)) and len(results) == 7, sorted(by_index)
    for i, r in by_index.items():
        level = r["triage"]["level"]
        if i in BAD_AT:
            assert level == "error" and r["prediction"] is None, r["triage"]
            reason = r["triage"]["reason"]
            assert reason.startswith("input: ") and expected_words in reason, (kind, reason)
            assert "MP4" not in reason  # advice for the file it is, not for a video
        else:
            assert level != "error", r["triage"]  # every good file still yields its own result


def _run(model: Path, source: Path, device: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_edgemed(
        "run", "--model", str(model), "--source", str(source), "--device-id", "d1", "--data-dir", str(device), *extra
    )


@pytest.mark.parametrize("kind", sorted(IMAGE_BAD))
def test_bad_images_in_a_folder_become_one_error_result_each(
    int8_model: Path, tmp_path: Path, broker: Mosquitto, kind: str
) -> None:
    folder = tmp_path / "scans"
    _image_folder(folder, kind)
    collector = Collector(broker.port)
    try:
        proc = _run(int8_model, folder, tmp_path / "device", "--broker", broker.url)
        assert proc.returncode == 0, proc.stderr
        results = collector.wait_results(7)
    finally:
        collector.close()
    assert "Traceback" not in proc.stderr
    _check(results, IMAGE_BAD[kind][1], kind)


@pytest.mark.parametrize("kind", sorted(DICOM_BAD))
def test_bad_files_in_a_dicom_folder_become_one_error_result_each(int8_model: Path, tmp_path: Path, kind: str) -> None:
    folder = tmp_path / "study"
    _dicom_folder(folder, kind)
    device = tmp_path / "device"
    proc = _run(int8_model, folder, device, "--quiet")
    assert proc.returncode == 10, proc.stderr  # offline: every result is kept on disk
    assert "Traceback" not in proc.stderr
    results = [json.loads(line) for line in (device / "results.jsonl").read_text().splitlines()]
    assert all(r["source"]["kind"] == "dicom" for r in results)
    _check(results, DICOM_BAD[kind][1], kind)
    for r in results:
        if r["triage"]["level"] == "error":
            assert "PNG or JPEG" not in r["triage"]["reason"]  # a .dcm gets DICOM advice


@pytest.mark.parametrize("kind", sorted(IMAGE_BAD))
def test_bad_files_arriving_in_a_watched_folder_become_one_error_result_each(
    int8_model: Path, tmp_path: Path, broker: Mosquitto, kind: str
) -> None:
    folder = tmp_path / "export"
    folder.mkdir()
    staged = tmp_path / "staged"
    _image_folder(staged, kind)
    profile = tmp_path / "watch.yaml"
    profile.write_text(
        f"profile: watch-test\ndevice: {{id: w1, data_dir: '{tmp_path / 'device'}'}}\n"
        f"model: {{path: '{int8_model}'}}\nmqtt: {{url: '{broker.url}'}}\n"
        f"source: {{uri: 'watch:{folder}', watch_poll_s: 0.05, watch_settle_s: 0.2}}\nrun: {{print_results: false}}\n"
        "health: {interval_s: 0.1}\n"
    )
    collector = Collector(broker.port)
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgemed", "run", "--profile", str(profile)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Files already there when watching starts are not new: wait until the heartbeat says it is watching.
        deadline = time.monotonic() + 30
        while not any(h.get("source_state") == "open" for h in collector.by_topic.get("health", [])):
            assert time.monotonic() < deadline and proc.poll() is None, "edgemed did not start watching"
            time.sleep(0.05)
        # The device writes its files one after the other while edgemed watches.
        for path in sorted(staged.iterdir(), key=lambda p: int(p.stem[1:])):
            time.sleep(0.4)
            shutil.move(path, folder / path.name)
        results = collector.wait_results(7, timeout_s=30)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=40)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        collector.close()
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err
    _check(results, IMAGE_BAD[kind][1], kind)


# ---------------------------------------------------------------- advice that fits the file (capture level)


def test_each_kind_of_bad_file_gets_advice_that_fits_it(tmp_path: Path) -> None:
    (tmp_path / "a1.png").write_bytes(b"")
    (tmp_path / "a2.dcm").write_bytes(_garbage())
    (tmp_path / "a3.dcm").write_bytes(b"")
    (tmp_path / "a4.jpg").write_bytes(PDF)
    (tmp_path / "a5.dcm").write_bytes(_png(1))  # a PNG named .dcm is still read, by content
    frames = list(open_source(str(tmp_path)))
    errors = [f.error for f in frames]
    assert errors[0] == "a1.png: the file is empty (0 bytes); copy it again from the device"
    assert errors[1] is not None and errors[1].startswith("a2.dcm: not a readable DICOM file")
    assert "export it again from the device as DICOM" in errors[1] and "PNG" not in errors[1]
    assert errors[2] == "a3.dcm: the file is empty (0 bytes); copy it again from the device"
    assert errors[3] is not None and errors[3].startswith("a4.jpg: not a readable image")
    assert errors[4] is None and frames[4].image is not None


@pytest.mark.parametrize("name", ["scan.png", "scan.dcm", "scan"])
def test_a_single_bad_image_or_dicom_file_is_one_error_result_not_a_video_error(tmp_path: Path, name: str) -> None:
    target = tmp_path / name
    target.write_bytes(_garbage())
    if name == "scan":  # no extension and no DICOM content: nothing says what it is, so it is tried as a video
        with pytest.raises(CaptureError, match="not a readable image, DICOM or video file"):
            open_source(str(target))
        return
    (frame,) = list(open_source(str(target)))
    assert frame.image is None and frame.error is not None and "MP4" not in frame.error
    assert ("DICOM" in frame.error) == name.endswith(".dcm")


def test_an_empty_video_file_says_it_is_empty(tmp_path: Path) -> None:
    (tmp_path / "clip.mp4").write_bytes(b"")
    with pytest.raises(CaptureError, match=r"clip.mp4: the file is empty \(0 bytes\); copy it again") as info:
        open_source(str(tmp_path / "clip.mp4"))
    assert "MP4" not in str(info.value)
