"""The out-of-distribution sets of the OOD benchmark, built from ``$EDGEMED_DATA`` and from seeded generators.

Each set is tagged with how far it is from the model's training images, *for that model*:

``other``
    another modality: what the targets are about (X-ray for the ultrasound model, ultrasound for the X-ray
    model, dermoscopy photographs for both);
``near``
    the same modality from another source (the ultrasound DICOM frames for the BreastMNIST model): reported
    as measured, with no target;
``synthetic``
    blank frames (one constant level each) and noise (uniform and Gaussian). On the device the quality gate
    refuses most of these before the model runs; here they go straight to the model, to show what the scores
    alone do.

Files are read with ``converters.ood.load_ood_eval``, the reader behind ``edgemed convert --ood-eval``: an
``.npz`` gives its test split, a folder or DICOM file every frame ``edgemed run`` would read from it. Frames keep
their own size and colour; the device's preprocessing fits them to the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

Kind = Literal["other", "near", "synthetic"]

#: The modality of each in-distribution dataset, and of each file-based OOD source.
MODALITY = {"breastmnist": "ultrasound", "pneumoniamnist": "x-ray"}


@dataclass(frozen=True)
class OodSet:
    """One set of images none of which the model should take for its own kind of image.

    Attributes:
        name: short name used in the tables.
        kind: ``other`` (modality), ``near`` (same modality, other source) or ``synthetic``.
        what: one line for the table's legend.
        images: uint8 frames, ``(H, W)`` or ``(H, W, 3)``, any size.
    """

    name: str
    kind: Kind
    what: str
    images: list[np.ndarray]


@dataclass(frozen=True)
class _FileSource:
    name: str
    relpath: str
    modality: str
    what: str


_FILES = (
    _FileSource("breastmnist", "breastmnist_28.npz", "ultrasound", "BreastMNIST test split (breast ultrasound)"),
    _FileSource("pneumoniamnist", "pneumoniamnist_28.npz", "x-ray", "PneumoniaMNIST test split (chest X-ray)"),
    _FileSource("isic_test", "isic_uda1_64.npz", "dermoscopy", "ISIC UDA-1 test split, 64x64 RGB (dermoscopy)"),
    _FileSource("isic_full", "isic_samples", "dermoscopy", "12 full-size ISIC dermoscopy photographs"),
    _FileSource(
        "us_dicom", "dicom", "ultrasound", "every frame of the 5 ultrasound DICOM files (other scanners, 30-frame cine)"
    ),
)


def file_sets(dataset: str, data: Path) -> list[OodSet]:
    """The file-based OOD sets for a model trained on ``dataset`` (its own test split is not among them).

    Raises:
        DataError: a file is missing or unreadable (from ``load_ood_eval``; it names the file).
    """
    from converters.ood import load_ood_eval

    sets = []
    for src in _FILES:
        if src.name == dataset:
            continue
        loaded = load_ood_eval(data / src.relpath)
        kind: Kind = "near" if src.modality == MODALITY[dataset] else "other"
        sets.append(OodSet(src.name, kind, src.what, [np.asarray(img) for img in loaded.images]))
    return sets


def synthetic_sets(height: int, width: int, seed: int = 0, n: int = 100) -> list[OodSet]:
    """Blank and noise frames at the model's input size (so the device's resize does not smooth the noise).

    Gray frames: the benchmark's models read gray, and an RGB frame would be averaged to gray anyway.
    """
    rng = np.random.default_rng(seed)
    levels = np.linspace(0, 255, 18).round().astype(np.uint8)
    blank = [np.full((height, width), level, np.uint8) for level in levels]
    uniform = [rng.integers(0, 256, (height, width), dtype=np.uint8) for _ in range(n)]
    gauss = [np.clip(rng.normal(128.0, 48.0, (height, width)), 0, 255).round().astype(np.uint8) for _ in range(n)]
    return [
        OodSet("blank", "synthetic", f"{len(blank)} constant frames, levels 0..255", blank),
        OodSet("noise_uniform", "synthetic", f"{n} frames of uniform noise 0..255", uniform),
        OodSet("noise_gauss", "synthetic", f"{n} frames of Gaussian noise (mean 128, sd 48, clipped)", gauss),
    ]
