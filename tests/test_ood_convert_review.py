"""Review of the converter's OOD step (issue 14): bad ``--ood-eval`` files, set names that would replace a split,
rank agreement that cannot be measured, and options refused before any conversion work. Logic tests: no
TensorFlow, fakes only at the seams (a SourceModel with no Keras graph, hand-made ModelOutputs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from converters.data import Dataset
from converters.ood import fit_ood, load_ood_eval
from converters.ood_step import plan
from converters.runner import ModelOutputs
from converters.samples import HeldOut
from converters.source import SourceModel
from edgemed.errors import ConfigError, DataError


def _outputs(features: np.ndarray) -> ModelOutputs:
    n = len(features)
    rng = np.random.default_rng(n)
    logits = rng.normal(size=(n, 2))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return ModelOutputs(probs=probs, logits=logits, features={"t0": features}, layers={"t0": "conv"})


def _source(output_kind: str = "logits", layers: tuple[str, ...] = ()) -> SourceModel:
    def unused(*_: Any) -> Any:
        raise AssertionError("the plan must not run the model for this check")

    return SourceModel(
        path=Path("m"),
        kind="saved_model",
        input_shape=(8, 8, 1),
        num_outputs=2,
        predict_float=unused,
        make_converter=unused,
        output_kind=output_kind,
        feature_layers=list(layers),
    )


def _data(tmp_path: Path) -> tuple[Dataset, HeldOut]:
    rng = np.random.default_rng(0)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        return rng.integers(0, 255, (n, 8, 8, 1), dtype=np.uint8), np.arange(n) % 2

    splits = {"train": split(20), "val": split(10), "test": split(10)}
    data = Dataset(splits=splits, labels=["a", "b"], colour_mode="gray", source=str(tmp_path / "d.npz"))
    return data, HeldOut("test", *splits["test"])


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 not a zip", b"\x93NUMPY truncated"])
def test_a_corrupt_or_empty_npz_is_a_data_error_naming_the_file(tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "other.npz"
    bad.write_bytes(content)
    with pytest.raises(DataError, match=r"other\.npz"):
        load_ood_eval(bad)


def test_a_truncated_npz_is_a_data_error(tmp_path: Path) -> None:
    whole = tmp_path / "whole.npz"
    np.savez_compressed(whole, test_images=np.random.default_rng(1).integers(0, 255, (50, 16, 16), dtype=np.uint8))
    cut = tmp_path / "cut.npz"
    cut.write_bytes(whole.read_bytes()[:-200])
    with pytest.raises(DataError, match=r"cut\.npz"):
        load_ood_eval(cut)


@pytest.mark.parametrize("stem", ["train", "val", "test"])
def test_an_eval_set_named_like_a_split_is_refused_with_the_fix(tmp_path: Path, stem: str) -> None:
    data, held = _data(tmp_path)
    path = tmp_path / f"{stem}.npz"
    np.savez(path, test_images=np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(DataError, match="rename"):
        plan("energy", 0.03, _source(), data, held, [path])


def test_energy_of_a_model_that_outputs_probabilities_is_refused_before_conversion(tmp_path: Path) -> None:
    data, held = _data(tmp_path)
    with pytest.raises(ConfigError, match="--ood auto"):
        plan("energy", 0.03, _source(output_kind="probabilities"), data, held, [])


def test_rank_agreement_that_cannot_be_measured_does_not_lose_the_fit() -> None:
    rng = np.random.default_rng(2)
    train, y = rng.normal(size=(40, 3)), np.arange(40) % 2
    val = rng.normal(size=(12, 3))
    constant_reference = np.zeros(12)  # Spearman is undefined against a constant
    spec = fit_ood(_outputs(train), y, _outputs(val), "auto", reference_val_scores=constant_reference)
    assert spec is not None and spec.features is not None and spec.feature_rank_agreement is None
    one = fit_ood(_outputs(train), y, _outputs(val[:1]), "auto", reference_val_scores=np.zeros(1))
    assert one is not None and one.features is not None and one.feature_rank_agreement is None


class _FakeDeviceModel:
    """Stands in for the converted file at the DeviceModel seam: features are the first pixels of each image."""

    def __init__(self, *_: Any) -> None:
        pass

    def __enter__(self) -> _FakeDeviceModel:
        return self

    def __exit__(self, *_: object) -> None:
        pass

    def run(self, images: Any, kind: str, progress: Any = None) -> ModelOutputs:
        flat = np.stack([np.asarray(im, dtype=np.float64).reshape(-1)[:4] for im in images])
        return _outputs(flat)


def _plan_without_float(tmp_path: Path, held: HeldOut) -> Any:
    from converters.ood_step import OodPlan

    data, _ = _data(tmp_path)
    train, y = data.splits["train"]
    return OodPlan("features", 0.1, train, y, data.splits["val"][0], held, [], None)


def test_run_target_thresholds_on_the_plans_val_not_the_held_out_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import converters.ood_step as ood_step
    from converters.ood import feature_scores, layer_inputs, threshold_at

    monkeypatch.setattr(ood_step, "DeviceModel", _FakeDeviceModel)
    other_val = HeldOut("val", np.random.default_rng(9).integers(0, 255, (7, 8, 8, 1), np.uint8), np.arange(7) % 2)
    the_plan = _plan_without_float(tmp_path, other_val)
    outcome = ood_step.run_target(the_plan, "int8", Path("x.tflite"), None, [], "logits")  # type: ignore[arg-type]
    assert outcome.spec is not None and outcome.spec.features is not None
    assert outcome.spec.threshold_n == len(the_plan.val_images) == 10
    val = _FakeDeviceModel().run(the_plan.val_images, "logits")
    expected, _ = threshold_at(feature_scores(outcome.spec.features, layer_inputs(val, outcome.spec.features)), 0.1)
    assert outcome.spec.features.threshold == pytest.approx(expected)
    assert outcome.sizes["val"] == 10
    assert outcome.held_split in outcome.scores and len(outcome.scores[outcome.held_split]["features"]) == 7


def test_the_ood_example_in_convert_help_is_two_lines_a_shell_can_paste() -> None:
    from converters.commands import CONVERT_EPILOG

    lines = CONVERT_EPILOG.splitlines()
    at = next(i for i, line in enumerate(lines) if "--ood-eval data/isic_samples" in line)
    assert lines[at].lstrip().startswith("--ood-eval ") and lines[at - 1].endswith("--out dist \\")


class _ProbabilitiesOnly(_FakeDeviceModel):
    def run(self, images: Any, kind: str, progress: Any = None) -> ModelOutputs:
        out = super().run(images, kind, progress)
        return ModelOutputs(probs=out.probs, logits=None, features={}, layers={})


def test_no_ood_score_note_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import converters.ood_step as ood_step

    monkeypatch.setattr(ood_step, "DeviceModel", _ProbabilitiesOnly)
    held = HeldOut("test", np.zeros((3, 8, 8, 1), np.uint8), np.arange(3) % 2)
    base = _plan_without_float(tmp_path, held)
    the_plan = ood_step.OodPlan("auto", 0.1, base.train_images, base.y_train, base.val_images, held, [], None)
    outcome = ood_step.run_target(the_plan, "int8", Path("x.tflite"), None, [], "probabilities")  # type: ignore[arg-type]
    assert outcome.spec is None
    (note,) = outcome.notes
    assert "without its softmax" in note and ".keras" in note


def test_a_long_eval_source_is_sampled_evenly_not_held_whole_in_memory(tmp_path: Path) -> None:
    """A video or a big folder would be held frame by frame at full size; a bounded, even sample of it is kept."""
    from PIL import Image

    from converters.ood import MAX_EVAL_IMAGES

    folder = tmp_path / "frames"
    folder.mkdir()
    total = MAX_EVAL_IMAGES * 2 + 37
    for i in range(total):
        Image.fromarray(np.full((4, 4), i % 251, np.uint8)).save(folder / f"{i:05d}.png")
    images = load_ood_eval(folder).images
    assert MAX_EVAL_IMAGES // 2 <= len(images) <= MAX_EVAL_IMAGES
    seen = sorted({int(im.reshape(-1)[0]) for im in images})
    assert len(seen) > 200  # spread over the whole source, not its first frames only
    many = tmp_path / "many.npz"  # a test split held in memory already: scored whole (the benchmark's sets)
    np.savez(many, test_images=np.zeros((total, 4, 4), np.uint8))
    assert len(load_ood_eval(many).images) == total


def test_an_unmeasured_rank_agreement_is_said_not_passed_off_as_no_feature_score(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import converters.ood_step as ood_step
    from converters.report_ood import ood_section

    monkeypatch.setattr(ood_step, "DeviceModel", _FakeDeviceModel)
    held = HeldOut("test", np.random.default_rng(3).integers(0, 255, (5, 8, 8, 1), np.uint8), np.arange(5) % 2)
    base = _plan_without_float(tmp_path, held)
    constant_float = np.zeros(len(base.val_images))
    the_plan = ood_step.OodPlan("auto", 0.1, base.train_images, base.y_train, base.val_images, held, [], constant_float)
    outcome = ood_step.run_target(the_plan, "int8", Path("x.tflite"), None, [], "logits")  # type: ignore[arg-type]
    assert outcome.spec is not None and outcome.spec.features is not None
    assert outcome.spec.feature_rank_agreement is None
    assert any("could not be measured" in n for n in outcome.notes)
    html = ood_section([outcome], lambda fig: "data:,")
    assert "no feature score" not in html and "not measured" in html


def test_non_finite_val_scores_error_names_the_fix() -> None:
    from converters.ood import threshold_at

    with pytest.raises(ConfigError, match=r"--ood energy|--ood none"):
        threshold_at(np.array([0.1, np.inf, 0.3]), 0.03)


def test_an_eval_folder_given_as_dot_is_named_after_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    folder = tmp_path / "echo_frames"
    folder.mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(folder / "a.png")
    monkeypatch.chdir(folder)
    assert load_ood_eval(".").name == "echo_frames"


def test_a_file_whose_scores_cannot_be_fitted_ships_without_them_under_auto(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every file is converted before the OOD step runs: under the default, one file's failed fit must not lose the
    # conversion; asked for by name, the failure is the answer.
    import converters.ood_step as ood_step

    def overflowing(*_: Any, **__: Any) -> Any:
        raise DataError("val split", "the float16 feature scores are not finite")

    monkeypatch.setattr(ood_step, "DeviceModel", _FakeDeviceModel)
    monkeypatch.setattr(ood_step, "fit_ood", overflowing)
    held = HeldOut("test", np.zeros((3, 8, 8, 1), np.uint8), np.arange(3) % 2)
    base = _plan_without_float(tmp_path, held)
    auto = ood_step.OodPlan("auto", 0.1, base.train_images, base.y_train, base.val_images, held, [], None)
    outcome = ood_step.run_target(auto, "float16", Path("x.tflite"), None, [], "logits")  # type: ignore[arg-type]
    assert outcome.spec is None
    (note,) = outcome.notes
    assert "no OOD statistics for float16" in note and "not finite" in note and "--ood energy" in note
    assert "max_softmax" in outcome.scores["val"]  # the report still shows the baseline for this file
    named = ood_step.OodPlan("features", 0.1, base.train_images, base.y_train, base.val_images, held, [], None)
    with pytest.raises(DataError, match="not finite"):
        ood_step.run_target(named, "float16", Path("x.tflite"), None, [], "logits")  # type: ignore[arg-type]
