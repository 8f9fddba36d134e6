"""Classification over a backend: a uint8 frame in, class probabilities in the manifest's label order out.

Beside the backends, as pycoral keeps ``classify.py`` beside its interpreter adapters: the backends only run a
tensor; turning the raw output into probabilities (dequantize, then softmax for a model that emits logits) lives
here, in one place, and is the same arithmetic on the device and in the converter's acceptance gate
(``converters.runner``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from edgemed.errors import ModelError
from edgemed.ood import OodDetector, OodSetting
from edgemed.preprocess import Preprocessor
from edgemed.types import OodCheck, Prediction, TensorSpec

if TYPE_CHECKING:
    from edgemed.inference import Backend
    from edgemed.manifest import Artifact, Manifest


def dequantize(raw: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Integer tensor to real values: ``scale * (q - zero_point)``; float tensors pass through as float64.

    The subtraction is done in int64 because int8 minus a zero point can leave the int8 range.
    """
    if not spec.quantized:
        return raw.astype(np.float64)
    return spec.scale * (raw.astype(np.int64) - spec.zero_point).astype(np.float64)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis."""
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=-1, keepdims=True))


def probabilities(raw: np.ndarray, spec: TensorSpec, *, logits: bool) -> tuple[float, ...]:
    """Class probabilities from a raw output tensor: dequantized, then softmax (logits) or clipped to [0, 1]."""
    return probabilities_and_logsumexp(raw, spec, logits=logits)[0]


def probabilities_and_logsumexp(raw: np.ndarray, spec: TensorSpec, *, logits: bool) -> tuple[tuple[float, ...], float]:
    """:func:`probabilities`, and the log-sum-exp of the dequantized logits the softmax computed on the way.

    The log-sum-exp is the energy score at T = 1 with its sign flipped (``edgemed.ood.energy_scores``), so the
    out-of-distribution check gets it for free; NaN when ``logits`` is False (probabilities have none).
    """
    if spec.quantized and raw.size <= 64:
        # A classifier has a handful of outputs: plain floats cost a fifth of numpy's per-call overhead, once
        # per frame on the inference thread. Same arithmetic as dequantize() and softmax() above.
        values = [spec.scale * (q - spec.zero_point) for q in np.asarray(raw).reshape(-1).tolist()]
        if not logits:
            return tuple(min(max(v, 0.0), 1.0) for v in values), math.nan
        top = max(values)
        exps = [math.exp(v - top) for v in values]
        total = sum(exps)
        return tuple(e / total for e in exps), top + math.log(total)
    real = dequantize(np.asarray(raw).reshape(-1), spec)
    if not logits:
        return tuple(float(p) for p in np.clip(real, 0.0, 1.0)), math.nan
    peak = float(real.max())
    e = np.exp(real - peak)
    mass = float(e.sum())
    return tuple(float(p) for p in e / mass), peak + math.log(mass)


class Classifier:
    """A backend plus its manifest's pre- and post-processing: uint8 frame in, class probabilities out, and
    whether the frame looks like the images the model was trained on.

    Attributes:
        backend: the loaded model.
        manifest: its manifest (labels, input geometry, name and version).
        artifact: the manifest's entry for the loaded file (sha256, target, output kind).
        labels: the class names, in output order.
        preprocess: frame to input tensor (resize, colour, quantize), shape ``(1, H, W, C)``.
        gray: True when the model reads grayscale frames (the quality gate then measures the gray frame).
        ood: the out-of-distribution detector (``edgemed.ood.OodDetector``), or ``None`` when the model has no
            out-of-distribution statistics and the setting is ``auto``.
    """

    def __init__(self, backend: Backend, manifest: Manifest, artifact: Artifact, ood: OodSetting | None = None) -> None:
        """Args:
            backend: the loaded model (opened with the artifact's scores output, ``Deployable.open_backend``).
            manifest: the manifest that describes it.
            artifact: the manifest's entry for the file the backend loaded.
            ood: the profile's ``ood:`` section; ``None`` is the default setting (``auto``: the manifest's
                method and threshold).

        Raises:
            ModelError: the backend's input or output tensor does not fit the manifest.
            ConfigError: ``ood`` asks for a method the model has no statistics for, or sets a threshold that is
                not a finite number.
        """
        self.backend = backend
        self.manifest = manifest
        self.artifact = artifact
        self.labels = tuple(manifest.labels)
        self.preprocess = Preprocessor(manifest.input, backend.input_spec)
        self.gray = manifest.input.colour_mode == "gray"
        self._logits = artifact.output_kind == "logits"
        expected = (1, manifest.input.height, manifest.input.width, manifest.input.channels)
        if tuple(backend.input_spec.shape) != expected:
            raise ModelError(
                f"model input {backend.input_spec.shape} does not match its manifest {expected}; "
                "re-run `edgemed convert` so model and manifest come from the same conversion"
            )
        if backend.output_spec.shape[-1] != len(self.labels):
            raise ModelError(
                f"model has {backend.output_spec.shape[-1]} outputs but the manifest lists "
                f"{len(self.labels)} labels; re-run `edgemed convert`"
            )
        specs = {spec.name: spec for spec in backend.output_specs}
        self.ood = OodDetector.build(artifact, backend.output_spec, specs, ood if ood is not None else OodSetting())
        # The energy at T = 1 is minus the log-sum-exp the softmax computes: check_ood and scores share one pass
        # over the frame's logits (the last row's values, its prediction and log-sum-exp are kept for the other).
        self._shared_pass = self._logits and self.ood is not None and self.ood.energy_is_minus_logsumexp
        self._last_row: list[float] | None = None
        self._last_pass: tuple[Prediction, float] | None = None

    def check_ood(self, raw: np.ndarray) -> OodCheck | None:
        """Score the last invoked frame for being out of distribution.

        Args:
            raw: the raw scores row ``backend.invoke`` returned for the frame; the feature outputs of the same
                run are read from the backend by name.

        Returns:
            The check (method, score, threshold, flagged, source), or ``None`` when there is no detector.
        """
        if self.ood is None:
            return None
        if self._shared_pass:
            return self.ood.check_score(-self._pass(raw)[1])
        return self.ood.check(raw, self.backend.output)

    def scores(self, raw: np.ndarray) -> Prediction:
        """Dequantize the raw output (and apply softmax when the model emits logits)."""
        if self._shared_pass:
            return self._pass(raw)[0]
        return Prediction(self.labels, probabilities(raw, self.backend.output_spec, logits=self._logits))

    def _pass(self, raw: np.ndarray) -> tuple[Prediction, float]:
        """The prediction and log-sum-exp of ``raw``, computed once per row: keyed by the row's values, not the
        array, so a row changed in place is computed again, and an equal row has the same answer anyway."""
        row = np.asarray(raw).reshape(-1).tolist()
        if row != self._last_row or self._last_pass is None:
            probs, lse = probabilities_and_logsumexp(raw, self.backend.output_spec, logits=True)
            self._last_row, self._last_pass = row, (Prediction(self.labels, probs), lse)
        return self._last_pass
