"""Is this model deployable? The one answer the device (at start), ``edgemed doctor`` and ``edgemed bundle`` share.

A model is deployable when, in this order:

1. the file exists and its sha256 is the one its manifest lists, and the acceptance gate did not reject it
   (or a named person signed a waiver) (``edgemed.manifest.verify_model``);
2. the CPU int8 twin an Edge TPU model names passes the same check (it is what the device falls back to);
3. the profile's triage policy names only labels the model has (``edgemed.triage.validate_policy``);
4. each file, once loaded, holds the tensors and output op its manifest describes
   (``edgemed.model_contract.check_loaded_model``). The device and doctor check that when they open the backend
   (:meth:`Deployable.open_backend`); a host that only ships the model asks for it with ``load=True``, which
   loads every file that runs on a CPU (an Edge TPU-compiled file needs libedgetpu; its twin stands in for it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgemed.manifest import Artifact, Manifest, check_model_file, find_manifest, verify_model
from edgemed.triage import TriagePolicy, validate_policy

if TYPE_CHECKING:
    from edgemed.inference import Backend, BackendConfig


@dataclass(frozen=True)
class Deployable:
    """A model that passed the checks, with what the device needs to run it.

    Attributes:
        model: the model file for the intended accelerator.
        manifest_path: the manifest that lists it.
        manifest: that manifest, read and validated.
        artifact: the manifest's entry for ``model``.
        twin: the CPU int8 twin of an Edge TPU model (checked like ``model``), or None.
    """

    model: Path
    manifest_path: Path
    manifest: Manifest
    artifact: Artifact
    twin: Path | None = None

    @property
    def files(self) -> list[Path]:
        """The model files to ship or install: the model, then its twin when it has one."""
        return [self.model] if self.twin is None else [self.model, self.twin]

    def open_backend(self, cfg: BackendConfig) -> Backend:
        """Load the model on the profile's accelerator (its twin as the CPU fallback), with its real tensors and
        output op checked against the manifest.

        Raises:
            DelegateUnavailableError: the accelerator cannot be used and the profile refuses the CPU fallback.
            ModelError: the file cannot be loaded, or its tensors or output op differ from its manifest entry.
            ConfigError: no interpreter package is installed.
        """
        from edgemed.inference import make_backend

        scores = self.artifact.scores_output
        return make_backend(
            self.model,
            cfg,
            fallback_model=self.twin,
            manifest=self.manifest,
            scores_output=scores.name if scores is not None else None,
        )


def check_deployable(
    model_path: Path,
    manifest_path: Path | None = None,
    policy: TriagePolicy | None = None,
    *,
    load: bool = False,
) -> Deployable:
    """Check that a model may run on a device (see the module docstring for each check, in order).

    Args:
        model_path: the ``.tflite`` file (for the Edge TPU the compiled ``*_edgetpu.tflite``).
        manifest_path: its manifest; None finds the ``*.manifest.json`` that lists the file, beside it or one
            folder up.
        policy: the profile's triage policy, checked against the model's labels; None skips that check (no
            profile).
        load: also load each file that runs on a CPU and check its tensors against the manifest (for a host
            that ships the model without running it, e.g. ``edgemed bundle``).

    Returns:
        The checked model, manifest and twin.

    Raises:
        ModelError: a file is missing or altered, is not listed in the manifest, or (``load``) a file's tensors
            differ from its manifest.
        ModelRejectedError: the acceptance gate rejected the model or its twin and nobody signed a waiver.
        ConfigError: the policy names a label the model does not have, or (``load``) no interpreter package is
            installed here.
    """
    model_path = Path(model_path)
    if manifest_path is None:
        check_model_file(model_path)  # a missing model is named as such, not as "no manifest lists it"
        manifest_path = find_manifest(model_path)
    manifest_path = Path(manifest_path)
    manifest, artifact = verify_model(model_path, manifest_path)
    twin = None
    if artifact.twin:
        twin = model_path.parent / Path(artifact.twin).name
        verify_model(twin, manifest_path)
    if policy is not None:
        validate_policy(policy, list(manifest.labels))
    checked = Deployable(model_path, manifest_path, manifest, artifact, twin)
    if load:
        check_models_load(checked.files, manifest)
    return checked


def check_models_load(files: list[Path], manifest: Manifest) -> None:
    """Load each model on the CPU and check its real tensors against the manifest, as the device does at start.

    A model compiled for the Edge TPU runs only with libedgetpu: its CPU twin, which it was compiled from and
    shares its input and output with, is the one checked here (the device checks the compiled file at load).

    Raises:
        ModelError: a model cannot be loaded, or its tensors or output op differ from its manifest entry.
        ConfigError: no TensorFlow Lite interpreter is installed here.
    """
    from edgemed.inference import BackendConfig, make_backend
    from edgemed.inference.backends import is_edgetpu_compiled

    for path in files:
        if not is_edgetpu_compiled(path):
            scores = manifest.artifact(path.name).scores_output
            name = scores.name if scores is not None else None
            make_backend(path, BackendConfig(threads=1), manifest=manifest, scores_output=name).close()
