"""Inference backends on a real LiteRT interpreter and a real BreastMNIST-trained int8 model."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from edgemed.errors import ConfigError, ModelError
from edgemed.inference import BackendConfig, interpreter_module, make_backend
from edgemed.inference.backends import is_edgetpu_compiled
from edgemed.inference.classify import dequantize, softmax
from edgemed.inference.compiled import CompiledModelBackend
from edgemed.inference.probe import coral_usb_devices, probe_delegates, runtime_version
from edgemed.manifest import verify_model
from edgemed.preprocess import quantize

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def scores(int8_model: Path) -> str | None:
    """The scores tensor the int8 model's manifest lists (its other outputs feed the OOD check)."""
    listed = verify_model(int8_model)[1].scores_output
    return listed.name if listed is not None else None


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=180, cwd=ROOT
    )


def _breast_test_set(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    data = np.load(data_dir / "breastmnist_28.npz")
    return data["test_images"], data["test_labels"].reshape(-1)


def test_importing_the_package_imports_no_interpreter() -> None:
    proc = _run_python("""
        import sys
        import edgemed.inference
        from edgemed.inference import BackendConfig
        BackendConfig(accelerator="edgetpu")
        loaded = [m for m in ("ai_edge_litert", "tflite_runtime", "tensorflow", "numpy") if m in sys.modules]
        print(",".join(loaded) or "none")
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "none"


def test_auto_runtime_is_litert_and_never_loads_tensorflow() -> None:
    proc = _run_python("""
        import sys
        from edgemed.inference import interpreter_module
        name, module = interpreter_module()
        print(name, module.__name__, "tensorflow" in sys.modules)
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["ai_edge_litert", "ai_edge_litert.interpreter", "False"]


def test_auto_runtime_falls_back_to_tensorflow_lite_when_litert_is_missing(
    scores: str | None, int8_model: Path
) -> None:
    # tflite_runtime is not installed here, so with LiteRT blocked the third choice must run the same model.
    proc = _run_python(f"""
        import sys
        sys.modules["ai_edge_litert"] = None
        import numpy as np
        from edgemed.inference import BackendConfig, make_backend
        b = make_backend({str(int8_model)!r}, BackendConfig(), scores_output={scores!r})
        print(b.backend, b.invoke(np.zeros(b.input_spec.shape, np.int8)).tolist())
    """)
    assert proc.returncode == 0, proc.stderr
    name, out = proc.stdout.strip().splitlines()[-1].split(" ", 1)
    assert name == "tensorflow"
    litert = make_backend(int8_model, BackendConfig(), scores_output=scores)
    assert json.loads(out) == litert.invoke(np.zeros(litert.input_spec.shape, np.int8)).tolist()  # bit-identical


def test_no_interpreter_installed_is_a_config_error_naming_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for mod in (
        "ai_edge_litert",
        "ai_edge_litert.interpreter",
        "tensorflow",
        "tensorflow.lite",
        "tensorflow.lite.python",
        "tensorflow.lite.python.interpreter",
        "tflite_runtime",
        "tflite_runtime.interpreter",
    ):
        monkeypatch.setitem(sys.modules, mod, None)
    with pytest.raises(ConfigError, match="pip install ai-edge-litert"):
        interpreter_module()


def test_explicit_runtime_that_is_not_installed_says_how_to_install_it() -> None:
    with pytest.raises(ConfigError, match=r"tflite_runtime.*pip install tflite-runtime"):
        interpreter_module("tflite_runtime")


def test_cpu_backend_reports_specs_and_classifies_real_images(
    scores: str | None, int8_model: Path, data_dir: Path
) -> None:
    backend = make_backend(int8_model, BackendConfig(threads=2), scores_output=scores)
    assert (backend.backend, backend.delegate, backend.degraded, backend.degraded_reason) == (
        "ai_edge_litert",
        "cpu",
        False,
        None,
    )
    spec = backend.input_spec
    assert spec.shape == (1, 28, 28, 1) and spec.dtype == "int8" and spec.quantized
    assert backend.output_spec.shape == (1, 2) and backend.output_spec.dtype == "int8"
    images, labels = _breast_test_set(data_dir)
    predicted = []
    for img in images:
        x = quantize(img[..., None].astype(np.float32) / 255.0, spec)
        raw = backend.invoke(x)
        assert raw.shape == (2,) and raw.dtype == np.int8
        predicted.append(int(np.argmax(softmax(dequantize(raw, backend.output_spec)))))
    accuracy = float(np.mean(np.array(predicted) == labels))
    # The reference CNN reaches ~.85 on this test split; a broken backend gives ~.27 or ~.73 (one class).
    assert accuracy > 0.75
    assert len(set(predicted)) == 2


def test_invoke_accepts_the_input_with_or_without_its_batch_axis(
    scores: str | None, int8_model: Path, data_dir: Path
) -> None:
    backend = make_backend(int8_model, BackendConfig(), scores_output=scores)
    img = _breast_test_set(data_dir)[0][3]
    x = quantize(img[..., None].astype(np.float32) / 255.0, backend.input_spec)
    assert backend.invoke(x).tolist() == backend.invoke(x[None]).tolist()


def test_thread_count_does_not_change_the_result(scores: str | None, int8_model: Path, data_dir: Path) -> None:
    one = make_backend(int8_model, BackendConfig(threads=1), scores_output=scores)
    two = make_backend(int8_model, BackendConfig(threads=2), scores_output=scores)
    for img in _breast_test_set(data_dir)[0][:20]:
        x = quantize(img[..., None].astype(np.float32) / 255.0, one.input_spec)
        assert one.invoke(x).tolist() == two.invoke(x).tolist()


def test_wrong_input_and_closed_backend_are_model_errors(scores: str | None, int8_model: Path) -> None:
    backend = make_backend(int8_model, BackendConfig(), scores_output=scores)
    with pytest.raises(ModelError, match="must be int8, got float32"):
        backend.invoke(np.zeros((1, 28, 28, 1), np.float32))
    with pytest.raises(ModelError, match=r"shape \(1, 28, 28, 1\)"):
        backend.invoke(np.zeros((1, 32, 32, 1), np.int8))
    backend.close()
    with pytest.raises(ModelError, match="closed"):
        backend.invoke(np.zeros((1, 28, 28, 1), np.int8))


def test_invoke_is_cheap(scores: str | None, int8_model: Path) -> None:
    backend = make_backend(int8_model, BackendConfig(threads=1), scores_output=scores)
    x = np.zeros(backend.input_spec.shape, np.int8)
    times = []
    for _ in range(300):
        t0 = time.perf_counter()
        backend.invoke(x)
        times.append(time.perf_counter() - t0)
    # The model itself takes ~10 us here; per-call tensor lookups would add tens of us, a re-allocation ms.
    assert float(np.median(times)) < 1e-3


def test_missing_and_corrupt_models_are_model_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        make_backend(tmp_path / "absent.tflite", BackendConfig())
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"this is not a flatbuffer" * 10)
    with pytest.raises(ModelError, match="cannot be loaded"):
        make_backend(bad, BackendConfig())
    assert ModelError("x").exit_code == 3


def test_compiled_model_backend_matches_the_interpreter(scores: str | None, int8_model: Path, data_dir: Path) -> None:
    # The GPU path minus the GPU: LiteRT's CompiledModel on its CPU accelerator must match the Interpreter.
    _, module = interpreter_module()
    compiled = CompiledModelBackend(module, int8_model, 2, accelerator="cpu", scores_output=scores)
    plain = make_backend(int8_model, BackendConfig(), scores_output=scores)
    assert compiled.input_spec == plain.input_spec and compiled.output_spec == plain.output_spec
    assert (compiled.delegate, compiled.backend, compiled.degraded) == ("cpu", "ai_edge_litert", False)
    for img in _breast_test_set(data_dir)[0][:10]:
        x = quantize(img[..., None].astype(np.float32) / 255.0, plain.input_spec)
        assert compiled.invoke(x).tolist() == plain.invoke(x).tolist()
        # The reference CNN's feature outputs too, each found by name in CompiledModel's own buffer order.
        assert all(compiled.output(o.name).tolist() == plain.output(o.name).tolist() for o in plain.output_specs)
    compiled.close()
    with pytest.raises(ModelError, match="closed"):
        compiled.invoke(np.zeros((1, 28, 28, 1), np.int8))


def test_edgetpu_compiled_models_are_recognised(int8_model: Path, tmp_path: Path) -> None:
    assert not is_edgetpu_compiled(int8_model)
    compiled = tmp_path / "m_edgetpu.tflite"
    compiled.write_bytes(b"TFL3" + b"\0" * 64 + b"edgetpu-custom-op" + b"\0" * 16)
    assert is_edgetpu_compiled(compiled)


def test_backend_config_rejects_unknown_keys_and_bad_values() -> None:
    assert BackendConfig(edgetpu_device="usb:1").edgetpu_device == "usb:1"
    assert BackendConfig(edgetpu_device="pci").edgetpu_device == "pci"
    with pytest.raises(ValidationError, match="usb, usb:N, pci or pci:N"):
        BackendConfig(edgetpu_device="usb1")
    with pytest.raises(ValidationError, match="extra"):
        BackendConfig.model_validate({"accelerator": "cpu", "acelerator": "gpu"})
    with pytest.raises(ValidationError):
        BackendConfig(threads=0)
    with pytest.raises(ValidationError):
        BackendConfig.model_validate({"accelerator": "npu"})
    assert all(f.description for f in BackendConfig.model_fields.values())


def _usb_device(sysfs: Path, name: str, vendor: str, product: str) -> None:
    dev = sysfs / name
    dev.mkdir(parents=True)
    (dev / "idVendor").write_text(vendor + "\n")
    (dev / "idProduct").write_text(product + "\n")


def test_probe_on_this_machine_finds_the_cpu_only(tmp_path: Path) -> None:
    rows = probe_delegates(BackendConfig(threads=3), dev=tmp_path / "dev", sysfs=tmp_path / "sys")
    assert [r.name for r in rows] == ["cpu", "edgetpu", "gpu"]
    cpu, edgetpu, gpu = rows
    assert cpu.available and cpu.detail == f"ai_edge_litert {runtime_version('ai_edge_litert')}, XNNPACK, 3 threads"
    assert runtime_version("ai_edge_litert")[0].isdigit()
    assert not edgetpu.available and "libedgetpu.so.1 cannot be loaded" in edgetpu.detail
    assert "no Coral USB" in edgetpu.detail
    assert not gpu.available and "no GPU device node" in gpu.detail


def test_probe_reports_coral_and_gpu_devices_it_can_see(tmp_path: Path) -> None:
    sysfs, dev = tmp_path / "sys", tmp_path / "dev"
    _usb_device(sysfs, "1-1", "18d1", "9302")  # Coral USB after firmware load
    _usb_device(sysfs, "1-2", "1a6e", "089a")  # Coral USB before firmware load
    _usb_device(sysfs, "1-3", "046d", "c077")  # a mouse
    (sysfs / "1-1:1.0").mkdir()  # an interface directory without ids
    (dev / "dri").mkdir(parents=True)
    (dev / "dri" / "renderD128").touch()
    (dev / "apex_0").touch()
    assert coral_usb_devices(sysfs) == 2
    _, edgetpu, gpu = probe_delegates(BackendConfig(), dev=dev, sysfs=sysfs)
    assert "2 USB, apex_0" in edgetpu.detail and not edgetpu.available  # the library is still missing
    assert gpu.available and "renderD128" in gpu.detail
    _, _, gpu_lib = probe_delegates(
        BackendConfig(gpu_library="libtensorflowlite_gpu_delegate.so"), dev=dev, sysfs=sysfs
    )
    assert not gpu_lib.available and "libtensorflowlite_gpu_delegate.so cannot be loaded" in gpu_lib.detail


def test_probe_with_a_missing_runtime_marks_the_cpu_unavailable(tmp_path: Path) -> None:
    cpu = probe_delegates(BackendConfig(runtime="tflite_runtime"), dev=tmp_path, sysfs=tmp_path)[0]
    assert not cpu.available and "pip install tflite-runtime" in cpu.detail
