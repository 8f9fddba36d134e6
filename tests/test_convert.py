"""Training and conversion on real BreastMNIST images: int8/uint8/float16 artifacts, manifest, report, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from converters.convert import ConvertResult
from converters.data import Dataset, load_dataset
from edgemed.errors import DataError, ModelError
from edgemed.manifest import load_manifest, verify_model

ROOT = Path(__file__).resolve().parent.parent
BREAST = ROOT / "data" / "breastmnist_28.npz"
LABELS = ["malignant", "benign"]


@pytest.fixture(scope="module")
def breast() -> Dataset:
    return load_dataset(BREAST, labels=LABELS)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, breast: Dataset) -> Path:
    from converters.train import train

    result = train(
        breast, tmp_path_factory.mktemp("train"), recipe="reference", seed=0, epochs=8, progress=False, name="breast"
    )
    assert result.model_path.is_file() and result.labels_path.is_file()
    saved = json.loads(result.labels_path.read_text())
    assert saved["labels"] == LABELS and saved["input"]["height"] == 28 and saved["colour_mode"] == "gray"
    return result.model_path


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory, trained: Path, breast: Dataset) -> ConvertResult:
    from converters.convert import convert

    out = tmp_path_factory.mktemp("dist")
    return convert(trained, breast, out, targets=("int8", "uint8", "float16"), name="breast", progress=False)


def _interp(path: Path) -> Any:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    it.allocate_tensors()
    return it


@pytest.mark.slow
def test_reference_cnn_int8_meets_size_and_agreement(converted: ConvertResult) -> None:
    res = converted
    assert res.manifest_path.is_file()
    manifest = load_manifest(res.manifest_path)
    art = manifest.artifact("breast_int8.tflite")
    assert art.verdict == "accepted", art.failed_criteria
    assert art.output_kind == "logits"
    it = _interp(res.artifacts["int8"])
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    assert inp["dtype"] == np.int8 and out["dtype"] == np.int8
    assert list(inp["shape"]) == [1, 28, 28, 1]
    assert art.input is not None and art.input.dtype == "int8"
    assert art.input.scale == pytest.approx(1 / 255, rel=1e-3) and art.input.zero_point == -128
    float_size = manifest.metrics["float_tflite_size_bytes"]
    assert art.size_bytes <= 0.30 * float_size, (art.size_bytes, float_size)
    assert art.gate is not None and art.gate["agreement"] >= 0.98
    # Manifest bookkeeping the device relies on.
    assert manifest.labels == LABELS and manifest.input.channels == 1 and manifest.input.resize == "area"
    assert manifest.calibration["count_per_class"] == [100, 100]
    assert manifest.evaluation["split"] == "test" and sum(manifest.evaluation["count_per_class"]) == 156
    assert set(manifest.versions) >= {"tensorflow", "keras", "edgemed", "python"}
    verify_model(res.artifacts["int8"])


@pytest.mark.slow
def test_uint8_io_is_really_uint8(converted: ConvertResult) -> None:
    it = _interp(converted.artifacts["uint8"])
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    assert inp["dtype"] == np.uint8 and out["dtype"] == np.uint8
    scale, zero = inp["quantization"]
    assert zero == 0 and scale == pytest.approx(1 / 255, rel=1e-3)


@pytest.mark.slow
def test_float16_runs_and_matches_float(converted: ConvertResult, breast: Dataset, trained: Path) -> None:
    import keras

    from converters.runner import DeviceModel

    x, _ = breast.splits["test"]
    outputs = load_manifest(converted.manifest_path).artifact(converted.artifacts["float16"].name).outputs
    with DeviceModel(converted.artifacts["float16"], breast.input_spec(), outputs) as model:  # the device's code
        assert model.backend.input_spec.dtype == "float32"
        probs16 = model.probabilities(x[:40], "logits")
    ref = keras.models.load_model(trained).predict(x[:40].astype(np.float32) / 255.0, verbose=0)
    assert np.abs(probs16 - ref).max() < 5e-3


@pytest.mark.slow
def test_report_files_are_complete(converted: ConvertResult) -> None:
    html = converted.report_html.read_text()
    assert html.count("data:image/png;base64,") == 5  # four plots and the OOD score histograms
    assert "Confusion matrices" in html and "Reliability diagram" in html and "<h2>Out-of-distribution</h2>" in html
    report = json.loads(converted.report_json.read_text())
    assert set(report["targets"]) == {"int8", "uint8", "float16"}
    assert report["targets"]["int8"]["numbers"]["quantized"]["per_class"][0]["label"] == "malignant"


def test_report_opens_in_a_browser_and_shows_every_plot(converted: ConvertResult, tmp_path: Path) -> None:
    from browser import WAIT_FOR_JS, PipeBrowser

    browser = PipeBrowser(tmp_path, converted.report_html.resolve().as_uri())
    try:
        # Every embedded PNG decoded to a real picture (a broken data URI loads with naturalWidth 0).
        sizes = browser.evaluate(
            WAIT_FOR_JS % "document.readyState === 'complete' && [...document.images].map((i) => [i.naturalWidth, "
            "i.naturalHeight, i.getBoundingClientRect().width])"
        )
        text = browser.evaluate("document.body.innerText")
    finally:
        browser.close()
    assert len(sizes) == 5 and all(w > 100 and h > 100 and shown > 0 for w, h, shown in sizes), sizes
    assert "Confusion matrices" in text and "Reliability diagram" in text and "int8" in text


@pytest.mark.slow
def test_probabilities_output_keeps_softmax(tmp_path: Path, trained: Path, breast: Dataset) -> None:
    from converters.convert import convert

    res = convert(trained, breast, tmp_path, targets=("int8",), output="probabilities", progress=False)
    art = load_manifest(res.manifest_path).artifacts[0]
    assert art.output_kind == "probabilities"
    it = _interp(res.artifacts["int8"])
    assert art.scores_output is not None
    detail = next(d for d in it.get_output_details() if d["name"] == art.scores_output.name)
    # An int8 softmax output has scale 1/256, zero point -128: probabilities in steps of 1/256.
    assert detail["quantization"][0] == pytest.approx(1 / 256) and detail["quantization"][1] == -128


@pytest.mark.slow
def test_h5_and_saved_model_inputs(tmp_path: Path, trained: Path, breast: Dataset) -> None:
    import keras

    from converters.convert import convert

    model = keras.models.load_model(trained)
    h5 = tmp_path / "breast.h5"
    model.save(h5)
    res = convert(h5, breast, tmp_path / "h5", progress=False)
    assert res.verdicts["int8"] == "accepted"
    saved = tmp_path / "saved"
    model.export(saved)
    res = convert(saved, breast, tmp_path / "sm", name="breast_sm", progress=False)
    assert res.verdicts["int8"] == "accepted"
    # The SavedModel keeps its softmax: the converter detects probabilities and says so.
    assert load_manifest(res.manifest_path).artifacts[0].output_kind == "probabilities"


@pytest.mark.slow
def test_bad_inputs_raise_named_errors(tmp_path: Path, trained: Path, breast: Dataset) -> None:
    from converters.convert import convert

    junk = tmp_path / "junk.keras"
    junk.write_bytes(b"not a model")
    with pytest.raises(ModelError, match=r"junk\.keras"):
        convert(junk, breast, tmp_path / "o1", progress=False)
    tiny = load_dataset(BREAST, labels=LABELS)
    x, y = tiny.splits["train"]
    keep = np.concatenate([np.flatnonzero(y == 0)[:5], np.flatnonzero(y == 1)[:50]])
    tiny.splits["train"] = (x[keep], y[keep])
    with pytest.raises(DataError, match="at least 10 training images of class 'malignant', found 5"):
        convert(trained, tiny, tmp_path / "o2", progress=False)
    rgb = load_dataset(BREAST, labels=LABELS, colour_mode="rgb")
    with pytest.raises(DataError, match="model expects"):
        convert(trained, rgb, tmp_path / "o3", progress=False)


@pytest.mark.slow
def test_cli_train_and_convert(tmp_path: Path) -> None:
    env_cmd = [sys.executable, "-m", "edgemed"]
    train = subprocess.run(
        [
            *env_cmd,
            "train",
            "--data",
            str(BREAST),
            "--out",
            str(tmp_path / "m"),
            "--labels",
            "malignant,benign",
            "--epochs",
            "3",
            "--name",
            "b",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert train.returncode == 0, train.stderr[-2000:]
    conv = subprocess.run(
        [
            *env_cmd,
            "convert",
            str(tmp_path / "m" / "b.keras"),
            "--calibration",
            str(BREAST),
            "--out",
            str(tmp_path / "d"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert conv.returncode == 0, conv.stdout[-2000:] + conv.stderr[-2000:]
    assert "top-1 agreement" in conv.stdout and "float accuracy" in conv.stdout
    bad = subprocess.run(
        [
            *env_cmd,
            "convert",
            str(tmp_path / "m" / "b.keras"),
            "--calibration",
            str(BREAST),
            "--out",
            str(tmp_path / "e"),
            "--target",
            "int4",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert bad.returncode == 2 and "int4" in bad.stderr


def test_recipes_load_and_best_is_an_alias(tmp_path: Path) -> None:
    from converters.recipe import available_recipes, load_recipe
    from edgemed.errors import ConfigError

    assert {"reference", "bn_gap", "mobilenetv2", "best"} <= set(available_recipes())
    best = load_recipe("best")
    assert best.name != "best" and best.name in available_recipes()
    mobile = load_recipe("mobilenetv2")
    assert mobile.alpha == 0.35 and mobile.bn_momentum == 0.9 and mobile.augmentation.hflip
    custom = tmp_path / "mine.yaml"
    custom.write_text("name: mine\narchitecture: reference\nepochs: 2\n")
    assert load_recipe(str(custom)).epochs == 2
    custom.write_text("name: mine\narchitecture: reference\nepoch: 2\n")
    with pytest.raises(ConfigError, match="epoch"):
        load_recipe(str(custom))
    with pytest.raises(ConfigError, match="unknown recipe 'nope'"):
        load_recipe("nope")
    custom.write_text("name: mine\narchitecture: {reference\n")
    with pytest.raises(ConfigError) as broken:
        load_recipe(str(custom))
    message = str(broken.value)  # one line with where the mistake is, not PyYAML's multi-line text
    assert "\n" not in message and "line 2" in message and "<unicode string>" not in message, message


def test_augmentation_keeps_range_and_shape() -> None:
    from converters.recipe import Augmentation
    from converters.train import augment

    x = load_dataset(BREAST).splits["val"][0][:16].astype(np.float32) / 255.0
    aug = Augmentation(hflip=True, vflip=True, rot90=True, shift_fraction=0.2, brightness=0.2, contrast=0.2)
    out = augment(x, aug, np.random.default_rng(0))
    assert out.shape == x.shape and out.min() >= 0.0 and out.max() <= 1.0
    assert not np.array_equal(out, x)
    assert np.array_equal(augment(x, Augmentation(), np.random.default_rng(0)), x)


@pytest.mark.slow
def test_mobilenetv2_device_graph_converts(tmp_path: Path) -> None:
    from converters.convert import Calibration, to_tflite
    from converters.edgetpu import check_compatibility
    from converters.models import build_model
    from converters.recipe import load_recipe
    from converters.source import load_source

    model = build_model(load_recipe("mobilenetv2"), (32, 32, 3), 2)
    model.save(tmp_path / "m.keras")
    # load_source rebuilds the nested MobileNetV2 with a batch-1 input and a linear head, and checks that the
    # rebuilt graph reproduces the model's probabilities.
    source = load_source(tmp_path / "m.keras")
    assert source.output_kind == "logits"
    images = np.random.default_rng(0).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    calib = Calibration(images=images, labels=np.zeros(20, np.int64), count_per_class=[10, 10], sha256="x")
    report = check_compatibility(to_tflite(source, "int8", calib))
    assert report.compatible, report.problems


@pytest.mark.slow
def test_train_holds_out_validation_and_can_stop_on_auc(tmp_path: Path) -> None:
    from converters.train import train

    ds = load_dataset(BREAST, labels=LABELS)
    del ds.splits["val"]
    result = train(ds, tmp_path, recipe="bn_gap_auc", epochs=2, progress=False, name="auc")
    assert len(result.history["val_auc"]) == 2 and 0.0 <= max(result.history["val_auc"]) <= 1.0
    assert result.best_epoch == int(np.argmax(result.history["val_auc"])) + 1
    assert result.recipe == "bn_gap_auc"
