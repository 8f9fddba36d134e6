"""Edge TPU: check a ``.tflite`` for compatibility without the compiler; run ``edgetpu_compiler`` if present.

The check applies the rules Coral publishes for Edge TPU models (coral.ai/docs/edgetpu/models-intro): every
activation tensor is 8-bit (int8 or uint8; int32 only for constant biases and shape parameters), tensor
shapes are static with batch 1, and every op is in the supported-op table below. It names each offending op
and tensor, so a user learns *before* compiling why an op would fall back to the CPU ("Model not quantized",
zero ops mapped).

The compiler only runs on x86-64 Linux from Coral's apt repository. When it is on PATH we run it, keep its
log, and parse how many ops it mapped to the TPU; when it is absent we say so and the CPU int8 model is the
twin the device falls back to."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgemed.errors import ModelError

#: TFLite builtin op names of Coral's "Supported operations" table (Edge TPU compiler 16).
SUPPORTED_OPS = frozenset(
    {
        "ADD",
        "AVERAGE_POOL_2D",
        "CONCATENATION",
        "CONV_2D",
        "DEPTHWISE_CONV_2D",
        "EXPAND_DIMS",
        "FULLY_CONNECTED",
        "L2_NORMALIZATION",
        "LOGISTIC",
        "UNIDIRECTIONAL_SEQUENCE_LSTM",
        "MAXIMUM",
        "MAX_POOL_2D",
        "MEAN",
        "MINIMUM",
        "MUL",
        "PACK",
        "PAD",
        "PRELU",
        "QUANTIZE",
        "REDUCE_MAX",
        "REDUCE_MIN",
        "RELU",
        "RELU6",
        "RELU_N1_TO_1",
        "RESHAPE",
        "RESIZE_BILINEAR",
        "RESIZE_NEAREST_NEIGHBOR",
        "RSQRT",
        "SLICE",
        "SOFTMAX",
        "SPACE_TO_DEPTH",
        "SPLIT",
        "SQUARED_DIFFERENCE",
        "SQUEEZE",
        "STRIDED_SLICE",
        "SUB",
        "SUM",
        "TANH",
        "TRANSPOSE",
        "TRANSPOSE_CONV",
    }
)
_EIGHT_BIT = {"int8", "uint8"}
_WEIGHT_OPS = {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV"}


@dataclass
class CompatReport:
    """Result of :func:`check_compatibility`.

    Attributes:
        compatible: no problem found.
        problems: one sentence per offending op or tensor, naming it.
        ops: op name -> count in the model.
    """

    compatible: bool
    problems: list[str] = field(default_factory=list)
    ops: dict[str, int] = field(default_factory=dict)


def check_compatibility(model: bytes | Path) -> CompatReport:
    """Check a ``.tflite`` against the Edge TPU's published requirements, without the compiler.

    Args:
        model: the file's bytes or path.

    Returns:
        The verdict, each problem naming the op or tensor, and the op counts.

    Raises:
        ModelError: the bytes are not a TFLite model.
    """
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    content = model if isinstance(model, bytes) else Path(model).read_bytes()
    try:
        # Without the default XNNPACK delegate, so the op list is the model's own ops, not "DELEGATE" nodes.
        interp = Interpreter(
            model_content=content,
            experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        )
    except (ValueError, RuntimeError) as exc:
        raise ModelError(f"not a TFLite model ({exc}); pass a .tflite written by `edgemed convert`") from exc
    tensors = {t["index"]: t for t in interp.get_tensor_details()}
    ops = interp._get_ops_details()
    problems: list[str] = []
    counts: dict[str, int] = {}
    for d in interp.get_input_details() + interp.get_output_details():
        sig = [int(v) for v in d.get("shape_signature", d["shape"])]
        if any(v < 0 for v in sig) or (sig and sig[0] != 1):
            problems.append(
                f"tensor {d['name']!r} has shape {sig}: the Edge TPU needs static shapes with "
                "batch 1 (convert with a fixed batch-1 input)"
            )
    for op in ops:
        name = str(op["op_name"])
        counts[name] = counts.get(name, 0) + 1
        if name not in SUPPORTED_OPS:
            problems.append(
                f"op {name} (node {op['index']}) is not in the Edge TPU's supported-op list; it and "
                "every op after it would run on the CPU"
            )
        constant_ok = _constant_inputs(name, list(op["inputs"]))
        for position, idx in enumerate(op["inputs"]):
            if idx < 0:
                continue
            t = tensors[idx]
            dtype = _dtype_name(t["dtype"])
            if dtype in _EIGHT_BIT or (dtype == "int32" and position in constant_ok):
                continue
            problems.append(
                f"tensor {t['name']!r} ({dtype}, input {position} of {name}) is not 8-bit: "
                "the Edge TPU needs a full-integer model (edgemed convert --target int8)"
            )
        for idx in op["outputs"]:
            t = tensors[idx]
            dtype = _dtype_name(t["dtype"])
            if dtype not in _EIGHT_BIT:
                problems.append(f"tensor {t['name']!r} ({dtype}, output of {name}) is not 8-bit")
    unique = list(dict.fromkeys(problems))
    return CompatReport(compatible=not unique, problems=unique, ops=counts)


def _constant_inputs(op_name: str, inputs: list[int]) -> set[int]:
    """Input positions where an int32 tensor is legitimate: biases, and shape/axis/padding parameters."""
    if op_name in _WEIGHT_OPS:
        return {2}
    return set(range(1, len(inputs)))


def _dtype_name(dtype: Any) -> str:
    import numpy as np

    return str(np.dtype(dtype).name)


@dataclass
class CompileResult:
    """What ``edgetpu_compiler`` did.

    Attributes:
        ok: exit status 0 and an output model was written.
        model_path: the compiled ``*_edgetpu.tflite`` (None on failure).
        log_path: the compiler's console output, kept beside the model.
        ops_on_tpu: operations mapped to the Edge TPU.
        ops_on_cpu: operations left on the CPU.
        total_ops: operations in the model.
        table: rows ``(operator, count, status)`` from the compiler's log.
        version: the compiler's version string.
    """

    ok: bool
    model_path: Path | None
    log_path: Path
    ops_on_tpu: int = 0
    ops_on_cpu: int = 0
    total_ops: int = 0
    table: list[tuple[str, int, str]] = field(default_factory=list)
    version: str = ""


def find_compiler() -> str | None:
    """Path of ``edgetpu_compiler`` on PATH, or None."""
    return shutil.which("edgetpu_compiler")


def parse_compiler_log(text: str) -> dict[str, Any]:
    """Parse the console output of ``edgetpu_compiler -s``.

    Reads the version, ``Total number of operations``, the ``Number of operations that will run on Edge
    TPU/CPU``
    lines (printed only when some ops stay on the CPU) and the ``Operator  Count  Status`` table.
    """
    version = re.search(r"Edge TPU Compiler version (\S+)", text)
    total = re.search(r"Total number of operations:\s*(\d+)", text)
    on_tpu = re.search(r"Number of operations that will run on Edge TPU:\s*(\d+)", text)
    on_cpu = re.search(r"Number of operations that will run on CPU:\s*(\d+)", text)
    table: list[tuple[str, int, str]] = []
    in_table = False
    for line in text.splitlines():
        if re.match(r"\s*Operator\s+Count\s+Status", line):
            in_table = True
            continue
        row = re.match(r"\s*([A-Z][A-Z0-9_]*)\s+(\d+)\s+(\S.*?)\s*$", line) if in_table else None
        if row:
            table.append((row.group(1), int(row.group(2)), row.group(3)))
    mapped = sum(c for _, c, s in table if s == "Mapped to Edge TPU")
    unmapped = sum(c for _, c, s in table if s != "Mapped to Edge TPU")
    return {
        "version": version.group(1) if version else "",
        "total_ops": int(total.group(1)) if total else mapped + unmapped,
        "ops_on_tpu": int(on_tpu.group(1)) if on_tpu else mapped,
        "ops_on_cpu": int(on_cpu.group(1)) if on_cpu else unmapped,
        "table": table,
    }


def run_compiler(
    model_path: Path, out_dir: Path, compiler: str | None = None, timeout_s: float = 300.0
) -> CompileResult | None:
    """Compile ``model_path`` with ``edgetpu_compiler`` into ``out_dir``; None when the compiler is absent.

    The console output is written to ``{stem}_edgetpu.compiler.log`` whether or not compilation succeeds.

    Raises:
        ModelError: the compiler could not be started or timed out.
    """
    exe = compiler or find_compiler()
    if exe is None:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(
            [exe, "-s", "-o", str(out_dir), str(model_path)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelError(f"edgetpu_compiler ({exe}) failed to run: {exc}") from exc
    log_path = out_dir / f"{model_path.stem}_edgetpu.compiler.log"
    log_path.write_text(proc.stdout + proc.stderr, encoding="utf-8")
    parsed = parse_compiler_log(proc.stdout + proc.stderr)
    compiled = out_dir / f"{model_path.stem}_edgetpu.tflite"
    ok = proc.returncode == 0 and compiled.is_file()
    return CompileResult(
        ok=ok,
        model_path=compiled if ok else None,
        log_path=log_path,
        ops_on_tpu=parsed["ops_on_tpu"],
        ops_on_cpu=parsed["ops_on_cpu"],
        total_ops=parsed["total_ops"],
        table=parsed["table"],
        version=parsed["version"],
    )
