"""Out-of-distribution abstention on the device: does this frame look like the images the model was trained on?

The statistics and thresholds come from the manifest (``edgemed.manifest.OodSpec``, fitted by ``edgemed convert``
on the training split and thresholded on the validation split); the profile's ``ood:`` section
(:class:`OodSetting`) picks the method, overrides the threshold, or turns the check off.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field

from edgemed.errors import ConfigError, ModelError
from edgemed.triage import OOD_REASON as OOD_REASON  # re-exported: the wording lives with the other reasons
from edgemed.types import OodCheck, TensorSpec
from edgemed.validation import FrozenModel

if TYPE_CHECKING:
    from edgemed.manifest import Artifact, FeatureLayerStats, FeatureSpec


class OodSetting(FrozenModel):
    """Whether a frame looks like the model's training images; one that does not is ``inconclusive``.

    The profile's ``ood:`` section. A method or threshold the model cannot use (it was converted without
    out-of-distribution statistics, or without that method) stops the device at start with the fix.
    """

    method: Literal["auto", "energy", "features", "none"] = Field(
        "auto",
        description="auto: the method the manifest names as default; energy or features: that score (the model "
        "must have it); none: no check (every result records that it was off)",
    )
    threshold: float | None = Field(
        None, description="override the manifest's threshold for the chosen method (recorded on every result)"
    )


def energy_scores(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """The energy score of each row of ``logits (N, K)``: ``-T * logsumexp(logits / T)`` (higher: less familiar).

    A model that is sure of some class has one large logit and a low (very negative) energy; an image unlike the
    training images tends to leave every logit small.
    """
    z = np.asarray(logits, dtype=np.float64) / temperature
    top = z.max(axis=1)
    lse = top + np.log(np.exp(z - top[:, None]).sum(axis=1))
    return np.asarray(-temperature * lse)


def max_softmax_scores(probs: np.ndarray) -> np.ndarray:
    """The max-softmax baseline (Hendrycks & Gimpel): ``-max_k p_k`` of each row (higher: less confident)."""
    return np.asarray(-np.asarray(probs, dtype=np.float64).max(axis=1))


def _layer_distance(stats: FeatureLayerStats, features: np.ndarray) -> np.ndarray:
    """``d = min_k |(f - center) @ whiten - class_means[k]|^2`` for each row of the dequantized ``features``."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[1] != stats.dims:
        raise ValueError(f"layer {stats.output!r} needs features of shape (N, {stats.dims}), got {f.shape}")
    z = (f - np.asarray(stats.center)) @ np.asarray(stats.whiten)
    means = np.asarray(stats.class_means)
    d = ((z[:, None, :] - means[None, :, :]) ** 2).sum(axis=2)
    return np.asarray(d.min(axis=1))


def layer_scores(spec: FeatureSpec, features: Sequence[np.ndarray]) -> np.ndarray:
    """The standardized per-layer scores ``(N, L)``: ``(d - median) / spread`` of each layer of ``spec``.

    Args:
        spec: the fitted feature statistics.
        features: one dequantized ``(N, dims)`` float array per layer of ``spec.layers``, in that order.
    """
    if len(features) != len(spec.layers):
        raise ValueError(f"the feature score reads {len(spec.layers)} layers, got {len(features)} arrays")
    cols = [
        (_layer_distance(stats, f) - stats.median) / stats.spread
        for stats, f in zip(spec.layers, features, strict=True)
    ]
    return np.stack(cols, axis=1)


def feature_scores(spec: FeatureSpec, features: Sequence[np.ndarray]) -> np.ndarray:
    """The feature score of each image: the largest of its per-layer scores (see :func:`layer_scores`)."""
    return np.asarray(layer_scores(spec, features).max(axis=1))


@dataclass(frozen=True)
class _FoldedLayer:
    """One layer's statistics with dequantization and whitening folded together, for one frame at a time.

    ``z = (scale * (q - zp) - center) @ whiten = q @ (scale * whiten) - (scale * zp + center) @ whiten``, so the
    raw integer row ``q`` needs one matrix product and one subtraction per class: ``z - m_k = q @ a - b[k]``.
    """

    name: str
    a: np.ndarray  # (dims, components)
    b: np.ndarray  # (classes, components): (scale * zp + center) @ whiten + class_means[k]
    median: float
    spread: float
    q: np.ndarray  # (dims,) buffer
    z: np.ndarray  # (components,) buffer
    diff: np.ndarray  # (classes, components) buffer

    @classmethod
    def fold(cls, stats: FeatureLayerStats, spec: TensorSpec) -> _FoldedLayer:
        scale, zp = (spec.scale, float(spec.zero_point)) if spec.quantized else (1.0, 0.0)
        whiten = np.asarray(stats.whiten, dtype=np.float64)
        offset = (scale * zp + np.asarray(stats.center, dtype=np.float64)) @ whiten
        b = offset[None, :] + np.asarray(stats.class_means, dtype=np.float64)
        return cls(
            name=stats.output,
            a=np.ascontiguousarray(scale * whiten),
            b=np.ascontiguousarray(b),
            median=stats.median,
            spread=stats.spread,
            q=np.empty(stats.dims, dtype=np.float64),
            z=np.empty(stats.components, dtype=np.float64),
            diff=np.empty_like(b),
        )

    def score(self, raw: np.ndarray) -> float:
        # int8 @ float64 would cast into a new array anyway; casting into a buffer lets np.dot write into z.
        np.copyto(self.q, raw.reshape(-1), casting="unsafe")
        np.dot(self.q, self.a, out=self.z)
        np.subtract(self.z, self.b, out=self.diff)
        np.multiply(self.diff, self.diff, out=self.diff)
        d = float(self.diff.sum(axis=1).min())
        return (d - self.median) / self.spread


class OodDetector:
    """The per-frame out-of-distribution check of one loaded model, built once from its manifest and profile.

    :meth:`check` writes into buffers allocated at build time (no per-frame allocation on the inference thread),
    so one detector serves one thread at a time, as one backend does.

    Attributes:
        method: ``energy``, ``features`` or ``none`` (the profile turned the check off).
        threshold: a score above it flags the frame (None when the method is ``none``).
        source: ``manifest`` (the converter's threshold) or ``profile`` (the profile's override, or its ``none``).
        reads: the output tensor names :meth:`check` reads through its ``read`` callback (besides the scores).
    """

    def __init__(
        self,
        method: Literal["energy", "features", "none"],
        threshold: float | None,
        source: Literal["manifest", "profile"],
        *,
        scores_spec: TensorSpec | None = None,
        temperature: float = 1.0,
        layers: Sequence[_FoldedLayer] = (),
    ) -> None:
        """Use :meth:`build`; this constructor trusts its arguments."""
        self.method: Literal["energy", "features", "none"] = method
        self.threshold = threshold
        self.source: Literal["manifest", "profile"] = source
        self.reads: tuple[str, ...] = tuple(layer.name for layer in layers)
        self._layers = tuple(layers)
        self._temperature = temperature
        if scores_spec is not None and scores_spec.quantized:
            self._scale, self._zp = scores_spec.scale / temperature, float(scores_spec.zero_point)
        else:
            self._scale, self._zp = 1.0 / temperature, 0.0

    @classmethod
    def build(
        cls, artifact: Artifact, scores_spec: TensorSpec, specs: Mapping[str, TensorSpec], setting: OodSetting
    ) -> OodDetector | None:
        """The detector for ``artifact`` under the profile's ``setting``.

        Args:
            artifact: the manifest entry of the loaded file (its ``ood`` holds the statistics and thresholds).
            scores_spec: the loaded model's scores tensor (what the energy score dequantizes).
            specs: every output tensor of the loaded model by name (the feature outputs' quantization).
            setting: the profile's ``ood:`` section.

        Returns:
            None when the model has no OOD statistics and the profile says ``auto`` (the caller warns once).

        Raises:
            ConfigError: the profile asks for a method the model lacks, or its threshold is not a finite number.
            ModelError: the model lacks a feature output its manifest's statistics read, or its size differs.
        """
        if setting.method == "none":
            return cls("none", None, "profile")
        ood = artifact.ood
        if ood is None:
            if setting.method == "auto":
                return None
            raise ConfigError(
                f"the profile's ood.method is {setting.method} but model {artifact.file} has no out-of-distribution "
                "statistics; convert it again with this edgemed (`edgemed convert --ood auto`), or set ood.method "
                "to auto or none in the profile"
            )
        method = ood.default if setting.method == "auto" else setting.method
        section = ood.method(method)
        if section is None:
            have = [m for m in ("energy", "features") if ood.method(m) is not None]
            raise ConfigError(
                f"the profile's ood.method is {method} but model {artifact.file} has only {', '.join(have)}; "
                f"set ood.method to auto or {' or '.join(have)}, or convert again with `--ood {method}`"
            )
        source: Literal["manifest", "profile"] = "manifest" if setting.threshold is None else "profile"
        threshold = section.threshold if setting.threshold is None else setting.threshold
        if not math.isfinite(threshold):
            where = "the profile's ood.threshold" if source == "profile" else f"the manifest's ood.{method}.threshold"
            raise ConfigError(f"{where} is {threshold}, not a finite number; set a number (or remove the override)")
        if method == "energy":
            temperature = ood.energy.temperature if ood.energy is not None else 1.0
            return cls("energy", threshold, source, scores_spec=scores_spec, temperature=temperature)
        assert ood.features is not None  # section is not None
        return cls("features", threshold, source, layers=[_fold(stats, specs) for stats in ood.features.layers])

    def score(self, scores_raw: np.ndarray, read: Callable[[str], np.ndarray]) -> float:
        """This frame's score for :attr:`method` (NaN when the method is ``none``)."""
        if self.method == "energy":
            # A classifier has a handful of logits: plain floats beat numpy's per-call overhead here.
            z = [self._scale * (q - self._zp) for q in np.asarray(scores_raw).reshape(-1).tolist()]
            top = max(z)
            return float(-self._temperature * (top + math.log(sum(math.exp(v - top) for v in z))))
        if self.method == "features":
            return max(layer.score(np.asarray(read(layer.name))) for layer in self._layers)
        return math.nan

    def check(self, scores_raw: np.ndarray, read: Callable[[str], np.ndarray]) -> OodCheck:
        """Score one frame from its raw (still quantized) outputs and compare it with the threshold.

        Args:
            scores_raw: the raw row of the scores tensor.
            read: the raw row of another output by tensor name (``Backend.output``), for each of :attr:`reads`.

        Returns:
            The frame's :class:`OodCheck`; a score that is not finite (a float model's overflow) flags the frame
            and is recorded as None.
        """
        if self.method == "none" or self.threshold is None:
            return OodCheck("none", None, None, False, self.source)
        value = self.score(scores_raw, read)
        if not math.isfinite(value):
            return OodCheck(self.method, None, self.threshold, True, self.source)
        return OodCheck(self.method, value, self.threshold, value > self.threshold, self.source)


def _fold(stats: FeatureLayerStats, specs: Mapping[str, TensorSpec]) -> _FoldedLayer:
    spec = specs.get(stats.output)
    if spec is None:
        raise ModelError(
            f"the manifest's feature statistics read output {stats.output!r}, which the model does not have "
            f"(its outputs: {', '.join(sorted(specs)) or 'none'}); re-run `edgemed convert` so model and manifest "
            "come from the same conversion"
        )
    size = int(np.prod(spec.shape)) if spec.shape else 1
    if size != stats.dims:
        raise ModelError(
            f"output {stats.output!r} holds {size} values but the manifest's feature statistics expect "
            f"{stats.dims}; re-run `edgemed convert` so model and manifest come from the same conversion"
        )
    return _FoldedLayer.fold(stats, spec)
