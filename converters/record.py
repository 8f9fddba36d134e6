"""The manifest a conversion writes: one artifact entry per file, with its verdict and gate summary.

The manifest's format belongs to ``edgemed.manifest`` (the device reads it); this module only fills it in from
the typed outcomes. The gate summary sits in each artifact's free-form ``gate`` section, so a device running an
older edgemed still reads a manifest that carries newer numbers.
"""

from __future__ import annotations

import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from converters._tf import quiet_tensorflow
from converters.gate import GateResult
from converters.metrics import ModelSummary
from converters.outcome import EdgeTpuOutcome, FloatReference, Footprint, TargetOutcome, jsonable
from converters.samples import Calibration, HeldOut
from edgemed.manifest import Artifact, InputSpec, Manifest, Reference, Waiver, sha256_file


def now() -> str:
    """The current UTC time, to the second, as the manifest writes it."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def target_artifact(out: Path, outcome: TargetOutcome, waiver: Waiver | None) -> Artifact:
    """The manifest entry of one gated target (its file where it now lies: ``rejected/`` if rejected)."""
    path = outcome.path
    return Artifact(
        file=str(path.relative_to(out)),
        target=outcome.target,
        sha256=sha256_file(path),
        size_bytes=path.stat().st_size,
        input=outcome.input,
        output=outcome.output,
        output_kind=outcome.output_kind,
        verdict=outcome.verdict,
        failed_criteria=outcome.gate.failed,
        waiver=waiver if outcome.verdict == "waived" else None,
        gate=gate_summary(outcome.gate),
        outputs=list(outcome.outputs),
    )


def edgetpu_artifact(out: Path, compiled: Path, twin: Artifact) -> Artifact:
    """The manifest entry of the compiled Edge TPU file.

    It runs only with libedgetpu, so it cannot be gated on this host: it inherits the verdict of the int8 model it
    was compiled from (the TPU executes the same quantized arithmetic), and names that model as its CPU twin. It
    inherits its twin's ``outputs``, ``ood`` and ``cam`` too: the compiler keeps the output tensors' names and
    quantization, and the device may fall back to the twin, which must then be read by the same names.
    """
    return Artifact(
        file=str(compiled.relative_to(out)),
        target="edgetpu",
        sha256=sha256_file(compiled),
        size_bytes=compiled.stat().st_size,
        input=twin.input,
        output=twin.output,
        output_kind=twin.output_kind,
        verdict=twin.verdict,
        failed_criteria=list(twin.failed_criteria),
        waiver=twin.waiver,
        gate=twin.gate,
        twin=twin.file,
        outputs=list(twin.outputs),
        ood=twin.ood,
        cam=twin.cam,
    )


def gate_summary(gate: GateResult) -> dict[str, Any]:
    """The artifact's ``gate`` section: the decisive numbers, per-class sensitivity and the clinical floors."""
    summary: dict[str, Any] = {
        "agreement": gate.agreement,
        "agreement_ci": gate.agreement_ci,
        "accuracy_drop": gate.accuracy_drop,
        "accuracy_drop_ci": gate.accuracy_drop_ci,
        "auc_drop": gate.auc_drop,
        "auc_drop_ci": gate.auc_drop_ci,
        "ece_increase": gate.ece_increase,
        "size_bytes": gate.size_bytes,
        "latency_ms": gate.latency_ms,
        "thresholds": gate.config.model_dump(),
        "quantized": headline(gate.quantized),
        "sensitivity": {rates.label: rates.sensitivity for rates in gate.quantized.per_class},
        # Free-form inside `gate`, so that a device running an older edgemed still reads the manifest.
        "floors": gate.floors.record(),
        "clinically_weak": list(gate.weak),
    }
    return dict(jsonable(summary))


def headline(summary: ModelSummary) -> dict[str, Any]:
    """The six numbers the manifest keeps of a model's summary."""
    return {
        "accuracy": summary.accuracy,
        "accuracy_ci": summary.accuracy_ci,
        "balanced_accuracy": summary.balanced_accuracy,
        "roc_auc": summary.roc_auc,
        "roc_auc_ci": summary.roc_auc_ci,
        "ece": summary.ece,
    }


def drift_reference(outcomes: list[TargetOutcome], held: HeldOut, labels: list[str]) -> Reference | None:
    """The manifest's ``reference``: the class mix and mean confidence of the shipped model's top-1 predictions
    on the held-out split, from the probabilities the gate already computed (the model is not run again).

    The int8 file is the one a CPU device runs and the Edge TPU build's twin, so its predictions are the
    reference when it was converted; otherwise the first converted target's.

    Args:
        outcomes: the gated targets, in the order converted.
        held: the held-out split they were evaluated on.
        labels: class names, in output order.

    Returns:
        The reference, or None when nothing was converted or the split is empty.
    """
    chosen = next((o for o in outcomes if o.target == "int8"), outcomes[0] if outcomes else None)
    if chosen is None or len(chosen.probs) == 0:
        return None
    probs = np.asarray(chosen.probs, dtype=np.float64)
    counts = np.bincount(probs.argmax(axis=1), minlength=len(labels))
    n = int(counts.sum())
    return Reference(
        n=n,
        class_mix={label: int(c) / n for label, c in zip(labels, counts, strict=True)},
        mean_confidence=float(np.clip(probs.max(axis=1).mean(), 0.0, 1.0)),
        split=held.split,
        target=chosen.target,
    )


def build_manifest(
    out: Path,
    name: str,
    labels: list[str],
    spec: InputSpec,
    artifacts: list[Artifact],
    calib: Calibration,
    held: HeldOut,
    reference: FloatReference,
    baseline: Footprint,
    edgetpu: EdgeTpuOutcome | None,
    drift: Reference | None = None,
) -> Manifest:
    """The manifest: labels, input, every artifact, versions, calibration and evaluation fingerprints, metrics,
    and the drift ``reference`` (see :func:`drift_reference`)."""
    quiet_tensorflow()
    import keras
    import tensorflow as tf

    import edgemed

    counts = [int(c) for c in np.bincount(held.labels, minlength=len(labels))]
    metrics: dict[str, Any] = {
        "float": headline(reference.summary),
        "float_tflite_size_bytes": baseline.size_bytes,
        "float_tflite_latency_ms": baseline.latency_ms,
    }
    if edgetpu is not None:
        metrics["edgetpu"] = edgetpu.record(out)
    return Manifest(
        name=name,
        created_at=now(),
        labels=labels,
        input=spec,
        artifacts=artifacts,
        versions={
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "edgemed": edgemed.__version__,
            "python": platform.python_version(),
        },
        calibration={"split": "train", "count_per_class": calib.count_per_class, "sha256": calib.sha256},
        evaluation={"split": held.split, "count_per_class": counts, "sha256": held.sha256},
        metrics=jsonable(metrics),
        reference=drift,
    )
