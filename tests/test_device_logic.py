"""The device's logic without a model file, an image file or a broker (issue 10 item 1).

``Device`` runs with a fake backend, a fake source and an in-memory publisher (tests/device_fakes.py); the rest
is real: quality gate, preprocessing, triage, study tracking, envelope, the SQLite outbox and the delivery thread.
"""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from device_fakes import (
    BRIGHT,
    DARK,
    INPUT,
    MID,
    AcknowledgingPublisher,
    BrightnessBackend,
    ListSource,
    fake_model,
    noise,
)

from edgemed.clock import Clock
from edgemed.config import DeviceProfile
from edgemed.deploy import check_deployable
from edgemed.envelope import result_schema, study_schema
from edgemed.errors import ConfigError, ModelError, OutboxLockedError
from edgemed.identity import load_or_create_secret, pseudonym
from edgemed.lock import DataDirLock
from edgemed.manifest import find_manifest, load_manifest
from edgemed.preprocess import Preprocessor
from edgemed.printer import result_line
from edgemed.runtime import Device
from edgemed.types import Frame, FrameResult, TriageResult

NOW = 1_700_000_000.25  # 2023-11-14T22:13:20.250Z
TRIAGE = {"rules": {"malignant": {"level": "urgent", "min_probability": 0.5}, "benign": {"level": "no_finding"}}}
DATA = Path(__file__).resolve().parent.parent / "data"


def _profile(data_dir: Path, **sections: Any) -> DeviceProfile:
    raw = {
        "profile": "logic-test",
        "device": {"id": "logic-01", "site": "ward", "data_dir": str(data_dir)},
        "triage": TRIAGE,
        "health": {"interval_s": 3600},
        **sections,
    }
    return DeviceProfile.model_validate(raw)


def _clock() -> Clock:
    return Clock(now=lambda: NOW, synced=lambda: True)


def _cine(kind: str = "video", study_uid: str | None = None) -> list[Frame]:
    """Seven frames: benign, urgent, urgent, unsure, blank (recapture), unreadable (error), urgent."""
    images: list[np.ndarray | None] = [
        noise(*DARK, seed=0),
        noise(*BRIGHT, seed=1),
        noise(*BRIGHT, seed=2),
        noise(*MID, seed=3),
        np.full((64, 64), 120, np.uint8),
        None,
        noise(*BRIGHT, seed=6),
    ]
    return [
        Frame(
            index=i,
            source_kind=kind,  # type: ignore[arg-type]
            image=image,
            error=f"scan_{i}.dcm: the image cannot be decoded" if image is None else None,
            name=f"scan_{i}.dcm",
            study_uid=study_uid,
        )
        for i, image in enumerate(images)
    ]


def test_a_session_gives_its_results_in_order_then_one_study_decision(tmp_path: Path) -> None:
    backend, link, out = BrightnessBackend(), AcknowledgingPublisher(), io.StringIO()
    frames = _cine()
    device = Device(
        _profile(tmp_path),
        out=out,
        model=fake_model(),
        backend=backend,
        source=ListSource(frames),
        publisher=link,
        clock=_clock(),
    )
    with device:
        summary = device.run()

    levels = ["no_finding", "urgent", "urgent", "inconclusive", "recapture", "error", "urgent"]
    assert summary.frames == 7 and summary.pending == 0 and summary.exit_code == 0
    assert summary.levels == {"no_finding": 1, "urgent": 3, "inconclusive": 1, "recapture": 1, "error": 1}
    assert (summary.errors, summary.recaptures) == (1, 1)
    # Only the five readable frames that passed the quality gate reached the model, each as its own pixels.
    assert len(backend.inputs) == 5 and backend.closed
    prepare = Preprocessor(fake_model().manifest.input, INPUT)
    for x, i in zip(backend.inputs, (0, 1, 2, 3, 6), strict=True):
        assert np.array_equal(x, prepare(frames[i].image))

    results = [json.loads(p) for p in link.on("results")]
    studies = [json.loads(p) for p in link.on("studies")]
    for env in results:
        jsonschema.validate(env, result_schema())
    assert [r["seq"] for r in results] == list(range(7))
    assert [r["source"]["index"] for r in results] == list(range(7))
    assert [r["triage"]["level"] for r in results] == levels
    assert [r["prediction"]["label"] if r["prediction"] else None for r in results] == [
        "benign",
        "malignant",
        "malignant",
        "benign",
        None,
        None,
        "malignant",
    ]
    assert results[4]["quality"]["passed"] is False and results[5]["quality"] is None
    assert list(results[1]["latency_ms"]) == ["capture", "quality", "preprocess", "inference", "triage", "total"]
    assert list(results[4]["latency_ms"]) == ["capture", "quality", "preprocess", "inference", "total"]
    assert all(r["created_at"] == "2023-11-14T22:13:20.250Z" and r["clock_synced"] is True for r in results)
    # The unreadable frame's message does not carry its file name; no result does.
    assert results[5]["triage"]["reason"] == "input: the image cannot be decoded"
    assert not any("scan_" in p.decode() for p in link.on("results"))

    # One decision over the video session, after its last frame, on the same counter.
    assert len(studies) == 1
    study = studies[0]
    jsonschema.validate(study, study_schema())
    assert (study["seq"], study["first_seq"], study["last_seq"]) == (7, 0, 6)
    assert study["triage"]["level"] == "urgent" and study["triage"]["frames"] == 7
    assert study["triage"]["valid_frames"] == 5 and study["session_id"] is None
    assert [s.decision.level for s in device.studies] == ["urgent"] and summary.studies[0].level == "urgent"

    # The nurse's lines, one per result, read from the typed results; no file name off a terminal.
    lines = out.getvalue().splitlines()
    assert len(lines) == 7 and "scan_" not in out.getvalue()
    assert lines[1] == "#1      malignant (100%)  -> URGENT: " + results[1]["triage"]["reason"]
    assert lines[5].startswith("#5      -  -> ERROR: ")
    # The broker got a clean offline status with nothing left on disk.
    assert link.stopped == {"abnormal": None, "pending": 0}


def test_a_new_study_is_decided_before_the_first_frame_of_the_next(tmp_path: Path) -> None:
    link = AcknowledgingPublisher()
    # A folder: two cine studies back to back (by StudyInstanceUID), then an unrelated photo.
    frames = [
        *(Frame(index=i, source_kind="dicom", image=noise(*BRIGHT, seed=i), study_uid="1.2.3.A") for i in range(3)),
        *(Frame(index=3 + i, source_kind="dicom", image=noise(*DARK, seed=i), study_uid="1.2.3.B") for i in range(3)),
        Frame(index=6, source_kind="image", image=noise(*DARK, seed=9)),
    ]
    profile = _profile(tmp_path, run={"print_results": False})
    with Device(
        profile, model=fake_model(), backend=BrightnessBackend(), source=ListSource(frames, "folder"), publisher=link
    ) as device:
        summary = device.run()

    sent = [json.loads(m.payload) for m in link.sent if not m.topic.endswith("/health")]
    kinds = [env["schema"] for env in sent]
    assert kinds == [
        *["edgemed.result/1"] * 3,
        "edgemed.study/1",
        *["edgemed.result/1"] * 3,
        "edgemed.study/1",
        "edgemed.result/1",
    ]
    assert [env["seq"] for env in sent] == list(range(9))  # one counter, no gap
    first, second = sent[3], sent[7]
    assert (first["first_seq"], first["last_seq"], first["triage"]["level"]) == (0, 2, "urgent")
    assert (second["first_seq"], second["last_seq"], second["triage"]["level"]) == (4, 6, "no_finding")
    # Each study's results and decision carry that study's pseudonym, keyed with the device secret; the photo none.
    secret = load_or_create_secret(tmp_path)
    assert {env["session_id"] for env in sent[:4]} == {pseudonym(secret, "1.2.3.A")}
    assert {env["session_id"] for env in sent[4:8]} == {pseudonym(secret, "1.2.3.B")}
    assert sent[8]["session_id"] is None
    assert not any("1.2.3." in m.payload.decode() for m in link.sent)
    assert summary.frames == 7 and [s.level for s in summary.studies] == ["urgent", "no_finding"]


def test_process_returns_the_typed_result_the_envelope_was_encoded_from(tmp_path: Path) -> None:
    profile = _profile(tmp_path, run={"print_results": False})
    with Device(profile, model=fake_model(), backend=BrightnessBackend(), clock=_clock(), study_id="S-9") as device:
        frame = Frame(index=4, source_kind="image", image=noise(*BRIGHT, seed=4), name="MRN123.png")
        result = device.process(frame, capture_ms=1.5)
        device.outbox.flush()
        (item,) = device.outbox.pending(10)
    assert isinstance(result, FrameResult) and result.frame is frame
    assert result.level == "urgent" and result.prediction is not None and result.prediction.label == "malignant"
    env = json.loads(item.payload)
    assert env["result_id"] == result.result_id == item.result_id and env["seq"] == result.seq == 0
    assert env["session_id"] == result.session_id == pseudonym(load_or_create_secret(tmp_path), "S-9")
    assert env["latency_ms"]["capture"] == 1.5 == result.latency_ms["capture"]
    assert env["triage"] == result.triage.as_dict() and "MRN123" not in item.payload.decode()
    assert result_line(result, show_name=True).startswith("#4     MRN123.png  malignant (100%)  -> URGENT: ")


def test_the_heartbeat_reports_source_reconnects_and_evicted_results(tmp_path: Path) -> None:
    link = AcknowledgingPublisher()
    frames = [Frame(index=i, source_kind="stream", image=noise(*DARK, seed=i)) for i in range(6)]
    profile = _profile(tmp_path, run={"print_results": False}, outbox={"max_pending": 3, "on_full": "evict_oldest"})
    # Offline (no publisher): the outbox fills, and evict_oldest makes room by deleting the oldest.
    with Device(
        profile, model=fake_model(), backend=BrightnessBackend(), source=ListSource(frames, "stream", reconnects=2)
    ) as device:
        device.run()
        beat = device.health_payload()
        evicted = device.outbox.evicted_total
    assert evicted >= 3 and beat["evicted_total"] == evicted
    assert beat["source_reconnects"] == 2 and beat["source_state"] == "ended"
    # Online, the same counters go out on the health topic.
    with Device(
        _profile(tmp_path / "b", run={"print_results": False}),
        model=fake_model(),
        backend=BrightnessBackend(),
        source=ListSource(frames[:2], "stream", reconnects=1),
        publisher=link,
    ) as device:
        device.run()
    last = json.loads(link.on("health")[-1])
    assert last["source_reconnects"] == 1 and last["evicted_total"] == 0 and last["pending"] == 0


def test_a_device_given_no_source_is_a_configuration_error(tmp_path: Path, int8_model: Path) -> None:
    profile = _profile(tmp_path, model={"path": str(int8_model)}, triage={})
    with Device(profile) as device, pytest.raises(ConfigError, match="no source given: pass --source PATH"):
        device.run()


def test_edgemed_run_without_a_source_exits_2(tmp_path: Path, int8_model: Path) -> None:
    from helpers import run_edgemed

    proc = run_edgemed("run", "--model", str(int8_model), "--device-id", "d1", "--data-dir", str(tmp_path / "d"))
    assert proc.returncode == 2, proc.stderr
    assert "edgemed: error: no source given: pass --source PATH or set source.uri in the profile" in proc.stderr


def test_the_heartbeat_of_a_real_run_carries_both_counters(tmp_path: Path, int8_model: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for photo in sorted((DATA / "isic_samples").glob("*.jpg"))[:5]:
        shutil.copy(photo, images)
    profile = _profile(
        tmp_path / "d",
        model={"path": str(int8_model)},
        source={"uri": str(images)},
        triage={},
        run={"print_results": False},
        outbox={"max_pending": 2, "on_full": "evict_oldest"},
    )
    with Device(profile) as device:
        device.run()
        beat = device.health_payload()
    assert beat["evicted_total"] >= 3 and beat["source_reconnects"] == 0


def test_a_backend_without_its_model_is_refused() -> None:
    with pytest.raises(ConfigError, match="needs the model it runs"):
        Device(_profile(Path("/nonexistent")), backend=BrightnessBackend())


def test_a_handed_in_backend_and_source_are_closed_when_the_policy_does_not_fit_the_model(tmp_path: Path) -> None:
    backend, source = BrightnessBackend(), ListSource(_cine())
    profile = _profile(tmp_path, triage={"rules": {"melanoma": {"level": "urgent"}}})  # the model has no melanoma
    device = Device(profile, model=fake_model(), backend=backend, source=source, publisher=AcknowledgingPublisher())
    with pytest.raises(ConfigError, match="melanoma"), device:
        pass
    assert backend.closed and source.closed


def test_a_handed_in_backend_and_source_are_closed_when_the_data_directory_is_locked(tmp_path: Path) -> None:
    backend, source = BrightnessBackend(), ListSource(_cine())
    device = Device(_profile(tmp_path), model=fake_model(), backend=backend, source=source)
    with DataDirLock(tmp_path), pytest.raises(OutboxLockedError), device:
        pass
    assert backend.closed and source.closed


def test_a_handed_in_source_is_closed_also_by_a_device_that_never_ran(tmp_path: Path) -> None:
    backend, source = BrightnessBackend(), ListSource(_cine())
    with Device(_profile(tmp_path), model=fake_model(), backend=backend, source=source):
        pass
    assert backend.closed and source.closed


def test_a_handed_in_backend_and_source_are_closed_when_the_device_cannot_be_made() -> None:
    backend, source = BrightnessBackend(), ListSource(_cine())
    with pytest.raises(ConfigError, match="needs the model it runs"):
        Device(_profile(Path("/nonexistent")), backend=backend, source=source)
    assert backend.closed and source.closed


def test_a_source_handed_in_is_closed_once_after_a_run(tmp_path: Path) -> None:
    closes: list[int] = []
    source = ListSource(_cine())
    source.close = lambda: closes.append(1)  # type: ignore[method-assign]
    with Device(_profile(tmp_path), model=fake_model(), backend=BrightnessBackend(), source=source) as device:
        device.run()
    assert closes == [1]


def test_the_clock_is_checked_at_the_first_result_even_just_after_boot() -> None:
    checks: list[float] = []
    now = [5.0]  # seconds since boot: a device service starts within a minute of it

    def synced() -> bool:
        checks.append(now[0])
        return True

    clock = Clock(synced=synced, monotonic=lambda: now[0], recheck_s=60.0)
    assert clock.synced() is True and checks == [5.0]
    now[0] = 50.0
    assert clock.synced() is True and checks == [5.0]  # reused within the minute
    now[0] = 70.0
    assert clock.synced() is True and checks == [5.0, 70.0]


def test_one_deployability_check_names_what_is_wrong(tmp_path: Path, int8_model: Path) -> None:
    from edgemed.triage import TriagePolicy

    model = tmp_path / int8_model.name
    shutil.copy(int8_model, model)
    manifest_path = tmp_path / find_manifest(int8_model).name
    shutil.copy(find_manifest(int8_model), manifest_path)
    ok = check_deployable(model, load=True)
    assert (ok.model, ok.manifest_path, ok.twin, ok.files) == (model, manifest_path, None, [model])
    assert ok.manifest == load_manifest(manifest_path) and ok.artifact == ok.manifest.artifact(model.name)

    wrong_label = TriagePolicy.model_validate({"rules": {"melanoma": {"level": "urgent"}}})
    with pytest.raises(ConfigError, match=re.escape("triage.rules names 'melanoma'")):
        check_deployable(model, policy=wrong_label)
    with pytest.raises(ModelError, match=re.escape(f"model file {tmp_path / 'gone.tflite'} not found")):
        check_deployable(tmp_path / "gone.tflite")

    # An Edge TPU model's CPU twin is what the device falls back to: it is checked as the model is.
    raw = json.loads(manifest_path.read_text())
    raw["artifacts"][0]["twin"] = "missing_int8.tflite"
    manifest_path.write_text(json.dumps(raw))
    with pytest.raises(ModelError, match=re.escape("missing_int8.tflite not found")):
        check_deployable(model)

    model.write_bytes(model.read_bytes()[:-1] + b"\0")
    with pytest.raises(ModelError, match="does not match its manifest"):
        check_deployable(model)


def test_the_nurses_line_reads_the_typed_result() -> None:
    frame = Frame(index=12, source_kind="folder", name="MRN777.jpg")
    result = FrameResult(
        frame=frame,
        seq=3,
        result_id="0" * 32,
        created_at=NOW,
        clock_synced=None,
        session_id=None,
        quality=None,
        prediction=None,
        triage=TriageResult("error", "input: cannot be decoded"),
        latency_ms={"total": 0.0},
    )
    assert result_line(result, show_name=False) == "#12     -  -> ERROR: input: cannot be decoded\n"
    assert result_line(result, show_name=True) == "#12    MRN777.jpg  -  -> ERROR: input: cannot be decoded\n"
