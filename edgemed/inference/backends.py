"""Concrete backends: a TensorFlow Lite ``Interpreter`` (CPU with XNNPACK, or an external delegate) and
LiteRT's ``CompiledModel`` (GPU accelerator).

Both look up their tensors once at construction, so ``invoke`` is one copy in, one run and one copy out.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from edgemed.errors import DelegateUnavailableError, ModelError
from edgemed.manifest import OutputKind, WeightKind, check_model_file
from edgemed.stderr_filter import LITERT_NOTICES, filtered_stderr
from edgemed.types import Delegate, TensorSpec

log = logging.getLogger("edgemed.inference")

EDGETPU_CUSTOM_OP = b"edgetpu-custom-op"

# What the interpreter raises for a model it cannot read or prepare (bad flatbuffer, unresolved custom op).
_LOAD_FAILURES = (ValueError, RuntimeError, OSError)

# How a classifier's output op tells what the output holds. Ops that turn scores into probabilities:
_PROBABILITY_OPS = frozenset({"SOFTMAX", "LOGISTIC"})
# ...ops a last layer computes raw scores (logits) with:
_LOGIT_OPS = frozenset(
    {"FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D", "BATCH_MATMUL", "ADD", "SUB", "MUL", "MEAN", "SUM"}
)
# ...and ops that pass a value on with its meaning unchanged (quantization and layout), looked through.
_PASS_THROUGH_OPS = frozenset({"QUANTIZE", "DEQUANTIZE", "RESHAPE", "SQUEEZE", "CAST"})


def is_edgetpu_compiled(model: Path) -> bool:
    """True when the model was compiled by ``edgetpu_compiler``.

    The compiler replaces the mapped subgraph with one custom op whose code name is stored as a plain string
    in the flatbuffer, so a byte search finds it without parsing the schema (which tflite_runtime does not
    ship).
    """
    return EDGETPU_CUSTOM_OP in Path(model).read_bytes()


def _spec(detail: dict[str, Any]) -> TensorSpec:
    scale, zero_point = detail.get("quantization", (0.0, 0))
    return TensorSpec(
        name=str(detail["name"]),
        shape=tuple(int(d) for d in detail["shape"]),
        dtype=np.dtype(detail["dtype"]).name,
        scale=float(scale),
        zero_point=int(zero_point),
    )


def _check_file(model: Path) -> None:
    check_model_file(model)


def graph_output_kind(interpreter: Any) -> OutputKind | None:
    """What the model's first output holds, read from the graph op that computes it.

    Args:
        interpreter: an ``Interpreter`` of any of the three packages (tensors allocated or not).

    Returns:
        ``probabilities`` when the output comes from a SOFTMAX or LOGISTIC op, ``logits`` when it comes from a
        layer that computes raw scores, ``None`` when the graph cannot tell (an Edge TPU custom op, or a package
        without op details).
    """
    try:
        # The public API has no graph introspection; this private call exists in ai_edge_litert, tflite_runtime
        # and tensorflow.lite alike.
        ops = interpreter._get_ops_details()
        tensor = int(interpreter.get_output_details()[0]["index"])
    except (AttributeError, TypeError, ValueError, RuntimeError, IndexError, KeyError):
        return None
    producer: dict[int, tuple[str, list[int]]] = {}
    for op in ops:
        name = str(op.get("op_name", ""))
        if name == "DELEGATE":  # a delegate's node lists every tensor it computes; the original ops remain
            continue
        for out in op.get("outputs", []):
            producer[int(out)] = (name, [int(i) for i in op.get("inputs", [])])
    for _ in range(len(ops) + 1):  # bounded: each step moves one op back towards the input
        name, inputs = producer.get(tensor, ("", []))
        if name in _PROBABILITY_OPS:
            return "probabilities"
        if name in _LOGIT_OPS:
            return "logits"
        if name not in _PASS_THROUGH_OPS or not inputs:
            return None
        tensor = inputs[0]
    return None


def graph_weights(interpreter: Any) -> WeightKind | None:
    """How the model stores its weights, read from the types of its tensors other than the input and output.

    The input and output dtypes cannot tell the float targets apart: float32, float16 and dynamic-range models
    all take and return float32. float16 conversion keeps its weights as float16 constants (DEQUANTIZE ops
    widen them to float32), dynamic-range quantization keeps them as int8.

    Args:
        interpreter: an ``Interpreter`` of any of the three packages.

    Returns:
        ``float16`` when any tensor is float16, ``int8`` when any is int8 or uint8 (quantized weights), else
        ``float32``; ``None`` when the interpreter lists no tensors.
    """
    try:
        io = {int(d["index"]) for d in (*interpreter.get_input_details(), *interpreter.get_output_details())}
        kinds = {np.dtype(d["dtype"]).name for d in interpreter.get_tensor_details() if int(d["index"]) not in io}
    except (AttributeError, TypeError, ValueError, RuntimeError, KeyError):
        return None
    if not kinds:
        return None
    if "float16" in kinds:
        return "float16"
    return "int8" if kinds & {"int8", "uint8"} else "float32"


def open_interpreter(module: ModuleType, model: Path, threads: int, delegates: list[Any] | None = None) -> Any:
    """Build and allocate an ``Interpreter`` (XNNPACK is applied by default on CPU).

    Raises:
        ModelError: without delegates, the model cannot be loaded.
        DelegateUnavailableError: with delegates, the interpreter could not be prepared with them (the model
            may still load on CPU, so the caller decides whether to fall back).
    """
    _check_file(model)
    try:
        with filtered_stderr(LITERT_NOTICES):  # LiteRT's "Created TensorFlow Lite XNNPACK delegate" notice
            interp = module.Interpreter(
                model_path=str(model), num_threads=threads, experimental_delegates=delegates or None
            )
            interp.allocate_tensors()
    except _LOAD_FAILURES as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if delegates:
            raise DelegateUnavailableError("delegate", f"the model could not be prepared with it ({detail})") from exc
        hint = (
            "it is compiled for the Edge TPU: run its CPU int8 twin instead"
            if is_edgetpu_compiled(model)
            else "re-run `edgemed convert` and copy the file again"
        )
        raise ModelError(f"model {model} cannot be loaded ({detail}); {hint}") from exc
    return interp


class InterpreterBackend:
    """A model running in a TensorFlow Lite ``Interpreter``.

    Attributes:
        input_spec, output_spec: the single input and first output tensor.
        backend: interpreter package that runs it.
        delegate: where it actually runs.
        degraded: True when ``delegate`` is not the intended accelerator.
        degraded_reason: why, in one line, or ``None``.
        output_kind: what the graph's output op computes (``None``: the graph cannot tell).
        weights: how the model stores its weights (``graph_weights``).
    """

    def __init__(
        self,
        interpreter: Any,
        *,
        backend: str,
        delegate: Delegate,
        intended: Delegate,
        degraded_reason: str | None = None,
        keep_alive: list[Any] | None = None,
    ) -> None:
        self._interp = interpreter
        # The delegate objects must outlive the interpreter that uses their native pointers.
        self._keep_alive = keep_alive or []
        inputs = interpreter.get_input_details()
        outputs = interpreter.get_output_details()
        if len(inputs) != 1:
            raise ModelError(f"the model has {len(inputs)} inputs; edgemed runs single-input image classifiers")
        self.input_spec = _spec(inputs[0])
        self.output_spec = _spec(outputs[0])
        self._in_index = int(inputs[0]["index"])
        self._out_index = int(outputs[0]["index"])
        self._in_shape = self.input_spec.shape
        self._in_dtype = np.dtype(inputs[0]["dtype"])
        self.output_kind = graph_output_kind(interpreter)
        self.weights = graph_weights(interpreter)
        self.backend = backend
        self.delegate: Delegate = delegate
        self.degraded = delegate != intended
        self.degraded_reason = degraded_reason if self.degraded else None

    def invoke(self, x: np.ndarray) -> np.ndarray:
        """Run the model on one preprocessed, already quantized input.

        Args:
            x: the input tensor, shaped like ``input_spec.shape`` with or without its leading batch axis of 1,
                of dtype ``input_spec.dtype``.

        Returns:
            The raw output row, shape ``(classes,)``, in the output tensor's dtype (see ``output_spec``).

        Raises:
            ModelError: the input has the wrong dtype or size, or the backend has been closed.
        """
        if self._interp is None:
            raise ModelError("the inference backend is closed; build a new one with make_backend")
        if x.dtype != self._in_dtype:
            raise ModelError(
                f"model input must be {self._in_dtype.name}, got {x.dtype.name}; quantize with "
                "edgemed.preprocess.quantize(x, backend.input_spec)"
            )
        try:
            self._interp.set_tensor(self._in_index, x.reshape(self._in_shape))
        except ValueError as exc:
            raise ModelError(f"model input must have shape {self._in_shape}, got {x.shape}") from exc
        self._interp.invoke()
        out: np.ndarray = self._interp.get_tensor(self._out_index)
        return out.reshape(-1)

    def close(self) -> None:
        """Release the interpreter, then its delegates (in that order: the interpreter uses them)."""
        self._interp = None
        self._keep_alive = []


class CompiledModelBackend:
    """A model running in LiteRT's ``CompiledModel`` on a hardware accelerator (used for the GPU)."""

    def __init__(self, module: ModuleType, model: Path, threads: int, *, accelerator: str = "gpu") -> None:
        """Compile the model for the accelerator.

        Args:
            module: the ``ai_edge_litert.interpreter`` module (its package provides ``CompiledModel``).
            model: path of the model (float16 or float32 for the GPU).
            threads: CPU threads, for ops the accelerator leaves to the CPU.
            accelerator: ``gpu``, or ``cpu`` (to exercise this backend where no GPU exists).

        Raises:
            ModelError: the model cannot be loaded at all.
            DelegateUnavailableError: the accelerator is absent or cannot run this model.
        """
        from ai_edge_litert.compiled_model import CompiledModel
        from ai_edge_litert.hardware_accelerator import HardwareAccelerator
        from ai_edge_litert.options import CpuOptions, Options

        # Specs (with quantization parameters, which CompiledModel does not report) come from a plain
        # interpreter; this also tells a broken model (ModelError) apart from an absent accelerator.
        probe = open_interpreter(module, model, threads)
        self.input_spec = _spec(probe.get_input_details()[0])
        self.output_spec = _spec(probe.get_output_details()[0])
        self.output_kind = graph_output_kind(probe)
        self.weights = graph_weights(probe)
        del probe
        # GPU|CPU lets ops the GPU cannot run stay on the CPU (as the Edge TPU compiler does); with no GPU adapter
        # at all LiteRT still raises RuntimeError (measured with 2.3), so an absent GPU is never silent.
        flag = HardwareAccelerator.CPU
        if accelerator == "gpu":
            flag = HardwareAccelerator.GPU | HardwareAccelerator.CPU
        try:
            with filtered_stderr(LITERT_NOTICES):  # LiteRT's INFO lines; its warnings and errors still show
                compiled = CompiledModel.from_file(
                    str(model),
                    options=Options(hardware_accelerators=flag, cpu_options=CpuOptions(num_threads=threads)),
                )
                self._inputs = compiled.create_input_buffers(0)
                self._outputs = compiled.create_output_buffers(0)
        except RuntimeError as exc:
            detail = " ".join(str(exc).split())
            raise DelegateUnavailableError(
                accelerator,
                f"LiteRT's {accelerator.upper()} accelerator could not compile the model: no usable "
                "adapter (OpenCL, Vulkan or WebGPU driver) was found, or the model uses ops it cannot run "
                f"(LiteRT said: {detail})",
            ) from exc
        self._compiled: Any = compiled
        self.fully_accelerated = bool(compiled.is_fully_accelerated())
        if accelerator == "gpu" and not self.fully_accelerated:
            log.info("some ops of the model run on the CPU: the GPU accelerator does not support them")
        self._in_shape = self.input_spec.shape
        self._in_dtype = np.dtype(self.input_spec.dtype)
        self._out_count = int(np.prod(self.output_spec.shape))
        self._out_dtype = np.dtype(self.output_spec.dtype)
        self.backend = "ai_edge_litert"
        self.delegate: Delegate = "gpu" if accelerator == "gpu" else "cpu"
        self.degraded = False
        self.degraded_reason: str | None = None

    def invoke(self, x: np.ndarray) -> np.ndarray:
        """Run the model on one preprocessed input; see ``InterpreterBackend.invoke``."""
        if self._compiled is None:
            raise ModelError("the inference backend is closed; build a new one with make_backend")
        if x.dtype != self._in_dtype or x.size != int(np.prod(self._in_shape)):
            raise ModelError(
                f"model input must be {self._in_dtype.name} of shape {self._in_shape}, got {x.dtype.name} {x.shape}"
            )
        self._inputs[0].write(np.ascontiguousarray(x.reshape(self._in_shape)))
        self._compiled.run_by_index(0, self._inputs, self._outputs)
        out: np.ndarray = np.asarray(self._outputs[0].read(self._out_count, self._out_dtype))
        return out.reshape(-1)

    def close(self) -> None:
        """Release the buffers and the compiled model."""
        self._inputs = []
        self._outputs = []
        if self._compiled is not None:
            self._compiled.close()
        self._compiled = None
