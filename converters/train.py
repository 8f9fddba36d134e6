"""Train a recipe's model on a :class:`~converters.data.Dataset` and save it with its labels.

Writes ``{name}.keras`` and ``{name}.labels.json`` (labels, colour mode, input spec, recipe, seed, and the
stored size and colour content of the training images, which ``edgemed convert`` checks its data against) to
``out_dir``. Early stopping watches the validation loss or ROC AUC (per recipe) and restores the best weights,
so the saved model is the one that generalised best, not the last epoch. When the dataset has no validation
split, a seeded stratified 15% of the training split is held out for it. Imports TensorFlow.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter quiet

import keras
import numpy as np

from converters.data import Dataset
from converters.fit import has_colour
from converters.recipe import Augmentation, Recipe, load_recipe
from edgemed.errors import ConfigError


@dataclass
class TrainResult:
    """What :func:`train` produced.

    Attributes:
        model_path: the saved ``.keras`` file.
        labels_path: the ``.labels.json`` beside it.
        recipe: the recipe's resolved name (``best`` resolves to a concrete one).
        epochs_run: epochs trained before early stopping.
        best_epoch: 1-based epoch whose weights were kept.
        val_loss: validation loss of the kept weights.
        val_accuracy: validation accuracy of the kept weights.
        history: per-epoch metrics as Keras recorded them.
    """

    model_path: Path
    labels_path: Path
    recipe: str
    epochs_run: int
    best_epoch: int
    val_loss: float
    val_accuracy: float
    history: dict[str, list[float]] = field(default_factory=dict)


def train(
    dataset: Dataset,
    out_dir: str | Path,
    recipe: str | Recipe = "reference",
    seed: int = 0,
    epochs: int | None = None,
    progress: bool = True,
    name: str | None = None,
) -> TrainResult:
    """Train a model on ``dataset`` and save it.

    Args:
        dataset: images and labels; uses ``train`` and ``val`` (never ``test``).
        out_dir: folder for ``{name}.keras`` and ``{name}.labels.json`` (created if needed).
        recipe: a recipe name (``reference``, ``bn_gap``, ``mobilenetv2``, ``best``), a YAML path or a
            Recipe.
        seed: seeds weights, shuffling and augmentation (same seed, same machine: same model).
        epochs: override the recipe's maximum epochs (early stopping may end sooner).
        progress: print one line per epoch.
        name: file stem; default ``{dataset file stem}_{recipe}``.

    Returns:
        Paths and validation numbers of the saved model.

    Raises:
        ConfigError: unknown recipe, or the recipe's architecture cannot take these images.
    """
    from converters.models import build_model

    rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = name or f"{Path(dataset.source).stem}_{rec.name}"
    keras.utils.set_random_seed(seed)
    x_train, y_train = dataset.splits["train"]
    if "val" in dataset.splits:
        x_val, y_val = dataset.splits["val"]
    else:
        x_train, y_train, x_val, y_val = _hold_out(x_train, y_train, seed)
    try:
        model = build_model(rec, dataset.image_shape, dataset.num_classes)
    except ValueError as exc:
        raise ConfigError(f"recipe {rec.name!r}: {exc}") from exc
    mode = "max" if rec.monitor == "val_auc" else "min"
    callbacks: list[Any] = [ValidationAUC(_scale(x_val), y_val)]
    if rec.reduce_lr_patience:
        callbacks.append(
            keras.callbacks.ReduceLROnPlateau(
                monitor=rec.monitor, mode=mode, factor=0.5, patience=rec.reduce_lr_patience, min_lr=1e-5
            )
        )
    # EarlyStopping last: it must see the val_auc that ValidationAUC adds to the epoch's logs.
    callbacks.append(
        keras.callbacks.EarlyStopping(monitor=rec.monitor, mode=mode, patience=rec.patience, restore_best_weights=True)
    )
    batches = AugmentedBatches(x_train, y_train, rec.batch_size, rec.augmentation, seed)
    history = model.fit(
        batches,
        validation_data=(_scale(x_val), y_val),
        epochs=epochs or rec.epochs,
        class_weight=_class_weights(y_train, dataset.num_classes, rec.class_weight),
        callbacks=callbacks,
        verbose=2 if progress else 0,
    )
    model_path = out / f"{stem}.keras"
    model.save(model_path)
    val_loss, val_acc = model.evaluate(_scale(x_val), y_val, verbose=0)
    labels_path = out / f"{stem}.labels.json"
    labels_path.write_text(
        json.dumps(
            {
                "labels": dataset.labels,
                "colour_mode": dataset.colour_mode,
                "input": dataset.input_spec().model_dump(mode="json"),
                "recipe": rec.name,
                "seed": seed,
                "trained_on": Path(dataset.source).name,
                # What `edgemed convert` compares its calibration data with (converters.fit).
                "stored_labels": dataset.stored_labels,
                "stored_shape": list(dataset.stored_shape) if dataset.stored_shape else None,
                "colour_images": any(has_colour(x) for x, _ in dataset.splits.values()),
            },
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )
    watched = [float(v) for v in history.history[rec.monitor]]
    best = int(np.argmax(watched) if mode == "max" else np.argmin(watched))
    return TrainResult(
        model_path=model_path,
        labels_path=labels_path,
        recipe=rec.name,
        epochs_run=len(watched),
        best_epoch=best + 1,
        val_loss=float(val_loss),
        val_accuracy=float(val_acc),
        history={k: [float(v) for v in vs] for k, vs in history.history.items()},
    )


def _scale(x: np.ndarray) -> np.ndarray:
    # The same mapping the manifest records (scale 1/255, offset 0) and the device applies.
    return x.astype(np.float32) / np.float32(255.0)


def _hold_out(x: np.ndarray, y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    val_idx = []
    for cls in np.unique(y):
        idx = np.flatnonzero(y == cls)
        rng.shuffle(idx)
        val_idx.extend(idx[: max(1, round(0.15 * len(idx)))].tolist())
    mask = np.zeros(len(y), bool)
    mask[val_idx] = True
    return x[~mask], y[~mask], x[mask], y[mask]


def _class_weights(y: np.ndarray, num_classes: int, mode: str) -> dict[int, float] | None:
    if mode == "none":
        return None
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    return {i: float(len(y) / (num_classes * c)) if c else 0.0 for i, c in enumerate(counts)}


class ValidationAUC(keras.callbacks.Callback):  # type: ignore[misc]
    """Adds ``val_auc`` (ROC AUC on the validation split, binary or macro one-vs-rest) to each epoch's logs.

    Validation loss rewards confident calibration; AUC rewards ranking, which is what a triage threshold uses.
    Small validation splits make both noisy, so recipes choose which one stops training.
    """

    def __init__(self, x_val: np.ndarray, y_val: np.ndarray) -> None:
        super().__init__()
        self.x_val, self.y_val = x_val, y_val

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        from converters.metrics import roc_auc

        probs = np.asarray(self.model.predict(self.x_val, batch_size=256, verbose=0), dtype=np.float64)
        if logs is not None:
            logs["val_auc"] = roc_auc(self.y_val, probs)


class AugmentedBatches(keras.utils.PyDataset):  # type: ignore[misc]
    """Shuffled, augmented training batches scaled to [0, 1], reshuffled each epoch by a seeded generator."""

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, aug: Augmentation, seed: int) -> None:
        super().__init__()
        self.x, self.y, self.batch_size, self.aug = x, y, batch_size, aug
        self.rng = np.random.default_rng(seed)
        self.order = self.rng.permutation(len(y))

    def __len__(self) -> int:
        return int(np.ceil(len(self.y) / self.batch_size))

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        idx = self.order[index * self.batch_size : (index + 1) * self.batch_size]
        return augment(_scale(self.x[idx]), self.aug, self.rng), self.y[idx]

    def on_epoch_end(self) -> None:
        self.order = self.rng.permutation(len(self.y))


def augment(batch: np.ndarray, aug: Augmentation, rng: np.random.Generator) -> np.ndarray:
    """Apply a recipe's augmentation to a float batch ``(N, H, W, C)`` in [0, 1]; returns a new array."""
    out = batch.copy()
    n, h, w, _ = out.shape
    for i in range(n):
        img = out[i]
        if aug.hflip and rng.random() < 0.5:
            img = img[:, ::-1]
        if aug.vflip and rng.random() < 0.5:
            img = img[::-1]
        if aug.rot90 and h == w:
            img = np.rot90(img, int(rng.integers(4)))
        if aug.shift_fraction:
            max_dy, max_dx = round(aug.shift_fraction * h), round(aug.shift_fraction * w)
            dy, dx = int(rng.integers(-max_dy, max_dy + 1)), int(rng.integers(-max_dx, max_dx + 1))
            # Edge padding, not zeros: a black band would be a feature the device never sees.
            padded = np.pad(img, ((abs(dy),) * 2, (abs(dx),) * 2, (0, 0)), mode="edge")
            img = padded[abs(dy) - dy : abs(dy) - dy + h, abs(dx) - dx : abs(dx) - dx + w]
        if aug.contrast:
            mean = img.mean()
            img = (img - mean) * (1.0 + rng.uniform(-aug.contrast, aug.contrast)) + mean
        if aug.brightness:
            img = img + rng.uniform(-aug.brightness, aug.brightness)
        out[i] = np.clip(img, 0.0, 1.0)
    return out
