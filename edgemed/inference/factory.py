"""``make_backend``: the intended accelerator, or an explicit, logged, reported CPU fallback."""

from __future__ import annotations

import logging
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from edgemed.errors import DelegateUnavailableError, ModelError
from edgemed.inference.delegates import EDGETPU_INSTALL, GPU_INSTALL, load_external_delegate
from edgemed.inference.interpreters import interpreter_module
from edgemed.manifest import check_model_file
from edgemed.model_contract import check_loaded_model
from edgemed.stderr_filter import LITERT_NOTICES, filtered_stderr

if TYPE_CHECKING:
    from typing import TypeAlias

    from edgemed.inference import Backend, BackendConfig
    from edgemed.inference.backends import InterpreterBackend
    from edgemed.inference.compiled import CompiledModelBackend
    from edgemed.manifest import Manifest
    from edgemed.types import Delegate

    _Concrete: TypeAlias = InterpreterBackend | CompiledModelBackend

log = logging.getLogger("edgemed.inference")

NOT_COMPILED = (
    "the model is not compiled for the Edge TPU (every op would run on the CPU); compile it with "
    "`edgemed convert --target edgetpu` and deploy the *_edgetpu.tflite with its CPU int8 twin"
)


def make_backend(
    model: Path,
    cfg: BackendConfig,
    *,
    fallback_model: Path | None = None,
    manifest: Manifest | None = None,
    scores_output: str | None = None,
) -> Backend:
    """Load a model on the intended accelerator, falling back to the CPU only if the profile allows it.

    Args:
        model: the model for the intended accelerator (for the Edge TPU the compiled ``*_edgetpu.tflite``; for
            the GPU the float16 model; for the CPU the int8 model).
        cfg: the backend settings of the device profile.
        fallback_model: the model to run on the CPU if the accelerator cannot be used (the manifest's CPU int8
            twin of an Edge TPU model); defaults to ``model``.
        manifest: the models' manifest; when given, the tensors and output op of the file that actually loaded
            are checked against its artifact entry (``check_loaded_model``) before the backend is returned.
        scores_output: tensor name of the classifier's scores output (``Artifact.scores_output.name``), which
            ``output_spec``, ``invoke()`` and ``output_kind`` are about; ``None`` takes the one ``manifest``
            lists for ``model`` when a manifest is given, else the first output (as for manifests written before
            outputs were listed). The other outputs are read with
            ``backend.output(name)``. An Edge TPU model and its CPU twin share their output names.

    Returns:
        A backend whose ``delegate`` says where it runs; ``degraded`` and ``degraded_reason`` are set when
        that is not ``cfg.accelerator``. A fallback is logged once, as a WARNING, here.

    Raises:
        DelegateUnavailableError: the accelerator cannot be used and ``cfg.allow_cpu_fallback`` is false
            (exit 6).
        ModelError: a model cannot be loaded at all, or a model not compiled for the Edge TPU is sent to it
            with fallback refused, or the CPU fallback model is itself Edge TPU-only, or the loaded model's
            tensors differ from its manifest, or it has no output named ``scores_output`` (exit 3).
        ConfigError: no interpreter package is installed.
    """
    if scores_output is None and manifest is not None:
        scores_output = _listed_scores(manifest, Path(model))
    backend, loaded = _load(Path(model), cfg, fallback_model, scores_output)
    if manifest is not None:
        try:
            check_loaded_model(
                manifest,
                loaded,
                backend.input_spec,
                backend.output_spec,
                backend.output_kind,
                backend.weights,
                outputs=backend.output_specs,
            )
        except ModelError:
            backend.close()
            raise
    return backend


def _listed_scores(manifest: Manifest, model: Path) -> str | None:
    """The scores tensor the manifest lists for ``model`` (None: not listed, or a manifest without outputs)."""
    listed = next((a for a in manifest.artifacts if Path(a.file).name == model.name), None)
    scores = listed.scores_output if listed is not None else None
    return scores.name if scores is not None else None


def _load(model: Path, cfg: BackendConfig, fallback_model: Path | None, scores: str | None) -> tuple[_Concrete, Path]:
    """The backend, and the file it loaded (``fallback_model`` after a fallback)."""
    name, module = interpreter_module(cfg.runtime)
    if cfg.accelerator == "cpu":
        return _cpu(module, name, model, cfg, scores, intended="cpu"), model
    # LiteRT prints INFO lines also when a failed GPU attempt is freed, at the end of the except block below.
    with filtered_stderr(LITERT_NOTICES):
        try:
            if cfg.accelerator == "edgetpu":
                return _edgetpu(module, name, model, cfg, scores), model
            return _gpu(module, name, model, cfg, scores), model
        except DelegateUnavailableError as exc:
            if not cfg.allow_cpu_fallback:
                raise
            reason = f"{exc.reason}; running on the CPU instead"
            cpu_model = Path(fallback_model) if fallback_model is not None else model
            backend = _cpu(module, name, cpu_model, cfg, scores, intended=cfg.accelerator, reason=reason)
    log.warning("%s delegate unavailable: %s", cfg.accelerator, reason)
    return backend, cpu_model


def _cpu(
    module: ModuleType,
    name: str,
    model: Path,
    cfg: BackendConfig,
    scores: str | None,
    *,
    intended: Delegate,
    reason: str | None = None,
) -> InterpreterBackend:
    from edgemed.inference.backends import InterpreterBackend, is_edgetpu_compiled, open_interpreter

    if intended != "cpu" and model.is_file() and is_edgetpu_compiled(model):
        raise ModelError(
            f"cannot fall back to the CPU: {model} is compiled for the Edge TPU and has no CPU "
            "twin here; pass the manifest's int8 twin as the fallback model "
            f"(first failure: {reason})"
        )
    interp = open_interpreter(module, model, cfg.threads)
    return InterpreterBackend(
        interp, backend=name, delegate="cpu", intended=intended, degraded_reason=reason, scores_output=scores
    )


def _edgetpu(module: ModuleType, name: str, model: Path, cfg: BackendConfig, scores: str | None) -> InterpreterBackend:
    from edgemed.inference.backends import InterpreterBackend, is_edgetpu_compiled, open_interpreter

    if not model.exists():
        raise ModelError(
            f"model file {model} not found; give the *_edgetpu.tflite written by `edgemed convert --target edgetpu`"
        )
    check_model_file(model)  # a folder is named as one
    options = {"device": cfg.edgetpu_device} if cfg.edgetpu_device else {}
    compiled = is_edgetpu_compiled(model)
    try:
        delegate = load_external_delegate(
            module, cfg.edgetpu_library, options, delegate="edgetpu", install_hint=EDGETPU_INSTALL
        )
    except DelegateUnavailableError as exc:
        if compiled:
            raise
        # Name the model problem too, so that one visit to the device fixes both.
        raise DelegateUnavailableError("edgetpu", f"{exc.reason}; also, {NOT_COMPILED}") from exc
    if not compiled:
        if not cfg.allow_cpu_fallback:
            raise ModelError(NOT_COMPILED)
        raise DelegateUnavailableError("edgetpu", NOT_COMPILED)
    try:
        interp = open_interpreter(module, model, cfg.threads, [delegate])
    except DelegateUnavailableError as exc:
        raise DelegateUnavailableError(
            "edgetpu",
            f"{exc.reason}; check that libedgetpu is at least as new as the edgetpu_compiler that built the model",
        ) from exc
    return InterpreterBackend(
        interp, backend=name, delegate="edgetpu", intended="edgetpu", keep_alive=[delegate], scores_output=scores
    )


def _gpu(module: ModuleType, name: str, model: Path, cfg: BackendConfig, scores: str | None) -> _Concrete:
    from edgemed.inference.backends import InterpreterBackend, open_interpreter
    from edgemed.inference.compiled import CompiledModelBackend

    if cfg.gpu_library is not None:
        delegate = load_external_delegate(module, cfg.gpu_library, {}, delegate="gpu", install_hint=GPU_INSTALL)
        try:
            interp = open_interpreter(module, model, cfg.threads, [delegate])
        except DelegateUnavailableError as exc:
            raise DelegateUnavailableError("gpu", exc.reason) from exc
        return InterpreterBackend(
            interp, backend=name, delegate="gpu", intended="gpu", keep_alive=[delegate], scores_output=scores
        )
    if name != "ai_edge_litert":
        raise DelegateUnavailableError(
            "gpu",
            f"LiteRT's GPU accelerator needs ai-edge-litert, but {name} is the interpreter in use; {GPU_INSTALL}",
        )
    return CompiledModelBackend(module, model, cfg.threads, accelerator="gpu", scores_output=scores)
