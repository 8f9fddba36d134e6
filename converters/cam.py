"""The class activation map step of ``edgemed convert``: find a GAP + Dense head, expose its feature map, record it.

A classifier whose final Dense reads (through Dropout only) a ``GlobalAveragePooling2D`` computes
``logit_k = b_k + sum_c w[c][k] * mean_ij F[i, j, c]``; the device can then draw the class activation map
``sum_c w[c][k] * F[i, j, c]`` (``edgemed.cam``) if the converted file outputs ``F``. This module finds that head
in the device graph (:func:`find_cam_head`), and turns it into the artifact's ``cam`` section once the converted
file's outputs are named (:func:`with_cam`). The map output is added to the device graph by
``converters.source``, after the scores and the OOD taps; ``converters.outputs`` names it (role ``feature_map``).

A GAP inside a nested backbone (Keras's MobileNetV2 with ``pooling="avg"``) is reached too: the outer graph cannot
output a nested model's inner tensor, so :func:`split_nested_gap` rebuilds the chain around a copy of the backbone
that also outputs its map (same layers, same weights, same scores). A model without such a head (the reference
CNN's Flatten + Dense + Dense) gets no map: the screen falls back to occlusion, and :func:`missing_note` says so in
the report and on the console.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edgemed.manifest import Artifact, CamSpec

CAM_OPTIONS = ("auto", "none")


@dataclass(frozen=True)
class CamHead:
    """A model's GAP + Dense head.

    Attributes:
        layer: the name of the Keras layer whose output the GAP averages (the last feature map ``F``).
        tensor: that symbolic tensor, ``(batch, H', W', channels)``: the device graph's extra output.
        weights: the Dense kernel, ``channels`` rows of one weight per class (the model's output order, which is
            the manifest's label order).
    """

    layer: str
    tensor: Any
    weights: list[list[float]]

    @property
    def channels(self) -> int:
        """Channels of the feature map (rows of ``weights``)."""
        return len(self.weights)


def check_cam_option(cam: str) -> bool:
    """Whether ``--cam`` asks for the map (``auto``); ``none`` turns it off.

    Raises:
        ConfigError: any other value.
    """
    from edgemed.errors import ConfigError

    if cam not in CAM_OPTIONS:
        raise ConfigError(f"cam {cam!r}: use one of {', '.join(CAM_OPTIONS)}, e.g. --cam auto")
    return cam == "auto"


def find_cam_head(model: Any) -> CamHead | None:
    """The GAP + Dense head of a Keras functional model, or None when it does not end in one.

    Walks back from the model's output: through a final Activation or Softmax layer, to a Dense, through Dropout
    layers only (they are the identity at inference), to a ``GlobalAveragePooling2D`` of a 4-D map. Anything else
    on the way (a second Dense, a Flatten, a nested model) means the logits are not a weighted channel mean of one
    map, and a map drawn with the Dense kernel would not be the model's.
    """
    layer = _producer(model.outputs[0])
    while layer is not None and type(layer).__name__ in ("Activation", "Softmax"):
        layer = _producer(layer.input)
    if layer is None or type(layer).__name__ != "Dense":
        return None
    dense = layer
    before = _producer(dense.input)
    while before is not None and type(before).__name__ == "Dropout":
        before = _producer(before.input)
    if before is None or type(before).__name__ != "GlobalAveragePooling2D":
        return None
    tensor = pooled_map(before.output)
    if tensor is None:
        return None  # keepdims, channels first (the device reads (1, H', W', C) maps), or a GAP of the input image
    source = _producer(tensor)
    kernel = np.asarray(dense.get_weights()[0], dtype=np.float64)
    if kernel.ndim != 2 or kernel.shape[0] != tensor.shape[-1]:
        return None
    return CamHead(layer=source.name, tensor=tensor, weights=kernel.tolist())


def split_nested_gap(model: Any) -> tuple[Any, CamHead] | None:
    """For a chain ``input -> ... -> backbone -> Dropout* -> Dense [-> Activation]`` whose nested ``backbone`` ends
    in ``GlobalAveragePooling2D``: the same chain around a second view of the backbone that outputs
    ``[pooled, map]``, and the head reading that map. None for any other model.

    The view shares the backbone's layers and weights (nothing is computed twice) and keeps its name, so the OOD tap
    on its pooled output is named as before; the layers around it are fresh copies with the same weights. Only a
    linear chain of single-input layers is rebuilt: anything that branches is left alone (no map), not guessed at.
    """
    import keras

    chain = _chain(model)
    if chain is None:
        return None
    layers = [layer for layer in chain if type(layer).__name__ not in ("Activation", "Softmax")]
    at = len(layers) - 1
    if at < 1 or type(layers[at]).__name__ != "Dense":
        return None
    dense, at = layers[at], at - 1
    while at >= 0 and type(layers[at]).__name__ == "Dropout":
        at -= 1
    backbone = layers[at] if at >= 0 else None
    if backbone is None or not isinstance(backbone, keras.Model) or len(backbone.outputs) != 1:
        return None
    inner = pooled_map(backbone.outputs[0])
    if inner is None:
        return None
    viewed = keras.Model(backbone.inputs, [backbone.outputs[0], inner], name=backbone.name)
    inputs = keras.Input(batch_shape=tuple(model.inputs[0].shape))
    x, fmap = inputs, None
    for layer in chain:
        if layer is backbone:
            x, fmap = viewed(x)
        else:
            # A fresh copy with the same weights: a layer called twice has two inputs, and find_taps reads the
            # classifier's one input.
            twin = layer.__class__.from_config(layer.get_config())
            x = twin(x)
            twin.set_weights(layer.get_weights())
    rebuilt = keras.Model(inputs, x, name=model.name)
    kernel = np.asarray(dense.get_weights()[0], dtype=np.float64)
    if kernel.ndim != 2 or kernel.shape[0] != inner.shape[-1]:
        return None
    head = CamHead(layer=f"{backbone.name}/{_producer(inner).name}", tensor=fmap, weights=kernel.tolist())
    return rebuilt, head


def pooled_map(pooled: Any) -> Any:
    """The 4-D map that a ``GlobalAveragePooling2D`` (channels last, no keepdims) averaged into ``pooled``, or None."""
    gap = _producer(pooled)
    if gap is None or type(gap).__name__ != "GlobalAveragePooling2D":
        return None
    if getattr(gap, "keepdims", False) or getattr(gap, "data_format", "channels_last") != "channels_last":
        return None
    tensor = gap.input
    if _producer(tensor) is None or len(tensor.shape) != 4:
        return None
    # A 1 x 1 map (MobileNetV2 on 32 x 32 images) has nothing to show: every region is the whole image.
    return tensor if min(tensor.shape[1] or 0, tensor.shape[2] or 0) >= 2 else None


def _chain(model: Any) -> list[Any] | None:
    """The model's layers from input to output when each takes the one before it (None when anything branches)."""
    chain: list[Any] = []
    tensor = model.outputs[0] if len(model.outputs) == 1 else None
    while tensor is not None and (layer := _producer(tensor)) is not None:
        nodes = getattr(layer, "_inbound_nodes", ())
        if len(nodes) != 1 or len(nodes[0].input_tensors) != 1:
            return None
        chain.append(layer)
        # The node's input, not layer.input: a nested model's .input is its own inner Input.
        tensor = nodes[0].input_tensors[0]
    if tensor is None or tensor is not model.inputs[0]:
        return None
    return chain[::-1]


def with_cam(artifact: Artifact, head: CamHead | None) -> Artifact:
    """The artifact with its ``cam`` section when its file outputs the head's feature map (else unchanged).

    Validated again, not copied: the artifact's checks hold ``cam`` to the ``feature_map`` output it lists.
    """
    if head is None:
        return artifact
    maps = [o for o in artifact.outputs if o.role == "feature_map" and o.layer == head.layer]
    if not maps:
        return artifact
    spec = CamSpec(output=maps[0].name, layer=head.layer, weights=head.weights)
    return Artifact.model_validate({**artifact.model_dump(), "cam": spec.model_dump()})


def missing_note(wanted: bool, head: CamHead | None, model_name: str, saved_model: bool = False) -> list[str]:
    """The console/report note for ``--cam auto`` on a model that gets no map (empty when it has one or
    ``--cam none`` turned it off)."""
    if not wanted or head is not None:
        return []
    why = (
        "is a SavedModel (its serving graph is converted as it is)"
        if saved_model
        else "does not end in GlobalAveragePooling2D + Dense (through Dropout only) over a map of 2 x 2 or more"
    )
    return [
        f"class activation map: {model_name} {why}, so its files have no feature_map output and no cam section; "
        "the device's screen offers an occlusion map instead"
    ]


def _producer(tensor: Any) -> Any:
    """The layer that computes a symbolic tensor (None for the model's input)."""
    history = getattr(tensor, "_keras_history", None)
    op = history.operation if history is not None else None
    return None if op is None or type(op).__name__ == "InputLayer" else op
