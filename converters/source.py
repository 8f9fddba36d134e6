"""Open the model to convert (.keras, legacy .h5, or a SavedModel folder) and derive the device graph from it.

The device graph differs from the trained model in three ways, all for the device's sake:

* a fixed batch-1 input, so every tensor shape is static (the Edge TPU requires it, and Flatten becomes a
  plain RESHAPE instead of SHAPE/STRIDED_SLICE/PACK ops computing the batch size at run time);
* the final softmax removed, so the quantized output is logits (see ``converters.convert`` for why);
* one extra output per **tap** (see :func:`find_taps`): the per-channel spatial mean of a feature map
  (a ``GlobalAveragePooling2D`` named ``ood_pool_<i>``, one MEAN op), or the 2-D penultimate vector itself, read
  by the out-of-distribution feature score;
* for a model ending in GAP + Dense, the last feature map itself (``converters.cam``), read by the device's class
  activation map. The graph's outputs are ``[scores, tap_0, tap_1, ..., feature_map]`` in Keras; TFLite may
  list them in another order, so ``converters.outputs`` names them by matching, never by position.

Keras 3 cannot load a SavedModel as a model: it is converted with ``from_saved_model`` and its serving
signature is the float reference; its output is kept as it is (no softmax stripping)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from converters._tf import quiet_tensorflow
from converters.cam import CamHead, find_cam_head, split_nested_gap
from edgemed.errors import ModelError

# Layers whose input is a tap: they reduce the spatial size, or end the feature maps.
_POOLING = ("MaxPooling2D", "AveragePooling2D", "GlobalAveragePooling2D", "GlobalMaxPooling2D", "Flatten")
_STRIDED = ("Conv2D", "DepthwiseConv2D", "SeparableConv2D")  # ... when a stride is above 1
_POOL_NAME = "ood_pool_{}"
# The widest vector read as a tap. A feature layer of D values costs a D x D covariance to fit (cubic in D) and D
# values out of the model per frame; MobileNetV2's pooled 1280 fits, a Flatten of the raw pixels (12288 for a
# 64x64 colour input) does not, and says nothing about the image that the pixels' statistics would not.
MAX_VECTOR_TAP = 2048

FeatureOutputs = dict[str, np.ndarray]


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
        feature_layers: the tapped Keras layers' names, in the order of the device graph's extra outputs (empty
            when taps were not asked for, none were found, or the model is a SavedModel).
        device_model: the batch-1 Keras device graph, outputs ``[scores, tap_0, ..., feature_map]`` (None for a
            SavedModel, whose serving signature is converted as it is).
        cam: the GAP + Dense head whose feature map is the device graph's last output (None: no such head, the
            map was not asked for, or a SavedModel).
    """

    path: Path
    kind: str
    input_shape: tuple[int, int, int]
    num_outputs: int
    predict_float: Callable[[np.ndarray], np.ndarray]
    make_converter: Callable[[], Any]
    output_kind: str
    feature_layers: list[str] = field(default_factory=list)
    device_model: Any = None
    cam: CamHead | None = None
    _predict_outputs: Callable[[np.ndarray], tuple[np.ndarray, FeatureOutputs]] | None = None

    def predict_outputs(self, x: np.ndarray) -> tuple[np.ndarray, FeatureOutputs]:
        """The float Keras device graph's outputs for float images ``(N, H, W, C)`` in [0, 1].

        Returns:
            The raw scores ``(N, K)`` float64 (logits when ``output_kind`` is ``logits``: the device graph's
            scores, before any softmax), and ``{layer name: pooled features (N, D) float64}`` for each of
            ``feature_layers``.
        """
        if self._predict_outputs is None:
            return self.predict_float(x), {}
        return self._predict_outputs(x)


def load_source(model_path: str | Path, strip_softmax: bool = True, taps: bool = True, cam: bool = True) -> SourceModel:
    """Load a model for conversion.

    Args:
        model_path: a ``.keras`` or ``.h5`` file, or a SavedModel folder.
        strip_softmax: give the device graph logits output when the model ends in a softmax.
        taps: give the device graph one pooled-feature output per tap (:func:`find_taps`); False keeps the
            single scores output (``--ood none`` and ``--ood energy``). A SavedModel never gets taps.
        cam: give the device graph the last feature map as an output when the model ends in GAP + Dense
            (``--cam auto``); False (``--cam none``) leaves it out. A SavedModel never gets it.

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
    device = _device_model(model, shape, strip_softmax, taps, cam)
    return SourceModel(
        path=path,
        kind="h5" if path.suffix == ".h5" else "keras",
        input_shape=shape,
        num_outputs=int(model.output_shape[-1]),
        predict_float=lambda x: np.asarray(model.predict(x, batch_size=64, verbose=0), dtype=np.float64),
        make_converter=lambda: tf.lite.TFLiteConverter.from_keras_model(device.model),
        output_kind=device.output_kind,
        feature_layers=device.layers,
        device_model=device.model,
        cam=device.cam,
        _predict_outputs=device.predict,
    )


@dataclass(frozen=True)
class Tap:
    """One feature tensor the device graph outputs for the OOD feature score.

    Attributes:
        layer: the name of the Keras layer producing it (a top-level layer; a nested backbone is one layer).
        tensor: the symbolic Keras tensor, ``(batch, H, W, C)`` (pooled on output) or ``(batch, D)``.
    """

    layer: str
    tensor: Any

    @property
    def pooled(self) -> bool:
        """True for a 4-D map, whose output is its per-channel spatial mean."""
        return len(self.tensor.shape) == 4


def find_taps(model: Any) -> list[Tap]:
    """The tensors whose (pooled) values the feature score reads, in graph order.

    Walking the top-level layers: the input of every layer that reduces the spatial size (max or average
    pooling, a convolution with a stride above 1) or ends the maps (global pooling, Flatten); then the
    penultimate vector (the input of the final classifier Dense, looking through Dropout) unless it is only the
    global average, or the Flatten, of a map already tapped. Early maps are kept on purpose: on the reference CNN
    the penultimate vector alone separated BreastMNIST from chest X-rays with AUROC 0.40, the early blocks' channel
    means with 1.00 (validation splits, measured by the project lead). Tensors straight from the model input are
    not taps.
    """
    taps: list[Tap] = []
    seen: set[int] = set()

    def add(tensor: Any) -> None:
        producer = _producer(tensor)
        if producer is None or id(tensor) in seen or len(tensor.shape) not in (2, 4):
            return
        if len(tensor.shape) == 2 and (tensor.shape[-1] or 0) > MAX_VECTOR_TAP:
            return
        seen.add(id(tensor))
        name = producer.name
        same = sum(t.layer.split(":")[0] == name for t in taps)
        if same:  # a second output of a layer with several: keep the names unique
            name = f"{name}:{same}"
        taps.append(Tap(layer=name, tensor=tensor))

    for layer in model.layers:
        kind = type(layer).__name__
        strided = kind in _STRIDED and max(getattr(layer, "strides", (1,))) > 1
        if (kind in _POOLING or strided) and len(getattr(layer, "_inbound_nodes", ())) == 1:
            add(layer.input)  # a layer shared between several calls has no single input: it is not a tap
    vector = _penultimate(model)
    if vector is not None:
        producer = _producer(vector)
        # Its pooled map already read: a global average of it adds nothing, and a Flatten of it is H*W*C wide
        # (a D x D covariance to fit, D values out per frame: 12544 for a 64x64 input's 14x14x64 map).
        reshaped_tap = type(producer).__name__ in ("GlobalAveragePooling2D", "Flatten") and id(producer.input) in seen
        if not reshaped_tap:
            add(vector)
    return taps


def _producer(tensor: Any) -> Any:
    """The layer that computes a symbolic tensor (None for the model's input)."""
    history = getattr(tensor, "_keras_history", None)
    op = history.operation if history is not None else None
    return None if op is None or type(op).__name__ == "InputLayer" else op


def _penultimate(model: Any) -> Any:
    """The input of the final classifier Dense (through Dropout), or None when the model does not end in one."""
    layer = _producer(model.outputs[0])
    while layer is not None and type(layer).__name__ in ("Activation", "Softmax"):
        layer = _producer(layer.input)
    if layer is None or type(layer).__name__ != "Dense":
        return None
    vector = layer.input
    while (before := _producer(vector)) is not None and type(before).__name__ == "Dropout":
        vector = before.input
    return vector


@dataclass
class _Device:
    model: Any
    output_kind: str
    layers: list[str]
    predict: Callable[[np.ndarray], tuple[np.ndarray, FeatureOutputs]] | None
    cam: CamHead | None = None


def _device_model(model: Any, shape: tuple[int, int, int], strip_softmax: bool, taps: bool, cam: bool) -> _Device:
    """The batch-1 device graph (a linear final layer with the same weights when asked and possible, plus the
    tap outputs and the CAM feature map) and, for ``predict_outputs``, the graph with the taps and a free batch
    size."""
    import keras

    last = model.layers[-1]
    activation = getattr(getattr(last, "activation", None), "__name__", "")
    strip = strip_softmax and (activation == "softmax" or isinstance(last, keras.layers.Softmax))
    clone = _rebuild(model, keras.Input(batch_shape=(1, *shape)), strip)
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
    head = find_cam_head(clone) if cam else None
    if cam and head is None and (split := split_nested_gap(clone)) is not None:
        plain, (clone, head) = clone, split  # the GAP of a nested backbone (MobileNetV2), its map made reachable
        if not np.allclose(np.asarray(clone(probe)), np.asarray(plain(probe)), atol=1e-5):
            raise ModelError("exposing the backbone's feature map changed the model's output; convert with --cam none")
    found = find_taps(clone) if taps else []
    device = _with_taps(clone, found, head) if found or head is not None else clone
    if not found:
        return _Device(model=device, output_kind=kind, layers=[], predict=None, cam=head)
    # The float reference of the features: the same graph rebuilt for any batch size (the batch-1 graph would
    # need one call per image).
    floating_clone = _rebuild(model, keras.Input(shape=shape), strip)
    floating = _with_taps(floating_clone, find_taps(floating_clone))
    names = [t.layer for t in found]

    def predict(x: np.ndarray) -> tuple[np.ndarray, FeatureOutputs]:
        outs = floating.predict(x, batch_size=64, verbose=0)
        arrays = [np.asarray(o, dtype=np.float64) for o in outs]
        return arrays[0], dict(zip(names, arrays[1:], strict=True))

    return _Device(model=device, output_kind=kind, layers=names, predict=predict, cam=head)


def _rebuild(model: Any, inputs: Any, strip: bool) -> Any:
    """``model`` cloned onto ``inputs`` with its weights, its final softmax made linear when ``strip``."""
    import keras

    last = model.layers[-1]

    def clone_layer(layer: Any) -> Any:
        config = layer.get_config()
        if layer is last and strip:
            if isinstance(layer, keras.layers.Softmax):
                return keras.layers.Activation("linear", name=layer.name)
            config["activation"] = "linear"
        return layer.__class__.from_config(config)

    try:
        clone = keras.models.clone_model(model, input_tensors=inputs, clone_function=clone_layer)
        clone.set_weights(model.get_weights())
    except (ValueError, TypeError) as exc:
        raise ModelError(
            f"cannot rebuild the model's graph for the device ({exc}); export it as a SavedModel "
            "folder and convert that instead"
        ) from exc
    return clone


def _with_taps(clone: Any, taps: list[Tap], head: CamHead | None = None) -> Any:
    """A model with the clone's scores output followed by one output per tap (4-D maps pooled), then the CAM
    head's feature map as it is (last, so the scores and taps keep their places)."""
    import keras

    outputs = [clone.outputs[0]]
    for i, tap in enumerate(taps):
        pool = keras.layers.GlobalAveragePooling2D(name=_POOL_NAME.format(i))
        outputs.append(pool(tap.tensor) if tap.pooled else tap.tensor)
    if head is not None:
        outputs.append(head.tensor)
    return keras.Model(clone.inputs[0], outputs, name=f"{clone.name}_device")


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
