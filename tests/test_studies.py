"""Only frames of one study form a study decision, and results and study decisions share one `seq` counter."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import jsonschema
from helpers import run_edgemed

from edgemed.envelope import result_schema, study_schema

DATA = Path(__file__).resolve().parent.parent / "data"
PHOTOS = sorted((DATA / "isic_samples").glob("*.jpg"))


def _outbox(device: Path) -> list[tuple[str, dict[str, Any]]]:
    """Every envelope the device has committed (offline: all still pending), in production order."""
    with sqlite3.connect(device / "outbox.sqlite3") as db:
        rows = db.execute("SELECT topic, payload FROM outbox ORDER BY row_id").fetchall()
    return [(str(topic).rsplit("/", 1)[1], json.loads(payload)) for topic, payload in rows]


def _run(model: Path, source: Path, device: Path) -> str:
    proc = run_edgemed(
        "run", "--model", str(model), "--source", str(source), "--device-id", "d1", "--data-dir", str(device), "--quiet"
    )
    assert proc.returncode == 10, proc.stderr  # offline: everything stays in the outbox, where the test reads it
    return proc.stderr


def test_unrelated_photos_beside_one_dicom_get_no_study_decision(int8_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i, photo in enumerate(PHOTOS[:3]):
        shutil.copy(photo, folder / f"a{i}.jpg")
    shutil.copy(DATA / "dicom" / "US1_UNCR.dcm", folder / "b.dcm")
    stderr = _run(int8_model, folder, tmp_path / "device")
    sent = _outbox(tmp_path / "device")
    assert [topic for topic, _ in sent] == ["results"] * 4
    assert "study decision" not in stderr


def test_a_cine_among_photos_is_one_study_over_the_cine_frames_only(int8_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(PHOTOS[0], folder / "a1.jpg")
    shutil.copy(PHOTOS[1], folder / "a2.jpg")
    shutil.copy(DATA / "dicom" / "examples_ybr_color.dcm", folder / "b.dcm")  # a 30-frame cine of one study
    shutil.copy(PHOTOS[2], folder / "c.jpg")
    stderr = _run(int8_model, folder, tmp_path / "device")
    sent = _outbox(tmp_path / "device")
    studies = [env for topic, env in sent if topic == "studies"]
    results = [env for topic, env in sent if topic == "results"]
    assert len(results) == 33 and len(studies) == 1 and stderr.count("study decision") == 1
    cine = [r for r in results if r["source"]["index"] in range(2, 32)]
    study = studies[0]
    jsonschema.validate(study, study_schema())
    assert study["triage"]["frames"] == 30
    assert (study["first_seq"], study["last_seq"]) == (cine[0]["seq"], cine[-1]["seq"])
    assert study["session_id"] == cine[0]["session_id"] is not None
    # The photos belong to no study: no session id, and no decision.
    assert all(r["session_id"] is None for r in results if r not in cine)


def test_results_and_study_decisions_share_one_gap_free_seq_and_the_schemas_say_so(
    int8_model: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "two-studies"
    folder.mkdir()
    shutil.copy(DATA / "dicom" / "examples_ybr_color.dcm", folder / "a.dcm")
    shutil.copy(DATA / "dicom" / "examples_ybr_color.dcm", folder / "b.dcm")
    _run(int8_model, folder, tmp_path / "device")
    sent = _outbox(tmp_path / "device")
    # Both cine copies carry the same StudyInstanceUID: one study of 60 frames, then its decision.
    assert [t for t, _ in sent].count("studies") == 1
    seqs = [env["seq"] for _, env in sent]
    assert seqs == list(range(len(sent)))  # one counter over everything the device sends: no gap, no reuse
    results_only = [env["seq"] for t, env in sent if t == "results"]
    assert results_only == list(range(60))  # the decision comes after its frames, numbered 60
    for schema in (result_schema(), study_schema()):
        text = schema["properties"]["seq"]["description"]
        assert "one counter" in text and "study decisions" in text and "gap" in text
