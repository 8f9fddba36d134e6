"""The manifest's out-of-distribution section: statistics fitted at conversion and thresholds the device applies.

Part of the manifest's format (``edgemed.manifest`` re-exports every name here); kept apart so that the manifest
module stays about the manifest as a whole. The arithmetic each field stands for is in the docstrings; the device
computes it in ``edgemed.ood``, the converter fits it in ``converters.ood``.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from edgemed.validation import FrozenModel

OodMethod = Literal["energy", "features"]


class FeatureLayerStats(FrozenModel):
    """The statistics of one pooled feature output, fitted on the training split.

    A vector ``f`` (the dequantized output, ``dims`` values) is whitened, ``z = (f - center) @ whiten`` (``whiten``
    is ``dims x components``: the shared, shrunk class covariance's inverse square root, truncated to its
    ``components`` largest principal directions when ``dims`` is large), its distance to the nearest class is
    ``d = min_k |z - class_means[k]|^2`` (the Mahalanobis distance with class-conditional means and a shared
    covariance), and the layer's score is ``(d - median) / spread`` (``median`` and ``spread`` of ``d`` over the
    training split, so layers of different sizes weigh alike).
    """

    # json.loads reads NaN and Infinity: one in the statistics would flag every frame (a non-finite score flags).
    model_config = ConfigDict(allow_inf_nan=False)

    output: str = Field(min_length=1, description="tensor name of the OutputSpec (role features) this layer reads")
    layer: str | None = None
    dims: int = Field(gt=0)
    components: int = Field(gt=0)
    center: list[float]
    whiten: list[list[float]]
    class_means: list[list[float]]
    median: float
    spread: float = Field(gt=0.0)

    @model_validator(mode="after")
    def _shapes_agree(self) -> FeatureLayerStats:
        if self.components > self.dims:
            raise ValueError(f"components {self.components} > dims {self.dims}")
        if len(self.center) != self.dims or len(self.whiten) != self.dims:
            raise ValueError(f"center and whiten must have {self.dims} rows (dims)")
        if any(len(row) != self.components for row in self.whiten):
            raise ValueError(f"every row of whiten must have {self.components} values (components)")
        if not self.class_means or any(len(row) != self.components for row in self.class_means):
            raise ValueError(f"class_means must hold one row of {self.components} values per class")
        return self


class OodScoreSpec(FrozenModel):
    """One out-of-distribution score's threshold: a frame whose score is above it is flagged.

    Attributes:
        threshold: chosen on ``OodSpec.threshold_split`` so that ``flagged_fraction`` of its images score above it.
        flagged_fraction: the fraction of that split's images above the threshold (close to ``target_fraction``).
    """

    threshold: float
    flagged_fraction: float = Field(ge=0.0, le=1.0)


class EnergySpec(OodScoreSpec):
    """The energy score, ``-T * logsumexp(logits / T)`` (higher: less like the training images)."""

    temperature: float = Field(1.0, gt=0.0)


class FeatureSpec(OodScoreSpec):
    """The feature score: the largest of the per-layer scores of ``layers`` (see :class:`FeatureLayerStats`).

    The largest, not the mean: an image of another modality is often unusual in one layer only (measured on the
    validation splits of other sets, the maximum separated them at least as well as the mean on every model tried).
    """

    layers: list[FeatureLayerStats] = Field(min_length=1)
    shrinkage: float = Field(ge=0.0, description="covariance shrinkage towards a scaled identity, 0..1")


class OodSpec(FrozenModel):
    """How the device tells an image unlike the training images, fitted and thresholded at conversion.

    Attributes:
        default: the method the device uses unless its profile says otherwise.
        energy: the energy score (absent when the model outputs probabilities: it needs logits).
        features: the feature score (absent when the converter found no layer to read).
        target_fraction: the share of in-distribution validation images the thresholds flag (default 0.03).
        fit_split, fit_n: the split (``train``) the feature statistics were fitted on, and its size.
        threshold_split, threshold_n: the split (``val``, never the test split) the thresholds were chosen on.
        feature_rank_agreement: Spearman correlation, on the threshold split, between this file's feature scores
            and the float Keras model's (None when there is no feature score).
    """

    default: OodMethod
    energy: EnergySpec | None = None
    features: FeatureSpec | None = None
    target_fraction: float = Field(gt=0.0, lt=1.0)
    fit_split: str = Field(min_length=1, max_length=32)
    fit_n: int = Field(gt=0)
    threshold_split: str = Field(min_length=1, max_length=32)
    threshold_n: int = Field(gt=0)
    feature_rank_agreement: float | None = Field(None, ge=-1.0, le=1.0)

    @model_validator(mode="after")
    def _default_exists(self) -> OodSpec:
        if getattr(self, self.default) is None:
            raise ValueError(f"default is {self.default} but the {self.default} section is missing")
        # Checked here, not on the sections: the converter fits a feature section before it has its threshold.
        # A threshold of NaN flags nothing and one of -Infinity everything, without a word on the device.
        for name in ("energy", "features"):
            section = getattr(self, name)
            if section is not None and not math.isfinite(section.threshold):
                raise ValueError(f"{name}.threshold is {section.threshold}, not a finite number")
        return self

    def method(self, name: OodMethod) -> EnergySpec | FeatureSpec | None:
        """The section of one method, or None when the model lacks it."""
        return self.energy if name == "energy" else self.features
