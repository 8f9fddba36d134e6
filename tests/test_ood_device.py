"""The device side of out-of-distribution abstention (issue 14), as logic: the triage of a flagged frame, the
study decision over flagged frames (also resumed from a ledger state written before the check existed), the
envelope and its schema (old envelopes stay valid), the nurse's line, the run summary and the dashboard's check
of the ``ood`` object. A real run with a real converted model is in tests/test_ood_runtime.py."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from helpers import envelope_context
from ood_helpers import POLICY
from ood_helpers import add_frame as _add
from ood_helpers import pred as _pred
from ood_helpers import study as _study

from edgemed.dashboard.validate import validate_result
from edgemed.envelope import build_result, result_schema
from edgemed.printer import result_line
from edgemed.summary import RunSummary
from edgemed.triage import (
    OOD_REASON,
    triage,
    triage_error,
    triage_ood,
    triage_recapture,
)
from edgemed.types import Frame, FrameResult, OodCheck, QualityReport, TriageResult

FIXTURES = Path(__file__).resolve().parent / "fixtures"
FLAGGED = OodCheck("features", 9.4123, 2.1, True, "manifest")
PASSED = OodCheck("energy", -7.5, -3.25, False, "profile")


# -- triage_ood -------------------------------------------------------------------------------------------------
def test_a_flagged_frame_is_inconclusive_with_the_nurses_reason_and_keeps_the_label() -> None:
    pred = _pred(0.02)
    verdict = triage(pred, POLICY)
    assert verdict.level == "no_finding"
    flagged = triage_ood(verdict, pred)
    assert flagged.level == "inconclusive" and flagged.reason == OOD_REASON
    assert flagged.extra == {"label": "benign", "basis": "ood", "model_level": "no_finding"}
    assert "check the probe, body part and preset, or refer" in flagged.reason


def test_a_flagged_frame_the_model_read_as_urgent_says_so_with_label_and_probability() -> None:
    # Escalated: malignant 0.35 reaches its urgent threshold although benign is more likely.
    pred = _pred(0.35)
    verdict = triage(pred, POLICY)
    assert verdict.level == "urgent" and verdict.extra["label"] == "malignant"
    flagged = triage_ood(verdict, pred)
    assert flagged.level == "inconclusive" and flagged.extra["model_level"] == "urgent"
    assert flagged.reason.startswith(OOD_REASON)
    assert "the model read it as urgent (malignant 0.35): refer if in doubt" in flagged.reason
    assert flagged.extra["label"] == "malignant"


# -- the study decision -----------------------------------------------------------------------------------------


def test_flagged_frames_are_not_evidence_and_the_recapture_reason_names_them() -> None:
    agg = _study()
    _add(agg, 0.02, ood=False)
    for _ in range(3):
        _add(agg, 0.9, ood=True)  # urgent by the model, but unlike the training images
    agg.add(triage_recapture(QualityReport(False, 1.0, 0.5, 0.0, "too blurred")), None)
    decision = agg.decision()
    assert agg.valid_frames == 1 and agg.ood_frames == 3
    assert decision.level == "recapture"
    assert decision.reason == (
        "only 1 of 5 frames were usable, 3 are needed (3 did not look like the images the model was trained on: "
        "check the probe, body part and preset; the model read 3 of them as urgent: refer if in doubt; most often: "
        "too blurred): record the study again"
    )
    assert decision.extra["ood_frames"] == 3 and decision.extra["valid_frames"] == 1
    assert decision.extra["counts"] == {"no_finding": 1, "inconclusive": 3, "recapture": 1}


def test_the_commoner_cause_of_unusable_frames_comes_first() -> None:
    agg = _study()
    _add(agg, 0.02, ood=True)
    for _ in range(2):
        agg.add(triage_recapture(QualityReport(False, 1.0, 0.5, 0.0, "too dark")), None)
    assert "(most often: too dark; 1 did not look like" in agg.decision().reason


def test_a_study_without_flagged_frames_reads_exactly_as_before() -> None:
    agg = _study()
    for _ in range(3):
        _add(agg, 0.02, ood=False)
    agg.add(triage_recapture(QualityReport(False, 1.0, 0.5, 0.0, "too dark")), None)
    decision = agg.decision()
    assert (
        decision.reason == "worst case over 3 usable frames: 3 no finding: no finding; continue the usual care pathway"
    )
    assert "ood_frames" not in decision.extra and agg.export()["ood_frames"] == 0


@pytest.mark.parametrize("rule", ["worst_case", "majority", "mean_probability"])
def test_flagged_urgent_frames_neither_decide_nor_enter_the_average(rule: str) -> None:
    agg = _study(rule)
    for _ in range(3):
        _add(agg, 0.02, ood=False)
    for _ in range(2):
        _add(agg, 0.99, ood=True)
    decision = agg.decision()
    # Counted as urgent evidence, two flagged frames would make worst_case (and the urgent override) urgent, and
    # would pull the average up to 0.41 malignant, over its 0.3 urgent threshold.
    assert decision.level == "no_finding", decision.reason
    assert decision.reason.endswith(
        "(2 frames unlike the training images left out; the model read 2 of them as urgent: refer if in doubt)"
    )
    assert decision.extra["valid_frames"] == 3


def test_only_flagged_frames_is_a_recapture_not_inconclusive() -> None:
    agg = _study(min_valid=1)
    for _ in range(4):
        _add(agg, 0.5, ood=True)
    decision = agg.decision()
    assert decision.level == "recapture" and "only 0 of 4 frames were usable" in decision.reason


def test_ood_frames_survive_export_and_restore_and_an_old_state_restores_as_zero() -> None:
    agg = _study()
    _add(agg, 0.02, ood=False)
    _add(agg, 0.9, ood=True)
    state = json.loads(json.dumps(agg.export()))
    assert state["ood_frames"] == 1
    resumed = _study()
    resumed.restore(state)
    _add(resumed, 0.02, ood=False)
    assert resumed.ood_frames == 1 and resumed.valid_frames == 2

    old = dict(state)
    del old["ood_frames"], old["ood_urgent_frames"]  # a ledger row written before the check existed
    old["levels"] = {"no_finding": 1, "urgent": 1}
    older = _study()
    older.restore(old)
    assert older.ood_frames == 0 and older.valid_frames == 2


@pytest.mark.parametrize("bad", [-1, 2, True, "1", 1.0])
def test_a_damaged_ood_count_is_refused(bad: object) -> None:
    agg = _study()
    _add(agg, 0.9, ood=True)
    state = agg.export()
    state["ood_frames"] = bad  # 2: more flagged frames than inconclusive ones
    with pytest.raises(ValueError, match="not a study state"):
        _study().restore(state)


# -- envelope and schema ----------------------------------------------------------------------------------------
def _result(ood: OodCheck | None, verdict: TriageResult | None = None, **kw: Any) -> FrameResult:
    pred = kw.pop("prediction", _pred(0.02))
    latency = {"capture": 1.0, "preprocess": 0.1, "inference": 0.2, "ood": 0.01, "triage": 0.01, "total": 1.32}
    return FrameResult(
        frame=Frame(index=4, source_kind="folder", image=np.zeros((2, 2), np.uint8), name="DOE_JANE.png"),
        seq=9,
        result_id="a" * 32,
        created_at=1.7e9,
        clock_synced=True,
        session_id=None,
        quality=QualityReport(True, 120.0, 90.0, 0.001),
        prediction=pred,
        triage=verdict if verdict is not None else triage_ood(triage(pred, POLICY), pred),
        latency_ms=kw.pop("latency_ms", latency),
        ood=ood,
    )


def _envelope(result: FrameResult) -> dict[str, Any]:
    r = result
    return build_result(
        envelope_context(),
        frame=r.frame,
        seq=r.seq,
        created_at=r.created_at,
        clock_synced=r.clock_synced,
        session_id=r.session_id,
        quality=r.quality,
        prediction=r.prediction,
        triage=r.triage,
        latency_ms=r.latency_ms,
        ood=r.ood,
    )


def test_a_flagged_result_envelope_carries_ood_and_validates() -> None:
    env = _envelope(_result(FLAGGED))
    jsonschema.validate(env, result_schema())
    assert env["ood"] == {
        "method": "features",
        "score": 9.4123,
        "threshold": 2.1,
        "flagged": True,
        "source": "manifest",
    }
    assert list(env)[-4:] == ["prediction", "ood", "triage", "latency_ms"]
    assert env["triage"]["basis"] == "ood" and env["prediction"]["label"] == "benign"  # still recorded
    assert list(env["latency_ms"]) == ["capture", "preprocess", "inference", "ood", "triage", "total"]
    assert validate_result(env, "clinic_a", "us-01") is None


def test_an_unchecked_frame_has_no_ood_key_and_an_off_check_records_nulls() -> None:
    error = _result(None, triage_error("the image cannot be decoded"), prediction=None)
    env = _envelope(error)
    assert "ood" not in env
    jsonschema.validate(env, result_schema())
    off = _envelope(_result(OodCheck("none", None, None, False, "profile"), triage(_pred(0.02), POLICY)))
    jsonschema.validate(off, result_schema())
    assert off["ood"] == {"method": "none", "score": None, "threshold": None, "flagged": False, "source": "profile"}


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"method": "mahalanobis"}, "method"),
        ({"source": "cloud"}, "source"),
        ({"flagged": "yes"}, "flagged"),
        ({"score": "high"}, "score"),
        ({"extra": 1}, None),
    ],
)
def test_the_schema_and_the_dashboard_refuse_a_malformed_ood(change: dict[str, Any], where: str | None) -> None:
    env = _envelope(_result(FLAGGED))
    env["ood"] = {**env["ood"], **change}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(env, result_schema())
    reason = validate_result(env, "clinic_a", "us-01")
    if where is None:
        assert reason is None  # the dashboard checks what it reads, not the full schema
    else:
        assert reason is not None and f"ood.{where}" in reason


def test_the_dashboard_refuses_an_ood_that_is_not_an_object() -> None:
    env = _envelope(_result(FLAGGED))
    env["ood"] = [1, 2]
    assert validate_result(env, "clinic_a", "us-01") == "ood is neither absent nor an object"


def test_old_envelopes_stay_valid_under_the_new_schema() -> None:
    with gzip.open(FIXTURES / "dashboard-i11.export.jsonl.gz", "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    results = [row for row in rows if row.get("schema") == "edgemed.result/1"]
    assert len(results) > 20
    for env in results:
        jsonschema.validate(env, result_schema())
    # And every basis the triage wrote before this issue, on an envelope without ood.
    for p in (0.02, 0.35, 0.5, 0.9):
        verdict = triage(_pred(p), POLICY)
        env = _envelope(_result(None, verdict))
        assert "ood" not in env
        jsonschema.validate(env, result_schema())


def test_a_flagged_basis_requires_nothing_new_of_old_consumers() -> None:
    # The schema's triage object keeps its two required keys: a consumer reading level and reason still works.
    schema = result_schema()
    assert schema["properties"]["triage"]["required"] == ["level", "reason"]
    assert "ood" not in schema["required"]


# -- the nurse's line and the run summary -------------------------------------------------------------------------
def test_the_nurses_line_makes_a_flagged_frame_plain() -> None:
    line = result_line(_result(FLAGGED), show_name=False)
    assert line.startswith(
        "#4      benign (98%)  [unlike the training images: features 9.41 > 2.10]  -> INCONCLUSIVE: "
    )
    assert OOD_REASON in line and "DOE_JANE" not in line
    overflow = result_line(_result(OodCheck("energy", None, -3.0, True, "manifest")), show_name=False)
    assert "[unlike the training images: energy not a finite number]  -> INCONCLUSIVE" in overflow
    plain = result_line(_result(PASSED, triage(_pred(0.02), POLICY)), show_name=False)
    assert "unlike" not in plain and "-> NO_FINDING" in plain


def test_the_run_summary_counts_flagged_frames() -> None:
    summary = RunSummary()
    summary.add(_result(FLAGGED))
    summary.add(_result(FLAGGED))
    summary.add(_result(PASSED, triage(_pred(0.02), POLICY)))
    summary.add(_result(None, triage_error("unreadable"), prediction=None))
    assert summary.ood_flagged == 2 and summary.levels == {"inconclusive": 2, "no_finding": 1, "error": 1}
    assert summary.line() == (
        "edgemed: 4 frames (error 1, inconclusive 2, no_finding 1); 2 unlike the training images (inconclusive); "
        "pending 0"
    )
    quiet = RunSummary()
    quiet.add(_result(PASSED, triage(_pred(0.02), POLICY)))
    assert quiet.line() == "edgemed: 1 frames (no_finding 1); pending 0"  # as before this issue


def test_the_ood_example_in_the_triage_docs_is_a_valid_profile_section() -> None:
    import re

    import yaml

    from edgemed.ood import OodSetting

    text = (Path(__file__).resolve().parent.parent / "docs" / "triage.md").read_text(encoding="utf-8")
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, re.S)]
    (section,) = [b["ood"] for b in blocks if "ood" in b]
    assert OodSetting.model_validate(section) == OodSetting()  # the example shows the defaults
