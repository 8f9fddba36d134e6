"""Review of issue 14's device side (R2): a flagged frame the model read as urgent keeps that in its study
decision (also after a resume), an error verdict is not turned into an out-of-distribution one, a profile
threshold says which score it is on, and a multi-output file whose manifest lists no outputs is refused."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from ood_helpers import LABELS, POLICY
from ood_helpers import add_frame as _add
from ood_helpers import pred as _pred
from ood_helpers import study as _study

from edgemed.config import parse_profile
from edgemed.envelope import study_schema
from edgemed.errors import ConfigError, ModelError
from edgemed.manifest import Manifest
from edgemed.model_contract import check_loaded_model
from edgemed.triage import triage, triage_error, triage_ood
from edgemed.types import Prediction, TensorSpec


@pytest.mark.parametrize("rule", ["worst_case", "majority", "mean_probability"])
def test_a_study_says_when_flagged_frames_were_read_as_urgent(rule: str) -> None:
    agg = _study(rule)
    for _ in range(3):
        _add(agg, 0.02, ood=False)
    for _ in range(2):
        _add(agg, 0.99, ood=True)  # urgent by the model, set aside as unlike the training images
    decision = agg.decision()
    assert decision.level == "no_finding"  # the design: flagged frames are not evidence
    # ...but "continue the usual care pathway" must not be all the nurse reads of a study the model found urgent.
    assert "the model read 2 of them as urgent: refer if in doubt" in decision.reason, decision.reason
    assert decision.extra["ood_urgent_frames"] == 2
    envelope_triage = {"level": decision.level, "reason": decision.reason, **decision.extra}
    jsonschema.validate(envelope_triage, study_schema()["properties"]["triage"])


def test_a_recapture_study_of_flagged_urgent_frames_says_so_too() -> None:
    agg = _study(min_valid=1)
    _add(agg, 0.99, ood=True)
    _add(agg, 0.02, ood=True)
    decision = agg.decision()
    assert decision.level == "recapture"
    assert "the model read 1 of them as urgent: refer if in doubt" in decision.reason, decision.reason


def test_the_urgent_count_of_flagged_frames_survives_a_resume_and_old_states_restore_as_zero() -> None:
    agg = _study()
    _add(agg, 0.02, ood=False)
    _add(agg, 0.99, ood=True)
    state = json.loads(json.dumps(agg.export()))
    resumed = _study()
    resumed.restore(state)
    _add(resumed, 0.02, ood=False)
    _add(resumed, 0.02, ood=False)
    assert "the model read 1 of them as urgent" in resumed.decision().reason

    old = dict(state)
    del old["ood_urgent_frames"]  # written before this count existed
    older = _study()
    older.restore(old)
    assert older.export()["ood_urgent_frames"] == 0

    for bad in (-1, 2, True, 1.0):  # 2: more than the flagged frames
        damaged = {**state, "ood_urgent_frames": bad}
        with pytest.raises(ValueError, match="not a study state"):
            _study().restore(damaged)


def test_an_error_verdict_stays_an_error_when_the_check_also_flags() -> None:
    # A float model that overflows gives non-finite probabilities (triage: error) and a non-finite OOD score
    # (flagged): "check the probe" would send the nurse to the wrong fix, and model_level error breaks the schema.
    verdict = triage(Prediction(LABELS, (float("nan"), float("nan"))), POLICY)
    assert verdict.level == "error"
    assert triage_ood(verdict, Prediction(LABELS, (float("nan"), float("nan")))) == verdict
    assert triage_ood(triage_error("x"), _pred(0.5)).level == "error"


@pytest.mark.parametrize(
    ("ood", "says"),
    [
        ({"threshold": 3.5}, "ood.method"),  # auto: the threshold would follow whichever score the model defaults to
        ({"method": "auto", "threshold": 3.5}, "ood.method"),
        ({"method": "none", "threshold": 3.5}, "remove ood.threshold"),
    ],
)
def test_a_profile_threshold_must_say_which_score_it_is_on(ood: dict[str, object], says: str) -> None:
    raw = {"profile": "p", "device": {"id": "dev-1", "site": "site-1"}, "ood": ood}
    with pytest.raises(ConfigError, match=says) as err:
        parse_profile(raw, None)
    assert "energy or features" in str(err.value) or "remove" in str(err.value)
    parse_profile({**raw, "ood": {"method": "features", "threshold": 3.5}}, None)  # explicit: fine


def _manifest(outputs: list[dict[str, object]]) -> Manifest:
    art = {
        "file": "m.tflite",
        "target": "int8",
        "sha256": "0" * 64,
        "size_bytes": 1,
        "output_kind": "logits",
        "outputs": outputs,
    }
    return Manifest.model_validate(
        {
            "name": "m",
            "created_at": "2026-01-01T00:00:00Z",
            "labels": list(LABELS),
            "input": {"height": 28, "width": 28, "channels": 1, "colour_mode": "gray"},
            "artifacts": [art],
        }
    )


def _t(name: str, shape: tuple[int, ...]) -> TensorSpec:
    return TensorSpec(name=name, shape=shape, dtype="int8", scale=0.1, zero_point=0)


def test_a_multi_output_file_whose_manifest_lists_no_outputs_is_refused() -> None:
    # Without outputs the device takes the first output as the scores: by position, which TFLite may reorder.
    inp = _t("in", (1, 28, 28, 1))
    feat, scores = _t("ood_pool_0", (1, 2)), _t("Identity", (1, 2))  # same size: the shape check cannot tell
    with pytest.raises(ModelError, match=r"artifacts\[0\]\.outputs.*2 outputs.*convert again"):
        check_loaded_model(_manifest([]), Path("m.tflite"), inp, feat, "logits", outputs=(feat, scores))
    check_loaded_model(_manifest([]), Path("m.tflite"), inp, scores, "logits", outputs=(scores,))  # old: fine


def _ood(threshold: float, whiten: float) -> dict[str, object]:
    layer = {"output": "f", "dims": 1, "components": 1, "center": [0.0], "whiten": [[whiten]],
             "class_means": [[0.0], [1.0]], "median": 0.0, "spread": 1.0}  # fmt: skip
    features = {"threshold": threshold, "flagged_fraction": 0.03, "shrinkage": 0.01, "layers": [layer]}
    return {"default": "features", "target_fraction": 0.03, "fit_split": "train", "fit_n": 10,
            "threshold_split": "val", "threshold_n": 10, "features": features}  # fmt: skip


@pytest.mark.parametrize(("threshold", "whiten"), [(float("nan"), 1.0), (float("inf"), 1.0), (1.0, float("nan"))])
def test_a_manifest_with_non_finite_ood_statistics_is_refused_when_read(
    threshold: float, whiten: float, tmp_path: Path
) -> None:
    # json.loads reads NaN and Infinity; a NaN in the statistics would flag every frame (a non-finite score is
    # flagged), and a NaN threshold would be blamed on the profile ("remove the override").
    from edgemed.manifest import load_manifest as read_manifest

    q = {"dtype": "int8", "scale": 0.1, "zero_point": 0}
    outputs = [{"name": "s", "shape": [1, 2], **q, "role": "scores"},
               {"name": "f", "shape": [1, 1], **q, "role": "features"}]  # fmt: skip
    raw = _manifest(outputs).model_dump(by_alias=True)
    raw["artifacts"][0]["ood"] = _ood(1.0, 1.0)
    path = tmp_path / "m.manifest.json"
    path.write_text(json.dumps(raw))
    read_manifest(path)  # finite: fine
    raw["artifacts"][0]["ood"] = _ood(threshold, whiten)
    path.write_text(json.dumps(raw))
    with pytest.raises(ModelError, match=r"ood[.:] ?features\.(threshold|layers\.0\.whiten)"):
        read_manifest(path)


class _PaddedBuffers:
    """A CompiledModel seam whose one output buffer is larger than the tensor (an accelerator's aligned layout)."""

    def get_output_buffer_requirements(self, k: int, signature: int) -> dict[str, int]:
        return {"buffer_size": 16}


def test_a_single_output_model_needs_no_buffer_matching() -> None:
    # Before outputs were listed, buffer 0 was read whatever its size; a one-output model has nothing to match,
    # so a padded buffer must not turn into a ModelError (which, unlike an unusable accelerator, never falls back).
    import numpy as np

    from edgemed.inference.compiled import _buffer_order

    spec = TensorSpec(name="Identity", shape=(1, 2), dtype="float32", scale=0.0, zero_point=0)
    assert _buffer_order(_PaddedBuffers(), None, (spec,), np.dtype("float32"), (1, 28, 28, 1)) == [0]
