"""Out-of-distribution statistics at conversion: fit on the training split, threshold on the validation split.

The device's arithmetic lives in ``edgemed.ood`` (energy, per-layer Mahalanobis scores, their maximum); this module
fits what that arithmetic reads, from one converted file's own dequantized outputs (``converters.runner
.DeviceModel.run``), so that the device reproduces the scores the thresholds were chosen on.

Feature statistics, per tapped layer (design measured by the lead on the validation splits of other sets):
class-conditional means, one covariance pooled within classes, shrunk towards ``trace / D * I`` (weight
``shrinkage``), whitened by its inverse square root (``numpy.linalg.eigh``), truncated to the ``min(D, 128)``
largest principal directions; the squared distance to the nearest class mean is standardized by its median and
interquartile range over the training split. Thresholds: the ``1 - target_fraction`` quantile (numpy's "higher")
of the validation split's scores, never the test split's.

Also here: AUROC and FPR at 95% TPR of a score against an OOD set, Spearman rank agreement, and the loading of
``--ood-eval`` sets (a ``.npz``, or anything ``edgemed run`` reads). No TensorFlow in this module.
"""

from __future__ import annotations

import math
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from converters.metrics import _average_ranks, binary_auc
from edgemed.errors import CaptureError, ConfigError, DataError
from edgemed.manifest import EnergySpec, FeatureLayerStats, FeatureSpec, OodMethod, OodSpec
from edgemed.ood import energy_scores, feature_scores, max_softmax_scores

if TYPE_CHECKING:
    from converters.runner import ModelOutputs

OodOption = Literal["auto", "energy", "features", "none"]
OOD_OPTIONS: tuple[OodOption, ...] = ("auto", "energy", "features", "none")
DEFAULT_FRACTION = 0.03
DEFAULT_SHRINKAGE = 0.01
MAX_COMPONENTS = 128
#: How far above the validation quantile a threshold sits (relative): far beyond the device's rounding differences
#: from the converter (~1e-12), far below the gap between two validation scores.
THRESHOLD_MARGIN = 1e-7
#: Frames kept of one --ood-eval video, DICOM or folder at most (an even sample beyond): they are held at their
#: full size until the model runs, so a minute of 1080p would need gigabytes; a few hundred pin an AUROC down.
#: A .npz is already whole in memory and is scored whole.
MAX_EVAL_IMAGES = 500
#: The score names of the report: the max-softmax baseline (never shipped), then the two shipped methods.
SCORE_NAMES = ("max_softmax", "energy", "features")


def check_option(method: str, output: str, fraction: float) -> OodOption:
    """Validate ``--ood`` and ``--ood-fraction`` before any conversion work.

    Raises:
        ConfigError: an unknown method, energy asked of a model converted to output probabilities, or a fraction
            outside (0, 0.5].
    """
    if method not in OOD_OPTIONS:
        raise ConfigError(f"--ood {method!r}: choose one of {', '.join(OOD_OPTIONS)} (default auto)")
    if method == "energy" and output != "logits":
        raise ConfigError(
            "--ood energy reads the model's logits, but --output probabilities keeps the softmax in the model; "
            "drop --output probabilities, or use --ood features"
        )
    if not (0.0 < fraction <= 0.5) or not math.isfinite(fraction):
        raise ConfigError(
            f"--ood-fraction {fraction}: the share of in-distribution validation images to flag must be in "
            "(0, 0.5], e.g. 0.03"
        )
    return method  # type: ignore[return-value]


def fit_layer(
    features: np.ndarray,
    y: np.ndarray,
    output: str,
    layer: str | None = None,
    shrinkage: float = DEFAULT_SHRINKAGE,
    max_components: int = MAX_COMPONENTS,
) -> FeatureLayerStats:
    """Fit one layer's statistics on its training features ``(N, D)`` (dequantized) and labels ``(N,)``.

    Raises:
        DataError: fewer than two training images, or features that are not finite.
    """
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(y).reshape(-1)
    if f.ndim != 2 or len(f) != len(y) or len(f) < 2:
        raise DataError(output, f"needs (N >= 2, D) training features with one label each, got {f.shape}")
    if not np.isfinite(f).all():
        raise DataError(output, "the training split's features are not all finite; check the model for overflow")
    dims = f.shape[1]
    classes = [k for k in np.unique(y)]
    center = f.mean(axis=0)
    means = np.stack([f[y == k].mean(axis=0) for k in classes])
    within = f - means[np.searchsorted(classes, y)]
    cov = within.T @ within / max(len(f) - len(classes), 1)
    # Shrinking towards a scaled identity keeps the inverse bounded when some channels barely vary (dead ReLUs,
    # or fewer images than dimensions); a layer with no variance at all still gets a usable, tiny identity.
    ridge = max(float(np.trace(cov)) / dims, 1e-12)
    shrunk = (1.0 - shrinkage) * cov + shrinkage * ridge * np.eye(dims)
    eigvals, eigvecs = np.linalg.eigh(shrunk)
    components = min(dims, max_components)
    top = np.argsort(eigvals)[::-1][:components]
    whiten = eigvecs[:, top] / np.sqrt(np.maximum(eigvals[top], 1e-300))
    class_means = (means - center) @ whiten
    z = (f - center) @ whiten
    d = ((z[:, None, :] - class_means[None, :, :]) ** 2).sum(axis=2).min(axis=1)
    median = float(np.median(d))
    q25, q75 = np.percentile(d, [25, 75])
    spread = max(float(q75 - q25), 1e-9 * max(1.0, abs(median)))
    return FeatureLayerStats(
        output=output,
        layer=layer,
        dims=dims,
        components=components,
        center=center.tolist(),
        whiten=whiten.tolist(),
        class_means=class_means.tolist(),
        median=median,
        spread=spread,
    )


def fit_feature_spec(
    train: ModelOutputs,
    y_train: np.ndarray,
    shrinkage: float = DEFAULT_SHRINKAGE,
    max_components: int = MAX_COMPONENTS,
) -> FeatureSpec:
    """Fit every feature output of ``train`` (in its order) on the training split.

    The threshold is left at +inf (flags nothing) with ``flagged_fraction`` 0: :func:`with_threshold` sets it from
    the validation split.

    Raises:
        ConfigError: ``train`` has no feature outputs (the model was converted without taps).
    """
    if not train.features:
        raise ConfigError("the model has no feature outputs for the feature score; use --ood energy or --ood auto")
    layers = [
        fit_layer(values, y_train, name, train.layers.get(name), shrinkage, max_components)
        for name, values in train.features.items()
    ]
    return FeatureSpec(threshold=math.inf, flagged_fraction=0.0, layers=layers, shrinkage=shrinkage)


def layer_inputs(outputs: ModelOutputs, spec: FeatureSpec) -> list[np.ndarray]:
    """The feature arrays ``spec`` reads, in the order of its layers (outputs are matched by tensor name)."""
    missing = [stats.output for stats in spec.layers if stats.output not in outputs.features]
    if missing:
        raise ConfigError(f"the feature statistics read {missing}, which these model outputs do not hold")
    return [outputs.features[stats.output] for stats in spec.layers]


def threshold_at(scores: np.ndarray, target_fraction: float) -> tuple[float, float]:
    """The ``1 - target_fraction`` quantile of ``scores`` (numpy "higher": an actual score) and the fraction of
    ``scores`` strictly above it (what the device flags).

    The quantile is one validation image's own score; the device computes that image's score frame by frame in
    another order of operations (``edgemed.ood.OodDetector``), a rounding (~1e-12) away, which would flag it or
    not by chance. So the threshold is nudged up by ``THRESHOLD_MARGIN`` (relative), never past the next score:
    the image at the quantile stays unflagged on the device too, as ``flagged_fraction`` says.

    Raises:
        ConfigError: no scores, or scores that are not all finite.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.size == 0 or not np.isfinite(s).all():
        bad = int(s.size - np.isfinite(s).sum())
        raise ConfigError(
            f"cannot choose an OOD threshold: the validation scores are empty or not all finite ({bad} of {s.size}); "
            "the model's outputs overflow on the val split (check a float16 target's logits and features), or convert "
            "with --ood energy (logits only) or --ood none"
        )
    quantile = float(np.quantile(s, 1.0 - target_fraction, method="higher"))
    above = s[s > quantile]
    nudged = quantile + THRESHOLD_MARGIN * max(1.0, abs(quantile))
    threshold = min(nudged, (quantile + float(above.min())) / 2) if above.size else nudged
    return threshold, float((s > threshold).mean())


def fit_ood(
    train: ModelOutputs,
    y_train: np.ndarray,
    val: ModelOutputs,
    method: OodOption,
    target_fraction: float = DEFAULT_FRACTION,
    *,
    fit_split: str = "train",
    threshold_split: str = "val",
    shrinkage: float = DEFAULT_SHRINKAGE,
    reference_val_scores: np.ndarray | None = None,
) -> OodSpec | None:
    """The artifact's ``ood`` section from its own outputs on the training and validation splits.

    The energy score is fitted whenever the model outputs logits (it costs nothing); the feature score when
    ``method`` is ``auto`` or ``features`` and the model has feature outputs. ``default`` is ``features`` when
    present, else ``energy``.

    Args:
        train, val: this artifact's outputs on the two splits (``DeviceModel.run``).
        y_train: the training labels (the feature score's class means).
        method: ``--ood``.
        target_fraction: the share of validation images each threshold flags.
        reference_val_scores: the float Keras model's feature scores on the validation split (same fitting on
            its float features), for ``feature_rank_agreement``.

    Returns:
        None for ``--ood none``, or for ``auto`` on a model with neither logits nor feature outputs.

    Raises:
        ConfigError: ``--ood energy`` without logits, or ``--ood features`` without feature outputs.
    """
    if method == "none":
        return None
    energy = None
    if train.logits is not None and val.logits is not None and method in ("auto", "energy", "features"):
        threshold, flagged = threshold_at(energy_scores(val.logits), target_fraction)
        energy = EnergySpec(threshold=threshold, flagged_fraction=flagged)
    elif method == "energy":
        raise ConfigError("--ood energy needs a model that outputs logits; use --ood features or drop --output")
    features = None
    agreement = None
    if method in ("auto", "features") and train.features:
        fitted = fit_feature_spec(train, y_train, shrinkage)
        val_scores = feature_scores(fitted, layer_inputs(val, fitted))
        threshold, flagged = threshold_at(val_scores, target_fraction)
        features = fitted.model_copy(update={"threshold": threshold, "flagged_fraction": flagged})
        if reference_val_scores is not None and len(val_scores) >= 2:
            agreement = rank_agreement(val_scores, reference_val_scores)
            # Undefined when either side is constant (a tiny or degenerate val split): not measured, not a crash
            # that would lose the conversion.
            agreement = agreement if math.isfinite(agreement) else None
    elif method == "features":
        raise ConfigError(
            "--ood features needs layers to read, and this model has none the converter can tap (a SavedModel "
            "input has none); use --ood energy or --ood auto"
        )
    if energy is None and features is None:
        return None
    default: OodMethod = "features" if features is not None else "energy"
    return OodSpec(
        default=default,
        energy=energy,
        features=features,
        target_fraction=target_fraction,
        fit_split=fit_split,
        fit_n=len(y_train),
        threshold_split=threshold_split,
        threshold_n=len(val.probs),
        feature_rank_agreement=None if agreement is None else float(np.clip(agreement, -1.0, 1.0)),
    )


def method_scores(spec: OodSpec | None, outputs: ModelOutputs) -> dict[str, np.ndarray]:
    """Every score the report compares, higher = less like the training images: ``max_softmax`` (the baseline),
    and ``energy`` and ``features`` where ``spec`` has them."""
    scores = {"max_softmax": max_softmax_scores(outputs.probs)}
    if spec is not None and spec.energy is not None and outputs.logits is not None:
        scores["energy"] = energy_scores(outputs.logits, spec.energy.temperature)
    if spec is not None and spec.features is not None:
        scores["features"] = feature_scores(spec.features, layer_inputs(outputs, spec.features))
    return scores


def auroc_fpr95(in_scores: np.ndarray, out_scores: np.ndarray) -> tuple[float, float]:
    """How well a score (higher = OOD) tells an OOD set from in-distribution images.

    Returns:
        ``(auroc, fpr_at_95_tpr)``: the ROC AUC with the OOD images as positives (ties count one half), and, in
        the convention of the OOD literature (Hendrycks & Gimpel; Liang et al.), the fraction of OOD images still
        *accepted* at the threshold that accepts 95% of the in-distribution images (lower is better). NaN when a
        side is empty.
    """
    a = np.asarray(in_scores, dtype=np.float64).reshape(-1)
    b = np.asarray(out_scores, dtype=np.float64).reshape(-1)
    if a.size == 0 or b.size == 0:
        return math.nan, math.nan
    y = np.concatenate([np.zeros(a.size, dtype=np.int64), np.ones(b.size, dtype=np.int64)])
    auroc = binary_auc(y, np.concatenate([a, b]))
    # The smallest in-distribution score that at least 95% of them are at or below: accepted up to there.
    cut = np.sort(a)[math.ceil(0.95 * a.size) - 1]
    return auroc, float((b <= cut).mean())


def rank_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two score vectors (average ranks for ties); NaN when one is constant."""
    x = np.asarray(a, dtype=np.float64).reshape(-1)
    y = np.asarray(b, dtype=np.float64).reshape(-1)
    if x.shape != y.shape or x.size < 2:
        raise ValueError(f"rank agreement needs two score vectors of one length >= 2, got {x.shape} and {y.shape}")
    rx, ry = _average_ranks(x), _average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / denom) if denom > 0 else math.nan


@dataclass(frozen=True)
class OodEvalSet:
    """Images of another kind than the training images, for the report's OOD comparison.

    Attributes:
        name: the file or folder name (the report's label for the set; never an image's own name).
        images: uint8 frames, ``(H, W)`` gray or ``(H, W, 3)`` RGB, any size (the device's preprocessing fits them).
    """

    name: str
    images: list[np.ndarray]


def load_ood_eval(path: str | Path) -> OodEvalSet:
    """Read one ``--ood-eval`` set.

    A ``.npz`` gives its ``test_images`` (the split never used to choose anything), else every array whose key
    ends in ``images``; anything else is read as ``edgemed run`` reads it (an image, a folder of images and DICOM
    files, a DICOM file with every frame, a video), through ``edgemed.capture.open_source``. Beyond
    ``MAX_EVAL_IMAGES`` readable frames of such a source, an even sample of them is kept (every k-th).

    Raises:
        DataError: the path does not exist, holds no readable image, or a ``.npz`` holds no image array.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(p, "no such file or folder; give an existing --ood-eval file or folder")
    if p.suffix.lower() == ".npz":
        return OodEvalSet(p.stem, _npz_images(p))  # already whole in memory: every image is scored
    from edgemed.capture import open_source

    images: list[np.ndarray] = []
    unreadable, stride, index = 0, 1, 0
    try:
        source = open_source(str(p))
        try:
            for frame in source:
                if frame.image is None:
                    unreadable += 1
                    continue
                if index % stride == 0:
                    images.append(np.asarray(frame.image, dtype=np.uint8))
                    if len(images) > MAX_EVAL_IMAGES:  # keep every other one, then take every 2*stride-th frame
                        images, stride = images[::2], stride * 2
                index += 1
        finally:
            source.close()
    except CaptureError as exc:
        raise DataError(
            p, f"cannot be read as images ({exc}); give a .npz, an image, a folder, DICOM or video"
        ) from exc
    if not images:
        raise DataError(p, f"holds no readable image ({unreadable} unreadable); give images edgemed run can read")
    return OodEvalSet(p.resolve().name or str(p), images)  # "." has no name of its own


def _npz_images(path: Path) -> list[np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = ["test_images"] if "test_images" in data.files else [k for k in data.files if k.endswith("images")]
            if not keys:
                raise DataError(path, f"has no test_images or *_images array (keys: {', '.join(data.files)})")
            arrays = [np.asarray(data[k]) for k in keys]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:  # empty, corrupt, truncated
        raise DataError(path, f"is not a readable .npz ({exc}); save it again with numpy.savez") from exc
    images: list[np.ndarray] = []
    for key, arr in zip(keys, arrays, strict=True):
        if arr.dtype != np.uint8 or arr.ndim not in (3, 4) or (arr.ndim == 4 and arr.shape[3] not in (1, 3)):
            raise DataError(path, f"{key} must be uint8 (N, H, W) or (N, H, W, 1|3), got {arr.dtype} {arr.shape}")
        images.extend(arr[i] for i in range(len(arr)))
    if not images:
        raise DataError(path, f"{', '.join(keys)} holds no image")
    return images


def set_scores(
    spec: OodSpec | None, outputs: Mapping[str, ModelOutputs], names: Sequence[str] | None = None
) -> dict[str, dict[str, np.ndarray]]:
    """:func:`method_scores` of several named sets of outputs (``{set name: {score name: scores}}``)."""
    chosen = names if names is not None else list(outputs)
    return {name: method_scores(spec, outputs[name]) for name in chosen}
