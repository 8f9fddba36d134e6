"""The out-of-distribution step of ``edgemed convert``: each converted file's ``ood`` section and its report numbers.

Per artifact, through the device's own code (``converters.runner.DeviceModel.run``): the file's outputs on the
training split fit the feature statistics (``converters.ood``), its outputs on the validation split choose the
thresholds, and its outputs on the held-out evaluation split and on every ``--ood-eval`` set are scored for the
report only (AUROC and FPR at 95% TPR against the held-out split, fraction flagged). The float Keras model's
features, fitted the same way, give the rank agreement of the file's feature scores with the float model's on the
validation split.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from converters.data import Dataset
from converters.ood import (
    SCORE_NAMES,
    OodEvalSet,
    OodOption,
    auroc_fpr95,
    feature_scores,
    fit_feature_spec,
    fit_ood,
    layer_inputs,
    load_ood_eval,
    method_scores,
    threshold_at,
)
from converters.runner import DeviceModel, ModelOutputs
from converters.samples import HeldOut
from converters.source import SourceModel
from edgemed.errors import ConfigError, DataError
from edgemed.manifest import Artifact, InputSpec, OodSpec, OutputKind, OutputSpec

#: Training images the statistics are fitted on, at most (a seeded draw beyond that: the fit needs means and one
#: covariance per layer, which a few thousand images pin down; more only costs conversion time).
MAX_FIT_IMAGES = 20_000
#: Below this Spearman correlation with the float model's feature scores, the report and the terminal warn.
MIN_RANK_AGREEMENT = 0.95


@dataclass(frozen=True)
class OodPlan:
    """What every artifact's OOD step runs on, prepared once per conversion.

    Attributes:
        method: ``--ood`` (never ``none``: there is no plan then).
        fraction: ``--ood-fraction``, the share of validation images each threshold flags.
        train_images, y_train: the training images the statistics are fitted on, and their labels.
        val_images: the validation split (thresholds).
        held: the gate's held-out split (report only).
        eval_sets: the ``--ood-eval`` sets.
        float_val_scores: the float Keras model's feature scores on the validation split (None without taps).
    """

    method: OodOption
    fraction: float
    train_images: np.ndarray
    y_train: np.ndarray
    val_images: np.ndarray
    held: HeldOut
    eval_sets: list[OodEvalSet]
    float_val_scores: np.ndarray | None


@dataclass(frozen=True)
class OodOutcome:
    """One artifact's OOD fit and its report numbers.

    Attributes:
        target: the artifact's target.
        spec: its manifest ``ood`` section (None: no score could be fitted, see ``notes``).
        scores: set name -> score name -> scores, for ``val``, the held-out split and each ``--ood-eval`` set.
        sizes: set name -> number of images.
        baseline_threshold: the max-softmax score's threshold, chosen on val like the shipped ones (report only).
        notes: what the user must know (no score fitted; weak rank agreement).
    """

    target: str
    spec: OodSpec | None
    scores: dict[str, dict[str, np.ndarray]]
    sizes: dict[str, int]
    baseline_threshold: float | None
    held_split: str
    eval_names: list[str]
    notes: list[str] = field(default_factory=list)

    def thresholds(self) -> dict[str, float]:
        """Score name -> threshold (the shipped ones, and the max-softmax baseline's, for comparison)."""
        out: dict[str, float] = {}
        if self.baseline_threshold is not None:
            out["max_softmax"] = self.baseline_threshold
        if self.spec is not None:
            for name in ("energy", "features"):
                section = getattr(self.spec, name)
                if section is not None:
                    out[name] = section.threshold
        return out

    def table(self) -> list[dict[str, Any]]:
        """One row per set and score: fraction flagged, and AUROC and FPR at 95% TPR against the held-out split."""
        rows: list[dict[str, Any]] = []
        reference = self.scores.get(self.held_split, {})
        for set_name, by_score in self.scores.items():
            for score in SCORE_NAMES:
                if score not in by_score:
                    continue
                values = by_score[score]
                threshold = self.thresholds().get(score)
                auroc, fpr = (math.nan, math.nan)
                if set_name in self.eval_names and score in reference:
                    auroc, fpr = auroc_fpr95(reference[score], values)
                rows.append(
                    {
                        "set": set_name,
                        "n": int(values.size),
                        "score": score,
                        "shipped": self.spec is not None and score == self.spec.default,
                        "flagged": float((values > threshold).mean()) if threshold is not None else math.nan,
                        "auroc": auroc,
                        "fpr_at_95_tpr": fpr,
                    }
                )
        return rows

    def record(self) -> dict[str, Any]:
        """report.json's ``ood`` entry of this artifact (every number; scores summarised, not listed)."""
        spec = self.spec
        return {
            "default": spec.default if spec is not None else None,
            "target_fraction": spec.target_fraction if spec is not None else None,
            "fit": {"split": spec.fit_split, "n": spec.fit_n} if spec is not None else None,
            "threshold": {"split": spec.threshold_split, "n": spec.threshold_n} if spec is not None else None,
            "thresholds": self.thresholds(),
            "feature_rank_agreement": spec.feature_rank_agreement if spec is not None else None,
            "sets": self.sizes,
            "held_out_split": self.held_split,
            "table": self.table(),
            "notes": self.notes,
        }

    def summary_line(self) -> str:
        """The terminal's one line about this artifact's OOD check."""
        if self.spec is None:
            return f"  ood {self.target}: none ({'; '.join(self.notes) or 'not fitted'})"
        spec = self.spec
        section = spec.method(spec.default)
        assert section is not None  # OodSpec guarantees the default's section
        parts = [
            f"  ood {self.target}: {spec.default} threshold {section.threshold:.4g} flags "
            f"{100 * section.flagged_fraction:.1f}% of {spec.threshold_n} {spec.threshold_split} images"
        ]
        held = self.scores.get(self.held_split, {}).get(spec.default)
        if held is not None:
            parts.append(f"{100 * float((held > section.threshold).mean()):.1f}% of {self.held_split}")
        for row in self.table():
            if row["set"] in self.eval_names and row["score"] == spec.default:
                parts.append(f"{row['set']} AUROC {row['auroc']:.3f}, {100 * row['flagged']:.0f}% flagged")
        if spec.feature_rank_agreement is not None:
            parts.append(f"rank agreement with float {spec.feature_rank_agreement:.3f}")
        return "; ".join(parts)


def plan(
    method: OodOption,
    fraction: float,
    source: SourceModel,
    data: Dataset,
    held: HeldOut,
    eval_paths: Sequence[Path | str],
    seed: int = 0,
) -> OodPlan | None:
    """Gather the images of the OOD step and the float model's reference scores; None for ``--ood none``.

    Raises:
        DataError: the data has no validation split (thresholds are never chosen on the test split), or an
            ``--ood-eval`` set cannot be read.
    """
    if method == "none":
        return None
    if method == "energy" and source.output_kind == "probabilities":
        raise ConfigError(
            "--ood energy reads logits, but this model's graph ends in a softmax the converter cannot remove (a "
            "SavedModel input is converted as it is); use --ood auto, or export the model without its softmax"
        )
    if method == "features" and not source.feature_layers:
        raise ConfigError(
            "--ood features needs layers to read, and the converter found none to tap in this model (a "
            "SavedModel input has none); use --ood energy or --ood auto"
        )
    if "val" not in data.splits or len(data.splits["val"][0]) == 0:
        raise DataError(
            data.source,
            "has no val split to choose the out-of-distribution thresholds on (never the test split); give the data "
            "a val split (val_images/val_labels in a .npz, or a val/ folder), or convert with --ood none",
        )
    eval_sets = [load_ood_eval(p) for p in eval_paths]  # before any model runs: a bad path fails fast
    names = [s.name for s in eval_sets]
    taken = {"train", "val", held.split}  # a set under a split's name would replace that split's images
    if len(set(names)) != len(names) or taken & set(names):
        raise DataError(
            ", ".join(map(str, eval_paths)),
            f"the --ood-eval sets are named by their file or folder names ({', '.join(names)}), which must differ "
            f"from each other and from {', '.join(sorted(taken))}; rename or copy the clashing ones",
        )
    train_images, y_train = data.splits["train"]
    if len(train_images) > MAX_FIT_IMAGES:
        pick = np.sort(np.random.default_rng(seed).choice(len(train_images), MAX_FIT_IMAGES, replace=False))
        train_images, y_train = train_images[pick], y_train[pick]
    val_images = data.splits["val"][0]
    float_scores = None
    if method in ("auto", "features") and source.feature_layers:
        float_scores = _float_feature_scores(source, train_images, y_train, val_images)
    return OodPlan(method, fraction, train_images, y_train, val_images, held, eval_sets, float_scores)


def _float_feature_scores(
    source: SourceModel, train_images: np.ndarray, y_train: np.ndarray, val_images: np.ndarray
) -> np.ndarray:
    """The float Keras model's feature scores on val, fitted on its own float training features."""
    train = _float_outputs(source, train_images)
    spec = fit_feature_spec(train, y_train)
    return feature_scores(spec, layer_inputs(_float_outputs(source, val_images), spec))


def _float_outputs(source: SourceModel, images: np.ndarray) -> ModelOutputs:
    raw, features = source.predict_outputs(images.astype(np.float32) / np.float32(255.0))
    return ModelOutputs(probs=raw, logits=None, features=features, layers={k: k for k in features})


def run_target(
    ood_plan: OodPlan,
    target: str,
    path: Path,
    spec: InputSpec,
    outputs: Sequence[OutputSpec],
    kind: OutputKind,
    progress: bool = False,
) -> OodOutcome:
    """Fit, threshold and score one converted file, run as the device runs it."""
    from tqdm import tqdm

    sets: dict[str, Any] = {"train": ood_plan.train_images, "val": ood_plan.val_images}
    held_key = _held_key(ood_plan)
    if held_key != "val":  # never replace the val images the thresholds are chosen on
        sets[held_key] = ood_plan.held.images
    for eval_set in ood_plan.eval_sets:
        sets[eval_set.name] = eval_set.images
    results: dict[str, ModelOutputs] = {}
    with DeviceModel(path, spec, outputs) as model:
        for name, images in sets.items():
            with tqdm(total=len(images), desc=f"ood {target} {name}", disable=not progress, unit="img") as bar:
                results[name] = model.run(images, kind, bar)
    notes: list[str] = []
    failure: str | None = None
    try:
        fitted = fit_ood(
            results["train"],
            ood_plan.y_train,
            results["val"],
            ood_plan.method,
            ood_plan.fraction,
            reference_val_scores=ood_plan.float_val_scores,
        )
    except ConfigError as exc:  # DataError included: the scores, not the options, failed
        if ood_plan.method != "auto":
            raise  # asked for by name: say it failed rather than ship without it
        # By default, one file whose scores cannot be fitted (a float16 overflow, say) ships without the check,
        # said plainly, instead of the whole conversion being lost after every file was written.
        fitted, failure = None, str(exc)
    if failure is not None:
        notes.append(
            f"WARNING: no OOD statistics for {target} ({failure}); the device runs this file without the check and "
            "warns at start; convert it with --ood energy, or use another target"
        )
    elif fitted is None:
        notes.append(
            f"no OOD score for {target}: the model outputs probabilities and has no layer to read, so the device "
            "cannot flag images unlike the training images; convert the .keras model (its layers are read), or "
            "export the model without its softmax so that it outputs logits (energy score)"
        )
    elif (
        fitted.features is not None and ood_plan.float_val_scores is not None and fitted.feature_rank_agreement is None
    ):
        notes.append(
            f"WARNING: the {target} feature scores' rank agreement with the float model could not be measured (fewer "
            "than 2 val images, or constant scores); give the data a larger val split"
        )
    elif fitted.feature_rank_agreement is not None and fitted.feature_rank_agreement < MIN_RANK_AGREEMENT:
        notes.append(
            f"WARNING: the {target} feature scores rank the validation images unlike the float model's "
            f"(Spearman {fitted.feature_rank_agreement:.3f} < {MIN_RANK_AGREEMENT}); quantization changed the "
            "features: compare the float and int8 histograms, or ship --ood energy"
        )
    report_sets = [n for n in sets if n != "train"]
    scores = {n: method_scores(fitted, results[n]) for n in report_sets}
    baseline, _ = threshold_at(scores["val"]["max_softmax"], ood_plan.fraction)
    return OodOutcome(
        target=target,
        spec=fitted,
        scores=scores,
        sizes={n: len(sets[n]) for n in sets},
        baseline_threshold=baseline,
        held_split=held_key,
        eval_names=[s.name for s in ood_plan.eval_sets],
        notes=notes,
    )


def _held_key(ood_plan: OodPlan) -> str:
    """The report's name for the gate's held-out split: its own, unless it is a val split other than the one the
    thresholds are chosen on (``--evaluation`` data held out on val), which must not take that one's place."""
    held = ood_plan.held
    if held.split != "val":
        return str(held.split)
    same = held.images is ood_plan.val_images or (
        held.images.shape == ood_plan.val_images.shape and np.array_equal(held.images, ood_plan.val_images)
    )
    return "val" if same else "val (evaluation data)"


def with_ood(artifact: Artifact, spec: OodSpec | None) -> Artifact:
    """The artifact with its ``ood`` section (unchanged for None). Validated again, not copied: the artifact's
    checks hold its ood to the outputs it lists."""
    if spec is None:
        return artifact
    return Artifact.model_validate({**artifact.model_dump(), "ood": spec.model_dump()})
