"""A region of interest that fits no frame is a configuration error (exit 2, naming `source.roi`), found on the
first frame by `edgemed run` and by `edgemed doctor`; one odd-sized frame later in a folder is one error result."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import run_edgemed

from edgemed.cli import main

DATA = Path(__file__).resolve().parent.parent / "data"


def _pngs(folder: Path, n: int) -> None:
    folder.mkdir(exist_ok=True)
    for i, image in enumerate(np.load(DATA / "breastmnist_28.npz")["test_images"][:n]):
        cv2.imwrite(str(folder / f"img{i}.png"), image)


def _profile(tmp_path: Path, model: Path, source: Path, roi: tuple[int, int, int, int]) -> Path:
    profile = tmp_path / "probe.yaml"
    profile.write_text(
        f"profile: roi-test\ndevice: {{id: us-01, data_dir: '{tmp_path / 'device'}'}}\nmodel: {{path: '{model}'}}\n"
        f"source: {{uri: '{source}', roi: [{', '.join(map(str, roi))}]}}\n"
    )
    return profile


def test_a_roi_outside_every_frame_stops_the_run_with_exit_2_naming_source_roi(
    int8_model: Path, tmp_path: Path
) -> None:
    _pngs(tmp_path / "scans", 30)
    proc = run_edgemed("run", "--profile", str(_profile(tmp_path, int8_model, tmp_path / "scans", (0, 0, 100, 80))))
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("edgemed: error: region of interest x=0 y=0 w=100 h=80 (source.roi) lies outside")
    assert "28x28 first frame" in last and "set source.roi in the device profile" in last
    assert "capture.roi" not in proc.stderr and "Traceback" not in proc.stderr
    assert "img0" not in proc.stderr  # no file name in the message (it reaches the journal on a device)
    # Detected on the first frame: not 30 error results.
    assert (tmp_path / "device" / "results.jsonl").read_text() == ""


def test_a_later_frame_the_roi_does_not_fit_is_one_error_result(int8_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(DATA / "dicom" / "US1_UNCR.dcm", folder / "a1.dcm")  # 640x480: the ROI fits
    _pngs(tmp_path / "small", 1)
    shutil.copy(tmp_path / "small" / "img0.png", folder / "a2.png")  # 28x28: it does not
    shutil.copy(DATA / "dicom" / "OBXXXX1A.dcm", folder / "a3.dcm")  # 800x600: it fits again
    proc = run_edgemed("run", "--profile", str(_profile(tmp_path, int8_model, folder, (100, 100, 300, 200))))
    assert proc.returncode == 10, proc.stderr  # offline: results kept on disk
    results = [json.loads(x) for x in (tmp_path / "device" / "results.jsonl").read_text().splitlines()]
    assert [r["source"]["index"] for r in results] == [0, 1, 2]
    assert [r["triage"]["level"] == "error" for r in results] == [False, True, False]
    assert results[1]["triage"]["reason"] == (
        "input: region of interest x=100 y=100 w=300 h=200 (source.roi) lies outside the 28x28 frame; "
        "fix source.roi in the device profile"
    )


def test_doctor_reports_a_roi_outside_the_first_frame_as_a_fail_row(
    int8_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _pngs(tmp_path / "scans", 3)
    bad = _profile(tmp_path, int8_model, tmp_path / "scans", (0, 0, 100, 80))
    code = main(["doctor", "--profile", str(bad), "--data-dir", str(tmp_path / "d")])
    out = capsys.readouterr().out
    assert code == 2, out
    row = next(line for line in out.splitlines() if "source roi" in line)
    assert row.startswith("FAIL  source roi") and "(source.roi) lies outside the 28x28 first frame" in row
    good = _profile(tmp_path, int8_model, tmp_path / "scans", (2, 2, 20, 20))
    assert main(["doctor", "--profile", str(good), "--data-dir", str(tmp_path / "d")]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "source roi" in line)
    assert row.startswith("ok    source roi") and row.endswith("source.roi x=2 y=2 w=20 h=20 fits the first frame")
