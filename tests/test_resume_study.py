"""A resumed run decides as an uninterrupted run would, and is not stopped by a region-of-interest check of its own
first frame.

The study open at an interrupted run's last committed frame, and whether the region of interest had fitted a
frame, are committed with the results in the ledger (``edgemed.resume``). Real ``python -m edgemed run``
processes on the real int8 model and real DICOM files from data/, interrupted by SIGKILL (a power cut) or by
``--max-frames`` (a clean stop before the end); the outbox (offline: everything stays in it) is read to see what
each run published.
"""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from helpers import edgemed_run_command as _edgemed
from helpers import run_offline as _run

DATA = Path(__file__).resolve().parent.parent / "data"
CINE = DATA / "dicom" / "examples_ybr_color.dcm"  # 30 frames, one study
SERIES = [DATA / "dicom" / "US1_UNCR.dcm", DATA / "dicom" / "US1_J2KR.dcm"]  # one frame each, another study


def _published(device: Path, kind: str) -> list[dict[str, Any]]:
    """Every message on ``.../{kind}`` committed in the outbox, in production order."""
    if not (device / "outbox.sqlite3").exists():
        return []
    db = sqlite3.connect(f"file:{device / 'outbox.sqlite3'}?mode=ro", uri=True, timeout=10)
    try:
        rows = db.execute("SELECT payload FROM outbox WHERE topic LIKE ? ORDER BY row_id", (f"%/{kind}",)).fetchall()
    except sqlite3.OperationalError:  # not created yet
        return []
    finally:
        db.close()
    return [json.loads(r[0]) for r in rows]


def _profile(tmp_path: Path, name: str, model: Path, source: Path | str, extra: str = "", **keys: object) -> Path:
    device = tmp_path / name
    more = "".join(f", {k}: {json.dumps(v)}" for k, v in keys.items())
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"profile: resume-test\ndevice: {{id: d1, data_dir: '{device}'}}\nmodel: {{path: '{model}'}}\n"
        f"source: {{uri: '{source}'{more}}}\nrun: {{print_results: false}}\n{extra}"
    )
    return path


def _kill_after(profile: Path, device: Path, n: int) -> int:
    """Start a run, SIGKILL it once at least ``n`` results are committed; returns how many were committed."""
    proc = subprocess.Popen(_edgemed(profile), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while len(_published(device, "results")) < n:
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the run did not commit results in time"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    return len(_published(device, "results"))


def _decisions(device: Path) -> list[tuple[Any, ...]]:
    """What each study decision says, and over which frames (the device secret, so session_id, differs)."""
    fields = ("level", "reason", "frames", "counts")
    return [(*(s["triage"][f] for f in fields), s["first_seq"], s["last_seq"]) for s in _published(device, "studies")]


def test_a_cine_killed_part_way_is_decided_over_all_its_frames_by_the_resumed_run(
    int8_model: Path, tmp_path: Path
) -> None:
    whole = _profile(tmp_path, "whole", int8_model, CINE)
    _run(whole)
    expected = _decisions(tmp_path / "whole")
    assert len(expected) == 1 and expected[0][2] == 30 and expected[0][4:] == (0, 29)

    device = tmp_path / "cut"
    cut = _profile(tmp_path, "cut", int8_model, CINE, fps_cap=15)
    committed = _kill_after(cut, device, 20)
    assert 20 <= committed < 30
    assert _published(device, "studies") == []  # a power cut: the interrupted run decided nothing
    second = _run(cut)
    assert f"study decision: {expected[0][0].upper()}: {expected[0][1]}" in second.stderr
    assert _decisions(device) == expected
    # One study across both runs: the decision names the pseudonym every frame result carries.
    sessions = {r["session_id"] for r in _published(device, "results")}
    assert sessions == {_published(device, "studies")[0]["session_id"]}


@pytest.mark.parametrize("stop_after", [12, 30, 31])
def test_a_folder_stopped_before_its_end_gets_the_decisions_of_an_uninterrupted_run(
    int8_model: Path, tmp_path: Path, stop_after: int
) -> None:
    """A cine (one study) then a two-file series (another study), stopped inside the cine, at its last frame and
    inside the series; the averaging rule needs the stored probabilities exactly."""
    folder = tmp_path / "exam"
    folder.mkdir()
    shutil.copy(CINE, folder / "a_cine.dcm")
    for i, path in enumerate(SERIES):
        shutil.copy(path, folder / f"b_series{i}.dcm")
    study = "triage: {study: {rule: mean_probability, min_valid_frames: 2}}\n"
    _run(_profile(tmp_path, "whole", int8_model, folder, study))
    expected = _decisions(tmp_path / "whole")
    assert [d[2] for d in expected] == [30, 2]

    profile = _profile(tmp_path, "cut", int8_model, folder, study)
    first = _run(profile, "--max-frames", str(stop_after))
    # A decision now would cover part of a study, and the resumed run's a second part: none is made yet.
    assert "no study decision yet" in first.stderr
    assert _decisions(tmp_path / "cut") == (expected[:1] if stop_after > 30 else [])
    _run(profile)
    assert _decisions(tmp_path / "cut") == expected


def _image(size: int, i: int) -> np.ndarray:
    image: np.ndarray = np.load(DATA / "breastmnist_28.npz")["test_images"][i]
    return cv2.resize(image, (size, size))


def test_a_resumed_run_does_not_take_its_first_frame_for_the_first_frame_of_the_source(
    int8_model: Path, tmp_path: Path
) -> None:
    """The region of interest fitted the interrupted run's first frame; a frame it does not fit that comes first in
    the resumed run is one error result, as in an uninterrupted run, not a configuration error (exit 2)."""
    folder = tmp_path / "scans"
    folder.mkdir()
    for i, size in enumerate([64, 16, 64, 64]):
        cv2.imwrite(str(folder / f"f{i}.png"), _image(size, i))
    profile = _profile(tmp_path, "dev", int8_model, folder, roi=[0, 0, 32, 32])
    device = tmp_path / "dev"
    _run(profile, "--max-frames", "1")
    second = _run(profile)  # exit 10, not 2
    assert "first frame of the source" not in second.stderr
    results = sorted(_published(device, "results"), key=lambda r: r["source"]["index"])
    assert [r["triage"]["level"] == "error" for r in results] == [False, True, False, False]
    assert "source.roi" in results[1]["triage"]["reason"]

    # A region that does not fit the first frame is still refused on the first frame (exit 2), also when an
    # earlier run on the same data directory fitted another region: what fitted is kept for that region only.
    other = _profile(tmp_path, "dev", int8_model, folder, roi=[0, 0, 20, 20])
    _run(other, "--max-frames", "1")  # the source is interrupted again, after f0
    shutil.move(folder / "f0.png", tmp_path / "f0.png")  # ... and changed: the 16 px file comes first
    refused = subprocess.run(
        _edgemed(_profile(tmp_path, "dev", int8_model, folder, roi=[0, 0, 48, 48])),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert refused.returncode == 2, refused.stderr
    assert "lies outside the 16x16 first frame" in refused.stderr


def test_a_watch_restart_after_the_region_fitted_goes_on_past_a_frame_it_does_not_fit(
    int8_model: Path, tmp_path: Path
) -> None:
    """A watch: folder restarted (a power cut) with a file the region of interest does not fit first in line: one
    error result and the run goes on, instead of exit 2 on every restart (a crash loop under systemd)."""
    folder = tmp_path / "incoming"
    folder.mkdir()
    device = tmp_path / "dev"
    watch = f"watch:{folder}"
    profile = _profile(tmp_path, "dev", int8_model, watch, roi=[0, 0, 32, 32], watch_poll_s=0.05, watch_settle_s=0.1)
    proc = subprocess.Popen(_edgemed(profile), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not _watching(device):  # files there before watching starts are not new
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        cv2.imwrite(str(folder / "a.png"), _image(64, 0))
        while len(_published(device, "results")) < 1:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    cv2.imwrite(str(folder / "b.png"), _image(16, 1))  # arrive while edgemed is down
    cv2.imwrite(str(folder / "c.png"), _image(64, 2))
    proc = subprocess.Popen(_edgemed(profile), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while len(_published(device, "results")) < 3:
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 10, err
    levels = [r["triage"]["level"] == "error" for r in _published(device, "results")]
    assert levels == [False, True, False]


def _watching(device: Path) -> bool:
    """The watch: source is attached to the ledger (it has listed the files already there)."""
    try:
        db = sqlite3.connect(f"file:{device / 'outbox.sqlite3'}?mode=ro", uri=True, timeout=10)
        try:
            return bool(db.execute("SELECT COUNT(*) FROM sources").fetchone()[0])
        finally:
            db.close()
    except sqlite3.OperationalError:
        return False


# -- the study tracker's side, as pure logic: what is kept is exactly what the decision needs ---------------------

_LABELS = ("normal_benign", "malignant")


def _tracker() -> Any:
    from edgemed.sessions import StudyTracker
    from edgemed.triage import TriagePolicy

    return StudyTracker(TriagePolicy.model_validate({"study": {"rule": "mean_probability"}}), b"k" * 32)


def _feed(tracker: Any, frames: range, probs: list[float]) -> Any:
    from edgemed.triage import triage
    from edgemed.types import Frame, FrameResult, Prediction

    closed = None
    for i in frames:
        frame = Frame(index=i, source_kind="dicom", study_uid="1.2.3.4")
        closed = tracker.before(frame) or closed
        pred = Prediction(_LABELS, (1 - probs[i], probs[i]))
        verdict = triage(pred, tracker.policy)
        tracker.add(FrameResult(frame, i, f"r{i}", 0.0, None, tracker.session_id(frame), None, pred, verdict, {}))
    return closed


def test_a_restored_study_decides_exactly_as_the_uninterrupted_one_and_names_no_study_id() -> None:
    probs = [0.1 + 0.83 * ((i * 7) % 11) / 11 for i in range(20)]
    whole = _tracker()
    _feed(whole, range(20), probs)
    expected = whole.close()

    first = _tracker()
    _feed(first, range(13), probs)
    kept = json.loads(json.dumps(first.export()))  # as the ledger stores it
    assert "1.2.3.4" not in json.dumps(kept)  # the study id stays out of the ledger too: its pseudonym is kept
    resumed = _tracker()
    resumed.restore(kept, resumes_at=13)
    _feed(resumed, range(13, 20), probs)
    assert resumed.close() == expected


def test_a_restored_study_is_dropped_when_the_resumed_run_does_not_continue_it(caplog: Any) -> None:
    """Files before the resume point changed (they are read again): their frames are not counted twice."""
    probs = [0.9] * 10
    first = _tracker()
    _feed(first, range(6), probs)
    resumed = _tracker()
    resumed.restore(first.export(), resumes_at=6)
    _feed(resumed, range(10), probs)  # the source starts over at frame 0
    assert resumed.close().decision.extra["frames"] == 10
    assert "cannot be continued" in caplog.text


def test_a_damaged_pass_state_is_said_and_ignored(int8_model: Path, tmp_path: Path) -> None:
    """A ledger row that is not what this version writes does not stop the run: one warning, the run goes on."""
    profile = _profile(tmp_path, "dev", int8_model, CINE)
    device = tmp_path / "dev"
    _run(profile, "--max-frames", "5")
    db = sqlite3.connect(device / "outbox.sqlite3")
    with db:
        db.execute("UPDATE passes SET state = json_set(state, '$.study.frames.levels', json('{\"urgent\": -1}'))")
    db.close()
    second = _run(profile)
    assert "cannot be read" in second.stderr
    assert [d[2] for d in _decisions(device)] == [25]  # only this run's frames: the damaged part is left out
