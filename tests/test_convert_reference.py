"""The drift reference a conversion records in the manifest: the shipped int8 model's top-1 class mix and mean
confidence on the held-out split, the same predictions the acceptance gate judged (report.json's confusion)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgemed.errors import ModelError
from edgemed.manifest import find_manifest, load_manifest


def test_the_manifest_records_the_int8_models_mix_on_the_held_out_split(int8_model: Path) -> None:
    manifest_path = find_manifest(int8_model)
    manifest = load_manifest(manifest_path)
    ref = manifest.reference
    assert ref is not None and manifest.evaluation is not None
    assert ref.split == manifest.evaluation["split"] and ref.target == "int8"
    assert ref.n == sum(manifest.evaluation["count_per_class"])
    assert set(ref.class_mix) == set(manifest.labels)
    assert sum(ref.class_mix.values()) == pytest.approx(1.0)
    # The gate's own predictions: the int8 confusion matrix's columns are the predicted classes.
    report = json.loads((manifest_path.parent / "report.json").read_text())
    confusion = report["targets"]["int8"]["numbers"]["quantized"]["confusion"]
    predicted = [sum(row[j] for row in confusion) for j in range(len(manifest.labels))]
    assert sum(predicted) == ref.n
    assert [ref.class_mix[label] for label in manifest.labels] == pytest.approx([c / ref.n for c in predicted])
    # A top-1 probability of K classes is at least 1/K.
    assert 1 / len(manifest.labels) <= ref.mean_confidence <= 1.0
    assert report["manifest"]["reference"] == ref.model_dump(mode="json")


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"class_mix": {"malignant": 0.5, "benign": 0.4}}, "sum to 0.9"),
        ({"class_mix": {"malignant": 0.5, "cyst": 0.5}}, "'cyst'"),
        ({"class_mix": {"malignant": 1.5, "benign": -0.5}}, "between 0 and 1"),
        ({"mean_confidence": 1.2}, "mean_confidence"),
        ({"n": 0}, "reference.n"),
    ],
)
def test_a_broken_reference_is_refused_naming_it(
    int8_model: Path, tmp_path: Path, change: dict[str, object], named: str
) -> None:
    raw = json.loads(find_manifest(int8_model).read_text())
    raw["reference"] = {**raw["reference"], **change}
    path = tmp_path / "edited.manifest.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ModelError, match="reference") as caught:
        load_manifest(path)
    assert named in str(caught.value)


def test_a_manifest_without_a_reference_still_loads(int8_model: Path, tmp_path: Path) -> None:
    raw = json.loads(find_manifest(int8_model).read_text())
    del raw["reference"]
    path = tmp_path / "older.manifest.json"
    path.write_text(json.dumps(raw))
    assert load_manifest(path).reference is None


def _outcome(target: str, probs: list[list[float]]) -> Any:
    from converters.outcome import Footprint, TargetOutcome
    from edgemed.manifest import QuantSpec

    spec = QuantSpec(shape=[1, 2], dtype="int8")
    # The gate's result is not read for the reference: only the target and its probabilities are.
    return TargetOutcome(target, Path(f"m_{target}.tflite"), spec, spec, "logits", Footprint(1, 1.0),
                         np.array(probs), None, "accepted")  # type: ignore[arg-type]  # fmt: skip


def test_the_reference_is_the_int8_models_else_the_first_targets() -> None:
    from converters.record import drift_reference
    from converters.samples import HeldOut

    held = HeldOut("val", np.zeros((4, 2, 2, 1), np.uint8), np.array([0, 1, 1, 0]))
    f16 = _outcome("float16", [[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    int8 = _outcome("int8", [[0.4, 0.6], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4]])
    ref = drift_reference([f16, int8], held, ["benign", "malignant"])
    assert ref is not None and ref.target == "int8" and ref.split == "val" and ref.n == 4
    assert ref.class_mix == {"benign": 0.25, "malignant": 0.75}
    assert ref.mean_confidence == pytest.approx((0.6 + 0.8 + 0.7 + 0.6) / 4)
    only = drift_reference([f16], held, ["benign", "malignant"])
    assert only is not None and only.target == "float16" and only.class_mix == {"benign": 0.75, "malignant": 0.25}
    assert drift_reference([], held, ["benign", "malignant"]) is None
