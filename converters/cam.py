"""The class activation map step of ``edgemed convert``: find a GAP + Dense head, expose its feature map, record it.

A classifier whose final Dense reads (through Dropout only) a ``GlobalAveragePooling2D`` computes
``logit_k = b_k + sum_c w[c][k] * mean_ij F[i, j, c]``; the device can then draw the class activation map
``sum_c w[c][k] * F[i, j, c]`` (``edgemed.cam``) if the converted file outputs ``F``. This module finds that head
in the device graph (:func:`find_cam_head`), and turns it into the artifact's ``cam`` section once the converted
file's outputs are named (:func:`with_cam`). The map output is added to the device graph by
``converters.source``, after the scores and the OOD taps; ``converters.outputs`` names it (role ``feature_map``).

A model without such a head (the reference CNN's Flatten + Dense + Dense, or a GAP inside a nested backbone such
as Keras's MobileNetV2 with ``pooling="avg"``, whose inner tensor the outer graph cannot output) gets no map: the
screen falls back to occlusion, and :func:`missing_note` says so in the report and on the console.
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
    if getattr(before, "keepdims", False) or getattr(before, "data_format", "channels_last") != "channels_last":
        return None  # the device reads channels-last (1, H', W', C) maps only
    tensor = before.input
    source = _producer(tensor)
    if source is None or len(tensor.shape) != 4:
        return None  # a GAP straight on the input image: no learned map to show
    kernel = np.asarray(dense.get_weights()[0], dtype=np.float64)
    if kernel.ndim != 2 or kernel.shape[0] != tensor.shape[-1]:
        return None
    return CamHead(layer=source.name, tensor=tensor, weights=kernel.tolist())


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
        else "does not end in GlobalAveragePooling2D + Dense (through Dropout only)"
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
