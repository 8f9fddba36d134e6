"""A real multi-output int8 model for the backend tests, built with TensorFlow in a subprocess.

Run as ``python tests/multi_output_model.py OUT_DIR``: trains a tiny CNN on BreastMNIST (data/) for two epochs,
with three outputs in this Keras order: the class probabilities (softmax, 2), and two pooled feature vectors of
the same size (8 channels each, so size alone cannot tell them apart). It is converted to full-integer int8 with
real training images as the representative set and writes, in OUT_DIR:

- ``multi_int8.tflite``: the model;
- ``truth.json``: Keras output name -> TFLite tensor name, read from the flatbuffer's signature (which keeps the
  Keras order, whatever order the interpreter lists its outputs in), checked against the values;
- ``truth.npz``: ``images`` (uint8 validation images, N x 28 x 28) and the float Keras outputs on them, one array
  per Keras output name.

The test process never imports TensorFlow (only ``build`` does, in the subprocess); the helpers below read the
model through the device's backends.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from edgemed.inference import Backend
    from edgemed.types import TensorSpec

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "breastmnist_28.npz"
OUTPUTS = ("probs", "pool_a", "pool_b")
LABELS = ("benign", "malignant")
_BUILT: dict[str, Path] = {}  # one build per test process, shared by the modules that use the model


def built_model(folder: Path) -> Path:
    """The model, built once per process into ``folder`` (a fresh temporary folder) by a TensorFlow subprocess."""
    if "model" not in _BUILT:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__)), str(folder)],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=ROOT,
            env={**os.environ, "KERAS_HOME": str(folder / "keras_home"), "TF_CPP_MIN_LOG_LEVEL": "3"},
        )
        if proc.returncode != 0:
            raise RuntimeError(f"building the multi-output model failed:\n{proc.stdout}\n{proc.stderr}")
        _BUILT["model"] = folder / "multi_int8.tflite"
    return _BUILT["model"]


def truth(model: Path) -> tuple[dict[str, str], np.ndarray, dict[str, np.ndarray]]:
    """Keras output name -> tensor name, the probe images, and the float Keras outputs on them."""
    names = json.loads((model.parent / "truth.json").read_text())
    data = np.load(model.parent / "truth.npz")
    return names, data["images"], {key: data[key] for key in names}


def model_input(image: np.ndarray, backend: Backend) -> np.ndarray:
    """A uint8 28 x 28 image as the model's quantized input."""
    from edgemed.preprocess import quantize

    return quantize(image[..., None].astype(np.float32) / 255.0, backend.input_spec)


def output_rows(backend: Backend, images: np.ndarray) -> dict[str, np.ndarray]:
    """Every output of every image, dequantized, by tensor name (one invoke per image)."""
    from edgemed.inference.classify import dequantize

    rows: dict[str, list[np.ndarray]] = {spec.name: [] for spec in backend.output_specs}
    for image in images:
        scores = backend.invoke(model_input(image, backend))
        assert np.array_equal(scores, backend.output(backend.output_spec.name))  # invoke() is that output's row
        for spec in backend.output_specs:
            rows[spec.name].append(dequantize(backend.output(spec.name), spec))
    return {name: np.stack(r) for name, r in rows.items()}


def write_manifest(model: Path, folder: Path, backend: Backend) -> Path:
    """A copy of the model in ``folder`` with the manifest a conversion writes: every output by name and role."""
    from edgemed.manifest import Manifest, OutputSpec, QuantSpec, save_manifest, sha256_file

    def quant(spec: TensorSpec) -> QuantSpec:
        return QuantSpec(
            name=spec.name, shape=list(spec.shape), dtype=spec.dtype, scale=spec.scale, zero_point=spec.zero_point
        )

    names, _, _ = truth(model)
    layers = {tensor: key for key, tensor in names.items()}
    outputs = [
        OutputSpec(
            **quant(spec).model_dump(),
            role="scores" if spec.name == names["probs"] else "features",
            layer=None if spec.name == names["probs"] else layers[spec.name],
        )
        for spec in backend.output_specs
    ]
    scores = next(o for o in outputs if o.role == "scores")
    copy = folder / model.name
    shutil.copyfile(model, copy)
    manifest = Manifest.model_validate(
        {
            "name": "multi",
            "version": "1",
            "created_at": "2026-12-02T00:00:00Z",
            "labels": list(LABELS),
            "input": {"height": 28, "width": 28, "channels": 1, "colour_mode": "gray"},
            "artifacts": [
                {
                    "file": copy.name,
                    "target": "int8",
                    "sha256": sha256_file(copy),
                    "size_bytes": copy.stat().st_size,
                    "input": quant(backend.input_spec).model_dump(),
                    "output": QuantSpec(**scores.model_dump(exclude={"role", "layer"})).model_dump(),
                    "output_kind": "probabilities",
                    "verdict": "accepted",
                    "outputs": [o.model_dump() for o in outputs],
                }
            ],
        }
    )
    path = folder / "multi.manifest.json"
    save_manifest(manifest, path)
    return path


def build(out: Path) -> None:
    """Train, convert and describe the model (see the module docstring)."""
    import tensorflow as tf

    tf.keras.utils.set_random_seed(0)
    data = np.load(DATA)
    x_train = data["train_images"][..., None].astype(np.float32) / 255.0
    y_train = data["train_labels"].reshape(-1)
    images = data["val_images"][:24]

    inp = tf.keras.Input((28, 28, 1), name="image")
    x = tf.keras.layers.Conv2D(8, 3, activation="relu", name="conv_a")(inp)
    pool_a = tf.keras.layers.GlobalAveragePooling2D(name="pool_a")(x)
    x = tf.keras.layers.MaxPooling2D(name="down")(x)
    x = tf.keras.layers.Conv2D(8, 3, activation="relu", name="conv_b")(x)
    pool_b = tf.keras.layers.GlobalAveragePooling2D(name="pool_b")(x)
    probs = tf.keras.layers.Dense(2, activation="softmax", name="probs")(pool_b)
    model = tf.keras.Model(inp, [probs, pool_a, pool_b])
    trainer = tf.keras.Model(inp, probs)
    trainer.compile("adam", "sparse_categorical_crossentropy")
    trainer.fit(x_train, y_train, epochs=2, batch_size=32, verbose=0)

    def representative() -> object:
        for i in range(0, 128, 4):
            yield [x_train[i : i + 1]]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    path = out / "multi_int8.tflite"
    path.write_bytes(converter.convert())

    # The signature lists the outputs as output_0, output_1, ... in the Keras model's order, each with the index
    # of the tensor that holds it: an answer that does not come from the backend under test.
    interp = tf.lite.Interpreter(model_path=str(path))
    interp.allocate_tensors()
    signature = interp._get_full_signature_list()["serving_default"]["outputs"]
    tensor_names = {int(d["index"]): str(d["name"]) for d in interp.get_output_details()}
    names = {key: tensor_names[int(signature[f"output_{i}"])] for i, key in enumerate(OUTPUTS)}

    floats = model.predict(images[..., None].astype(np.float32) / 255.0, verbose=0)
    truth = {key: np.asarray(value, np.float64) for key, value in zip(OUTPUTS, floats, strict=True)}
    _check(interp, names, images, truth)
    (out / "truth.json").write_text(json.dumps(names, indent=1))
    np.savez(out / "truth.npz", images=images, **truth)
    print(path)


def _check(interp: object, names: dict[str, str], images: np.ndarray, truth: dict[str, np.ndarray]) -> None:
    """The signature's mapping must agree with the values (else the fixture itself would be wrong)."""
    details = {str(d["name"]): d for d in interp.get_output_details()}  # type: ignore[attr-defined]
    inp = interp.get_input_details()[0]  # type: ignore[attr-defined]
    scale, zero = inp["quantization"]
    got: dict[str, list[np.ndarray]] = {key: [] for key in names}
    for image in images:
        q = np.clip(np.round(image.astype(np.float64) / 255.0 / scale + zero), -128, 127).astype(np.int8)
        interp.set_tensor(inp["index"], q.reshape(1, 28, 28, 1))  # type: ignore[attr-defined]
        interp.invoke()  # type: ignore[attr-defined]
        for key, name in names.items():
            d = details[name]
            s, z = d["quantization"]
            got[key].append(s * (interp.get_tensor(d["index"]).reshape(-1).astype(np.float64) - z))  # type: ignore[attr-defined]
    for key, rows in got.items():
        r = np.corrcoef(np.stack(rows).reshape(-1), truth[key].reshape(-1))[0, 1]
        if not r > 0.95:
            raise SystemExit(f"output {key} ({names[key]}) does not match the Keras output (r = {r:.3f})")


if __name__ == "__main__":
    build(Path(sys.argv[1]))
