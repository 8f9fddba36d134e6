"""Convert a trained Keras model to TFLite for the device, gate every artifact, write manifest and report.

Targets: ``int8`` (full integer, int8 input and output: CPU/XNNPACK), ``uint8`` (full integer with uint8
input and output, what Coral's examples expect), ``float16`` (float16 weights, float I/O: GPU delegates),
``dynamic`` (int8 weights, float activations) and ``edgetpu`` (the int8 model compiled by
``edgetpu_compiler``).

Integer targets are calibrated on the user's own *training* images: class-balanced, seeded, and never fewer
than a minimum per class (too few is an error, not a warning), because a range estimated on someone else's
images or on a handful of one class is how an int8 model ends up predicting one class.

**Logits, not probabilities, by default.** The device graph's final softmax is removed, so the quantized
model outputs logits and the device applies the softmax in float (``output_kind: "logits"`` in the
manifest). An int8 softmax output can only say 0, 1/256, 2/256, ...: confident images pile up on the same
few values and their ranking is lost. Measured with this converter (``benchmarks/bench_accuracy.py``, reference
CNN, seeds 0/1/2, test split, same trained models converted both ways):

==============  ==============  ===============  ================  =======================
dataset         float AUC       int8 logits AUC  int8 softmax AUC  softmax top-1 agreement
==============  ==============  ===============  ================  =======================
PneumoniaMNIST  .949/.948/.948  .949/.948/.948   .937/.926/.936    1.000/.997/.998
BreastMNIST     .901/.867/.852  .902/.868/.853   .903/.868/.853    1.000/1.000/.994
==============  ==============  ===============  ================  =======================

On PneumoniaMNIST, where the model is confident, the int8 softmax lost 0.012-0.022 AUC (over the gate's 0.005)
while agreeing on top-1 for >= 99.7% of images; logits lost nothing (<= 0.0005). On BreastMNIST the float
model is less confident and neither output lost AUC. ``output="probabilities"`` keeps the softmax in the
model for runtimes that cannot apply it; the gate then catches the loss where it happens."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import platform
import shutil
import warnings
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from converters import edgetpu
from converters._tf import quiet_tensorflow, tensorflow_quiet
from converters.data import Dataset
from converters.fit import Expectation, expectation, fit_to_model, read_training_record
from converters.gate import GateConfig, GateResult, evaluate_gate, summarise
from converters.source import SourceModel, load_source
from edgemed.errors import ConfigError, DataError, ModelError
from edgemed.inference.backends import graph_output_kind
from edgemed.manifest import Artifact, InputSpec, Manifest, Normalisation, Waiver, save_manifest, sha256_file

TARGETS = ("int8", "uint8", "float16", "dynamic", "edgetpu")
DEFAULT_CALIBRATION_PER_CLASS = 100
MIN_CALIBRATION_PER_CLASS = 10
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@dataclass
class ConvertResult:
    """What :func:`convert` wrote and decided.

    Attributes:
        manifest_path: the one ``{name}.manifest.json``.
        report_json: ``report.json`` (every number).
        report_html: ``report.html`` (tables and plots for a reviewer).
        artifacts: target -> file path (inside ``rejected/`` when the gate rejected it).
        verdicts: target -> ``accepted``, ``rejected``, ``waived`` or ``not_evaluated``.
        failed: target -> failed criteria in words.
        weak: target -> clinical floors the model is under, in words (accepted anyway unless floors are
            required: "faithful conversion, clinically weak").
        float_summary: the float model's numbers on the evaluation split.
        notes: things the user must know (e.g. the Edge TPU compiler was not found).
    """

    manifest_path: Path
    report_json: Path
    report_html: Path
    artifacts: dict[str, Path]
    verdicts: dict[str, str]
    failed: dict[str, list[str]]
    float_summary: dict[str, Any]
    gates: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    weak: dict[str, list[str]] = field(default_factory=dict)

    @property
    def rejected(self) -> bool:
        """True when any artifact was rejected without a waiver."""
        return any(v == "rejected" for v in self.verdicts.values())


@dataclass
class Calibration:
    """The calibration images actually used, and their fingerprint."""

    images: np.ndarray
    labels: np.ndarray
    count_per_class: list[int]
    sha256: str


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
        sha256=_fingerprint(images, labels),
    )


def _fingerprint(images: np.ndarray, labels: np.ndarray) -> str:
    digest = hashlib.sha256(np.ascontiguousarray(images).tobytes())
    digest.update(np.ascontiguousarray(labels.astype(np.int64)).tobytes())
    return digest.hexdigest()


def convert(
    model_path: str | Path,
    calibration: Dataset,
    out_dir: str | Path,
    targets: tuple[str, ...] | list[str] = ("int8",),
    name: str | None = None,
    eval_split: str | None = None,
    gate: GateConfig | None = None,
    waiver: tuple[str, str] | None = None,
    output: str = "logits",
    evaluation: Dataset | None = None,
    calibration_per_class: int = DEFAULT_CALIBRATION_PER_CLASS,
    min_calibration_per_class: int = MIN_CALIBRATION_PER_CLASS,
    seed: int = 0,
    progress: bool = True,
) -> ConvertResult:
    """Convert, gate, and record a model.

    Args:
        model_path: ``.keras``/``.h5`` file or SavedModel folder.
        calibration: the user's dataset; its ``train`` split calibrates integer targets.
        out_dir: where ``{name}_{target}.tflite``, ``{name}.manifest.json`` and the report go.
        targets: any of ``int8 uint8 float16 dynamic edgetpu``.
        name: file stem; default the model file's stem.
        eval_split: held-out split for the gate; default ``test`` if present, else ``val``.
        gate: thresholds; default :class:`GateConfig()`.
        waiver: ``(by, reason)`` to ship a rejected model anyway, recorded in the manifest.
        output: ``logits`` (default, softmax on the device) or ``probabilities``.
        evaluation: dataset for the gate when it differs from ``calibration`` (same classes and image size).
        calibration_per_class: calibration images per class (fewer if a class is smaller).
        min_calibration_per_class: below this many training images of any class, refuse.
        seed: seeds the calibration draw and the bootstrap.
        progress: show tqdm progress bars.

    Returns:
        Paths, verdicts and numbers; ``result.rejected`` tells whether to exit 3.

    Raises:
        ConfigError: unknown target or option. DataError: unusable calibration or evaluation data, or data
            that does not fit the model (other classes, class count, size or colour; see ``converters.fit``).
        ModelError: the model cannot be loaded or converted.
    """
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise ConfigError(f"unknown target(s) {unknown}; choose from {', '.join(TARGETS)}, e.g. --target int8")
    if output not in ("logits", "probabilities"):
        raise ConfigError(f"output {output!r}: use 'logits' or 'probabilities'")
    gate = gate or GateConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = load_source(model_path, strip_softmax=output == "logits")
    name = name or Path(model_path).stem
    exp = model_expectation(Path(model_path), source)
    # A Dataset given here was sized by its caller (load_dataset's image_size): only the command line, which
    # knows whether the user asked for that, also compares the size the data was stored at.
    calibration = fit_to_model(calibration, exp, "calibration", resized_on_purpose=True)
    evaluation = fit_to_model(evaluation, exp, "evaluation", resized_on_purpose=True) if evaluation else calibration
    labels, spec = list(calibration.labels), calibration.input_spec()
    split = _eval_split(evaluation, eval_split)
    x_eval, y_eval = evaluation.splits[split]
    calib = calibration_sample(calibration, calibration_per_class, min_calibration_per_class, seed)
    float_probs = _probabilities(source.predict_float(x_eval.astype(np.float32) / np.float32(255.0)))
    float_summary = summarise(y_eval, float_probs, labels)

    wanted = list(dict.fromkeys(t for t in targets if t != "edgetpu"))
    if "edgetpu" in targets and "int8" not in wanted:
        wanted.insert(0, "int8")  # the Edge TPU model's CPU twin, and what the compiler compiles
    baseline = to_tflite(source, "float32", calib)
    from converters.runner import load_interpreter, median_latency_ms

    norm = Normalisation()
    baseline_latency = median_latency_ms(load_interpreter(baseline), x_eval[0], norm)
    entries: list[dict[str, Any]] = []
    for target in wanted:
        entries.append(
            _convert_one(
                source,
                target,
                calib,
                out / f"{name}_{target}.tflite",
                x_eval,
                y_eval,
                float_probs,
                labels,
                gate,
                norm,
                progress,
            )
        )
    notes: list[str] = []
    edgetpu_info: dict[str, Any] | None = None
    if "edgetpu" in targets:
        edgetpu_info, note = _edgetpu(out, name, entries)
        notes.extend(note)
    waiver_rec = Waiver(by=waiver[0], reason=waiver[1], at=_now()) if waiver else None
    artifacts = [_finalise(out, e, waiver_rec) for e in entries]
    if "edgetpu" in targets and any(a.target == "int8" and a.verdict == "rejected" for a in artifacts):
        notes.append("the int8 model (the Edge TPU build's CPU twin) was rejected by the gate: neither can ship")
    if edgetpu_info and edgetpu_info.get("artifact"):
        twin = next(a for a in artifacts if a.target == "int8")
        artifacts.append(_edgetpu_artifact(out, edgetpu_info, twin))
    manifest = _manifest(
        name,
        labels,
        spec,
        artifacts,
        calib,
        evaluation,
        split,
        x_eval,
        y_eval,
        float_summary,
        baseline,
        baseline_latency,
        edgetpu_info,
    )
    manifest_path = out / f"{name}.manifest.json"
    save_manifest(manifest, manifest_path)
    from converters.report import write_reports

    report_json, report_html = write_reports(
        out,
        manifest,
        entries,
        float_summary,
        baseline,
        baseline_latency,
        edgetpu_info,
        notes,
        y_eval,
        float_probs,
    )
    return ConvertResult(
        manifest_path=manifest_path,
        report_json=report_json,
        report_html=report_html,
        artifacts={a.target: out / a.file for a in artifacts},
        verdicts={a.target: a.verdict for a in artifacts},
        failed={a.target: list(a.failed_criteria) for a in artifacts},
        float_summary=float_summary,
        gates={e["target"]: e["gate"].numbers for e in entries},
        notes=notes,
        weak={a.target: a.clinically_weak for a in artifacts},
    )


def model_expectation(model_path: Path, source: SourceModel) -> Expectation:
    """What data for this model must look like: its training record, with the loaded model's own input shape
    and number of outputs (the model is the truth where a stale record disagrees)."""
    exp = expectation(model_path, read_training_record(model_path))
    return replace(exp, shape=tuple(source.input_shape), classes=source.num_outputs)


def _eval_split(data: Dataset, requested: str | None) -> str:
    if requested is not None:
        if requested == "train":
            raise ConfigError("--eval-split train would judge the model on its own calibration images; use test or val")
        if requested not in data.splits:
            raise DataError(data.source, f"no {requested!r} split (has: {', '.join(data.splits)})")
        return requested
    for candidate in ("test", "val"):
        if candidate in data.splits:
            return candidate
    raise DataError(data.source, "no held-out split (test or val) to gate the conversion on; add one")


def _probabilities(raw: np.ndarray) -> np.ndarray:
    if np.allclose(raw.sum(axis=1), 1.0, atol=1e-3) and (raw >= 0).all():
        return raw
    from edgemed.preprocess import softmax

    return softmax(raw)


def to_tflite(source: SourceModel, target: str, calib: Calibration, progress: bool = False) -> bytes:
    """Convert the device graph to one target's TFLite bytes (``float32`` is the size/latency baseline).

    Raises:
        ModelError: the TFLite converter failed (its message is included).
    """
    quiet_tensorflow()
    import tensorflow as tf
    from tensorflow.lite.python.convert_phase import ConverterError

    conv = source.make_converter()
    if target in ("int8", "uint8"):
        images = calib.images.astype(np.float32) / np.float32(255.0)

        def representative() -> Any:
            from tqdm import tqdm

            for image in tqdm(images, desc=f"calibrate {target}", disable=not progress, unit="img"):
                yield [image[None, ...]]

        io_type = tf.int8 if target == "int8" else tf.uint8
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = representative
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv.inference_input_type = io_type
        conv.inference_output_type = io_type
    elif target == "float16":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.target_spec.supported_types = [tf.float16]
    elif target == "dynamic":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
    try:
        # TensorFlow prints the temporary SavedModel's signature to stdout; keep our own output readable.
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            # Quantization here is calibrated by the representative dataset; the converter still warns that the
            # legacy quantized_input_stats were not given, which would send a user looking for a missing step.
            warnings.filterwarnings("ignore", message="Statistics for quantized inputs were expected")
            with tensorflow_quiet():  # the quantizer's "fully_quantize: ..." line, LiteRT's XNNPACK notice
                return bytes(conv.convert())
    except (ConverterError, ValueError, RuntimeError) as exc:
        raise ModelError(f"TFLite conversion to {target} failed: {exc}") from exc


def _convert_one(
    source: SourceModel,
    target: str,
    calib: Calibration,
    path: Path,
    x_eval: np.ndarray,
    y_eval: np.ndarray,
    float_probs: np.ndarray,
    labels: list[str],
    gate: GateConfig,
    norm: Normalisation,
    progress: bool,
) -> dict[str, Any]:
    from tqdm import tqdm

    from converters.runner import io_specs, load_interpreter, median_latency_ms, predict, quant_spec

    content = to_tflite(source, target, calib, progress)
    path.write_bytes(content)
    interp = load_interpreter(str(path))
    in_spec, out_spec = io_specs(interp)
    # The converted graph's own output op decides (the device checks the same at load); the source model's kind
    # is the fallback for a graph that cannot tell, and an unknown kind is taken as logits.
    kind = graph_output_kind(interp) or (source.output_kind if source.output_kind != "unknown" else "logits")
    with tqdm(total=len(x_eval), desc=f"evaluate {target}", disable=not progress, unit="img") as bar:
        probs = predict(interp, x_eval, kind, norm, bar)
    latency = median_latency_ms(interp, x_eval[0], norm)
    result: GateResult = evaluate_gate(y_eval, float_probs, probs, labels, gate, len(content), latency)
    return {
        "target": target,
        "path": path,
        "input": quant_spec(in_spec),
        "output": quant_spec(out_spec),
        "output_kind": kind,
        "gate": result,
        "probs": probs,
        "size_bytes": len(content),
        "latency_ms": latency,
    }


def _finalise(out: Path, entry: dict[str, Any], waiver: Waiver | None) -> Artifact:
    """Decide the verdict; a rejected file without a waiver moves to ``rejected/`` so nobody ships it."""
    result: GateResult = entry["gate"]
    path: Path = entry["path"]
    verdict = "accepted" if result.passed else ("waived" if waiver else "rejected")
    if verdict == "rejected":
        (out / "rejected").mkdir(exist_ok=True)
        moved = out / "rejected" / path.name
        shutil.move(str(path), moved)
        path = moved
    entry["path"], entry["verdict"] = path, verdict
    return Artifact(
        file=str(path.relative_to(out)),
        target=entry["target"],
        sha256=sha256_file(path),
        size_bytes=path.stat().st_size,
        input=entry["input"],
        output=entry["output"],
        output_kind=entry["output_kind"],
        verdict=verdict,
        failed_criteria=result.failed,
        waiver=waiver if verdict == "waived" else None,
        gate=_gate_summary(result),
    )


def _gate_summary(result: GateResult) -> dict[str, Any]:
    n = result.numbers
    keep = (
        "agreement",
        "agreement_ci",
        "accuracy_drop",
        "accuracy_drop_ci",
        "auc_drop",
        "auc_drop_ci",
        "ece_increase",
        "size_bytes",
        "latency_ms",
        "thresholds",
    )
    summary = {k: n[k] for k in keep}
    q = n["quantized"]
    summary["quantized"] = {
        k: q[k] for k in ("accuracy", "accuracy_ci", "balanced_accuracy", "roc_auc", "roc_auc_ci", "ece")
    }
    summary["sensitivity"] = {r["label"]: r["sensitivity"] for r in q["per_class"]}
    # Free-form inside `gate`, so that a device running an older edgemed still reads the manifest.
    summary["floors"] = n["floors"]
    summary["clinically_weak"] = list(result.weak)
    return dict(jsonable(summary))


def _edgetpu(out: Path, name: str, entries: list[dict[str, Any]]) -> tuple[dict[str, Any], list[str]]:
    twin = next(e for e in entries if e["target"] == "int8")
    compat = edgetpu.check_compatibility(twin["path"])
    info: dict[str, Any] = {
        "compatible": compat.compatible,
        "problems": compat.problems,
        "ops": compat.ops,
        "twin": twin["path"].name,
    }
    notes: list[str] = []
    if not compat.compatible:
        notes.append("Edge TPU check: " + "; ".join(compat.problems))
    compiled = edgetpu.run_compiler(twin["path"], out)
    if compiled is None:
        info["compiler"] = None
        notes.append(
            f"edgetpu_compiler is not on PATH (Coral's apt package, x86-64 Linux): no {name}_edgetpu"
            f".tflite was made; the device falls back to the CPU int8 model {twin['path'].name}"
        )
        return info, notes
    info["compiler"] = {
        "ok": compiled.ok,
        "version": compiled.version,
        "ops_on_tpu": compiled.ops_on_tpu,
        "ops_on_cpu": compiled.ops_on_cpu,
        "total_ops": compiled.total_ops,
        "table": [list(r) for r in compiled.table],
        "log": compiled.log_path.name,
    }
    if not compiled.ok or compiled.model_path is None:
        notes.append(f"edgetpu_compiler failed; see {compiled.log_path.name}")
        return info, notes
    final = out / f"{name}_edgetpu.tflite"
    compiled.model_path.replace(final)
    info["artifact"] = final
    if compiled.ops_on_cpu:
        notes.append(f"edgetpu_compiler left {compiled.ops_on_cpu} of {compiled.total_ops} ops on the CPU")
    return info, notes


def _edgetpu_artifact(out: Path, info: dict[str, Any], twin: Artifact) -> Artifact:
    path: Path = info.pop("artifact")
    if twin.verdict == "rejected":
        (out / "rejected").mkdir(exist_ok=True)
        path = Path(shutil.move(str(path), out / "rejected" / path.name))
    info["file"] = str(path.relative_to(out))
    # The compiled file runs only with libedgetpu, so it cannot be gated on this host: it inherits the verdict
    # of the int8 model it was compiled from (the TPU executes the same quantized arithmetic).
    return Artifact(
        file=str(path.relative_to(out)),
        target="edgetpu",
        sha256=sha256_file(path),
        size_bytes=path.stat().st_size,
        input=twin.input,
        output=twin.output,
        output_kind=twin.output_kind,
        verdict=twin.verdict,
        failed_criteria=list(twin.failed_criteria),
        waiver=twin.waiver,
        gate=twin.gate,
        twin=twin.file,
    )


def _manifest(
    name: str,
    labels: list[str],
    spec: InputSpec,
    artifacts: list[Artifact],
    calib: Calibration,
    evaluation: Dataset,
    split: str,
    x_eval: np.ndarray,
    y_eval: np.ndarray,
    float_summary: dict[str, Any],
    baseline: bytes,
    baseline_latency: float,
    edgetpu_info: dict[str, Any] | None,
) -> Manifest:
    quiet_tensorflow()
    import keras
    import tensorflow as tf

    import edgemed

    counts = [int(c) for c in np.bincount(y_eval, minlength=len(labels))]
    metrics: dict[str, Any] = {
        "float": {
            k: float_summary[k]
            for k in ("accuracy", "accuracy_ci", "balanced_accuracy", "roc_auc", "roc_auc_ci", "ece")
        },
        "float_tflite_size_bytes": len(baseline),
        "float_tflite_latency_ms": baseline_latency,
    }
    if edgetpu_info is not None:
        metrics["edgetpu"] = {k: v for k, v in edgetpu_info.items() if k != "artifact"}
    return Manifest(
        name=name,
        created_at=_now(),
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
        evaluation={"split": split, "count_per_class": counts, "sha256": _fingerprint(x_eval, y_eval)},
        metrics=jsonable(metrics),
    )


def _now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def jsonable(value: Any) -> Any:
    """Recursively turn numpy scalars into Python ones and NaN into None (strict JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, Path):
        return value.name
    return value
