"""The model manifest: the contract between the host converter and the device runtime.

The converter writes one ``{name}.manifest.json`` beside its artifacts. The device reads it to learn the labels,
how to preprocess a frame exactly as training did, the quantization of each tensor, and whether the acceptance gate
passed. The device refuses an artifact whose sha256 does not match or whose verdict is ``rejected``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ConfigDict, Field, ValidationError, model_validator

from edgemed import MANIFEST_SCHEMA
from edgemed.errors import ModelError, ModelRejectedError
from edgemed.manifest_cam import CamSpec as CamSpec
from edgemed.manifest_ood import EnergySpec as EnergySpec
from edgemed.manifest_ood import FeatureLayerStats as FeatureLayerStats
from edgemed.manifest_ood import FeatureSpec as FeatureSpec
from edgemed.manifest_ood import OodMethod as OodMethod
from edgemed.manifest_ood import OodScoreSpec as OodScoreSpec
from edgemed.manifest_ood import OodSpec
from edgemed.validation import FrozenModel, describe

if TYPE_CHECKING:
    pass

Target = Literal["keras", "int8", "uint8", "float16", "dynamic", "edgetpu"]
Verdict = Literal["accepted", "rejected", "waived", "not_evaluated"]
ColourMode = Literal["gray", "rgb"]
ResizeMethod = Literal["area", "linear", "nearest"]
OutputKind = Literal["probabilities", "logits"]
WeightKind = Literal["float32", "float16", "int8"]
OutputRole = Literal["scores", "features", "feature_map"]


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
            ``features`` (a layer's activations averaged over height and width, read by the feature OOD score) or
            ``feature_map`` (the last feature map before global average pooling, read by the class activation map,
            ``Artifact.cam``).
        layer: for ``features`` and ``feature_map``, the Keras layer whose activations these are (for reports and
            error messages).
    """

    role: OutputRole
    layer: str | None = None


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
    cam: CamSpec | None = Field(
        None, description="class activation map weights for a model ending in global average pooling; None: none"
    )

    @model_validator(mode="after")
    def _outputs_agree(self) -> Artifact:
        if not self.outputs:
            if self.ood is not None and self.ood.features is not None:
                raise ValueError("ood.features needs the feature outputs listed in outputs")
            if self.cam is not None:
                raise ValueError("cam needs its feature map listed in outputs")
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
        if self.cam is not None:
            maps = {o.name: o for o in self.outputs if o.role == "feature_map"}
            spec = maps.get(self.cam.output)
            if spec is None:
                raise ValueError(f"cam reads {self.cam.output!r}, which outputs does not list with role feature_map")
            if len(spec.shape) != 4 or spec.shape[-1] != self.cam.channels:
                raise ValueError(
                    f"cam.weights has {self.cam.channels} rows but its feature map {spec.name!r} has shape {spec.shape}"
                )
            if spec.shape[0] != 1 or min(spec.shape) < 1:
                raise ValueError(f"cam's feature map {spec.name!r} has shape {spec.shape}, not (1, H', W', channels)")
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
    def _sections_name_labels(self) -> Manifest:
        if self.reference is not None:
            unknown = sorted(set(self.reference.class_mix) - set(self.labels))
            if unknown:
                raise ValueError(f"reference.class_mix names {unknown}, which are not among the labels")
        for art in self.artifacts:
            # The device weighs the map of label k with column k: a kernel of another width is not this model's.
            if art.cam is not None and art.cam.classes != len(self.labels):
                raise ValueError(
                    f"{art.file}: cam.weights scores {art.cam.classes} classes but there are {len(self.labels)} labels"
                )
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


# A MobileNetV2 manifest with its OOD statistics and CAM kernel is about 5 MB; a file many times that is not one
# `edgemed convert` wrote, and json.loads would hold all of it (as Python objects, several times its size) in memory
# before any field is validated.
MAX_MANIFEST_BYTES = 64 << 20


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
        size = Path(path).stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise ModelError(
                f"manifest {path} is {size} bytes, more than the {MAX_MANIFEST_BYTES >> 20} MiB a manifest written "
                "by `edgemed convert` can be; use the .manifest.json it wrote beside the model"
            )
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
                if candidate.stat().st_size > MAX_MANIFEST_BYTES:
                    continue  # not a converter's manifest (load_manifest says why if it is passed by name)
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
