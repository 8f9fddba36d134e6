"""Out-of-distribution statistics on a real conversion: the reference CNN trained briefly on BreastMNIST.

The manifest's thresholds must come from the validation split, flag about the target share of it when the file is
run through the device's own code (the per-frame detector on a real LiteRT interpreter), the int8 feature scores
must rank the validation images like the float Keras model's (recomputed here from the Keras model itself, not
read from the manifest), and dermoscopy photographs (data/isic_samples) must stand out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from converters.convert import ConvertResult
from converters.data import Dataset, load_dataset
from edgemed.errors import DataError
from edgemed.manifest import Artifact, Manifest, load_manifest

ROOT = Path(__file__).resolve().parent.parent
BREAST = ROOT / "data" / "breastmnist_28.npz"
ISIC = ROOT / "data" / "isic_samples"
LABELS = ["malignant", "benign"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def breast() -> Dataset:
    return load_dataset(BREAST, labels=LABELS)


def keras_model_of(int8_model: Path) -> Path:
    """The Keras model the ``int8_model`` fixture was trained into (``converters.testing.build_reference_model``
    keeps it in ``out_dir/keras/breast.keras``; the int8 file may sit in ``out_dir/rejected/``)."""
    for folder in (int8_model.parent, int8_model.parent.parent):
        if (folder / "keras" / "breast.keras").is_file():
            return folder / "keras" / "breast.keras"
    raise FileNotFoundError(f"no keras/breast.keras beside {int8_model}")


@pytest.fixture(scope="module")
def converted(
    tmp_path_factory: pytest.TempPathFactory, breast: Dataset, int8_model: Path
) -> tuple[Path, ConvertResult]:
    """The session's reference CNN (BreastMNIST, 3 epochs, seed 0: trained once per session for ``int8_model``)
    converted again here, with the dermoscopy photographs as an ``--ood-eval`` set."""
    from converters.convert import convert

    model_path = keras_model_of(int8_model)
    out = tmp_path_factory.mktemp("ood")
    result = convert(model_path, breast, out, name="breast", progress=False, ood_eval=[ISIC])
    return model_path, result


def _int8(result: ConvertResult) -> tuple[Manifest, Artifact]:
    manifest = load_manifest(result.manifest_path)
    return manifest, manifest.artifact(result.artifacts["int8"].name)


def _device_scores(result: ConvertResult, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Feature and energy scores of each image as the device computes them: a real interpreter opened from the
    manifest, the device's preprocessing, and the per-frame ``OodDetector.check`` on the raw outputs."""
    from edgemed.inference import BackendConfig, make_backend
    from edgemed.ood import OodDetector, OodSetting
    from edgemed.preprocess import Preprocessor

    manifest, art = _int8(result)
    backend = make_backend(result.artifacts["int8"], BackendConfig(accelerator="cpu", threads=1), manifest=manifest)
    try:
        specs = {s.name: s for s in backend.output_specs}
        features = OodDetector.build(art, backend.output_spec, specs, OodSetting())
        energy = OodDetector.build(art, backend.output_spec, specs, OodSetting(method="energy"))
        assert features is not None and energy is not None and features.method == "features"
        prep = Preprocessor(manifest.input, backend.input_spec)
        f, e = [], []
        for image in images:
            raw = backend.invoke(prep(image))
            f.append(features.check(raw, backend.output).score)
            e.append(energy.check(raw, backend.output).score)
    finally:
        backend.close()
    return np.asarray(f, dtype=np.float64), np.asarray(e, dtype=np.float64)


def _keras_features(model_path: Path, layers: list[str], images: np.ndarray) -> list[np.ndarray]:
    """The float Keras model's activations at each tapped layer, averaged over height and width (no converter code)."""
    import keras

    model = keras.models.load_model(model_path, compile=False)
    sub = keras.Model(model.inputs, [model.get_layer(name).output for name in layers])
    outs = sub.predict(images.astype(np.float32) / np.float32(255.0), batch_size=64, verbose=0)
    outs = outs if isinstance(outs, list) else [outs]
    return [np.asarray(o, np.float64).mean(axis=(1, 2)) if o.ndim == 4 else np.asarray(o, np.float64) for o in outs]


def test_manifest_thresholds_come_from_val_and_flag_about_three_percent(
    converted: tuple[Path, ConvertResult], breast: Dataset
) -> None:
    _, result = converted
    _, art = _int8(result)
    ood = art.ood
    assert ood is not None and ood.features is not None and ood.energy is not None
    assert ood.default == "features" and ood.target_fraction == 0.03
    val, y_val = breast.splits["val"]
    assert (ood.fit_split, ood.fit_n) == ("train", len(breast.splits["train"][1]))
    assert (ood.threshold_split, ood.threshold_n) == ("val", len(y_val))
    features, energy = _device_scores(result, val)
    for section, scores in ((ood.features, features), (ood.energy, energy)):
        # The threshold is the "higher" 97% quantile of this file's own val scores, as the device computes them.
        assert section.threshold == pytest.approx(float(np.quantile(scores, 0.97, method="higher")), rel=1e-6)
        flagged = float((scores > section.threshold).mean())
        assert flagged == pytest.approx(section.flagged_fraction)
        assert 1 / len(y_val) <= flagged <= 0.03  # about 3%: 2 of 78 images
    # The reference CNN's taps: its three convolutions (each before a pooling) and the penultimate dense layer
    # (names carry Keras's per-process counters, so they are read from the model).
    import keras

    model = keras.models.load_model(converted[0], compile=False)
    kinds = {layer.name: type(layer).__name__ for layer in model.layers}
    assert [kinds[str(s.layer)] for s in ood.features.layers] == ["Conv2D", "Conv2D", "Conv2D", "Dense"]


def test_per_frame_check_equals_the_converters_batch_scores(converted: tuple[Path, ConvertResult]) -> None:
    from converters.ood import method_scores
    from converters.runner import DeviceModel

    _, result = converted
    manifest, art = _int8(result)
    images = load_dataset(BREAST, labels=LABELS).splits["test"][0][:40]
    with DeviceModel(result.artifacts["int8"], manifest.input, art.outputs) as model:
        batch = method_scores(art.ood, model.run(images, art.output_kind))
    features, energy = _device_scores(result, images)
    np.testing.assert_allclose(features, batch["features"], atol=1e-6)
    np.testing.assert_allclose(energy, batch["energy"], atol=1e-6)


def test_int8_feature_scores_rank_val_like_the_float_model(
    converted: tuple[Path, ConvertResult], breast: Dataset
) -> None:
    """Spearman >= 0.95 on val between the shipped int8 scores and the float model's, fitted alike on train."""
    from converters.ood import feature_scores, fit_feature_spec, rank_agreement
    from converters.runner import ModelOutputs

    model_path, result = converted
    _, art = _int8(result)
    assert art.ood is not None and art.ood.features is not None
    layers = [str(s.layer) for s in art.ood.features.layers]
    train, y_train = breast.splits["train"]
    val = breast.splits["val"][0]
    train_f = _keras_features(model_path, layers, train)
    fitted = fit_feature_spec(
        ModelOutputs(np.zeros((len(train), 2)), None, dict(zip(layers, train_f, strict=True)), {}), y_train
    )
    float_scores = feature_scores(fitted, _keras_features(model_path, layers, val))
    int8_scores, _ = _device_scores(result, val)
    rho = rank_agreement(int8_scores, float_scores)
    assert rho >= 0.95, rho
    assert art.ood.feature_rank_agreement == pytest.approx(rho, abs=0.01)


def test_report_section_and_isic_photographs_stand_out(converted: tuple[Path, ConvertResult]) -> None:
    _, result = converted
    page = result.report_html.read_text(encoding="utf-8")
    assert "<h2>Out-of-distribution</h2>" in page and 'alt="OOD score histograms (int8)"' in page
    assert "isic_samples" in page and "FPR at 95% TPR" in page
    report = json.loads(result.report_json.read_text(encoding="utf-8"))["ood"]["int8"]
    assert report["sets"] == {"train": 546, "val": 78, "test": 156, "isic_samples": 12}
    rows = {(r["set"], r["score"]): r for r in report["table"]}
    isic = rows[("isic_samples", "features")]
    assert isic["auroc"] >= 0.95 and isic["flagged"] >= 0.9
    assert rows[("isic_samples", "max_softmax")]["auroc"] < isic["auroc"]  # the baseline is beaten
    assert rows[("val", "features")]["flagged"] <= 0.03
    assert report["thresholds"]["features"] == pytest.approx(_int8(result)[1].ood.features.threshold)  # type: ignore[union-attr]


def test_cli_energy_only_prints_the_summary_line(tmp_path: Path, converted: tuple[Path, ConvertResult]) -> None:
    model_path, _ = converted
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KERAS_HOME": str(tmp_path / "keras-home")}
    cmd = [sys.executable, "-m", "edgemed", "convert", str(model_path), "--calibration", str(BREAST)]
    cmd += ["--out", str(tmp_path), "--name", "e", "--ood", "energy", "--ood-fraction", "0.05", "--no-progress"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "ood int8: energy threshold" in run.stdout and "of 78 val images" in run.stdout
    art = load_manifest(tmp_path / "e.manifest.json").artifacts[0]
    assert art.ood is not None and art.ood.features is None and art.ood.energy is not None
    assert art.ood.target_fraction == 0.05 and [o.role for o in art.outputs] == ["scores"]


def test_no_val_split_is_refused_before_any_conversion(tmp_path: Path, converted: tuple[Path, ConvertResult]) -> None:
    from converters.convert import convert

    model_path, _ = converted
    ds = load_dataset(BREAST, labels=LABELS)
    del ds.splits["val"]
    with pytest.raises(DataError, match=r"no val split .* --ood none"):
        convert(model_path, ds, tmp_path, name="x", progress=False)
    assert not list(tmp_path.glob("*.tflite"))
    with pytest.raises(DataError, match="no such file"):
        convert(model_path, load_dataset(BREAST, labels=LABELS), tmp_path, progress=False, ood_eval=["absent"])
