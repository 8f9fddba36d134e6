"""The manifest's class-activation-map section: what the device needs to show where a GAP model looked.

A model that ends in global average pooling followed by one dense layer computes its logits as
``logit_k = b_k + sum_c w[c][k] * mean_ij F[i, j, c]``, where ``F`` is the last feature map. The same weights
applied at each position, ``cam_k[i, j] = sum_c w[c][k] * F[i, j, c]``, give the class activation map (Zhou et al.,
2016): the regions whose activations raised the score for class ``k``. The converter exposes ``F`` as an extra
output of the converted model (``OutputSpec.role == "feature_map"``) and records ``w`` here; the device computes the
map in ``edgemed.cam``. It is a picture of which regions moved the score, not an explanation of the decision.
"""

from __future__ import annotations

import math

from pydantic import ConfigDict, Field, model_validator

from edgemed.validation import FrozenModel

# Bounds on a manifest's kernel: the widest last map of a common backbone has 2560 channels (EfficientNet-B7) and a
# triage model scores a handful of classes. A hand-edited manifest with millions of weights is refused by the
# validator instead of being kept (and multiplied per frame) on a small device.
MAX_CAM_CHANNELS = 8192
MAX_CAM_CLASSES = 1024


class CamSpec(FrozenModel):
    """The class activation map of a model that ends in global average pooling and one dense layer.

    Attributes:
        output: tensor name of the ``OutputSpec`` (role ``feature_map``) holding the last feature map ``F``
            (shape ``(1, H', W', channels)``).
        layer: the Keras layer whose activations ``F`` are (for reports and error messages).
        weights: the dense layer's kernel, ``channels`` rows of one weight per class (in the manifest's label
            order). Its bias is left out: it shifts a class's map by a constant and a shown map is normalised.
    """

    # json.loads reads NaN and Infinity: one in the weights would make every map meaningless.
    model_config = ConfigDict(allow_inf_nan=False)

    output: str = Field(min_length=1, description="tensor name of the OutputSpec (role feature_map)")
    layer: str | None = None
    weights: list[list[float]] = Field(
        min_length=1, max_length=MAX_CAM_CHANNELS, description="channels x classes: the dense layer's kernel"
    )

    @model_validator(mode="after")
    def _rectangular(self) -> CamSpec:
        width = len(self.weights[0])
        if width < 1 or any(len(row) != width for row in self.weights):
            raise ValueError("cam.weights must have one weight per class in every row")
        if width > MAX_CAM_CLASSES:
            raise ValueError(
                f"cam.weights has {width} classes per row, more than {MAX_CAM_CLASSES}; re-run `edgemed convert`"
            )
        if not all(math.isfinite(v) for row in self.weights for v in row):
            raise ValueError("cam.weights must be finite numbers")
        return self

    @property
    def channels(self) -> int:
        """Channels of the feature map the weights expect."""
        return len(self.weights)

    @property
    def classes(self) -> int:
        """Classes the weights score."""
        return len(self.weights[0])
