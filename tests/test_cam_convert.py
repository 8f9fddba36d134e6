"""``edgemed convert``'s class activation map: the feature_map output and the ``cam`` section, ``--cam auto|none``.

Real conversions by the real command line (in subprocesses: TensorFlow stays out of the test process) of the
``gap_model`` fixture's Keras model (the ``best`` recipe: GAP + Dense) and of the reference CNN (no GAP head).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gap_model import gap_model_fixture

from edgemed.deploy import check_deployable
from edgemed.inference import BackendConfig
from edgemed.inference.classify import Classifier
from edgemed.manifest import Artifact, load_manifest

__all__ = ["gap_model_fixture"]

ROOT = Path(__file__).resolve().parent.parent
BREAST = ROOT / "data" / "breastmnist_28.npz"

pytestmark = pytest.mark.slow


def _convert(model: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KERAS_HOME": str(out.parent / "keras_home"), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "edgemed", "convert", str(model), "--calibration", str(BREAST), "--out", str(out)]
    proc = subprocess.run([*cmd, *extra, "--no-progress"], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _int8(manifest: Path) -> Artifact:
    return next(a for a in load_manifest(manifest).artifacts if a.target == "int8")


def _probabilities(model: Path, manifest: Path, images: np.ndarray) -> np.ndarray:
    deployable = check_deployable(model, manifest)
    classifier = Classifier(deployable.open_backend(BackendConfig()), deployable.manifest, deployable.artifact)
    return np.array(
        [classifier.scores(classifier.backend.invoke(classifier.preprocess(x))).probabilities for x in images]
    )


def _gate(artifact: Artifact) -> dict[str, Any]:
    gate = dict(artifact.gate or {})
    gate.pop("latency_ms", None)  # timed on a shared machine
    gate.pop("size_bytes", None)  # the extra output's tensor entry adds about a hundred bytes
    return gate


def test_gap_model_manifest_lists_the_feature_map_and_cam(gap_model: Path) -> None:
    art = _int8(gap_model.parent / "breast_gap.manifest.json")
    roles = [o.role for o in art.outputs]
    # Keras order: the scores, the OOD taps, then the feature map (the manifest keeps it; TFLite's may differ).
    assert roles == ["scores", "features", "features", "features", "feature_map"]
    fmap = art.outputs[-1]
    assert fmap.layer == "relu2_1" and fmap.shape == [1, 7, 7, 64] and fmap.dtype == "int8" and fmap.scale > 0
    assert art.cam is not None
    assert art.cam.output == fmap.name and art.cam.layer == "relu2_1"
    assert art.cam.channels == 64 and art.cam.classes == 2
    assert art.ood is not None and art.ood.features is not None  # OOD auto still fitted beside it


def test_cam_on_every_target_and_none_changes_no_score(gap_model: Path, tmp_path: Path, data_dir: Path) -> None:
    """``--cam auto`` gives float16 and dynamic files their map too; ``--cam none`` leaves it out, and the int8
    file's scores, gate numbers and OOD thresholds are those of the conversion with the map."""
    keras_model = gap_model.parent / "keras" / "breast_gap.keras"
    # int8 with the map is the fixture's own conversion: only the float targets are converted again here.
    every = _convert(keras_model, tmp_path / "every", "--target", "float16", "dynamic", "--name", "g")
    assert "class activation map" not in every.stdout
    manifest = load_manifest(tmp_path / "every" / "g.manifest.json")
    assert {a.target for a in manifest.artifacts} == {"float16", "dynamic"}
    for art in manifest.artifacts:
        maps = [o for o in art.outputs if o.role == "feature_map"]
        assert len(maps) == 1 and art.cam is not None and art.cam.output == maps[0].name, art.target
        assert maps[0].shape == [1, 7, 7, 64]
        assert (maps[0].scale > 0) == (art.target == "int8")  # float16/dynamic keep float activations
    reference = _int8(gap_model.parent / "breast_gap.manifest.json")
    assert reference.cam is not None and [o.role for o in reference.outputs].count("feature_map") == 1
    for art in manifest.artifacts:  # the same Dense kernel whatever the target
        assert art.cam is not None and art.cam.weights == reference.cam.weights, art.target

    _convert(keras_model, tmp_path / "none", "--cam", "none", "--name", "g")
    plain = _int8(tmp_path / "none" / "g.manifest.json")
    assert plain.cam is None and [o.role for o in plain.outputs] == ["scores", "features", "features", "features"]
    assert _gate(plain) == _gate(reference)
    assert plain.ood is not None and reference.ood is not None
    assert plain.ood.model_dump() == reference.ood.model_dump()
    images = np.load(data_dir / "breastmnist_28.npz")["test_images"]
    with_map = _probabilities(gap_model, gap_model.parent / "breast_gap.manifest.json", images)
    without = _probabilities(tmp_path / "none" / "g_int8.tflite", tmp_path / "none" / "g.manifest.json", images)
    np.testing.assert_array_equal(with_map, without)


def test_a_model_without_a_gap_head_gets_no_cam_and_a_note(int8_model: Path, tmp_path: Path) -> None:
    """The reference CNN (Flatten + Dense + Dense): no feature_map output, cam None, and the console says why."""
    assert _int8(next(int8_model.parent.glob("*.manifest.json"))).cam is None
    keras_model = next(
        f / "keras" / "breast.keras" for f in (int8_model.parent, int8_model.parent.parent) if (f / "keras").is_dir()
    )
    proc = _convert(keras_model, tmp_path / "ref", "--ood", "none", "--name", "r")
    art = _int8(tmp_path / "ref" / "r.manifest.json")
    assert art.cam is None and all(o.role != "feature_map" for o in art.outputs)
    note = next(line for line in proc.stdout.splitlines() if "class activation map" in line)
    assert note.startswith("note: ") and "GlobalAveragePooling2D + Dense" in note and "occlusion" in note
    report = json.loads((tmp_path / "ref" / "report.json").read_text())
    assert "class activation map" in json.dumps(report)


# Runs in a subprocess (no TensorFlow in the test process): an untrained MobileNetV2 (the mobilenetv2 recipe's
# architecture, GAP inside the nested backbone) loaded for conversion; prints what the device graph became.
_MOBILENET = """
import json, sys
import numpy as np
from converters.models import build_model
from converters.recipe import load_recipe
from converters.source import load_source

found = {}
for side in map(int, sys.argv[2:]):
    path = f"{sys.argv[1]}/m{side}.keras"
    model = build_model(load_recipe("mobilenetv2"), (side, side, 3), 2)
    model.save(path)
    source = load_source(path)
    x = np.random.default_rng(0).random((1, side, side, 3), dtype=np.float32)
    out = {"cam": None, "taps": source.feature_layers}
    if source.cam is not None:
        scores, *taps, fmap = [np.asarray(o, dtype=np.float64) for o in source.device_model(x)]
        dense = model.get_layer("classifier")
        kernel, bias = (np.asarray(w, dtype=np.float64) for w in dense.get_weights())
        # GAP + Dense: the map's mean weighed by the recorded kernel, plus the bias, is the logit.
        cam_logits = (fmap[0] @ np.asarray(source.cam.weights)).mean(axis=(0, 1)) + bias
        logits = np.log(np.asarray(model(x), dtype=np.float64)[0])
        out.update(
            cam=source.cam.layer, map=list(fmap.shape), kernel_equal=bool(np.array_equal(kernel, source.cam.weights)),
            scores_vs_model=float(np.abs((scores[0] - scores[0].max()) - (logits - logits.max())).max()),
            cam_vs_scores=float(np.abs(cam_logits - scores[0]).max()),
        )
    found[side] = out
print(json.dumps(found))
"""


def test_mobilenetv2_gap_inside_its_backbone_gets_a_cam(tmp_path: Path) -> None:
    """The GAP of Keras's MobileNetV2 (pooling="avg") is inside the nested backbone: the device graph is rebuilt
    around a view of the backbone that also outputs its last map, with the same scores; at 32 x 32 the map is
    1 x 1 and there is no CAM. Both sizes in one subprocess: TensorFlow starts once."""
    env = {**os.environ, "KERAS_HOME": str(tmp_path / "keras_home"), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", _MOBILENET, str(tmp_path), "64", "32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    for side in (64, 32):
        got = found[str(side)]
        backbone = f"mobilenetv2_0.35_{side}"
        assert got["taps"] == [backbone]  # the OOD tap keeps its name through the rebuild
        if side == 32:
            assert got["cam"] is None
            continue
        assert got["cam"] == f"{backbone}/out_relu" and got["map"] == [1, 2, 2, 1280] and got["kernel_equal"]
        assert got["scores_vs_model"] < 1e-4 and got["cam_vs_scores"] < 1e-4, got


def test_cam_option_is_checked(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgemed",
            "convert",
            "x.keras",
            "--calibration",
            str(BREAST),
            "--out",
            str(tmp_path),
            "--cam",
            "gradcam",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "--cam" in proc.stderr and "'auto', 'none'" in proc.stderr
    help_text = subprocess.run(
        [sys.executable, "-m", "edgemed", "convert", "--help"], capture_output=True, text=True, timeout=120
    ).stdout
    assert "--cam {auto,none}" in help_text and "occlusion" in help_text


# Runs in a subprocess: small untrained Keras heads, each given to find_cam_head; prints what it found.
_HEADS = """
import json
import keras
import numpy as np
from converters.cam import find_cam_head

L = keras.layers

def build(name, head, classes=2):
    inputs = keras.Input((8, 8, 1))
    x = L.Conv2D(6, 3, padding="same", activation="relu", name="conv")(inputs)
    return keras.Model(inputs, head(x, classes), name=name)

heads = {
    "dropout_chain": lambda x, k: L.Dense(k, activation="softmax", name="fc")(
        L.Dropout(0.2)(L.Dropout(0.3)(L.GlobalAveragePooling2D()(x)))),
    "softmax_layer_3_classes": lambda x, k: L.Softmax()(L.Dense(k, name="fc")(L.GlobalAveragePooling2D()(x))),
    "keepdims": lambda x, k: L.Dense(k, name="fc")(L.Flatten()(L.GlobalAveragePooling2D(keepdims=True)(x))),
    "batchnorm_between": lambda x, k: L.Dense(k, name="fc")(L.BatchNormalization()(L.GlobalAveragePooling2D()(x))),
    "two_dense": lambda x, k: L.Dense(k, name="fc")(L.Dense(4, activation="relu")(L.GlobalAveragePooling2D()(x))),
    "flatten": lambda x, k: L.Dense(k, name="fc")(L.Flatten()(x)),
}
out = {}
rng = np.random.default_rng(0)
for name, head in heads.items():
    classes = 3 if "3_classes" in name else 2
    model = build(name, head, classes)
    found = find_cam_head(model)
    if found is None:
        out[name] = None
        continue
    bias = model.get_layer("fc").get_weights()[1]
    x = rng.random((1, 8, 8, 1), dtype=np.float32)
    fmap = np.asarray(keras.Model(model.inputs, found.tensor)(x), dtype=np.float64)[0]
    # The class's map averaged over the grid, plus the bias, is that class's logit, column by column: its
    # softmax is the model's output (both heads end in a softmax; Dropout is the identity at inference).
    logits = (fmap @ np.asarray(found.weights)).mean(axis=(0, 1)) + bias
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    error = float(np.abs(probs - np.asarray(model(x), dtype=np.float64)[0]).max())
    out[name] = {"layer": found.layer, "shape": [len(found.weights), len(found.weights[0])], "error": error}
print(json.dumps(out))
"""


def test_find_cam_head_takes_gap_dense_heads_only(tmp_path: Path) -> None:
    """Dropout chains and a separate Softmax are looked through, the kernel's columns are the classes in output
    order (3 classes); a keepdims GAP, a BatchNormalization or a second Dense between GAP and Dense, and a Flatten
    head give no CAM (their logits are not a weighted channel mean of the map)."""
    env = {**os.environ, "KERAS_HOME": str(tmp_path / "keras_home"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", _HEADS], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, classes in (("dropout_chain", 2), ("softmax_layer_3_classes", 3)):
        assert got[name] is not None, name
        assert got[name]["layer"] == "conv" and got[name]["shape"] == [6, classes]
        assert got[name]["error"] < 1e-5, got[name]
    for name in ("keepdims", "batchnorm_between", "two_dense", "flatten"):
        assert got[name] is None, (name, got[name])
