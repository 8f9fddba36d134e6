"""The device graph's feature outputs: tapped, converted, named by tensor name and role, and checked on the device.

Real conversions of the reference CNN and a bn_gap model trained briefly on BreastMNIST; TFLite lists their
outputs in an order of its own, and the manifest must still say which tensor is which.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from converters.convert import ConvertResult
from converters.data import Dataset, load_dataset
from edgemed.errors import ModelError
from edgemed.manifest import Artifact, load_manifest

ROOT = Path(__file__).resolve().parent.parent
BREAST = ROOT / "data" / "breastmnist_28.npz"
LABELS = ["malignant", "benign"]
BN_GAP_TAPS = ["relu0_1", "relu1_1", "relu2_1"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def breast() -> Dataset:
    return load_dataset(BREAST, labels=LABELS)


@pytest.fixture(scope="module")
def reference(
    tmp_path_factory: pytest.TempPathFactory, breast: Dataset, int8_model: Path
) -> tuple[Path, ConvertResult]:
    """The session's reference CNN (trained once per session for ``int8_model``), converted to int8 and float16."""
    from converters.convert import convert

    # build_reference_model keeps the Keras model in out_dir/keras/ (the int8 file may be in out_dir/rejected/).
    model_path = next(
        f / "keras" / "breast.keras" for f in (int8_model.parent, int8_model.parent.parent) if (f / "keras").is_dir()
    )
    out = tmp_path_factory.mktemp("ref")
    result = convert(model_path, breast, out, targets=("int8", "float16"), name="reference", progress=False)
    return model_path, result


@pytest.fixture(scope="module")
def bn_gap(tmp_path_factory: pytest.TempPathFactory, breast: Dataset) -> tuple[Path, ConvertResult]:
    """A bn_gap model trained for one epoch: the mapping checks need its taps' activations, not its accuracy."""
    from converters.convert import convert
    from converters.train import train

    out = tmp_path_factory.mktemp("gap")
    trained = train(breast, out / "keras", recipe="bn_gap", seed=0, epochs=1, progress=False, name="bn_gap")
    result = convert(trained.model_path, breast, out, targets=("int8",), name="bn_gap", progress=False)
    return trained.model_path, result


def _artifact(result: ConvertResult, target: str) -> Artifact:
    return load_manifest(result.manifest_path).artifact(result.artifacts[target].name)


def _interpreter_outputs(path: Path, images: np.ndarray) -> tuple[list[str], dict[str, np.ndarray]]:
    """Every output of the file for uint8 images, dequantized, read independently of edgemed's code."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    it.allocate_tensors()
    (inp,) = it.get_input_details()
    outs = it.get_output_details()
    rows: dict[str, list[np.ndarray]] = {o["name"]: [] for o in outs}
    scale, zero = inp["quantization"]
    for image in images:
        x = image[None].astype(np.float32) / 255.0
        if scale:
            x = np.clip(np.round(x / scale) + zero, -128, 127).astype(inp["dtype"])
        it.set_tensor(inp["index"], x)
        it.invoke()
        for o in outs:
            q = it.get_tensor(o["index"]).reshape(-1).astype(np.float64)
            s, z = o["quantization"]
            rows[o["name"]].append((q - z) * s if s else q)
    return [str(o["name"]) for o in outs], {k: np.asarray(v) for k, v in rows.items()}


def _check_mapping(
    model_path: Path, result: ConvertResult, target: str, taps: list[str], breast: Dataset, maps: tuple[str, ...] = ()
) -> None:
    """Each listed output holds what its role and layer say: it follows that Keras output best of all outputs.

    ``maps``: the layer of the CAM feature map listed last (its values are checked in tests/test_cam_convert.py).
    """
    from converters.source import load_source

    art = _artifact(result, target)
    assert [o.role for o in art.outputs] == ["scores"] + ["features"] * len(taps) + ["feature_map"] * len(maps)
    assert [o.layer for o in art.outputs] == [None, *taps, *maps]
    assert art.output is not None and art.scores_output is not None
    assert art.output.name == art.scores_output.name  # the gate's scores tensor is the listed one
    images = breast.splits["val"][0][:40]
    order, tflite = _interpreter_outputs(result.artifacts[target], images)
    assert sorted(order) == sorted(o.name for o in art.outputs)
    scores, features = load_source(model_path).predict_outputs(images.astype(np.float32) / 255.0)
    keras = {None: scores, **features}
    for listed in (o for o in art.outputs if o.role != "feature_map"):
        mine = tflite[listed.name]
        assert [int(d) for d in listed.shape] == [1, mine.shape[1]]
        corr = {
            layer: float(np.corrcoef(mine.ravel(), ref.ravel())[0, 1])
            for layer, ref in keras.items()
            if ref.shape == mine.shape
        }
        assert max(corr, key=corr.__getitem__) == listed.layer, (listed.name, corr)
        assert corr[listed.layer] > 0.95, (listed.name, corr)
        np.testing.assert_allclose(mine, keras[listed.layer], atol=0.15 * float(np.abs(keras[listed.layer]).max()))


def _reference_taps(model_path: Path) -> list[str]:
    """The reference CNN's three convolutions and its penultimate Dense (Keras numbers names per process)."""
    import keras

    layers = keras.models.load_model(model_path, compile=False).layers
    convs = [layer.name for layer in layers if type(layer).__name__ == "Conv2D"]
    dense = [layer.name for layer in layers if type(layer).__name__ == "Dense"]
    return [*convs, dense[0]]


def test_reference_cnn_outputs_are_named_and_mapped(reference: tuple[Path, ConvertResult], breast: Dataset) -> None:
    model_path, result = reference
    taps = _reference_taps(model_path)
    assert len(taps) == 4
    for target in ("int8", "float16"):
        _check_mapping(model_path, result, target, taps, breast)
    # The test means something only because TFLite does reorder (measured with TensorFlow 2.21).
    order, _ = _interpreter_outputs(result.artifacts["int8"], breast.splits["val"][0][:1])
    listed = [o.name for o in _artifact(result, "int8").outputs]
    assert order != listed, "TFLite kept the Keras order: this test no longer shows the outputs are matched"


def test_bn_gap_outputs_are_named_and_mapped(bn_gap: tuple[Path, ConvertResult], breast: Dataset) -> None:
    model_path, result = bn_gap
    _check_mapping(model_path, result, "int8", BN_GAP_TAPS, breast, maps=("relu2_1",))
    assert _artifact(result, "int8").cam is not None


def test_name_outputs_follows_the_reference_not_positions(reference: tuple[Path, ConvertResult]) -> None:
    """Permute the Keras side's tap outputs (and their names): the names follow the tensors, not positions."""
    from converters.outputs import name_outputs
    from converters.source import load_source

    model_path, result = reference
    source = load_source(model_path)
    probe = load_dataset(BREAST, labels=LABELS).splits["train"][0][:24].astype(np.float32) / 255.0
    straight = name_outputs(result.artifacts["int8"], source.device_model, probe, source.feature_layers)
    assert straight == _artifact(result, "int8").outputs
    perm = [3, 1, 0, 2]

    def permuted(x: np.ndarray) -> list[Any]:
        outs = source.device_model(x)
        return [outs[0], *(outs[1 + p] for p in perm)]

    layers = [source.feature_layers[p] for p in perm]
    swapped = name_outputs(result.artifacts["int8"], permuted, probe, layers)
    by_layer = {o.layer: o.name for o in straight}
    assert [(o.layer, o.name) for o in swapped[1:]] == [(layer, by_layer[layer]) for layer in layers]


def test_name_outputs_refuses_another_models_file(
    reference: tuple[Path, ConvertResult], bn_gap: tuple[Path, ConvertResult]
) -> None:
    from converters.outputs import name_outputs
    from converters.source import load_source

    other = load_source(bn_gap[0])
    probe = load_dataset(BREAST, labels=LABELS).splits["train"][0][:16].astype(np.float32) / 255.0
    with pytest.raises(ModelError, match=r"output\(s\) of 16 values .* not this model's conversion"):
        name_outputs(
            reference[1].artifacts["int8"], other.device_model, probe, other.feature_layers, feature_map="relu2_1"
        )


def test_device_model_run_reads_every_feature(reference: tuple[Path, ConvertResult], breast: Dataset) -> None:
    from converters.runner import DeviceModel

    _, result = reference
    art = _artifact(result, "int8")
    images = breast.splits["val"][0][:30]
    _, tflite = _interpreter_outputs(result.artifacts["int8"], images)
    with DeviceModel(result.artifacts["int8"], load_manifest(result.manifest_path).input, art.outputs) as model:
        run = model.run(images, "logits")
        probs = model.probabilities(images, "logits")
    np.testing.assert_array_equal(run.probs, probs)
    assert run.logits is not None
    np.testing.assert_allclose(run.logits, tflite[art.outputs[0].name], atol=1e-12)
    features = [o for o in art.outputs if o.role == "features"]
    assert list(run.features) == [o.name for o in features]
    assert run.layers == {o.name: o.layer for o in features}
    for o in features:
        np.testing.assert_allclose(run.features[o.name], tflite[o.name], atol=1e-12)


def test_ood_none_graph_has_one_output(tmp_path: Path, reference: tuple[Path, ConvertResult], breast: Dataset) -> None:
    from converters.convert import convert

    result = convert(reference[0], breast, tmp_path, targets=("int8",), name="plain", progress=False, ood="none")
    art = _artifact(result, "int8")
    assert [(o.role, o.layer) for o in art.outputs] == [("scores", None)]
    order, _ = _interpreter_outputs(result.artifacts["int8"], breast.splits["val"][0][:1])
    assert order == [art.outputs[0].name]


def _edited_copy(result: ConvertResult, tmp_path: Path, edit: Any) -> tuple[Path, Path]:
    model = result.artifacts["int8"]
    shutil.copy(model, tmp_path / model.name)
    raw = json.loads(result.manifest_path.read_text())
    index = next(i for i, a in enumerate(raw["artifacts"]) if a["file"] == model.name)
    edit(raw["artifacts"][index])
    manifest = tmp_path / result.manifest_path.name
    manifest.write_text(json.dumps(raw))
    return tmp_path / model.name, manifest


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("name", "StatefulPartitionedCall_1:99", r"outputs\[2\] names 'StatefulPartitionedCall_1:99'"),
        ("scale", 0.5, r"outputs\[2\]\.scale is 0\.5"),
    ],
)
def test_device_refuses_a_hand_edited_output(
    tmp_path: Path, reference: tuple[Path, ConvertResult], field: str, value: object, message: str
) -> None:
    from edgemed.deploy import check_deployable
    from edgemed.inference import BackendConfig

    def edit(art: dict[str, Any]) -> None:
        old = art["outputs"][2][field]
        art["outputs"][2][field] = value
        # A consistent edit: the OOD statistics (when fitted) follow the renamed output, so the manifest stays valid.
        for layer in ((art.get("ood") or {}).get("features") or {}).get("layers", []):
            if field == "name" and layer["output"] == old:
                layer["output"] = value

    model, manifest = _edited_copy(reference[1], tmp_path, edit)
    deployable = check_deployable(model, manifest)  # the file's sha256 is still right: only loading can tell
    with pytest.raises(ModelError, match=message) as err:
        deployable.open_backend(BackendConfig(accelerator="cpu", threads=1, allow_cpu_fallback=False))
    assert "convert again" in str(err.value)


def test_device_refuses_a_scores_output_it_does_not_have(tmp_path: Path, reference: tuple[Path, ConvertResult]) -> None:
    from edgemed.deploy import check_deployable
    from edgemed.inference import BackendConfig

    def edit(art: dict[str, Any]) -> None:
        art["outputs"][0]["name"] = "logits_that_are_not_there"

    model, manifest = _edited_copy(reference[1], tmp_path, edit)
    with pytest.raises(ModelError, match="logits_that_are_not_there"):
        check_deployable(model, manifest).open_backend(BackendConfig(accelerator="cpu", threads=1))


def test_mobilenetv2_taps_its_pooled_backbone_only(tmp_path: Path) -> None:
    """A nested backbone is one top-level layer: its pooled output is the only tap (no recursion)."""
    from converters.models import build_model
    from converters.recipe import load_recipe
    from converters.source import load_source

    model = build_model(load_recipe("mobilenetv2"), (32, 32, 3), 2)
    model.save(tmp_path / "m.keras")
    source = load_source(tmp_path / "m.keras")
    backbone = next(layer.name for layer in model.layers if layer.name.startswith("mobilenetv2"))
    assert source.feature_layers == [backbone]
    # At 32 x 32 the backbone's last map is 1 x 1: nothing for a class activation map to show (converters.cam;
    # a 64 x 64 MobileNetV2 gets one, tests/test_cam_convert.py).
    assert source.cam is None
    scores, features = source.predict_outputs(np.random.default_rng(0).random((3, 32, 32, 3), dtype=np.float32))
    assert scores.shape == (3, 2) and features[backbone].shape == (3, int(model.layers[-1].input.shape[-1]))
    assert load_source(tmp_path / "m.keras", taps=False).feature_layers == []


def test_a_vector_too_wide_to_fit_is_not_a_tap() -> None:
    """A Flatten of the raw input feeding the classifier would be a 12288-wide tap (a 12288 x 12288 covariance)."""
    import keras

    from converters.source import MAX_VECTOR_TAP, find_taps

    inputs = keras.Input(shape=(64, 64, 3))
    flat = keras.layers.Flatten()(inputs)
    assert flat.shape[-1] > MAX_VECTOR_TAP
    wide = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(flat))
    assert find_taps(wide) == []
    narrow = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Dense(16)(flat)))
    assert [t.tensor.shape[-1] for t in find_taps(narrow)] == [16]


def test_the_device_reads_the_listed_scores_and_refuses_another(reference: tuple[Path, ConvertResult]) -> None:
    from edgemed.inference import BackendConfig, make_backend

    _, result = reference
    manifest = load_manifest(result.manifest_path)
    art = _artifact(result, "int8")
    assert art.scores_output is not None
    cfg = BackendConfig(accelerator="cpu", threads=1)
    backend = make_backend(result.artifacts["int8"], cfg, manifest=manifest)  # the scores name from the manifest
    try:
        assert backend.output_spec.name == art.scores_output.name
        assert {s.name for s in backend.output_specs} == {o.name for o in art.outputs}
    finally:
        backend.close()
    feature = art.outputs[1].name
    with pytest.raises(ModelError, match=r"outputs\[0\] names .* as the scores but the model's scores tensor is"):
        make_backend(result.artifacts["int8"], cfg, manifest=manifest, scores_output=feature)


def test_strided_convolutions_are_taps_and_an_averaged_tap_is_not_repeated() -> None:
    import keras

    from converters.source import find_taps

    inputs = keras.Input(shape=(32, 32, 1))
    x = keras.layers.Conv2D(8, 3, strides=2, name="from_input")(inputs)  # reads the image itself: not a tap
    x = keras.layers.Conv2D(8, 3, name="c1")(x)
    x = keras.layers.Conv2D(16, 3, strides=2, name="c2")(x)
    x = keras.layers.ReLU(name="r2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dropout(0.2, name="drop")(x)
    outputs = keras.layers.Dense(2, activation="softmax", name="head")(x)
    taps = find_taps(keras.Model(inputs, outputs))
    assert [(t.layer, t.pooled) for t in taps] == [("c1", True), ("r2", True)]

    flat = keras.Sequential(
        [keras.Input(shape=(16, 16, 1)), keras.layers.Conv2D(4, 3, name="c"), keras.layers.Flatten(name="f"),
         keras.layers.Dense(8, name="hidden"), keras.layers.Dense(2, name="logits")]
    )  # fmt: skip
    assert [(t.layer, t.pooled) for t in find_taps(flat)] == [("c", True), ("hidden", False)]


def test_a_flattened_tapped_map_feeding_the_classifier_is_not_a_second_tap() -> None:
    """Flatten -> Dense(classes): the penultimate vector is the tapped map itself, H*W*C wide (12544 here, a
    12544 x 12544 covariance to fit and a 12544-value output per frame); its channel means are already read."""
    import keras

    from converters.source import find_taps

    model = keras.Sequential(
        [keras.Input(shape=(64, 64, 1)), keras.layers.Conv2D(16, 3, name="c1"), keras.layers.MaxPooling2D(2),
         keras.layers.Conv2D(64, 3, name="c2"), keras.layers.MaxPooling2D(2, name="p2"),
         keras.layers.Flatten(name="f"), keras.layers.Dropout(0.1), keras.layers.Dense(2, name="logits")]
    )  # fmt: skip
    taps = find_taps(model)
    assert [(t.layer, t.pooled) for t in taps] == [("c1", True), ("c2", True), ("p2", True)]
