"""Accelerator fallback: the real absent libedgetpu and GPU, and a ctypes delegate at the load_delegate seam.

No Edge TPU or GPU exists on this machine, so the failure paths run for real. The "delegate loads" path uses a
real ``TfLiteDelegate`` struct built with ctypes: LiteRT calls its ``Prepare`` through the C ABI, the delegate
claims no nodes, and the model runs on the CPU kernels, as the interpreter treats any external delegate.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from delegate_fakes import CtypesDelegate

import edgemed.inference.backends as backends_mod
import edgemed.inference.factory as factory_mod
from edgemed.errors import DelegateUnavailableError, ModelError
from edgemed.inference import BackendConfig, interpreter_module, make_backend
from edgemed.inference.delegates import check_library, load_external_delegate
from edgemed.manifest import find_manifest, load_manifest, verify_model

ROOT = Path(__file__).resolve().parent.parent
NOISE = "Exception ignored"


@pytest.fixture()
def fake_delegate(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Replace the one load_delegate seam; record what make_backend asked for."""
    seen: dict[str, Any] = {"status": 0}

    def load(module: Any, library: str, options: dict[str, str], *, delegate: str, install_hint: str) -> Any:
        seen.update(library=library, options=options, delegate=delegate)
        seen["object"] = CtypesDelegate(seen["status"])
        return seen["object"]

    monkeypatch.setattr(factory_mod, "load_external_delegate", load)
    return seen


@pytest.fixture()
def compiled(monkeypatch: pytest.MonkeyPatch, int8_model: Path, tmp_path: Path) -> Path:
    """A copy of the int8 model treated as Edge TPU-compiled (no edgetpu_compiler exists here)."""
    copy = tmp_path / "breast_edgetpu.tflite"
    copy.write_bytes(int8_model.read_bytes())
    monkeypatch.setattr(backends_mod, "is_edgetpu_compiled", lambda model: Path(model) == copy)
    return copy


@pytest.fixture()
def scores(int8_model: Path) -> str | None:
    """The scores tensor the int8 model's manifest lists (its other outputs feed the OOD check)."""
    listed = verify_model(int8_model)[1].scores_output
    return listed.name if listed is not None else None


def _zeros(backend: Any) -> np.ndarray:
    return np.zeros(backend.input_spec.shape, np.dtype(backend.input_spec.dtype))


def test_absent_libedgetpu_with_fallback_runs_on_cpu_degraded(
    scores: str | None, int8_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="edgemed.inference"):
        backend = make_backend(
            int8_model, BackendConfig(accelerator="edgetpu", edgetpu_device="usb"), scores_output=scores
        )
    assert (backend.delegate, backend.degraded, backend.backend) == ("cpu", True, "ai_edge_litert")
    assert backend.degraded_reason is not None
    assert "libedgetpu.so.1 cannot be loaded" in backend.degraded_reason
    assert "libedgetpu1-std" in backend.degraded_reason  # what to install
    assert "edgemed convert --target edgetpu" in backend.degraded_reason  # this model is not compiled either
    assert backend.invoke(_zeros(backend)).shape == (2,)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "edgetpu" in warnings[0].getMessage()


def test_absent_libedgetpu_with_fallback_refused_is_exit_6(scores: str | None, int8_model: Path) -> None:
    with pytest.raises(DelegateUnavailableError) as info:
        make_backend(int8_model, BackendConfig(accelerator="edgetpu", allow_cpu_fallback=False), scores_output=scores)
    assert info.value.exit_code == 6 and info.value.delegate == "edgetpu"
    assert "libedgetpu.so.1" in str(info.value) and "apt-get install libedgetpu1-std" in str(info.value)


def test_compiled_model_falls_back_to_its_cpu_twin(scores: str | None, tmp_path: Path, int8_model: Path) -> None:
    edgetpu_model = tmp_path / "m_edgetpu.tflite"  # not loadable on the CPU: it must never be opened there
    edgetpu_model.write_bytes(b"TFL3" + b"\0" * 60 + b"edgetpu-custom-op")
    backend = make_backend(
        edgetpu_model, BackendConfig(accelerator="edgetpu"), fallback_model=int8_model, scores_output=scores
    )
    assert (backend.delegate, backend.degraded) == ("cpu", True)
    assert backend.degraded_reason is not None and "compiled" not in backend.degraded_reason
    assert backend.invoke(_zeros(backend)).shape == (2,)


def test_compiled_model_without_twin_cannot_fall_back(tmp_path: Path) -> None:
    edgetpu_model = tmp_path / "m_edgetpu.tflite"
    edgetpu_model.write_bytes(b"TFL3" + b"\0" * 60 + b"edgetpu-custom-op")
    with pytest.raises(ModelError, match=r"compiled for the Edge TPU.*int8 twin"):
        make_backend(edgetpu_model, BackendConfig(accelerator="edgetpu"))


def test_edgetpu_delegate_that_loads_runs_undegraded(
    scores: str | None, fake_delegate: dict[str, Any], compiled: Path
) -> None:
    cfg = BackendConfig(accelerator="edgetpu", edgetpu_device="usb:0", allow_cpu_fallback=False)
    backend = make_backend(compiled, cfg, scores_output=scores)
    assert (backend.delegate, backend.degraded, backend.degraded_reason) == ("edgetpu", False, None)
    assert fake_delegate["library"] == "libedgetpu.so.1" and fake_delegate["options"] == {"device": "usb:0"}
    assert fake_delegate["object"].prepared == 1  # LiteRT really applied the delegate
    cpu = make_backend(compiled, BackendConfig(), scores_output=scores)
    x = np.arange(784, dtype=np.int16).reshape(1, 28, 28, 1).astype(np.int8)
    assert backend.invoke(x).tolist() == cpu.invoke(x).tolist()


def test_edgetpu_without_device_option_passes_no_options(
    scores: str | None, fake_delegate: dict[str, Any], compiled: Path
) -> None:
    make_backend(compiled, BackendConfig(accelerator="edgetpu"), scores_output=scores)
    assert fake_delegate["options"] == {}


def test_delegate_that_fails_to_prepare_falls_back_or_stops(
    scores: str | None, fake_delegate: dict[str, Any], compiled: Path, int8_model: Path
) -> None:
    fake_delegate["status"] = 1  # kTfLiteError from Prepare, as a runtime/compiler version mismatch gives
    backend = make_backend(
        compiled, BackendConfig(accelerator="edgetpu"), fallback_model=int8_model, scores_output=scores
    )
    assert (backend.delegate, backend.degraded) == ("cpu", True)
    assert backend.degraded_reason is not None and "could not be prepared" in backend.degraded_reason
    with pytest.raises(DelegateUnavailableError, match=r"edgetpu delegate unavailable.*prepared"):
        make_backend(compiled, BackendConfig(accelerator="edgetpu", allow_cpu_fallback=False), scores_output=scores)


def test_uncompiled_model_on_a_working_edgetpu(
    scores: str | None, fake_delegate: dict[str, Any], int8_model: Path
) -> None:
    backend = make_backend(int8_model, BackendConfig(accelerator="edgetpu"), scores_output=scores)
    assert (backend.delegate, backend.degraded) == ("cpu", True)
    assert backend.degraded_reason is not None and "edgemed convert --target edgetpu" in backend.degraded_reason
    with pytest.raises(ModelError, match="edgemed convert --target edgetpu"):
        make_backend(int8_model, BackendConfig(accelerator="edgetpu", allow_cpu_fallback=False), scores_output=scores)


def test_gpu_delegate_library_that_loads_runs_on_gpu(
    scores: str | None, fake_delegate: dict[str, Any], int8_model: Path
) -> None:
    cfg = BackendConfig(accelerator="gpu", gpu_library="libtensorflowlite_gpu_delegate.so", allow_cpu_fallback=False)
    backend = make_backend(int8_model, cfg, scores_output=scores)
    assert (backend.delegate, backend.degraded) == ("gpu", False)
    assert fake_delegate["library"] == "libtensorflowlite_gpu_delegate.so" and fake_delegate["delegate"] == "gpu"


def test_absent_gpu_delegate_library(scores: str | None, int8_model: Path) -> None:
    cfg = BackendConfig(accelerator="gpu", gpu_library="libtensorflowlite_gpu_delegate.so")
    backend = make_backend(int8_model, cfg, scores_output=scores)
    assert (backend.delegate, backend.degraded) == ("cpu", True)
    assert backend.degraded_reason is not None and "libtensorflowlite_gpu_delegate.so" in backend.degraded_reason
    with pytest.raises(DelegateUnavailableError, match="gpu delegate unavailable"):
        make_backend(int8_model, cfg.model_copy(update={"allow_cpu_fallback": False}), scores_output=scores)


def test_litert_gpu_accelerator_without_a_gpu(scores: str | None, int8_model: Path) -> None:
    backend = make_backend(int8_model, BackendConfig(accelerator="gpu"), scores_output=scores)
    assert (backend.delegate, backend.degraded) == ("cpu", True)
    assert backend.degraded_reason is not None and "GPU accelerator could not compile" in backend.degraded_reason
    assert backend.invoke(_zeros(backend)).shape == (2,)
    with pytest.raises(DelegateUnavailableError) as info:
        make_backend(int8_model, BackendConfig(accelerator="gpu", allow_cpu_fallback=False), scores_output=scores)
    assert info.value.delegate == "gpu" and info.value.exit_code == 6


def test_fallback_model_that_cannot_load_is_a_model_error(scores: str | None, tmp_path: Path, int8_model: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        make_backend(
            int8_model,
            BackendConfig(accelerator="edgetpu"),
            fallback_model=tmp_path / "twin.tflite",
            scores_output=scores,
        )


def test_check_library_tells_absent_from_not_a_delegate() -> None:
    absent = check_library("libedgetpu.so.1")
    assert absent is not None and "cannot be loaded" in absent
    not_delegate = check_library("libm.so.6")
    assert not_delegate is not None and "not a TensorFlow Lite external delegate" in not_delegate


def test_load_external_delegate_errors_carry_the_install_hint() -> None:
    _, module = interpreter_module()
    with pytest.raises(DelegateUnavailableError, match="HINT"):
        load_external_delegate(module, "libedgetpu.so.1", {}, delegate="edgetpu", install_hint="HINT")


def _stderr_of(code: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    assert "DONE" in proc.stdout
    return proc.stderr


def test_the_runtimes_own_load_delegate_prints_the_noise() -> None:
    # The control for the test below: without our handling, the message does reach stderr.
    err = _stderr_of("""
        import gc
        from ai_edge_litert.interpreter import load_delegate
        try:
            load_delegate("libedgetpu.so.1", {"device": "usb"})
        except OSError:
            pass
        gc.collect()
        print("DONE")
    """)
    assert NOISE in err and "Delegate.__del__" in err


def test_no_delegate_del_noise_reaches_the_user(int8_model: Path) -> None:
    err = _stderr_of(f"""
        import gc, ctypes
        from edgemed.errors import DelegateUnavailableError
        from edgemed.inference import BackendConfig, make_backend, interpreter_module
        import edgemed.inference.delegates as d
        make_backend({str(int8_model)!r}, BackendConfig(accelerator="edgetpu", edgetpu_device="usb"))
        try:
            make_backend({str(int8_model)!r}, BackendConfig(accelerator="edgetpu", allow_cpu_fallback=False))
        except DelegateUnavailableError:
            pass
        # A library that loads but is not a delegate: the runtime's Delegate.__init__ fails after setting
        # _library, the case where its __del__ would call destroy on a NULL delegate.
        d.check_library = lambda library: None
        try:
            d.load_external_delegate(interpreter_module()[1], "libm.so.6", {{}}, delegate="gpu",
                                     install_hint="x")
        except DelegateUnavailableError as exc:
            print("translated:", exc)
        gc.collect()
        print("DONE")
    """)
    assert NOISE not in err and "__del__" not in err


@pytest.mark.hardware
def test_real_edgetpu_runs_the_compiled_model() -> None:
    """On a device with a Coral: EDGEMED_EDGETPU_MODEL names a *_edgetpu.tflite; no fallback allowed."""
    import os

    model = os.environ.get("EDGEMED_EDGETPU_MODEL")
    if not model:
        pytest.fail("set EDGEMED_EDGETPU_MODEL to a model compiled with `edgemed convert --target edgetpu`")
    manifest = load_manifest(find_manifest(Path(model)))  # names its scores output among the feature outputs
    backend = make_backend(
        Path(model), BackendConfig(accelerator="edgetpu", allow_cpu_fallback=False), manifest=manifest
    )
    assert (backend.delegate, backend.degraded) == ("edgetpu", False)
    assert backend.invoke(_zeros(backend)).ndim == 1


@pytest.mark.hardware
def test_real_gpu_runs_the_model(scores: str | None, int8_model: Path) -> None:
    """On a device with a GPU driver (OpenCL, Vulkan or WebGPU) that LiteRT can use."""
    backend = make_backend(int8_model, BackendConfig(accelerator="gpu", allow_cpu_fallback=False), scores_output=scores)
    assert (backend.delegate, backend.degraded) == ("gpu", False)
    assert backend.invoke(_zeros(backend)).shape == (2,)
