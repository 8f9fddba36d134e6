"""The acceptance gate: does a converted model behave like the float model it came from?

Both models are run on the same held-out images (the float Keras model in TensorFlow, the converted file through
the device's own inference code: ``converters.runner``). The gate compares them and fails the converted model
when any criterion fails:

============================  ==========  ====================================================================
criterion                     default     why
============================  ==========  ====================================================================
accuracy drop                 <= 0.01     a point of accuracy is the most a triage model may lose silently
ROC AUC drop                  <= 0.005    ranking is what a threshold is tuned on; tied int8 scores erode it
per-class sensitivity drop    <= max(0.02, 1 case)  a missed malignancy is the costly error, per class
top-1 agreement               >= 0.98     the converted model must make the float model's decisions
ECE increase                  <= 0.03     confidence shown to a clinician must stay as honest as before
evaluation images per class   >= 20       below that the numbers above are too noisy to prove anything
size / latency                optional    set ``max_size_bytes`` / ``max_latency_ms`` for a device budget
============================  ==========  ====================================================================

A faithful conversion of a weak model is still a weak model, so the converted model is also held to absolute
**clinical floors**, per class:

============================  ==========  ====================================================================
floor                         default     why
============================  ==========  ====================================================================
sensitivity of every class    >= 0.50     below it the model misses more cases of the class than it finds: a
                                          coin flip finds half
one-vs-rest ROC AUC           >= 0.70     below it discrimination is poor by the common rule of thumb (0.5 is
                                          none, 0.7-0.8 acceptable, 0.8-0.9 excellent; Hosmer and Lemeshow)
============================  ==========  ====================================================================

These defaults were fixed from those two arguments alone, not tuned on any dataset or test split: they only stop
"accepted" from reading as "good", and are no clinical validation. Set the floors your clinical use needs in the
gate YAML (``min_sensitivity``, ``min_auc``, and ``class_floors: {melanoma: {min_sensitivity: 0.9}}``). By
default a model under a floor stays accepted as a *faithful conversion, clinically weak*, with one warning per
failing class on the console, in the report and in the manifest (``gate.clinically_weak``); with
``require_floors: true`` (``--require-floors``) it is rejected. A floor that cannot be checked (a class with no
evaluation images has no sensitivity; an evaluation set without that class, or of nothing else, has no AUC for
it) is treated the same way: never passed silently, a warning by default and a rejection with the floors required.

Thresholds come from :class:`GateConfig` (defaults above), a YAML/JSON file (``--gate-config``), or single
command-line flags. Point estimates decide; Wilson and bootstrap 95% intervals are reported beside them so a
reviewer can see how much a small evaluation set can prove.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import Field, ValidationError

from converters import metrics as M
from converters.metrics import ClassRates, ModelSummary, summarise
from edgemed.errors import ConfigError
from edgemed.validation import StrictModel, describe, describe_yaml_error

DEFAULT_MIN_SENSITIVITY = 0.50
DEFAULT_MIN_AUC = 0.70


class ClassFloor(StrictModel):
    """Clinical floors for one class, overriding the gate's floors for every class."""

    min_sensitivity: float | None = Field(None, ge=0.0, le=1.0, description="smallest sensitivity of this class")
    min_auc: float | None = Field(None, ge=0.0, le=1.0, description="smallest one-vs-rest ROC AUC of this class")


class GateConfig(StrictModel):
    """Acceptance thresholds; every field has a safe default."""

    max_accuracy_drop: float = Field(0.01, ge=0.0, description="float accuracy minus quantized accuracy")
    max_auc_drop: float = Field(0.005, ge=0.0, description="float ROC AUC minus quantized ROC AUC")
    max_sensitivity_drop: float = Field(0.02, ge=0.0, description="per-class sensitivity loss (fraction)")
    max_sensitivity_drop_cases: int = Field(1, ge=0, description="...or this many cases, whichever is larger")
    min_agreement: float = Field(0.98, ge=0.0, le=1.0, description="share of images with the same top-1 class")
    max_ece_increase: float = Field(0.03, ge=0.0, description="quantized ECE minus float ECE")
    min_eval_per_class: int = Field(20, ge=1, description="minimum evaluation images of every class")
    max_size_bytes: int | None = Field(None, gt=0, description="largest acceptable model file, bytes")
    max_latency_ms: float | None = Field(None, gt=0, description="largest acceptable median CPU latency, ms")
    min_sensitivity: float = Field(
        DEFAULT_MIN_SENSITIVITY, ge=0.0, le=1.0, description="clinical floor: every class's sensitivity"
    )
    min_auc: float = Field(DEFAULT_MIN_AUC, ge=0.0, le=1.0, description="clinical floor: every class's ROC AUC")
    class_floors: dict[str, ClassFloor] = Field(
        default_factory=dict, description="per-class floors by label, e.g. {melanoma: {min_sensitivity: 0.9}}"
    )
    require_floors: bool = Field(False, description="reject (not only warn about) a model under a clinical floor")


def load_gate_config(path: str | Path | None = None, **overrides: Any) -> GateConfig:
    """Build gate thresholds from defaults, an optional YAML/JSON file, then explicit overrides.

    Args:
        path: a ``.yaml``/``.yml``/``.json`` file with any GateConfig fields.
        overrides: field values from the command line; ``None`` values are ignored.

    Raises:
        ConfigError: unreadable file, unknown field, or a value out of range.
    """
    values: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
            raw = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"gate config {path} is not valid YAML: {describe_yaml_error(exc)}") from exc
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read gate config {path} ({exc})") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"gate config {path} must be a mapping, e.g. 'max_accuracy_drop: 0.01'")
        values.update(raw)
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return GateConfig.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(
            f"gate setting {describe(exc, GateConfig, limit=1)} (source: {path or 'command line'})"
        ) from exc


@dataclass(frozen=True)
class ClassFloorCheck:
    """One class of the converted model held to its clinical floors."""

    n: int
    true_positives: int
    sensitivity: float
    min_sensitivity: float
    roc_auc: float  # one-vs-rest; NaN when the class is absent
    min_auc: float

    @property
    def under_sensitivity(self) -> bool:
        """The class has images and the model finds fewer of them than the floor asks."""
        return bool(self.n) and self.sensitivity < self.min_sensitivity

    @property
    def under_auc(self) -> bool:
        """The class's one-vs-rest AUC is defined and under its floor."""
        return not math.isnan(self.roc_auc) and self.roc_auc < self.min_auc

    @property
    def sensitivity_unchecked(self) -> bool:
        """No evaluation image of the class: its sensitivity, and so its floor, is undefined."""
        return not self.n or math.isnan(self.sensitivity)

    @property
    def auc_unchecked(self) -> bool:
        """The evaluation images lack the class or everything else: its one-vs-rest AUC is undefined."""
        return math.isnan(self.roc_auc)


@dataclass(frozen=True)
class Floors:
    """The clinical floors, class by class, and whether missing one rejects the model."""

    require: bool
    classes: dict[str, ClassFloorCheck]

    def record(self) -> dict[str, Any]:
        """The JSON form (``gate.floors`` in the manifest, ``numbers.floors`` in report.json)."""
        return {"require": self.require, "classes": {label: asdict(row) for label, row in self.classes.items()}}


@dataclass(frozen=True)
class GateResult:
    """The gate's decision for one converted model, and every number it was made on.

    Attributes:
        failed: one sentence per failed criterion, with the measured number and the threshold.
        weak: one sentence per clinical floor the converted model is under (also in ``failed`` when the
            floors are required).
        reference, quantized: the float and the converted model on the same images.
        agreement: share of images on which both models name the same class.
        accuracy_drop, auc_drop: float minus converted; ``*_ci`` are paired bootstrap 95% intervals.
        ece_increase: converted minus float expected calibration error.
        size_bytes, latency_ms: what was checked against the size and latency budgets (None: not given).
        config: the thresholds applied.
        floors: the clinical floors, per class.
    """

    failed: list[str]
    weak: list[str]
    reference: ModelSummary
    quantized: ModelSummary
    agreement: float
    agreement_ci: tuple[float, float]
    accuracy_drop: float
    accuracy_drop_ci: tuple[float, float]
    auc_drop: float
    auc_drop_ci: tuple[float, float]
    ece_increase: float
    size_bytes: int | None
    latency_ms: float | None
    config: GateConfig
    floors: Floors

    @property
    def passed(self) -> bool:
        """Every criterion held."""
        return not self.failed

    @property
    def numbers(self) -> dict[str, Any]:
        """Every measured value (float and quantized side by side) with intervals: ``report.json``'s form."""
        return {
            "float": self.reference.record(),
            "quantized": self.quantized.record(),
            "agreement": self.agreement,
            "agreement_ci": self.agreement_ci,
            "accuracy_drop": self.accuracy_drop,
            "accuracy_drop_ci": self.accuracy_drop_ci,
            "auc_drop": self.auc_drop,
            "auc_drop_ci": self.auc_drop_ci,
            "ece_increase": self.ece_increase,
            "size_bytes": self.size_bytes,
            "latency_ms": self.latency_ms,
            "thresholds": self.config.model_dump(),
            "floors": self.floors.record(),
        }


def evaluate_gate(
    y: np.ndarray,
    float_probs: np.ndarray,
    quant_probs: np.ndarray,
    labels: list[str],
    config: GateConfig,
    size_bytes: int | None = None,
    latency_ms: float | None = None,
) -> GateResult:
    """Compare a converted model's probabilities with the float model's on the same images.

    Args:
        y: true labels ``(N,)``.
        float_probs: the float model's probabilities ``(N, K)``.
        quant_probs: the converted model's probabilities ``(N, K)`` (softmax already applied to logits).
        labels: class names, for the failure messages.
        config: thresholds.
        size_bytes: the converted file's size, checked against ``max_size_bytes`` when set.
        latency_ms: its median CPU latency, checked against ``max_latency_ms`` when set.

    Returns:
        The decision, the failed criteria in words, the clinical floors missed, and every number.

    Raises:
        ConfigError: ``class_floors`` names a class the model does not have.
    """
    ref, qnt = summarise(y, float_probs, labels), summarise(y, quant_probs, labels)
    n = len(y)
    agree = int((float_probs.argmax(1) == quant_probs.argmax(1)).sum())

    def paired(stat: Any) -> tuple[float, float]:
        return M.bootstrap_ci(lambda i: stat(y[i], float_probs[i]) - stat(y[i], quant_probs[i]), n)

    weak, floors = clinical_floors(y, quant_probs, qnt.per_class, labels, config)
    measured = GateResult(
        failed=[],  # decided below, from these numbers
        weak=weak,
        reference=ref,
        quantized=qnt,
        agreement=agree / n,
        agreement_ci=M.wilson(agree, n),
        accuracy_drop=ref.accuracy - qnt.accuracy,
        accuracy_drop_ci=paired(lambda yy, pp: float((pp.argmax(1) == yy).mean())),
        auc_drop=ref.roc_auc - qnt.roc_auc,
        auc_drop_ci=paired(M.roc_auc),
        ece_increase=qnt.ece - ref.ece,
        size_bytes=size_bytes,
        latency_ms=latency_ms,
        config=config,
        floors=floors,
    )
    failed = _failed_criteria(measured, y, agree, labels)
    if config.require_floors:
        failed.extend(f"clinical floor: {w}" for w in weak)
    return replace(measured, failed=failed)


def _failed_criteria(g: GateResult, y: np.ndarray, agree: int, labels: list[str]) -> list[str]:
    """One sentence per criterion the converted model fails, in the order of the table above."""
    config, ref, qnt, n = g.config, g.reference, g.quantized, len(y)
    failed: list[str] = []
    for k, c in enumerate(np.bincount(y, minlength=len(labels))):
        if c < config.min_eval_per_class:
            failed.append(
                f"evaluation size: class {labels[k]!r} has {c} images, need >= "
                f"{config.min_eval_per_class} to judge the conversion"
            )
    if g.accuracy_drop > config.max_accuracy_drop + 1e-12:
        failed.append(
            f"accuracy drop {g.accuracy_drop:.4f} ({ref.accuracy:.4f} -> {qnt.accuracy:.4f}) "
            f"> {config.max_accuracy_drop}"
        )
    if math.isnan(g.auc_drop) or g.auc_drop > config.max_auc_drop + 1e-12:
        failed.append(f"ROC AUC drop {g.auc_drop:.4f} ({ref.roc_auc:.4f} -> {qnt.roc_auc:.4f}) > {config.max_auc_drop}")
    for fr, qr in zip(ref.per_class, qnt.per_class, strict=True):
        if not fr.n:
            continue
        allowed = max(config.max_sensitivity_drop, config.max_sensitivity_drop_cases / fr.n)
        drop = fr.sensitivity - qr.sensitivity
        if drop > allowed + 1e-12:
            failed.append(
                f"sensitivity of {fr.label!r} dropped {drop:.4f} ({fr.sensitivity:.4f} -> "
                f"{qr.sensitivity:.4f}, {fr.true_positives} -> {qr.true_positives} of {fr.n}) > {allowed:.4f}"
            )
    if agree / n < config.min_agreement:
        failed.append(f"top-1 agreement {agree / n:.4f} ({agree}/{n}) < {config.min_agreement}")
    if g.ece_increase > config.max_ece_increase:
        failed.append(
            f"calibration error rose {g.ece_increase:.4f} ({ref.ece:.4f} -> {qnt.ece:.4f}) > {config.max_ece_increase}"
        )
    if config.max_size_bytes is not None and g.size_bytes is not None and g.size_bytes > config.max_size_bytes:
        failed.append(f"size {g.size_bytes} bytes > {config.max_size_bytes}")
    if config.max_latency_ms is not None and g.latency_ms is not None and g.latency_ms > config.max_latency_ms:
        failed.append(f"median CPU latency {g.latency_ms:.3f} ms > {config.max_latency_ms} ms")
    return failed


def clinical_floors(
    y: np.ndarray, probs: np.ndarray, per_class: list[ClassRates], labels: list[str], config: GateConfig
) -> tuple[list[str], Floors]:
    """Hold the converted model to the absolute per-class floors.

    Args:
        y: true labels.
        probs: the converted model's probabilities.
        per_class: its per-class rates (from :func:`converters.metrics.summarise`).
        labels: class names.
        config: the floors.

    Returns:
        One sentence per floor missed, and per class the floors and measured values.

    Raises:
        ConfigError: ``class_floors`` names a class the model does not have.
    """
    unknown = sorted(set(config.class_floors) - set(labels))
    if unknown:
        raise ConfigError(
            f"gate setting class_floors names {', '.join(unknown)}, which the model does not have "
            f"(its classes: {', '.join(labels)})"
        )
    table: dict[str, ClassFloorCheck] = {}
    for k, rates in enumerate(per_class):
        own = config.class_floors.get(labels[k], ClassFloor())
        table[labels[k]] = ClassFloorCheck(
            n=rates.n,
            true_positives=rates.true_positives,
            sensitivity=rates.sensitivity,
            min_sensitivity=config.min_sensitivity if own.min_sensitivity is None else own.min_sensitivity,
            roc_auc=M.binary_auc((y == k).astype(int), probs[:, k]),
            min_auc=config.min_auc if own.min_auc is None else own.min_auc,
        )
    weak: list[str] = []
    for label, row in table.items():
        if row.sensitivity_unchecked:
            weak.append(
                f"sensitivity of {label!r}: floor {row.min_sensitivity:.2f} cannot be checked (no evaluation images "
                "of this class); evaluate on images of every class"
            )
        elif row.under_sensitivity:
            weak.append(
                f"sensitivity of {label!r} {_versus(row.sensitivity, row.min_sensitivity)} "
                f"({row.true_positives} of {row.n})"
            )
    rows = list(table.items())
    if len(rows) == 2 and rows[0][1].min_auc == rows[1][1].min_auc:
        rows = [("", rows[1][1])]  # two classes have one AUC between them: say it once
    for label, row in rows:
        who = f"ROC AUC of {label!r} (one-vs-rest)" if label else "ROC AUC"
        if row.auc_unchecked:
            lacking = "this class or every other" if label else "one of the two classes"
            weak.append(
                f"{who}: floor {row.min_auc:.2f} cannot be checked (the evaluation images lack {lacking}); "
                "evaluate on images of every class"
            )
        elif row.under_auc:
            weak.append(f"{who} {_versus(row.roc_auc, row.min_auc)}")
    return weak, Floors(require=config.require_floors, classes=table)


def _versus(value: float, floor: float) -> str:
    """``value < floor`` with as many digits as it takes for the two printed numbers to differ."""
    for digits in range(2, 9):
        if round(value, digits) != round(floor, digits):
            return f"{value:.{digits}f} < floor {floor:.{digits}f}"
    return f"{value!r} < floor {floor!r}"
