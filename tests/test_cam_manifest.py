"""The manifest's ``cam`` section as the device reads it: malformed, hostile or oversized manifests are refused
with a clear error before anything is computed, and the Edge TPU entry carries its CPU twin's map weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from gap_model import gap_model_fixture

from edgemed.deploy import Deployable, check_deployable
from edgemed.errors import ModelError
from edgemed.manifest import Artifact

__all__ = ["gap_model_fixture"]


def _deployable(model: Path) -> Deployable:
    return check_deployable(model, next(model.parent.glob("*.manifest.json")))


def test_a_malformed_cam_section_is_a_validation_error(gap_model: Path) -> None:
    """(c) The manifest's own checks: weights rows against the listed map, ragged rows, NaN, a missing map."""
    from pydantic import ValidationError

    raw = _deployable(gap_model).artifact.model_dump()
    cases = {
        "has shape": {**raw, "cam": {**raw["cam"], "weights": raw["cam"]["weights"][:10]}},
        "one weight per class in every row": {
            **raw,
            "cam": {**raw["cam"], "weights": [raw["cam"]["weights"][0][:1], *raw["cam"]["weights"][1:]]},
        },
        "finite": {**raw, "cam": {**raw["cam"], "weights": [[float("nan"), 0.0]] * 64}},
        "does not list with role feature_map": {**raw, "cam": {**raw["cam"], "output": "elsewhere"}},
    }
    for message, bad in cases.items():
        with pytest.raises(ValidationError, match=message):
            Artifact.model_validate(bad)
    with pytest.raises(ValidationError, match="finite"):
        Artifact.model_validate_json(
            Artifact.model_validate(raw).model_dump_json().replace('"weights":[[', '"weights":[[NaN,', 1)
        )


def test_a_hostile_cam_in_a_manifest_is_refused(gap_model: Path) -> None:
    """(c) Checks a manifest read from disk gets: a kernel for other labels, a huge kernel, a batched map."""
    from pydantic import ValidationError

    from edgemed.manifest import Manifest

    classifier = _deployable(gap_model)
    manifest = classifier.manifest.model_dump(by_alias=True)
    index = next(i for i, a in enumerate(manifest["artifacts"]) if a["cam"] is not None)
    art = manifest["artifacts"][index]
    rows = art["cam"]["weights"]

    def with_artifact(**change: Any) -> dict[str, Any]:
        changed = {**art, **change}
        return {**manifest, "artifacts": [changed if i == index else a for i, a in enumerate(manifest["artifacts"])]}

    three = with_artifact(cam={**art["cam"], "weights": [[*row, 0.0] for row in rows]})
    with pytest.raises(ValidationError, match=r"cam\.weights scores 3 classes but there are 2 labels"):
        Manifest.model_validate(three)
    # Refused by the length bound, before any row is checked against the map.
    huge = with_artifact(cam={**art["cam"], "weights": [[0.0, 0.0]] * 8193})
    with pytest.raises(ValidationError, match="at most 8192"):
        Manifest.model_validate(huge)
    wide = with_artifact(cam={**art["cam"], "weights": [[0.0] * 1025] * 64})
    with pytest.raises(ValidationError, match="more than 1024"):
        Manifest.model_validate(wide)
    outputs = [{**o, "shape": [2, *o["shape"][1:]]} if o["role"] == "feature_map" else o for o in art["outputs"]]
    with pytest.raises(ValidationError, match=r"not \(1, H', W', channels\)"):
        Manifest.model_validate(with_artifact(outputs=outputs))
    Manifest.model_validate(manifest)  # the untouched manifest still passes


def test_the_edgetpu_twin_carries_the_int8_cam(gap_model: Path, tmp_path: Path) -> None:
    """The compiled file is read by its twin's output names, so it gets the twin's cam (and sha256 of its own)."""
    from converters.record import edgetpu_artifact

    twin = _deployable(gap_model).artifact
    compiled = tmp_path / "breast_gap_edgetpu.tflite"
    compiled.write_bytes(b"compiled by the edge tpu compiler")
    tpu = edgetpu_artifact(tmp_path, compiled, twin)
    assert tpu.cam == twin.cam and tpu.cam is not None and tpu.outputs == twin.outputs
    assert tpu.sha256 != twin.sha256 and tpu.twin == twin.file


def test_an_oversized_manifest_is_refused_before_it_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A manifest far beyond what the converter writes (a hostile kernel of millions of weights) is refused by
    size, naming the file and the fix, without json.loads holding it all in memory."""
    import edgemed.manifest as manifest_module

    monkeypatch.setattr(manifest_module, "MAX_MANIFEST_BYTES", 1000)
    path = tmp_path / "big.manifest.json"
    path.write_text('{"cam": {"weights": [' + ",".join(["[0.0, 0.0]"] * 200) + "]}}", encoding="utf-8")
    with pytest.raises(ModelError, match=r"big\.manifest\.json is \d+ bytes, more than .*beside the model"):
        manifest_module.load_manifest(path)
