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

The test process never imports TensorFlow; only this script does.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parent.parent / "data" / "breastmnist_28.npz"
OUTPUTS = ("probs", "pool_a", "pool_b")


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
