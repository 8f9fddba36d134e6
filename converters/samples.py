"""The images a conversion uses: the calibration sample (training split) and the held-out split the gate judges on.

Integer targets are calibrated on the user's own *training* images: class-balanced, seeded, and never fewer
than a minimum per class (too few is an error, not a warning), because a range estimated on someone else's
images or on a handful of one class is how an int8 model ends up predicting one class. The gate then judges on
a split the calibration never saw. Both are fingerprinted in the manifest.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from converters.data import Dataset
from edgemed.errors import ConfigError, DataError

DEFAULT_CALIBRATION_PER_CLASS = 100
MIN_CALIBRATION_PER_CLASS = 10


@dataclass
class Calibration:
    """The calibration images actually used, and their fingerprint."""

    images: np.ndarray
    labels: np.ndarray
    count_per_class: list[int]
    sha256: str


@dataclass(frozen=True)
class HeldOut:
    """The held-out images the gate runs both models on.

    Attributes:
        split: ``test`` or ``val``.
        images: uint8 images ``(N, H, W, C)``.
        labels: their true class indices ``(N,)``.
    """

    split: str
    images: np.ndarray
    labels: np.ndarray

    @property
    def sha256(self) -> str:
        """Fingerprint of the images and labels, recorded in the manifest."""
        return fingerprint(self.images, self.labels)


def calibration_sample(
    dataset: Dataset,
    per_class: int = DEFAULT_CALIBRATION_PER_CLASS,
    min_per_class: int = MIN_CALIBRATION_PER_CLASS,
    seed: int = 0,
) -> Calibration:
    """Draw a class-balanced, seeded calibration set from the training split.

    Every class contributes the same number of images (``per_class``, or the smallest class's count if lower),
    so the activation ranges are not set by the majority class alone.

    Raises:
        DataError: some class has fewer than ``min_per_class`` training images.
    """
    x, y = dataset.splits["train"]
    counts = np.bincount(y, minlength=dataset.num_classes)
    for k, c in enumerate(counts):
        if c < min_per_class:
            raise DataError(
                dataset.source,
                f"calibration needs at least {min_per_class} training images of "
                f"class {dataset.labels[k]!r}, found {c}; add images of that class",
            )
    take = int(min(per_class, counts.min()))
    rng = np.random.default_rng(seed)
    chosen = np.concatenate(
        [rng.choice(np.flatnonzero(y == k), take, replace=False) for k in range(dataset.num_classes)]
    )
    chosen = rng.permutation(chosen)
    images, labels = x[chosen], y[chosen]
    return Calibration(
        images=images,
        labels=labels,
        count_per_class=[take] * dataset.num_classes,
        sha256=fingerprint(images, labels),
    )


def held_out(data: Dataset, requested: str | None) -> HeldOut:
    """The split the gate judges on: ``requested``, else ``test`` if present, else ``val``.

    Raises:
        ConfigError: ``train`` was requested (the calibration images).
        DataError: the requested split is absent, or there is no held-out split at all.
    """
    if requested is not None:
        if requested == "train":
            raise ConfigError("--eval-split train would judge the model on its own calibration images; use test or val")
        if requested not in data.splits:
            raise DataError(data.source, f"no {requested!r} split (has: {', '.join(data.splits)})")
        split = requested
    else:
        found = [candidate for candidate in ("test", "val") if candidate in data.splits]
        if not found:
            raise DataError(data.source, "no held-out split (test or val) to gate the conversion on; add one")
        split = found[0]
    images, labels = data.splits[split]
    return HeldOut(split, images, labels)


def fingerprint(images: np.ndarray, labels: np.ndarray) -> str:
    """SHA-256 over the image bytes and the labels as int64."""
    digest = hashlib.sha256(np.ascontiguousarray(images).tobytes())
    digest.update(np.ascontiguousarray(labels.astype(np.int64)).tobytes())
    return digest.hexdigest()
