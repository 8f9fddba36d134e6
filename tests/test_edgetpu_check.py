"""Edge TPU compatibility check on real converted models, and compiler-log handling with a stand-in compiler."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from converters import edgetpu
from converters.data import Dataset, load_dataset

ROOT = Path(__file__).resolve().parent.parent
BREAST = ROOT / "data" / "breastmnist_28.npz"
STANDIN = ROOT / "tests" / "fixtures" / "edgetpu_compiler_standin"

REAL_LOG = """Edge TPU Compiler version 16.0.384591198
Started a compilation timeout timer of 180 seconds.

Model compiled successfully in 1354 ms.

Input model: m.tflite
Input size: 5.10MiB
Output model: m_edgetpu.tflite
Output size: 6.28MiB
Number of Edge TPU subgraphs: 1
Total number of operations: 143
Operation log: m_edgetpu.log

Model successfully compiled but not all operations are supported by the Edge TPU.
Number of operations that will run on Edge TPU: 139
Number of operations that will run on CPU: 4

Operator                       Count      Status

CONV_2D                        120        Mapped to Edge TPU
RESHAPE                        19         Mapped to Edge TPU
DEQUANTIZE                     2          Operation is working on an unsupported data type
LOGISTIC                       2          More than one subgraph is not supported
"""


def test_parse_compiler_log() -> None:
    parsed = edgetpu.parse_compiler_log(REAL_LOG)
    assert parsed["version"] == "16.0.384591198"
    assert (parsed["total_ops"], parsed["ops_on_tpu"], parsed["ops_on_cpu"]) == (143, 139, 4)
    assert ("DEQUANTIZE", 2, "Operation is working on an unsupported data type") in parsed["table"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from converters.convert import calibration_sample
    from converters.source import load_source

    ds: Dataset = load_dataset(BREAST, labels=["malignant", "benign"])
    from converters.models import reference_cnn

    out = tmp_path_factory.mktemp("tpu")
    model = reference_cnn((28, 28, 1), 2)  # untrained is enough: compatibility is about the graph
    model.save(out / "ref.keras")
    source = load_source(out / "ref.keras")
    calib = calibration_sample(ds, per_class=20)
    from converters.convert import to_tflite

    paths = {}
    for target in ("float32", "int8", "dynamic"):
        paths[target] = out / f"ref_{target}.tflite"
        paths[target].write_bytes(to_tflite(source, target, calib))
    return paths


@pytest.mark.slow
def test_full_integer_batch1_model_is_compatible(models: dict[str, Path]) -> None:
    report = edgetpu.check_compatibility(models["int8"])
    assert report.compatible, report.problems
    assert report.ops.get("CONV_2D") == 3 and "SHAPE" not in report.ops  # static batch: no run-time shape ops


@pytest.mark.slow
def test_float_model_names_the_offending_tensor(models: dict[str, Path]) -> None:
    from ai_edge_litert.interpreter import Interpreter

    report = edgetpu.check_compatibility(models["float32"])
    assert not report.compatible
    input_name = Interpreter(model_path=str(models["float32"])).get_input_details()[0]["name"]
    assert any(f"tensor {input_name!r} (float32" in p for p in report.problems), report.problems
    dyn = edgetpu.check_compatibility(models["dynamic"])
    assert not dyn.compatible and any("float32" in p for p in dyn.problems)


@pytest.mark.slow
def test_stand_in_compiler_on_path(models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(STANDIN, bin_dir / "edgetpu_compiler")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    ops = edgetpu.check_compatibility(models["int8"]).ops
    monkeypatch.setenv("EDGETPU_STANDIN_OPS", json.dumps(ops))
    monkeypatch.setenv("EDGETPU_STANDIN_CPU_OPS", "FULLY_CONNECTED")
    assert edgetpu.find_compiler() == str(bin_dir / "edgetpu_compiler")
    result = edgetpu.run_compiler(models["int8"], tmp_path / "out")
    assert result is not None and result.ok and result.model_path is not None
    assert result.model_path.name == "ref_int8_edgetpu.tflite"
    assert result.ops_on_cpu == ops["FULLY_CONNECTED"] and result.total_ops == sum(ops.values())
    assert result.ops_on_tpu == result.total_ops - result.ops_on_cpu
    assert "Edge TPU Compiler version" in result.log_path.read_text()
    monkeypatch.setenv("EDGETPU_STANDIN_FAIL", "1")
    failed = edgetpu.run_compiler(models["int8"], tmp_path / "out2")
    assert failed is not None and not failed.ok and "Compilation failed" in failed.log_path.read_text()


@pytest.mark.slow
def test_convert_edgetpu_target_with_and_without_compiler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from converters.convert import convert
    from converters.train import train
    from edgemed.manifest import load_manifest

    ds = load_dataset(BREAST, labels=["malignant", "benign"])
    model = train(ds, tmp_path / "m", epochs=4, progress=False, name="b").model_path
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no edgetpu_compiler here
    absent = convert(model, ds, tmp_path / "a", targets=("edgetpu",), progress=False)
    assert set(absent.artifacts) == {"int8"}
    assert any("edgetpu_compiler is not on PATH" in n for n in absent.notes)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(STANDIN, bin_dir / "edgetpu_compiler")
    monkeypatch.setenv(
        "PATH",
        f"{bin_dir}{os.pathsep}{os.path.dirname(shutil.which('python3') or '/usr/bin')}{os.pathsep}/usr/bin:/bin",
    )
    monkeypatch.setenv(
        "EDGETPU_STANDIN_OPS", json.dumps({"CONV_2D": 3, "MAX_POOL_2D": 2, "RESHAPE": 1, "FULLY_CONNECTED": 2})
    )
    present = convert(model, ds, tmp_path / "p", targets=("edgetpu",), progress=False)
    manifest = load_manifest(present.manifest_path)
    tpu = next(a for a in manifest.artifacts if a.target == "edgetpu")
    assert tpu.file == "b_edgetpu.tflite" and tpu.twin == "b_int8.tflite"
    assert manifest.metrics["edgetpu"]["compiler"]["ops_on_tpu"] == 8  # type: ignore[index]
    assert manifest.metrics["edgetpu"]["compatible"] is True  # type: ignore[index]
