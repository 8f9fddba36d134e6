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
class _FusedLayers:
    """Every layer's statistics folded into a few stacked arrays, so one frame costs a handful of numpy calls.

    Per layer ``l`` (``r = 1 / sqrt(spread)``), with ``q`` the raw integer row:
    ``z = (scale * (q - zp) - center) @ whiten`` is ``q @ (scale * whiten) - (scale * zp + center) @ whiten``, so
    ``r * (z - m_k) = q @ a - b[k]`` with ``a = r * scale * whiten`` and ``b[k] = r * ((scale * zp + center) @
    whiten + m_k)``, and the layer score ``(d - median) / spread`` is ``min_k |q @ a - b[k]|^2 - median / spread``.

    The layers are stacked along a first axis, each padded with zeros to the widest layer's ``dims`` and
    ``components`` (a padded row or column adds exact zeros), with one more input slot fixed at 1 and one more
    component fed from it: that component is 1 for every class, so its square times ``-median / spread`` in the
    summing weights subtracts the layer's median. A frame is then: one concatenation of the raw rows (cast to
    float64) into the stacked input, one batched product, one subtraction, one square, one batched product
    summing each class's squares (``(L, K)`` layer-class scores), and plain-float min over classes and max over
    layers (a few values: cheaper than two numpy reductions). Same numbers as :func:`feature_scores` up to
    rounding (~1e-13; tested on a real model).
    """

    names: tuple[str, ...]
    dims: tuple[int, ...]
    parts: list[np.ndarray]  # concatenation list: the raw rows (filled per frame), each followed by its pad
    a: np.ndarray  # (L, D + 1, C + 1)
    b: np.ndarray  # (L, K, C + 1)
    w: np.ndarray  # (L, C + 1, 1): 1 on a layer's components, -median / spread on the constant one
    q: np.ndarray  # (L, 1, D + 1) buffer: padded raw rows, each with its constant 1
    flat: np.ndarray  # q as one flat row (a view), what the concatenation writes
    z: np.ndarray  # (L, 1, C + 1) buffer
    diff: np.ndarray  # (L, K, C + 1) buffer
    d: np.ndarray  # (L, K, 1) buffer
    d2: np.ndarray  # d as (L, K) (a view)

    @classmethod
    def fold(cls, layers: Sequence[FeatureLayerStats], specs: Sequence[TensorSpec]) -> _FusedLayers:
        classes = {len(stats.class_means) for stats in layers}
        if len(classes) != 1:
            raise ModelError(
                "the manifest's feature statistics list different numbers of classes per layer; re-run "
                "`edgemed convert` so model and manifest come from the same conversion"
            )
        n, k = len(layers), classes.pop()
        dmax, cmax = max(s.dims for s in layers), max(s.components for s in layers)
        a = np.zeros((n, dmax + 1, cmax + 1))
        b = np.zeros((n, k, cmax + 1))
        w = np.zeros((n, cmax + 1, 1))
        parts: list[np.ndarray] = []
        for i, (stats, spec) in enumerate(zip(layers, specs, strict=True)):
            scale, zp = (spec.scale, float(spec.zero_point)) if spec.quantized else (1.0, 0.0)
            whiten = np.asarray(stats.whiten, dtype=np.float64)
            r = 1.0 / math.sqrt(stats.spread)
            offset = (scale * zp + np.asarray(stats.center, dtype=np.float64)) @ whiten
            a[i, : stats.dims, : stats.components] = (r * scale) * whiten
            a[i, dmax, cmax] = 1.0  # the constant input slot feeds the constant component
            b[i, :, : stats.components] = r * (offset[None, :] + np.asarray(stats.class_means, dtype=np.float64))
            w[i, : stats.components, 0] = 1.0
            w[i, cmax, 0] = -stats.median / stats.spread
            pad = np.zeros(dmax - stats.dims + 1, dtype=np.int8)  # int8: castable from every row dtype
            pad[-1] = 1
            parts += [np.zeros(stats.dims, dtype=np.int8), pad]  # the row's slot, filled per frame
        q = np.empty((n, 1, dmax + 1))
        d = np.empty((n, k, 1))
        return cls(
            flat=q.reshape(-1),
            names=tuple(stats.output for stats in layers),
            dims=tuple(stats.dims for stats in layers),
            parts=parts,
            a=a,
            b=b,
            w=w,
            q=q,
            z=np.empty((n, 1, cmax + 1)),
            diff=np.empty((n, k, cmax + 1)),
            d=d,
            d2=d.reshape(n, k),
        )

    def score(self, read: Callable[[str], np.ndarray]) -> float:
        parts = self.parts
        for i, name in enumerate(self.names):
            parts[2 * i] = read(name)
        try:
            np.concatenate(parts, out=self.flat, casting="unsafe")
        except ValueError:
            raise self._bad_rows(parts) from None
        np.matmul(self.q, self.a, out=self.z)
        np.subtract(self.z, self.b, out=self.diff)
        np.multiply(self.diff, self.diff, out=self.diff)
        np.matmul(self.diff, self.w, out=self.d)
        return float(max(map(min, self.d2.tolist())))

    def _bad_rows(self, parts: list[np.ndarray]) -> ModelError:
        for name, dims, row in zip(self.names, self.dims, parts[::2], strict=True):
            got = np.shape(row)
            if len(got) != 1 or got[0] != dims:
                return ModelError(
                    f"output {name!r} was read with shape {got}, but the feature statistics need a flat row of "
                    f"{dims} values (Backend.output returns the flattened row of the last invoke)"
                )
        return ModelError("the feature outputs could not be read into the detector's buffer")


class OodDetector:
    """The per-frame out-of-distribution check of one loaded model, built once from its manifest and profile.

    :meth:`check` writes into buffers allocated at build time (no per-frame allocation on the inference thread),
    so one detector serves one thread at a time, as one backend does.

    Attributes:
        method: ``energy``, ``features`` or ``none`` (the profile turned the check off).
        threshold: a score above it flags the frame (None when the method is ``none``).
        source: ``manifest`` (the converter's threshold) or ``profile`` (the profile's override, or its ``none``).
        reads: the output tensor names :meth:`check` reads through its ``read`` callback (besides the scores).
        energy_is_minus_logsumexp: True for the energy at T = 1, whose score is minus the log-sum-exp of the
            dequantized logits: a caller that computes the softmax anyway passes ``-logsumexp`` to
            :meth:`check_score` and skips a second pass over the logits.
    """

    def __init__(
        self,
        method: Literal["energy", "features", "none"],
        threshold: float | None,
        source: Literal["manifest", "profile"],
        *,
        scores_spec: TensorSpec | None = None,
        temperature: float = 1.0,
        layers: _FusedLayers | None = None,
    ) -> None:
        """Use :meth:`build`; this constructor trusts its arguments."""
        self.method: Literal["energy", "features", "none"] = method
        self.threshold = threshold
        self.source: Literal["manifest", "profile"] = source
        self.reads: tuple[str, ...] = layers.names if layers is not None else ()
        self._layers = layers
        self._temperature = temperature
        # At T = 1 the energy is minus the log-sum-exp the softmax of the same logits computes anyway, so the
        # Classifier hands that in (check_score) instead of this detector dequantizing the logits again.
        self.energy_is_minus_logsumexp = method == "energy" and temperature == 1.0
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
            again = (
                "convert again with `--output logits` (the energy score needs logits)"
                if method == "energy" and artifact.output_kind != "logits"
                else f"convert again with `--ood {method}`"
            )
            raise ConfigError(
                f"the profile's ood.method is {method} but model {artifact.file} has only {', '.join(have)}; "
                f"set ood.method to auto or {' or '.join(have)}, or {again}"
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
        layers = ood.features.layers
        fused = _FusedLayers.fold(layers, [_output_spec(stats, specs) for stats in layers])
        return cls("features", threshold, source, layers=fused)

    def score(self, scores_raw: np.ndarray, read: Callable[[str], np.ndarray]) -> float:
        """This frame's score for :attr:`method` (NaN when the method is ``none``)."""
        if self.method == "energy":
            # A classifier has a handful of logits: plain floats beat numpy's per-call overhead here.
            z = [self._scale * (q - self._zp) for q in np.asarray(scores_raw).reshape(-1).tolist()]
            top = max(z)
            return float(-self._temperature * (top + math.log(sum(math.exp(v - top) for v in z))))
        if self.method == "features" and self._layers is not None:
            return self._layers.score(read)
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
        return self.check_score(self.score(scores_raw, read))

    def check_score(self, value: float) -> OodCheck:
        """Compare an already computed score for :attr:`method` with the threshold (see :meth:`check`).

        For the energy at T = 1 (:attr:`energy_is_minus_logsumexp`) the score is ``-logsumexp`` of the frame's
        dequantized logits, which ``edgemed.inference.classify`` computes with the softmax.
        """
        if self.method == "none" or self.threshold is None:
            return OodCheck("none", None, None, False, self.source)
        if not math.isfinite(value):
            return OodCheck(self.method, None, self.threshold, True, self.source)
        return OodCheck(self.method, value, self.threshold, value > self.threshold, self.source)


def _output_spec(stats: FeatureLayerStats, specs: Mapping[str, TensorSpec]) -> TensorSpec:
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
    return spec
