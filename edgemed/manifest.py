"""The model manifest: the contract between the host converter and the device runtime.

The converter writes one ``{name}.manifest.json`` beside its artifacts. The device reads it to learn the labels,
how to preprocess a frame exactly as training did, the quantization of each tensor, and whether the acceptance gate
passed. The device refuses an artifact whose sha256 does not match or whose verdict is ``rejected``.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ConfigDict, Field, ValidationError, model_validator

from edgemed import MANIFEST_SCHEMA
from edgemed.errors import ModelError, ModelRejectedError
from edgemed.validation import FrozenModel, describe

if TYPE_CHECKING:
    from collections.abc import Sequence

    from edgemed.types import TensorSpec

Target = Literal["keras", "int8", "uint8", "float16", "dynamic", "edgetpu"]
Verdict = Literal["accepted", "rejected", "waived", "not_evaluated"]
ColourMode = Literal["gray", "rgb"]
ResizeMethod = Literal["area", "linear", "nearest"]
OutputKind = Literal["probabilities", "logits"]
WeightKind = Literal["float32", "float16", "int8"]
OutputRole = Literal["scores", "features"]
OodMethod = Literal["energy", "features"]

# The dtype of the input and output tensors a converted file of each target has (float16 keeps float32 I/O).
_TARGET_IO: dict[str, tuple[str, ...]] = {
    "int8": ("int8",),
    "uint8": ("uint8",),
    "edgetpu": ("int8", "uint8"),
    "float16": ("float32",),
    "dynamic": ("float32",),
}
# ...and the weights of the targets whose I/O is float32 like a plain float32 model's (edgemed.inference.backends
# .graph_weights): only the weights tell them apart.
_TARGET_WEIGHTS: dict[str, WeightKind] = {"float16": "float16", "dynamic": "int8"}


class Normalisation(FrozenModel):
    """Pixel to model-input mapping: ``x = pixel * scale + offset``."""

    scale: float = Field(1.0 / 255.0, description="multiplier applied to uint8 pixels")
    offset: float = Field(0.0, description="added after scaling")


class InputSpec(FrozenModel):
    """What a frame must look like before it is quantized and fed to the model."""

    height: int = Field(gt=0)
    width: int = Field(gt=0)
    channels: Literal[1, 3]
    colour_mode: ColourMode
    resize: ResizeMethod = Field("area", description="interpolation used by training and device alike")
    normalisation: Normalisation = Normalisation()


class QuantSpec(FrozenModel):
    """One tensor of a converted model, as the interpreter reports it."""

    name: str = ""
    shape: list[int]
    dtype: str
    scale: float = 0.0
    zero_point: int = 0


class OutputSpec(QuantSpec):
    """One output tensor of a converted model and what it holds.

    TFLite may order a model's outputs differently from the Keras model it was converted from, so the device finds
    each output by its tensor ``name`` and reads its meaning from ``role``, never from its position.

    Attributes:
        role: ``scores`` (the classifier's logits or probabilities, the one ``Artifact.output`` also describes) or
            ``features`` (a layer's activations averaged over height and width, read by the feature OOD score).
        layer: for ``features``, the Keras layer whose activations are pooled (for reports and error messages).
    """

    role: OutputRole
    layer: str | None = None


class FeatureLayerStats(FrozenModel):
    """The statistics of one pooled feature output, fitted on the training split.

    A vector ``f`` (the dequantized output, ``dims`` values) is whitened, ``z = (f - center) @ whiten`` (``whiten``
    is ``dims x components``: the shared, shrunk class covariance's inverse square root, truncated to its
    ``components`` largest principal directions when ``dims`` is large), its distance to the nearest class is
    ``d = min_k |z - class_means[k]|^2`` (the Mahalanobis distance with class-conditional means and a shared
    covariance), and the layer's score is ``(d - median) / spread`` (``median`` and ``spread`` of ``d`` over the
    training split, so layers of different sizes weigh alike).
    """

    # json.loads reads NaN and Infinity: one in the statistics would flag every frame (a non-finite score flags).
    model_config = ConfigDict(allow_inf_nan=False)

    output: str = Field(min_length=1, description="tensor name of the OutputSpec (role features) this layer reads")
    layer: str | None = None
    dims: int = Field(gt=0)
    components: int = Field(gt=0)
    center: list[float]
    whiten: list[list[float]]
    class_means: list[list[float]]
    median: float
    spread: float = Field(gt=0.0)

    @model_validator(mode="after")
    def _shapes_agree(self) -> FeatureLayerStats:
        if self.components > self.dims:
            raise ValueError(f"components {self.components} > dims {self.dims}")
        if len(self.center) != self.dims or len(self.whiten) != self.dims:
            raise ValueError(f"center and whiten must have {self.dims} rows (dims)")
        if any(len(row) != self.components for row in self.whiten):
            raise ValueError(f"every row of whiten must have {self.components} values (components)")
        if not self.class_means or any(len(row) != self.components for row in self.class_means):
            raise ValueError(f"class_means must hold one row of {self.components} values per class")
        return self


class OodScoreSpec(FrozenModel):
    """One out-of-distribution score's threshold: a frame whose score is above it is flagged.

    Attributes:
        threshold: chosen on ``OodSpec.threshold_split`` so that ``flagged_fraction`` of its images score above it.
        flagged_fraction: the fraction of that split's images above the threshold (close to ``target_fraction``).
    """

    threshold: float
    flagged_fraction: float = Field(ge=0.0, le=1.0)


class EnergySpec(OodScoreSpec):
    """The energy score, ``-T * logsumexp(logits / T)`` (higher: less like the training images)."""

    temperature: float = Field(1.0, gt=0.0)


class FeatureSpec(OodScoreSpec):
    """The feature score: the largest of the per-layer scores of ``layers`` (see :class:`FeatureLayerStats`).

    The largest, not the mean: an image of another modality is often unusual in one layer only (measured on the
    validation splits of other sets, the maximum separated them at least as well as the mean on every model tried).
    """

    layers: list[FeatureLayerStats] = Field(min_length=1)
    shrinkage: float = Field(ge=0.0, description="covariance shrinkage towards a scaled identity, 0..1")


class OodSpec(FrozenModel):
    """How the device tells an image unlike the training images, fitted and thresholded at conversion.

    Attributes:
        default: the method the device uses unless its profile says otherwise.
        energy: the energy score (absent when the model outputs probabilities: it needs logits).
        features: the feature score (absent when the converter found no layer to read).
        target_fraction: the share of in-distribution validation images the thresholds flag (default 0.03).
        fit_split, fit_n: the split (``train``) the feature statistics were fitted on, and its size.
        threshold_split, threshold_n: the split (``val``, never the test split) the thresholds were chosen on.
        feature_rank_agreement: Spearman correlation, on the threshold split, between this file's feature scores
            and the float Keras model's (None when there is no feature score).
    """

    default: OodMethod
    energy: EnergySpec | None = None
    features: FeatureSpec | None = None
    target_fraction: float = Field(gt=0.0, lt=1.0)
    fit_split: str = Field(min_length=1, max_length=32)
    fit_n: int = Field(gt=0)
    threshold_split: str = Field(min_length=1, max_length=32)
    threshold_n: int = Field(gt=0)
    feature_rank_agreement: float | None = Field(None, ge=-1.0, le=1.0)

    @model_validator(mode="after")
    def _default_exists(self) -> OodSpec:
        if getattr(self, self.default) is None:
            raise ValueError(f"default is {self.default} but the {self.default} section is missing")
        # Checked here, not on the sections: the converter fits a feature section before it has its threshold.
        # A threshold of NaN flags nothing and one of -Infinity everything, without a word on the device.
        for name in ("energy", "features"):
            section = getattr(self, name)
            if section is not None and not math.isfinite(section.threshold):
                raise ValueError(f"{name}.threshold is {section.threshold}, not a finite number")
        return self

    def method(self, name: OodMethod) -> EnergySpec | FeatureSpec | None:
        """The section of one method, or None when the model lacks it."""
        return self.energy if name == "energy" else self.features


class Waiver(FrozenModel):
    """A named person's decision to ship a model the gate rejected."""

    by: str
    reason: str
    at: str


class Artifact(FrozenModel):
    """One file produced by the converter."""

    file: str = Field(description="path relative to the manifest's folder")
    target: Target
    sha256: str
    size_bytes: int
    input: QuantSpec | None = None
    output: QuantSpec | None = None
    output_kind: OutputKind = "probabilities"
    verdict: Verdict = "not_evaluated"
    failed_criteria: list[str] = Field(default_factory=list)
    waiver: Waiver | None = None
    gate: dict[str, Any] | None = None
    twin: str | None = Field(None, description="for edgetpu: the CPU int8 file to fall back to")
    outputs: list[OutputSpec] = Field(
        default_factory=list,
        description="every output tensor by name and role; empty in manifests from before multi-output models "
        "(the first output is then the scores)",
    )
    ood: OodSpec | None = Field(None, description="out-of-distribution scores and thresholds; None: not fitted")

    @model_validator(mode="after")
    def _outputs_agree(self) -> Artifact:
        if not self.outputs:
            if self.ood is not None and self.ood.features is not None:
                raise ValueError("ood.features needs the feature outputs listed in outputs")
            return self
        names = [o.name for o in self.outputs]
        if len(set(names)) != len(names) or not all(names):
            raise ValueError("outputs must name each tensor once")
        scores = [o for o in self.outputs if o.role == "scores"]
        if len(scores) != 1:
            raise ValueError(f"outputs must list exactly one tensor with role scores, not {len(scores)}")
        if self.ood is not None and self.ood.features is not None:
            features = {o.name for o in self.outputs if o.role == "features"}
            missing = [layer.output for layer in self.ood.features.layers if layer.output not in features]
            if missing:
                raise ValueError(f"ood.features reads {missing}, which outputs does not list with role features")
        return self

    @property
    def scores_output(self) -> OutputSpec | None:
        """The classifier's output tensor (None in a manifest that lists no outputs: the first is the scores)."""
        return next((o for o in self.outputs if o.role == "scores"), None)

    @property
    def clinically_weak(self) -> list[str]:
        """The clinical floors the gate found this model under (``gate.clinically_weak``; empty in manifests
        written before the floors existed): a faithful conversion of a weak model."""
        weak = (self.gate or {}).get("clinically_weak")
        return [str(w) for w in weak] if isinstance(weak, list) else []


class Reference(FrozenModel):
    """What the shipped model predicted on its held-out evaluation split: the mix the dashboard's drift view
    compares a site's recent results with (the device publishes it with its status).

    Attributes:
        n: evaluation images.
        class_mix: label -> fraction of the images whose top-1 prediction it was (the fractions sum to 1).
        mean_confidence: mean of the top class's probability.
        split: the split (``test`` or ``val``).
        target: the converted file whose predictions these are (``int8`` when it was converted).
    """

    n: int = Field(gt=0)
    class_mix: dict[str, float]
    mean_confidence: float = Field(ge=0.0, le=1.0)
    split: str = Field(min_length=1, max_length=32)
    target: str | None = Field(None, max_length=32)

    @model_validator(mode="after")
    def _mix_is_a_distribution(self) -> Reference:
        if not self.class_mix or any(not 0.0 <= f <= 1.0 for f in self.class_mix.values()):
            raise ValueError("reference.class_mix must map each label to a fraction between 0 and 1")
        total = sum(self.class_mix.values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"reference.class_mix fractions sum to {total:.6g}, not 1")
        return self


class Manifest(FrozenModel):
    """Everything the device needs to know about a converted model."""

    model_config = ConfigDict(extra="allow")  # newer converters may add sections; keep them (still frozen)

    schema_: str = Field(MANIFEST_SCHEMA, alias="schema")
    name: str
    version: str = "1"
    created_at: str
    labels: list[str] = Field(min_length=2)
    input: InputSpec
    artifacts: list[Artifact]
    versions: dict[str, str] = Field(default_factory=dict)
    calibration: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    reference: Reference | None = None

    @model_validator(mode="after")
    def _reference_names_labels(self) -> Manifest:
        if self.reference is not None:
            unknown = sorted(set(self.reference.class_mix) - set(self.labels))
            if unknown:
                raise ValueError(f"reference.class_mix names {unknown}, which are not among the labels")
        return self

    def artifact(self, file_name: str) -> Artifact:
        """The artifact whose file name (last path component) is ``file_name``.

        Raises:
            ModelError: no artifact of that name is listed.
        """
        for art in self.artifacts:
            if Path(art.file).name == file_name:
                return art
        raise ModelError(
            f"{file_name} is not listed in the manifest of model {self.name!r}; "
            "use a file written by `edgemed convert` next to its manifest"
        )

    def preprocess_sha256(self) -> str:
        """Fingerprint of the preprocessing settings; identical settings give identical fingerprints."""
        blob = json.dumps(self.input.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_manifest(path: Path) -> Manifest:
    """Read and validate a manifest file.

    Raises:
        ModelError: the file is missing, not JSON, or not a manifest (the message names the field).
    """
    if Path(path).is_dir():
        found = sorted(p.name for p in Path(path).glob("*.manifest.json"))
        raise ModelError(
            f"manifest path {path} is a folder; pass the .manifest.json file itself"
            + (f", e.g. {Path(path) / found[0]}" if found else " that `edgemed convert` wrote")
        )
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelError(
            f"manifest {path} not found; keep the .manifest.json that `edgemed convert` wrote beside the model"
        ) from exc
    except (OSError, ValueError) as exc:
        raise ModelError(f"manifest {path} is unreadable ({exc}); re-run `edgemed convert`") from exc
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        raise ModelError(
            f"manifest {path} is invalid: {describe(exc, Manifest, limit=1)}; re-run `edgemed convert`"
        ) from exc


def save_manifest(manifest: Manifest, path: Path) -> None:
    """Write a manifest atomically (temporary file then rename) so a crash never leaves half a file."""
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest.model_dump(mode="json", by_alias=True), indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def find_manifest(model_path: Path) -> Path:
    """Locate the manifest that lists ``model_path``: beside it, or one folder up for ``rejected/`` models.

    Raises:
        ModelError: no manifest lists this file.
    """
    model_path = Path(model_path)
    for folder in (model_path.parent, model_path.parent.parent):
        for candidate in sorted(folder.glob("*.manifest.json")):
            try:
                raw = json.loads(candidate.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            files = [Path(a.get("file", "")).name for a in raw.get("artifacts", [])]
            if model_path.name in files:
                return candidate
    raise ModelError(
        f"no manifest lists {model_path.name}; pass --manifest FILE or keep the "
        "{name}.manifest.json written by `edgemed convert` in the same folder"
    )


def verify_model(model_path: Path, manifest_path: Path | None = None) -> tuple[Manifest, Artifact]:
    """Check a model file against its manifest before the device runs it.

    Returns:
        The manifest and the artifact entry for ``model_path``.

    Raises:
        ModelError: the file is missing (or a folder) or its sha256 differs from the manifest's.
        ModelRejectedError: the acceptance gate rejected it and nobody signed a waiver.
    """
    model_path = Path(model_path)
    check_model_file(model_path)
    manifest_path = manifest_path or find_manifest(model_path)
    manifest = load_manifest(manifest_path)
    art = manifest.artifact(model_path.name)
    actual = sha256_file(model_path)
    if actual != art.sha256:
        raise ModelError(
            f"{model_path} does not match its manifest (sha256 {actual[:12]}... != "
            f"{art.sha256[:12]}...): the file was altered or is from another conversion; re-copy it"
        )
    if art.verdict == "rejected":
        why = "; ".join(art.failed_criteria) or "see report.json"
        raise ModelRejectedError(
            f"{model_path.name} was rejected by the acceptance gate ({why}); the device "
            "refuses it. Fix the conversion, or record a waiver with `edgemed convert "
            "--waive-gate --waiver-by NAME --waiver-reason TEXT`"
        )
    return manifest, art


def check_model_file(model_path: Path) -> None:
    """Refuse a model path that is missing or is a folder, saying which (and what the folder holds).

    Raises:
        ModelError: the path is not a file.
    """
    model_path = Path(model_path)
    if model_path.is_dir():
        found = sorted(p.name for p in model_path.glob("*.tflite"))
        inside = f" (it holds {', '.join(found[:4])})" if found else " (it holds no .tflite file)"
        raise ModelError(
            f"model path {model_path} is a folder{inside}; pass the .tflite file itself, e.g. "
            f"{model_path / (found[0] if found else 'NAME_int8.tflite')}"
        )
    if not model_path.is_file():
        raise ModelError(f"model file {model_path} not found; pass the .tflite written by `edgemed convert`")


def check_loaded_model(
    manifest: Manifest,
    model_path: Path,
    input_tensor: TensorSpec,
    output_tensor: TensorSpec,
    output_kind: OutputKind | None,
    weights: WeightKind | None = None,
    outputs: Sequence[TensorSpec] = (),
) -> None:
    """Refuse a loaded model whose real tensors are not the ones its manifest describes.

    The sha256 proves only that the file is the one the manifest lists; a hand-edited manifest can list any file.
    The device publishes the manifest's ``target`` and post-processes by its ``output_kind``, so both must be
    what the interpreter actually holds: a float model listed as int8, or a softmax output listed as logits (a
    second softmax squeezes a certain 1.00 into 0.73), is refused here.

    Args:
        manifest: the model's manifest.
        model_path: the file the interpreter loaded (its name selects the artifact).
        input_tensor: the interpreter's input tensor.
        output_tensor: the interpreter's scores tensor (the one the artifact's ``scores_output`` names; the first
            output for a manifest that lists no outputs).
        output_kind: what the graph's output op computes, or ``None`` where the graph cannot tell (an Edge TPU
            custom op); then that field is not checked.
        weights: how the model stores its weights (``float16``, ``int8``, ``float32``), or ``None`` when not
            known; checked for the ``float16`` and ``dynamic`` targets, whose tensors in and out are float32.
        outputs: every output tensor of the interpreter (``backend.output_specs``); each tensor the artifact
            lists in ``outputs`` must be among them by name, with its dtype, shape, scale and zero point.

    Raises:
        ModelError: a field differs; the message names each field (``artifacts[i].target``, ...) and the fix.
    """
    name = Path(model_path).name
    art = manifest.artifact(name)
    where = f"artifacts[{manifest.artifacts.index(art)}]"
    problems = [
        *_target_problems(where, art, input_tensor, output_tensor, weights),
        *_tensor_problems(f"{where}.input", art.input, input_tensor),
        *_tensor_problems(f"{where}.output", art.output, output_tensor),
        *_shape_problems(manifest, input_tensor, output_tensor),
        *_output_problems(where, art, outputs, output_tensor),
    ]
    if output_kind is not None and output_kind != art.output_kind:
        consequence = (
            "the device would apply a softmax to probabilities"
            if output_kind == "probabilities"
            else "the device would read logits as probabilities"
        )
        problems.append(
            f"{where}.output_kind is {art.output_kind} but the model's output op computes {output_kind} ({consequence})"
        )
    if problems:
        raise ModelError(
            f"{name} does not match its manifest: {'; '.join(problems)}. The model or its manifest was changed "
            "after `edgemed convert`: copy both from the same conversion, or convert again"
        )


def _target_problems(
    where: str, art: Artifact, inp: TensorSpec, out: TensorSpec, weights: WeightKind | None
) -> list[str]:
    wanted = _TARGET_IO.get(art.target)
    if wanted is None:
        return [f"{where}.target is {art.target}, which is not a TFLite model the device can run"]
    quantized = wanted[0] != "float32"
    if inp.dtype in wanted and out.dtype in wanted and (not quantized or (inp.quantized and out.quantized)):
        stored = _TARGET_WEIGHTS.get(art.target)
        if stored is None or weights is None or weights == stored:
            return []
        what = {"float32": "a float32 model", "float16": "a float16 model", "int8": "a dynamic-range model"}
        return [
            f"{where}.target is {art.target} but the model's weights are {weights} ({what[weights]}; a "
            f"{art.target} model stores its weights as {stored})"
        ]
    tensors = inp.dtype if inp.dtype == out.dtype else f"{inp.dtype} in, {out.dtype} out"
    return [
        f"{where}.target is {art.target} but the model's tensors are {tensors} (a {art.target} model has "
        f"{' or '.join(wanted)}{' quantized' if quantized else ''} input and output)"
    ]


def _tensor_problems(where: str, listed: QuantSpec | None, real: TensorSpec) -> list[str]:
    if listed is None:  # manifests may omit the tensor specs; the target and output kind are still checked
        return []
    differ: list[tuple[str, object, object]] = []
    if listed.dtype != real.dtype:
        differ.append(("dtype", listed.dtype, real.dtype))
    if tuple(listed.shape) != tuple(real.shape):
        differ.append(("shape", list(listed.shape), list(real.shape)))
    # The manifest stores the interpreter's float32 scale as JSON; it round-trips exactly, so a small relative
    # tolerance only absorbs a hand-typed value with fewer digits.
    if not math.isclose(listed.scale, real.scale, rel_tol=1e-6, abs_tol=1e-12):
        differ.append(("scale", f"{listed.scale:.9g}", f"{real.scale:.9g}"))
    if listed.zero_point != real.zero_point:
        differ.append(("zero_point", listed.zero_point, real.zero_point))
    return [f"{where}.{field} is {mine} but the model's is {theirs}" for field, mine, theirs in differ]


def _output_problems(where: str, art: Artifact, real: Sequence[TensorSpec], scores: TensorSpec) -> list[str]:
    listed = art.scores_output
    if listed is not None and scores.name != listed.name:  # the device would read another tensor as the scores
        j = art.outputs.index(listed)
        return [
            f"{where}.outputs[{j}] names {listed.name!r} as the scores but the model's scores tensor is {scores.name!r}"
        ]
    if not real:  # the caller did not pass the interpreter's outputs
        return []
    if not art.outputs and len(real) > 1:
        # A manifest from before outputs were listed has one-output models; with several, the first is a guess
        # (TFLite orders a model's outputs as it likes), and a feature vector could be read as the scores.
        names = ", ".join(repr(t.name) for t in real)
        return [
            f"{where}.outputs lists no tensors but the model has {len(real)} outputs ({names}), so the device "
            "cannot tell which holds the scores"
        ]
    by_name = {t.name: t for t in real}
    problems = []
    for j, listed in enumerate(art.outputs):
        tensor = by_name.get(listed.name)
        if tensor is None:
            names = ", ".join(repr(t.name) for t in real)
            problems.append(f"{where}.outputs[{j}] names {listed.name!r} but the model's outputs are {names}")
        else:
            problems.extend(_tensor_problems(f"{where}.outputs[{j}]", listed, tensor))
    return problems


def _shape_problems(manifest: Manifest, inp: TensorSpec, out: TensorSpec) -> list[str]:
    spec = manifest.input
    problems = []
    expected = (1, spec.height, spec.width, spec.channels)
    if tuple(inp.shape) != expected:
        problems.append(
            f"input (height {spec.height}, width {spec.width}, channels {spec.channels}) does not fit the model's "
            f"input tensor {list(inp.shape)}"
        )
    if not out.shape or out.shape[-1] != len(manifest.labels):
        problems.append(f"labels lists {len(manifest.labels)} classes but the model outputs {list(out.shape)}")
    return problems
