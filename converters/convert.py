"""Convert a trained Keras model to TFLite for the device, gate every artifact, write manifest and report.

Targets: ``int8`` (full integer, int8 input and output: CPU/XNNPACK), ``uint8`` (full integer with uint8
input and output, what Coral's examples expect), ``float16`` (float16 weights, float I/O: GPU delegates),
``dynamic`` (int8 weights, float activations) and ``edgetpu`` (the int8 model compiled by
``edgetpu_compiler``).

Integer targets are calibrated on the user's own *training* images (``converters.samples``). Every converted
file is then gated (``converters.gate``) on a held-out split: the float Keras model in TensorFlow against the
file run through the device's own inference code (``converters.runner``).

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
import io
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from converters import edgetpu
from converters._tf import quiet_tensorflow, tensorflow_quiet
from converters.cam import check_cam_option, missing_note, with_cam
from converters.data import Dataset
from converters.fit import Expectation, expectation, fit_to_model, read_training_record
from converters.gate import GateConfig, GateResult, evaluate_gate
from converters.metrics import ModelSummary, summarise
from converters.ood import DEFAULT_FRACTION, check_option
from converters.ood_step import OodOutcome, OodPlan, plan, run_target, with_ood
from converters.outcome import (
    CompilerRun,
    Conversion,
    EdgeTpuOutcome,
    FloatReference,
    Footprint,
    TargetOutcome,
)
from converters.outputs import name_source_outputs
from converters.record import build_manifest, drift_reference, edgetpu_artifact, now, target_artifact
from converters.report import write_reports
from converters.runner import DeviceModel, quant_spec
from converters.samples import (
    DEFAULT_CALIBRATION_PER_CLASS,
    MIN_CALIBRATION_PER_CLASS,
    Calibration,
    HeldOut,
    calibration_sample,
    held_out,
)
from converters.source import SourceModel, load_source
from edgemed.errors import ConfigError, ModelError
from edgemed.manifest import Artifact, InputSpec, OutputKind, Verdict, Waiver, save_manifest

TARGETS = ("int8", "uint8", "float16", "dynamic", "edgetpu")
OOD_METHODS = ("auto", "energy", "features", "none")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__all__ = [
    "DEFAULT_CALIBRATION_PER_CLASS",
    "MIN_CALIBRATION_PER_CLASS",
    "TARGETS",
    "Calibration",
    "ConvertResult",
    "calibration_sample",
    "convert",
    "model_expectation",
    "to_tflite",
]


@dataclass
class ConvertResult:
    """What :func:`convert` wrote and decided.

    Attributes:
        manifest_path: the one ``{name}.manifest.json``.
        report_json: ``report.json`` (every number).
        report_html: ``report.html`` (tables and plots for a reviewer).
        artifacts: target -> file path (inside ``rejected/`` when the gate rejected it).
        verdicts: target -> ``accepted``, ``rejected`` or ``waived``.
        failed: target -> failed criteria in words.
        float_summary: the float model's numbers on the evaluation split.
        gates: target -> the gate's result, for every target gated on this host (not ``edgetpu``).
        notes: things the user must know (e.g. the Edge TPU compiler was not found).
        weak: target -> clinical floors the model is under, in words (accepted anyway unless floors are
            required: "faithful conversion, clinically weak").
        ood: per converted target, its out-of-distribution fit and report numbers (empty for ``--ood none``).
    """

    manifest_path: Path
    report_json: Path
    report_html: Path
    artifacts: dict[str, Path]
    verdicts: dict[str, str]
    failed: dict[str, list[str]]
    float_summary: ModelSummary
    gates: dict[str, GateResult] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    weak: dict[str, list[str]] = field(default_factory=dict)
    ood: list[OodOutcome] = field(default_factory=list)

    @property
    def rejected(self) -> bool:
        """True when any artifact was rejected without a waiver."""
        return any(v == "rejected" for v in self.verdicts.values())


@dataclass(frozen=True)
class _Inputs:
    """What every step of one conversion works from."""

    source: SourceModel
    data: Dataset  # the calibration data fitted to the model: its train and val splits fit the OOD statistics
    labels: list[str]
    spec: InputSpec
    calib: Calibration
    held: HeldOut
    gate: GateConfig
    progress: bool


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
    ood: str = "auto",
    ood_eval: Sequence[str | Path] = (),
    ood_fraction: float = DEFAULT_FRACTION,
    cam: str = "auto",
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
        ood: ``auto`` or ``features`` give the device graph one pooled-feature output per tapped layer
            (``converters.source.find_taps``); ``energy`` and ``none`` keep the scores output alone. Every
            converted file except with ``none`` gets an ``ood`` section fitted on the train split and thresholded
            on the val split (``converters.ood_step``); ``auto`` makes the feature score the default when the
            model has taps, else the energy score.
        ood_eval: images of other kinds (``.npz``, image, folder, DICOM, video) the report scores against the
            held-out split (AUROC, FPR at 95% TPR, fraction flagged).
        ood_fraction: the share of in-distribution validation images each OOD threshold flags.
        cam: ``auto`` gives a model ending in GAP + Dense a ``feature_map`` output and every artifact with it a
            ``cam`` section (``converters.cam``); ``none`` leaves both out.

    Returns:
        Paths, verdicts and numbers; ``result.rejected`` tells whether to exit 3.

    Raises:
        ConfigError: unknown target or option. DataError: unusable calibration or evaluation data, or data
            that does not fit the model (other classes, class count, size or colour; see ``converters.fit``).
        ModelError: the model cannot be loaded or converted.
    """
    gated = _targets_to_gate(targets, output)
    method = check_option(ood, output, ood_fraction)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = name or Path(model_path).stem
    wants_cam = check_cam_option(cam)
    source = load_source(model_path, strip_softmax=output == "logits", taps=_wants_taps(ood), cam=wants_cam)
    sampling = (calibration_per_class, min_calibration_per_class, seed)
    inputs = _inputs(model_path, source, calibration, evaluation, eval_split, sampling, gate, progress)
    ood_plan = plan(method, ood_fraction, source, inputs.data, inputs.held, ood_eval, seed)
    reference = _float_reference(inputs)
    baseline = _float_baseline(inputs)
    waiver_record = Waiver(by=waiver[0], reason=waiver[1], at=now()) if waiver else None
    outcomes = [_convert_target(inputs, reference, t, out / f"{name}_{t}.tflite", waiver_record) for t in gated]
    tpu = _build_for_edgetpu(out, name, _int8(outcomes)) if "edgetpu" in targets else None
    ood_outcomes = [_fit_ood(inputs, ood_plan, o) for o in outcomes] if ood_plan is not None else []
    outcomes = [replace(o, path=_set_aside(out, o.path)) if o.verdict == "rejected" else o for o in outcomes]
    fitted = {r.target: r.spec for r in ood_outcomes}
    artifacts = [
        with_cam(with_ood(target_artifact(out, o, waiver_record), fitted.get(o.target)), source.cam) for o in outcomes
    ]
    if tpu is not None:
        twin = next(a for a in artifacts if a.target == "int8")
        tpu = _follow_twin(out, tpu, twin)
        if tpu.compiled is not None:
            artifacts.append(with_cam(edgetpu_artifact(out, tpu.compiled, twin), source.cam))  # the twin's outputs
    cam_note = missing_note(wants_cam, source.cam, name, source.kind == "saved_model")
    notes = (tpu.notes if tpu is not None else []) + [n for r in ood_outcomes for n in r.notes] + cam_note
    drift = drift_reference(outcomes, inputs.held, inputs.labels)  # the gate's own predictions, not a new run
    manifest = build_manifest(
        out, name, inputs.labels, inputs.spec, artifacts, inputs.calib, inputs.held, reference, baseline, tpu, drift
    )
    manifest_path = out / f"{name}.manifest.json"
    save_manifest(manifest, manifest_path)
    conversion = Conversion(out, inputs.labels, inputs.held.labels, reference, baseline, outcomes, tpu, notes)
    report_json, report_html = write_reports(manifest, conversion, ood_outcomes)
    return ConvertResult(
        manifest_path=manifest_path,
        report_json=report_json,
        report_html=report_html,
        artifacts={a.target: out / a.file for a in artifacts},
        verdicts={a.target: a.verdict for a in artifacts},
        failed={a.target: list(a.failed_criteria) for a in artifacts},
        float_summary=reference.summary,
        gates={o.target: o.gate for o in outcomes},
        notes=notes,
        weak={a.target: a.clinically_weak for a in artifacts},
        ood=ood_outcomes,
    )


def model_expectation(model_path: Path, source: SourceModel) -> Expectation:
    """What data for this model must look like: its training record, with the loaded model's own input shape
    and number of outputs (the model is the truth where a stale record disagrees)."""
    exp = expectation(model_path, read_training_record(model_path))
    return replace(exp, shape=source.input_shape, classes=source.num_outputs)


def _targets_to_gate(targets: tuple[str, ...] | list[str], output: str) -> list[str]:
    """The TFLite targets to convert and gate here, in order; ``edgetpu`` needs ``int8`` (its CPU twin)."""
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise ConfigError(f"unknown target(s) {unknown}; choose from {', '.join(TARGETS)}, e.g. --target int8")
    if output not in ("logits", "probabilities"):
        raise ConfigError(f"output {output!r}: use 'logits' or 'probabilities'")
    wanted = list(dict.fromkeys(t for t in targets if t != "edgetpu"))
    if "edgetpu" in targets and "int8" not in wanted:
        wanted.insert(0, "int8")  # the Edge TPU model's CPU twin, and what the compiler compiles
    return wanted


def _wants_taps(ood: str) -> bool:
    """Whether the device graph gets feature outputs: only a method that may read them needs them."""
    if ood not in OOD_METHODS:
        raise ConfigError(f"ood {ood!r}: use one of {', '.join(OOD_METHODS)}, e.g. --ood auto")
    return ood in ("auto", "features")


def _inputs(
    model_path: str | Path,
    source: SourceModel,
    calibration: Dataset,
    evaluation: Dataset | None,
    eval_split: str | None,
    sampling: tuple[int, int, int],
    gate: GateConfig | None,
    progress: bool,
) -> _Inputs:
    """Fit the data to the model, draw the calibration sample and pick the held-out split."""
    exp = model_expectation(Path(model_path), source)
    # A Dataset given here was sized by its caller (load_dataset's image_size): only the command line, which
    # knows whether the user asked for that, also compares the size the data was stored at.
    judged_here = evaluation is None  # the gate judges on the calibration data's held-out split
    calibration = fit_to_model(
        calibration, exp, "calibration", resized_on_purpose=True, eval_split=eval_split, evaluated=judged_here
    )
    if evaluation is not None:
        evaluation = fit_to_model(evaluation, exp, "evaluation", resized_on_purpose=True, eval_split=eval_split)
    else:
        evaluation = calibration
    held = held_out(evaluation, eval_split)
    calib = calibration_sample(calibration, *sampling)  # per class, minimum per class, seed
    labels, spec = list(calibration.labels), calibration.input_spec()
    return _Inputs(source, calibration, labels, spec, calib, held, gate or GateConfig(), progress)


def _float_reference(inputs: _Inputs) -> FloatReference:
    """The float Keras model, in TensorFlow, on the held-out images: what every converted model is held to."""
    raw = inputs.source.predict_float(inputs.held.images.astype(np.float32) / np.float32(255.0))
    probs = _probabilities(raw)
    return FloatReference(probs, summarise(inputs.held.labels, probs, inputs.labels))


def _probabilities(raw: np.ndarray) -> np.ndarray:
    if np.allclose(raw.sum(axis=1), 1.0, atol=1e-3) and (raw >= 0).all():
        return raw
    from edgemed.inference.classify import softmax

    return softmax(raw)


def _float_baseline(inputs: _Inputs) -> Footprint:
    """The float32 TFLite file's size and latency: what the targets' size and latency are compared with."""
    content = to_tflite(inputs.source, "float32", inputs.calib)
    with tempfile.TemporaryDirectory(prefix="edgemed-float32-") as tmp:
        path = Path(tmp) / "float32.tflite"
        path.write_bytes(content)
        with DeviceModel(path, inputs.spec) as model:
            return Footprint(len(content), model.median_latency_ms(inputs.held.images[0]))


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


def _convert_target(
    inputs: _Inputs, reference: FloatReference, target: str, path: Path, waiver: Waiver | None
) -> TargetOutcome:
    """Convert one target, run it on the held-out images through the device's code, and gate it."""
    from tqdm import tqdm

    content = to_tflite(inputs.source, target, inputs.calib, inputs.progress)
    path.write_bytes(content)
    images = inputs.held.images
    outputs = name_source_outputs(path, inputs.source, inputs.calib.images)
    with DeviceModel(path, inputs.spec, outputs) as model:
        kind = _output_kind(model.backend.output_kind, inputs.source.output_kind)
        with tqdm(total=len(images), desc=f"evaluate {target}", disable=not inputs.progress, unit="img") as bar:
            probs = model.probabilities(images, kind, bar)
        footprint = Footprint(len(content), model.median_latency_ms(images[0]))
        tensors = quant_spec(model.backend.input_spec), quant_spec(model.backend.output_spec)
    held, size, latency = inputs.held, footprint.size_bytes, footprint.latency_ms
    result = evaluate_gate(held.labels, reference.probs, probs, inputs.labels, inputs.gate, size, latency)
    verdict: Verdict = "accepted" if result.passed else ("waived" if waiver else "rejected")
    return TargetOutcome(target, path, *tensors, kind, footprint, probs, result, verdict, outputs)


def _fit_ood(inputs: _Inputs, ood_plan: OodPlan, outcome: TargetOutcome) -> OodOutcome:
    """One file's OOD statistics and thresholds, fitted on its own outputs as the device computes them."""
    path, kind = outcome.path, outcome.output_kind
    return run_target(ood_plan, outcome.target, path, inputs.spec, outcome.outputs, kind, inputs.progress)


def _output_kind(graph: OutputKind | None, source: str) -> OutputKind:
    # The converted graph's own output op decides (the device checks the same at load); the source model's kind
    # is the fallback for a graph that cannot tell, and an unknown kind is taken as logits.
    if graph is not None:
        return graph
    return "probabilities" if source == "probabilities" else "logits"


def _int8(outcomes: list[TargetOutcome]) -> TargetOutcome:
    return next(o for o in outcomes if o.target == "int8")


def _set_aside(out: Path, path: Path) -> Path:
    """Move a rejected file into ``rejected/``, so that nobody ships it by mistake; returns where it now is."""
    (out / "rejected").mkdir(exist_ok=True)
    return Path(shutil.move(str(path), out / "rejected" / path.name))


def _build_for_edgetpu(out: Path, name: str, twin: TargetOutcome) -> EdgeTpuOutcome:
    """Check the int8 model for the Edge TPU and compile it to ``{name}_edgetpu.tflite`` when the compiler is here."""
    compat = edgetpu.check_compatibility(twin.path)
    notes: list[str] = []
    if not compat.compatible:
        notes.append("Edge TPU check: " + "; ".join(compat.problems))

    def outcome(compiler: CompilerRun | None, compiled: Path | None) -> EdgeTpuOutcome:
        return EdgeTpuOutcome(compat.compatible, compat.problems, compat.ops, twin.path.name, compiler, compiled, notes)

    compiled = edgetpu.run_compiler(twin.path, out)
    if compiled is None:
        notes.append(
            f"edgetpu_compiler is not on PATH (Coral's apt package, x86-64 Linux): no {name}_edgetpu"
            f".tflite was made; the device falls back to the CPU int8 model {twin.path.name}"
        )
        return outcome(None, None)
    run = CompilerRun(
        ok=compiled.ok,
        version=compiled.version,
        ops_on_tpu=compiled.ops_on_tpu,
        ops_on_cpu=compiled.ops_on_cpu,
        total_ops=compiled.total_ops,
        table=list(compiled.table),
        log=compiled.log_path.name,
    )
    if not compiled.ok or compiled.model_path is None:
        notes.append(f"edgetpu_compiler failed; see {compiled.log_path.name}")
        return outcome(run, None)
    final = out / f"{name}_edgetpu.tflite"
    compiled.model_path.replace(final)
    if compiled.ops_on_cpu:
        notes.append(f"edgetpu_compiler left {compiled.ops_on_cpu} of {compiled.total_ops} ops on the CPU")
    return outcome(run, final)


def _follow_twin(out: Path, tpu: EdgeTpuOutcome, twin: Artifact) -> EdgeTpuOutcome:
    """The compiled model shares its CPU twin's verdict: a rejected twin takes it into ``rejected/`` too."""
    if twin.verdict != "rejected":
        return tpu
    note = "the int8 model (the Edge TPU build's CPU twin) was rejected by the gate: neither can ship"
    compiled = _set_aside(out, tpu.compiled) if tpu.compiled is not None else None
    return replace(tpu, compiled=compiled, notes=[*tpu.notes, note])
