"""Does a dataset fit the model it is to calibrate or evaluate?

Calibration sets the int8 ranges and the evaluation decides the gate, so data of other classes, another size or
another colour mode gives a model that is "accepted" on numbers that mean nothing: a BreastMNIST model
calibrated and judged on 64x64 colour dermoscopy relabelled as its own classes scored AUC 0.52 and passed. The
checks here refuse such data before any work is done, from what ``edgemed train`` recorded beside the model
(``NAME.labels.json``) and from the model itself:

* class names: data that names its classes (a ``.npz``'s ``classes``, class sub-folders, CSV label names) must
  name the model's classes; its label values are then mapped to the model's output order by name;
* class count: integer labels must be the model's outputs, ``0 .. K-1`` and nothing else;
* every class in what is used: the calibration images (``train``) and the split the gate judges on (``test``,
  else ``val``, or ``--eval-split``) must each hold images of every class, checked split by split: labels
  ``{0, 2}`` for three outputs, or a class found only in the training split, leave a class whose clinical floors
  the gate cannot check;
* input shape and colour mode: a ``.npz`` stored at another size or colour mode than the model's input (or the
  training data's, converted the same way) is refused unless resized on purpose (``--image-size``,
  ``--colour-mode``);
* colour content: a colour model is not calibrated on images without any colour.

No TensorFlow here: the command line runs these checks before TensorFlow is imported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from converters.data import Dataset
from edgemed.errors import ConfigError, DataError


@dataclass(frozen=True)
class Expectation:
    """What data for one model must look like; ``None`` where it is not known.

    Attributes:
        model: the model's file name, for messages.
        labels: its class names in output order.
        data_labels: what its training data itself called each of those classes (``edgemed train --labels``
            may have renamed them); default ``labels``.
        classes: its number of outputs.
        shape: ``(H, W, C)`` of its input.
        training_shape: ``(H, W, C)`` of its training images as stored (before training resized them).
        colour_images: whether any of its training images had colour.
        record: where these facts come from (the ``.labels.json``), for messages.
    """

    model: str
    labels: list[str] | None = None
    data_labels: list[str] | None = None
    classes: int | None = None
    shape: tuple[int, int, int] | None = None
    training_shape: tuple[int, int, int] | None = None
    colour_images: bool | None = None
    record: str = ""


def training_record_path(model: Path) -> Path:
    """The ``.labels.json`` that ``edgemed train`` writes beside a model (inside a SavedModel folder)."""
    model = Path(model)
    return model / "labels.json" if model.is_dir() else model.with_suffix(".labels.json")


def read_training_record(model: Path) -> dict[str, Any] | None:
    """What ``edgemed train`` recorded about a model, or ``None`` when it left no record.

    Raises:
        ConfigError: the record exists but is unreadable.
    """
    path = training_record_path(model)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is unreadable ({exc}); delete it or re-run edgemed train") from exc
    return data if isinstance(data, dict) else None


def expectation(model: Path, record: dict[str, Any] | None) -> Expectation:
    """The expectation a training record gives (the model's shape and outputs are added once it is loaded)."""
    if record is None:
        return Expectation(model=Path(model).name)
    spec = record.get("input") or {}
    shape = _shape([spec.get("height"), spec.get("width"), spec.get("channels")]) if "height" in spec else None
    stored = record.get("stored_shape")
    labels = record.get("labels")
    named = record.get("stored_labels")
    return Expectation(
        model=Path(model).name,
        labels=[str(v) for v in labels] if isinstance(labels, list) else None,
        data_labels=[str(v) for v in named] if isinstance(named, list) and len(named) == len(labels or []) else None,
        classes=len(labels) if isinstance(labels, list) else None,
        shape=shape,
        training_shape=_shape(stored),
        colour_images=record.get("colour_images") if isinstance(record.get("colour_images"), bool) else None,
        record=training_record_path(model).name,
    )


def _shape(value: Any) -> tuple[int, int, int] | None:
    if isinstance(value, list) and len(value) == 3:
        return int(value[0]), int(value[1]), int(value[2])
    return None


def has_colour(images: np.ndarray) -> bool:
    """True when any pixel of any ``(N, H, W, 3)`` image has channels that differ (grayscale stored as RGB has
    none)."""
    if images.ndim != 4 or images.shape[-1] != 3:
        return False
    for start in range(0, len(images), 256):  # chunks: stop at the first colour image without a full-size copy
        chunk = images[start : start + 256]
        if (chunk[..., 0] != chunk[..., 1]).any() or (chunk[..., 1] != chunk[..., 2]).any():
            return True
    return False


def fit_to_model(
    ds: Dataset,
    exp: Expectation,
    role: str,
    *,
    resized_on_purpose: bool = False,
    eval_split: str | None = None,
    evaluated: bool = True,
) -> Dataset:
    """Check that ``ds`` fits the model and return it with the model's labels, in the model's output order.

    Args:
        ds: the calibration or evaluation data.
        exp: what the model expects.
        role: ``calibration`` (its ``train`` split is drawn from, and must hold every class) or ``evaluation``,
            for messages.
        resized_on_purpose: the user asked for ``--image-size``/``--colour-mode``: a stored size or colour mode
            unlike the model's is then converted, not refused.
        eval_split: the split the gate judges on (``--eval-split``); None = ``test``, else ``val``, as the gate
            picks it.
        evaluated: the gate judges on this dataset (False for calibration data given beside evaluation data).

    Returns:
        ``ds``, or a copy whose label values are renumbered to the model's label order.

    Raises:
        DataError: other class names, another number of classes, a class missing from the calibration or the
            evaluated split, another input size or colour mode, or no colour where the model was trained on
            colour; the message names the file, the difference and the fix.
    """
    ds = _fit_labels(ds, exp, role)
    _require_every_class(ds, exp, role, _used_splits(ds, role, eval_split if evaluated else None, evaluated))
    _check_shape(ds, exp, role, resized_on_purpose)
    if exp.colour_images and ds.image_shape[-1] == 3 and not any(has_colour(x) for x, _ in ds.splits.values()):
        raise DataError(
            ds.source,
            f"every {role} image is grayscale but {exp.model} was trained on colour images; use colour images "
            "of the same kind as its training data",
        )
    return ds


def _fit_labels(ds: Dataset, exp: Expectation, role: str) -> Dataset:
    values = np.concatenate([y for _, y in ds.splits.values()])
    if ds.stored_labels is not None and exp.labels is not None:
        # Names are matched with what the training data called each class, so a class renamed by
        # `train --labels` is still recognised; the label values are then renumbered to the model's outputs.
        known = exp.data_labels or exp.labels
        present = [ds.stored_labels[v] for v in np.unique(values)]
        if not set(present) <= set(known):
            raise DataError(
                ds.source,
                f"its classes are {', '.join(present)} but {exp.model} was trained on {', '.join(known)} "
                f"({exp.record}): this is data of other classes; use {role} images of the model's own classes",
            )
        # A name with no images (a class listed but empty) is never looked up; 0 only keeps the table whole.
        order = np.asarray([known.index(n) if n in known else 0 for n in ds.stored_labels], dtype=np.int64)
        splits = {name: (x, order[y]) for name, (x, y) in ds.splits.items()}
        # Renumbered: label value i is now the model's class i, which the data calls known[i].
        return replace(ds, splits=splits, labels=list(exp.labels), stored_labels=list(known))
    classes = int(values.max()) + 1 if len(values) else 0
    wanted = _wanted(exp)
    # Every value must be one of the model's outputs; whether each output has images is checked per split.
    if wanted is not None and (classes > wanted or (len(values) and int(values.min()) < 0)):
        raise DataError(
            ds.source,
            f"its labels are 0..{classes - 1} ({classes} classes) but {exp.model} outputs {wanted} classes; "
            f"use {role} data labelled with the model's classes",
        )
    if exp.labels is not None and ds.labels != exp.labels:
        return replace(ds, labels=list(exp.labels))
    return ds


def _wanted(exp: Expectation) -> int | None:
    return exp.classes if exp.classes is not None else (len(exp.labels) if exp.labels else None)


def _used_splits(ds: Dataset, role: str, eval_split: str | None, evaluated: bool) -> list[str]:
    """The splits whose images are used: ``train`` for calibration, and the split the gate judges on."""
    used = ["train"] if role == "calibration" else []
    if evaluated:
        judged = eval_split if eval_split in ds.splits else next((s for s in ("test", "val") if s in ds.splits), None)
        if judged is not None and judged != "train" and judged not in used:
            used.append(judged)
    return used


def _require_every_class(ds: Dataset, exp: Expectation, role: str, splits: list[str]) -> None:
    """Each used split holds images of every class of the model (``np.unique``, not the highest label + 1)."""
    wanted = _wanted(exp)
    if wanted is None:
        return
    names = ds.stored_labels if ds.stored_labels is not None and len(ds.stored_labels) == wanted else exp.labels
    for split in splits:
        present = set(np.unique(ds.splits[split][1]).tolist())
        missing = [k for k in range(wanted) if k not in present]
        if not missing:
            continue
        classes = ", ".join(names[k] if names else str(k) for k in missing)
        if split == "train" and role == "calibration":
            raise DataError(ds.source, f"it has no {role} images of class {classes}; add some")
        raise DataError(
            ds.source,
            f"its {split} split, which the gate judges {exp.model} on, has no images of class {classes}: the "
            "clinical floors of that class could not be checked; add some, or choose another split with --eval-split",
        )


def _check_shape(ds: Dataset, exp: Expectation, role: str, resized_on_purpose: bool) -> None:
    if exp.shape is not None and ds.image_shape != exp.shape:
        raise DataError(
            ds.source,
            f"{role} images are {_describe(ds.image_shape)} but the model expects {_describe(exp.shape)} "
            f"({exp.model}); use data of the model's size and colour mode{_resize_hint(exp.shape)}",
        )
    stored = ds.stored_shape
    if stored is None or resized_on_purpose or exp.shape is None or stored in (exp.shape, exp.training_shape):
        return
    trained = f" (its training images were {_describe(exp.training_shape)})" if exp.training_shape else ""
    raise DataError(
        ds.source,
        f"{role} images are stored as {_describe(stored)} but the model expects {_describe(exp.shape)} "
        f"({exp.model}){trained}: this looks like other data; use the model's own kind of images"
        f"{_resize_hint(exp.shape)}",
    )


def _resize_hint(shape: tuple[int, int, int]) -> str:
    h, w, c = shape
    return f", or convert them on purpose with --image-size {h}x{w} --colour-mode {'gray' if c == 1 else 'rgb'}"


def _describe(shape: tuple[int, int, int] | None) -> str:
    if shape is None:
        return "unknown"
    h, w, c = shape
    return f"{h}x{w} {'gray' if c == 1 else 'rgb'}"
