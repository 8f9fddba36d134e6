"""Classification metrics and a model's summary for the acceptance gate, in plain numpy (no scikit-learn anywhere).

ROC AUC is the Mann-Whitney statistic with average ranks for ties: tied scores count one half, which is
exactly what makes a coarsely quantized probability output lose AUC while top-1 agreement stays perfect.
Confidence intervals: Wilson score intervals for proportions (sound at small n and near 0 or 1, where the
normal approximation is not), and a seeded paired bootstrap for AUC and float-minus-quantized differences.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

Z95 = 1.959963984540054


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval for ``successes / n``; ``(0, 1)`` when ``n == 0``."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    # Tied values share the mean of the ranks they span.
    boundaries = np.flatnonzero(np.diff(sorted_x)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(x)]])
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + e - 1) / 2.0 + 1.0
    return ranks


def binary_auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC of ``score`` for the positive class ``y == 1``; NaN when one class is absent."""
    pos = y == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(score.astype(np.float64))
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_auc(y: np.ndarray, probs: np.ndarray) -> float:
    """Binary AUC on class 1's probability, or the macro one-vs-rest AUC over classes present."""
    if probs.shape[1] == 2:
        return binary_auc(y, probs[:, 1])
    aucs = [binary_auc((y == k).astype(int), probs[:, k]) for k in range(probs.shape[1])]
    finite = [a for a in aucs if not math.isnan(a)]
    return float(np.mean(finite)) if finite else float("nan")


def roc_curve(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates over all thresholds (for plotting)."""
    order = np.argsort(-score, kind="mergesort")
    y_sorted = (y[order] == 1).astype(np.float64)
    tps = np.concatenate([[0.0], np.cumsum(y_sorted)])
    fps = np.concatenate([[0.0], np.cumsum(1.0 - y_sorted)])
    return fps / max(fps[-1], 1.0), tps / max(tps[-1], 1.0)


def confusion(y: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Confusion matrix, rows = true class, columns = predicted class."""
    m = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(m, (y, pred), 1)
    return m


def expected_calibration_error(y: np.ndarray, probs: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE with equal-width confidence bins: mean |accuracy - confidence| weighted by bin size."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            total += sel.mean() * abs(float(correct[sel].mean()) - float(conf[sel].mean()))
    return float(total)


def reliability(y: np.ndarray, probs: np.ndarray, bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-bin mean confidence, accuracy and count (for the reliability diagram)."""
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y).astype(np.float64)
    which = np.clip(np.digitize(conf, np.linspace(0, 1, bins + 1)[1:-1], right=True), 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore"):
        mean_conf = np.bincount(which, conf, bins) / counts
        acc = np.bincount(which, correct, bins) / counts
    return mean_conf, acc, counts


def bootstrap_ci(
    stat: Callable[[np.ndarray], float], n: int, seed: int = 0, resamples: int = 1000
) -> tuple[float, float]:
    """95% percentile bootstrap interval of ``stat(indices)`` over ``resamples`` resamples of ``range(n)``.

    Resamples whose statistic is undefined (NaN, e.g. AUC with one class drawn) are skipped.
    """
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        v = stat(rng.integers(0, n, n))
        if not math.isnan(v):
            values.append(v)
    if not values:
        return float("nan"), float("nan")
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


@dataclass(frozen=True)
class ClassRates:
    """One class's sensitivity (recall) and specificity with Wilson intervals, and the counts behind them."""

    class_index: int
    n: int  # images of this class
    true_positives: int
    sensitivity: float  # NaN when the class has no image
    sensitivity_ci: tuple[float, float]
    specificity: float  # NaN when every image is of this class
    specificity_ci: tuple[float, float]
    label: str


def class_rates(y: np.ndarray, pred: np.ndarray, labels: list[str]) -> list[ClassRates]:
    """Per-class sensitivity and specificity of predictions ``pred`` against true labels ``y``."""
    out: list[ClassRates] = []
    for k, label in enumerate(labels):
        pos, neg = y == k, y != k
        tp, n_pos = int((pred[pos] == k).sum()), int(pos.sum())
        tn, n_neg = int((pred[neg] != k).sum()), int(neg.sum())
        out.append(
            ClassRates(
                class_index=k,
                n=n_pos,
                true_positives=tp,
                sensitivity=tp / n_pos if n_pos else float("nan"),
                sensitivity_ci=wilson(tp, n_pos),
                specificity=tn / n_neg if n_neg else float("nan"),
                specificity_ci=wilson(tn, n_neg),
                label=label,
            )
        )
    return out


def balanced_accuracy(y: np.ndarray, pred: np.ndarray, num_classes: int) -> float:
    """Mean per-class sensitivity over the classes present."""
    recalls = [float((pred[y == k] == k).mean()) for k in range(num_classes) if (y == k).any()]
    return float(np.mean(recalls))


@dataclass(frozen=True)
class ModelSummary:
    """One model's numbers on the evaluation images, with 95% intervals.

    ``record()`` is the JSON form written to ``report.json`` (and, in part, the manifest).
    """

    n: int
    accuracy: float
    accuracy_ci: tuple[float, float]
    balanced_accuracy: float
    roc_auc: float  # NaN when a class is absent
    roc_auc_ci: tuple[float, float]
    ece: float
    per_class: list[ClassRates]
    confusion: list[list[int]]  # rows = true class, columns = predicted class

    def record(self) -> dict[str, Any]:
        """Every number as plain Python values (tuples stay tuples: :func:`converters.outcome.jsonable` lists them)."""
        return asdict(self)


def summarise(y: np.ndarray, probs: np.ndarray, labels: list[str]) -> ModelSummary:
    """Accuracy, balanced accuracy, AUC, ECE and per-class rates of one model's probabilities ``(N, K)``."""
    k = len(labels)
    pred = probs.argmax(axis=1)
    n, correct = len(y), int((pred == y).sum())
    return ModelSummary(
        n=n,
        accuracy=correct / n,
        accuracy_ci=wilson(correct, n),
        balanced_accuracy=balanced_accuracy(y, pred, k),
        roc_auc=roc_auc(y, probs),
        roc_auc_ci=bootstrap_ci(lambda i: roc_auc(y[i], probs[i]), n),
        ece=expected_calibration_error(y, probs),
        per_class=class_rates(y, pred, labels),
        confusion=confusion(y, pred, k).tolist(),
    )
