"""Where the model looked: the class activation map of a GAP model, and an occlusion map for any model.

Both give a :class:`~edgemed.types.ClassMap` for the device's own screen (never published, never stored).

* :class:`CamComputer` reads the last feature map ``F`` that a converted GAP + Dense model outputs (role
  ``feature_map``, ``Artifact.cam``) from the frame's own invoke and weighs its channels with the Dense kernel:
  ``cam_k[i, j] = sum_c w[c][k] * F[i, j, c]`` (Zhou et al., 2016). One small matrix product per frame, no extra
  invoke.
* :func:`occlusion_map` covers one patch of the model input at a time and records how much the class's
  probability drops: it needs no CAM, costs one invoke per patch position, and so runs on request, on the
  screen's worker thread.

Either map shows which regions moved the score, not why the model decided as it did.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

import numpy as np

from edgemed.errors import ModelError
from edgemed.inference.classify import probabilities
from edgemed.types import ClassMap, TensorSpec

if TYPE_CHECKING:
    from edgemed.inference.classify import Classifier

# The patch covers about this fraction of the input's side; a seventh of the side (4 px of a 28 px input, 32 of a
# 224) is small enough to localise a lesion and large enough that covering it moves the score.
PATCH_FRACTION = 1 / 7


class CamComputer:
    """The class activation map of the last invoked frame, from the model's ``feature_map`` output.

    Build it once per loaded model with :meth:`build`; call :meth:`compute` after each invoke and before the next
    one (the backend keeps only the last run's outputs).
    """

    def __init__(self, classifier: Classifier, spec: TensorSpec, weights: np.ndarray, layer: str | None) -> None:
        """Use :meth:`build`, which checks the model's output against the manifest's weights."""
        self._backend = classifier.backend
        self._labels = classifier.labels
        self._spec = spec
        self._height, self._width, self._channels = (int(d) for d in spec.shape[1:])
        # Dequantization folded into the weights, once: scale * (q - z) @ w == q @ (scale * w) - z * sum(scale * w),
        # so compute() is one (H'W' x C) @ (C,) product on the raw map and one subtraction of a per-class constant,
        # with no per-value dequantized copy of the map. One contiguous float32 row per class.
        scale = float(spec.scale) if spec.quantized else 1.0
        zero = float(spec.zero_point) if spec.quantized else 0.0
        scaled = np.asarray(weights, dtype=np.float64).T * scale
        self._weights = np.ascontiguousarray(scaled, dtype=np.float32)
        self._offsets = (zero * scaled.sum(axis=1)).astype(np.float32)
        self.layer = layer

    @classmethod
    def build(cls, classifier: Classifier) -> CamComputer | None:
        """The computer for a classifier whose artifact has a ``cam`` section; None when it has none.

        Raises:
            ModelError: the loaded file has no output of the name ``cam.output`` gives, or its shape disagrees
                with the weights (not ``(1, H', W', channels)``, or another number of classes than the labels):
                the manifest is not this file's.
        """
        cam = classifier.artifact.cam
        if cam is None:
            return None
        specs = {s.name: s for s in classifier.backend.output_specs}
        spec = specs.get(cam.output)
        if spec is None:
            raise ModelError(
                f"the manifest's cam reads the output {cam.output!r}, which the model file does not have (it has "
                f"{', '.join(specs)}); re-run `edgemed convert` so model and manifest come from the same conversion, "
                "or set screen.class_map: off"
            )
        shape = tuple(int(d) for d in spec.shape)
        if len(shape) != 4 or shape[0] != 1 or shape[3] != cam.channels or min(shape) < 1:
            raise ModelError(
                f"the model's feature map {cam.output!r} has shape {shape} but the manifest's cam weights expect "
                f"(1, H', W', {cam.channels}); re-run `edgemed convert` so model and manifest come from the same "
                "conversion"
            )
        if cam.classes != len(classifier.labels):
            raise ModelError(
                f"the manifest's cam weights score {cam.classes} classes but the model has {len(classifier.labels)} "
                f"labels; re-run `edgemed convert`"
            )
        return cls(classifier, spec, np.asarray(cam.weights, dtype=np.float64), cam.layer)

    @property
    def shape(self) -> tuple[int, int]:
        """``(H', W')``: the grid of every map this computer returns."""
        return self._height, self._width

    def compute(self, class_index: int, seq: int) -> ClassMap:
        """The map for class ``class_index`` of the frame invoked last.

        Args:
            class_index: the class, in the manifest's label order (the frame's top class, usually).
            seq: the frame result's ``seq``, carried on the map.

        Returns:
            A ``cam`` map, float32 ``(H', W')``, not normalised: positive where the activations raised the score.

        Raises:
            ValueError: ``class_index`` is not one of the model's classes.
            ModelError: nothing was invoked yet, or the backend is closed.
        """
        if not 0 <= class_index < len(self._labels):
            raise ValueError(f"class_index {class_index} is not one of the model's {len(self._labels)} classes")
        raw = self._backend.output(self._spec.name).reshape(self._height * self._width, self._channels)
        values = raw.astype(np.float32, copy=False) @ self._weights[class_index]
        values -= self._offsets[class_index]
        grid = values.reshape(self._height, self._width)
        return ClassMap(values=grid, label=self._labels[class_index], kind="cam", seq=seq)


def occlusion_map(
    classifier: Classifier,
    image: np.ndarray,
    class_index: int,
    seq: int,
    *,
    lock: AbstractContextManager[object] | None = None,
    max_invokes: int = 400,
) -> ClassMap:
    """The drop in ``p(class_index)`` when each region of the model input is covered.

    A square patch of about a seventh of the input's side slides over the model input, half a patch at a time
    (further apart, and as wide as the spacing, when that would take more than ``max_invokes`` invokes), and is
    filled with the frame's own mean value: a neutral cover that hides the region's content without adding a dark
    or bright shape of its own. One invoke per position, plus one of the whole frame for the reference probability.

    Args:
        classifier: the loaded model (shared with the runtime thread: see ``lock``).
        image: the frame as ``Classifier.preprocess`` takes it (uint8).
        class_index: the class, in the manifest's label order.
        seq: the frame result's ``seq``, carried on the map.
        lock: held around each invoke and its output read, so the runtime thread's frames and these invokes do
            not interleave on the one interpreter. None: the caller owns the backend alone.
        max_invokes: the most invokes this call makes (at least 2).

    Returns:
        An ``occlusion`` map, float32 ``(rows, cols)`` over the patch positions (row-major, top-left first):
        positive where covering the region lowered the class's probability.

    Raises:
        ValueError: ``class_index`` is not one of the model's classes, or ``max_invokes`` is below 2.
        ModelError: the backend is closed.
    """
    if not 0 <= class_index < len(classifier.labels):
        raise ValueError(f"class_index {class_index} is not one of the model's {len(classifier.labels)} classes")
    if max_invokes < 2:
        raise ValueError(f"max_invokes must be at least 2 (the whole frame and one patch), not {max_invokes}")
    x = classifier.preprocess(image)
    _, height, width, _ = x.shape
    patch = max(1, round(min(height, width) * PATCH_FRACTION))
    stride = max(1, patch // 2)
    rows, cols = _positions(height, patch, stride), _positions(width, patch, stride)
    while len(rows) * len(cols) + 1 > max_invokes:
        if stride >= max(height, width):  # too few invokes for any grid: one patch covering everything
            patch, rows, cols = max(height, width), [0], [0]
            break
        stride += max(1, stride // 8)  # a few dozen steps even on a large input, not one per pixel
        # Patches at least as wide as their spacing: a sparser grid still covers every pixel, no strip unseen.
        patch = max(patch, stride)
        rows, cols = _positions(height, patch, stride), _positions(width, patch, stride)
    fill = _neutral(x)
    spec = classifier.backend.output_spec
    logits = classifier.artifact.output_kind == "logits"
    guard = lock if lock is not None else contextlib.nullcontext()

    # probabilities() is pure: Classifier.scores caches its last pass, which the runtime thread also uses.
    def p_class(tensor: np.ndarray) -> float:
        with guard:
            raw = classifier.backend.invoke(tensor).copy()
        return probabilities(raw, spec, logits=logits)[class_index]

    reference = p_class(x)
    drops = np.empty((len(rows), len(cols)), dtype=np.float32)
    covered = x.copy()
    for i, top in enumerate(rows):
        for j, left in enumerate(cols):
            covered[0, top : top + patch, left : left + patch, :] = fill
            drops[i, j] = reference - p_class(covered)
            covered[0, top : top + patch, left : left + patch, :] = x[0, top : top + patch, left : left + patch, :]
    return ClassMap(values=drops, label=classifier.labels[class_index], kind="occlusion", seq=seq)


def _positions(side: int, patch: int, stride: int) -> list[int]:
    """Top (or left) edges of the patches along one side: every ``stride``, and the last one flush with the edge."""
    last = max(0, side - patch)
    starts = list(range(0, last + 1, stride))
    if starts[-1] != last:
        starts.append(last)  # no strip along the far edge left uncovered
    return starts


def _neutral(x: np.ndarray) -> np.ndarray:
    """The per-channel mean of the input tensor, in its own dtype (quantized inputs stay quantized)."""
    mean = x.reshape(-1, x.shape[-1]).astype(np.float64).mean(axis=0)
    if np.issubdtype(x.dtype, np.integer):
        info = np.iinfo(x.dtype)
        out: np.ndarray = np.clip(np.round(mean), info.min, info.max).astype(x.dtype)
        return out
    same: np.ndarray = mean.astype(x.dtype)
    return same


__all__ = ["PATCH_FRACTION", "CamComputer", "occlusion_map"]
