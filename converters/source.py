"""Open the model to convert (.keras, legacy .h5, or a SavedModel folder) and derive the device graph from it.

The device graph differs from the trained model in two ways, both for the device's sake:

* a fixed batch-1 input, so every tensor shape is static (the Edge TPU requires it, and Flatten becomes a
  plain RESHAPE instead of SHAPE/STRIDED_SLICE/PACK ops computing the batch size at run time);
* the final softmax removed, so the quantized output is logits (see ``converters.convert`` for why).

Keras 3 cannot load a SavedModel as a model: it is converted with ``from_saved_model`` and its serving
signature is the float reference; its output is kept as it is (no softmax stripping)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from converters._tf import quiet_tensorflow
from edgemed.errors import ModelError


@dataclass
class SourceModel:
    """A loaded model to convert.

    Attributes:
        path: where it was read from.
        kind: ``keras``, ``h5`` or ``saved_model``.
        input_shape: ``(H, W, C)``.
        num_outputs: classes in the output.
        predict_float: float images ``(N, H, W, C)`` in [0, 1] -> the model's raw outputs ``(N, K)``.
        make_converter: builds a fresh ``tf.lite.TFLiteConverter`` for the device graph.
        output_kind: what the device graph outputs: ``logits`` or ``probabilities``.
    """

    path: Path
    kind: str
    input_shape: tuple[int, int, int]
    num_outputs: int
    predict_float: Callable[[np.ndarray], np.ndarray]
    make_converter: Callable[[], Any]
    output_kind: str


def load_source(model_path: str | Path, strip_softmax: bool = True) -> SourceModel:
    """Load a model for conversion.

    Args:
        model_path: a ``.keras`` or ``.h5`` file, or a SavedModel folder.
        strip_softmax: give the device graph logits output when the model ends in a softmax.

    Raises:
        ModelError: missing, unreadable, or not an image classifier with one 4-D input.
    """
    path = Path(model_path)
    if not path.exists():
        raise ModelError(f"model {path} not found; pass the .keras file written by `edgemed train`")
    quiet_tensorflow()
    import tensorflow as tf

    if path.is_dir():
        return _load_saved_model(path, tf)
    if path.suffix not in (".keras", ".h5"):
        raise ModelError(
            f"{path}: unsupported model format {path.suffix!r}; use .keras, .h5 or a SavedModel "
            "folder (with saved_model.pb)"
        )
    import keras

    try:
        model = keras.models.load_model(path, compile=False)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ModelError(f"{path}: not a loadable Keras model ({exc}); re-save it with model.save('x.keras')") from exc
    shape = _image_shape(path, model.input_shape)
    device = _device_model(model, shape, strip_softmax)
    return SourceModel(
        path=path,
        kind="h5" if path.suffix == ".h5" else "keras",
        input_shape=shape,
        num_outputs=int(model.output_shape[-1]),
        predict_float=lambda x: np.asarray(model.predict(x, batch_size=64, verbose=0), dtype=np.float64),
        make_converter=lambda: tf.lite.TFLiteConverter.from_keras_model(device.model),
        output_kind=device.output_kind,
    )


@dataclass
class _Device:
    model: Any
    output_kind: str


def _device_model(model: Any, shape: tuple[int, int, int], strip_softmax: bool) -> _Device:
    """Clone with a batch-1 input and, when asked and possible, a linear final layer with the same weights."""
    import keras

    last = model.layers[-1]
    activation = getattr(getattr(last, "activation", None), "__name__", "")
    strip = strip_softmax and (activation == "softmax" or isinstance(last, keras.layers.Softmax))

    def clone_layer(layer: Any) -> Any:
        config = layer.get_config()
        if layer is last and strip:
            if isinstance(layer, keras.layers.Softmax):
                return keras.layers.Activation("linear", name=layer.name)
            config["activation"] = "linear"
        return layer.__class__.from_config(config)

    inputs = keras.Input(batch_shape=(1, *shape))
    try:
        clone = keras.models.clone_model(model, input_tensors=inputs, clone_function=clone_layer)
        clone.set_weights(model.get_weights())
    except (ValueError, TypeError) as exc:
        raise ModelError(
            f"cannot rebuild the model with a batch-1 input ({exc}); export it as a SavedModel "
            "folder and convert that instead"
        ) from exc
    probe = np.random.default_rng(0).random((1, *shape), dtype=np.float32)
    ref = np.asarray(model(probe))
    out = np.asarray(clone(probe))
    if strip:
        z = np.exp(out - out.max(axis=-1, keepdims=True))
        out = z / z.sum(axis=-1, keepdims=True)
    if not np.allclose(ref, out, atol=1e-4):
        raise ModelError(
            "the rebuilt device graph does not reproduce the model's output; convert with --output probabilities"
        )
    kind = "logits" if strip else ("probabilities" if activation == "softmax" else "unknown")
    return _Device(model=clone, output_kind=kind)


def _image_shape(path: Path, input_shape: Any) -> tuple[int, int, int]:
    if isinstance(input_shape, list):
        raise ModelError(f"{path}: the model has {len(input_shape)} inputs; edgemed converts single-image classifiers")
    if len(input_shape) != 4 or input_shape[3] not in (1, 3) or None in input_shape[1:]:
        raise ModelError(f"{path}: input shape {input_shape} is not (batch, height, width, 1 or 3)")
    return int(input_shape[1]), int(input_shape[2]), int(input_shape[3])


def _load_saved_model(path: Path, tf: Any) -> SourceModel:
    if not (path / "saved_model.pb").is_file():
        raise ModelError(f"{path} is a folder without saved_model.pb; pass a SavedModel folder or a .keras file")
    try:
        loaded = tf.saved_model.load(str(path))
        fn = loaded.signatures["serving_default"]
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{path}: cannot load the SavedModel's serving_default signature ({exc})") from exc
    specs = fn.structured_input_signature[1]
    if len(specs) != 1:
        raise ModelError(
            f"{path}: the serving signature has {len(specs)} inputs; edgemed converts single-image classifiers"
        )
    arg_name, spec = next(iter(specs.items()))
    shape = _image_shape(path, tuple(spec.shape.as_list()))
    out_specs = fn.structured_outputs
    num_outputs = int(next(iter(out_specs.values())).shape[-1])

    def predict(x: np.ndarray) -> np.ndarray:
        rows = []
        for start in range(0, len(x), 64):
            out = fn(**{arg_name: tf.constant(x[start : start + 64], dtype=tf.float32)})
            rows.append(next(iter(out.values())).numpy())
        return np.concatenate(rows).astype(np.float64)

    probe = predict(np.random.default_rng(0).random((8, *shape), dtype=np.float32))
    sums_to_one = bool(np.allclose(probe.sum(axis=1), 1.0, atol=1e-3) and (probe >= 0).all())
    return SourceModel(
        path=path,
        kind="saved_model",
        input_shape=shape,
        num_outputs=num_outputs,
        predict_float=predict,
        make_converter=lambda: tf.lite.TFLiteConverter.from_saved_model(str(path)),
        output_kind="probabilities" if sums_to_one else "logits",
    )
