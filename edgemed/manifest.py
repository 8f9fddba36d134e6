"""The model manifest: the contract between the host converter and the device runtime.

The converter writes one ``{name}.manifest.json`` beside its artifacts. The device reads it to learn the labels,
how to preprocess a frame exactly as training did, the quantization of each tensor, and whether the acceptance gate
passed. The device refuses an artifact whose sha256 does not match or whose verdict is ``rejected``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgemed import MANIFEST_SCHEMA
from edgemed.errors import ModelError, ModelRejectedError

Target = Literal["keras", "int8", "uint8", "float16", "dynamic", "edgetpu"]
Verdict = Literal["accepted", "rejected", "waived", "not_evaluated"]
ColourMode = Literal["gray", "rgb"]
ResizeMethod = Literal["area", "linear", "nearest"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Normalisation(_Strict):
    """Pixel to model-input mapping: ``x = pixel * scale + offset``."""

    scale: float = Field(1.0 / 255.0, description="multiplier applied to uint8 pixels")
    offset: float = Field(0.0, description="added after scaling")


class InputSpec(_Strict):
    """What a frame must look like before it is quantized and fed to the model."""

    height: int = Field(gt=0)
    width: int = Field(gt=0)
    channels: Literal[1, 3]
    colour_mode: ColourMode
    resize: ResizeMethod = Field("area", description="interpolation used by training and device alike")
    normalisation: Normalisation = Normalisation()


class QuantSpec(_Strict):
    """One tensor of a converted model, as the interpreter reports it."""

    name: str = ""
    shape: list[int]
    dtype: str
    scale: float = 0.0
    zero_point: int = 0


class Waiver(_Strict):
    """A named person's decision to ship a model the gate rejected."""

    by: str
    reason: str
    at: str


class Artifact(_Strict):
    """One file produced by the converter."""

    file: str = Field(description="path relative to the manifest's folder")
    target: Target
    sha256: str
    size_bytes: int
    input: QuantSpec | None = None
    output: QuantSpec | None = None
    output_kind: Literal["probabilities", "logits"] = "probabilities"
    verdict: Verdict = "not_evaluated"
    failed_criteria: list[str] = Field(default_factory=list)
    waiver: Waiver | None = None
    gate: dict[str, Any] | None = None
    twin: str | None = Field(None, description="for edgetpu: the CPU int8 file to fall back to")


class Manifest(_Strict):
    """Everything the device needs to know about a converted model."""

    model_config = ConfigDict(extra="allow", frozen=True)  # newer converters may add sections; keep them

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
        from edgemed.validation import describe

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
        ModelError: the file is missing or its sha256 differs from the manifest's.
        ModelRejectedError: the acceptance gate rejected it and nobody signed a waiver.
    """
    model_path = Path(model_path)
    if not model_path.is_file():
        raise ModelError(f"model file {model_path} not found; pass the .tflite written by `edgemed convert`")
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
