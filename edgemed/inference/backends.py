"""Concrete backends: a TensorFlow Lite ``Interpreter`` (CPU with XNNPACK, or an external delegate) here, and
LiteRT's ``CompiledModel`` (GPU accelerator) in ``compiled.py``, which shares this module's helpers.

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


def scores_position(specs: tuple[TensorSpec, ...], scores_output: str | None) -> int:
    """Where the scores tensor is among a model's outputs: the one named ``scores_output``, else the first.

    Raises:
        ModelError: no output has that name (the message lists the model's outputs and the fix).
    """
    if scores_output is None:
        return 0
    for i, spec in enumerate(specs):
        if spec.name == scores_output:
            return i
    raise ModelError(
        f"the manifest names {scores_output!r} as the model's scores output, but the model's outputs are "
        f"{_names(specs)}; the model or its manifest was changed after `edgemed convert`: copy both from the "
        "same conversion, or convert again"
    )


def _names(specs: tuple[TensorSpec, ...]) -> str:
    return ", ".join(repr(s.name) for s in specs) or "none"


def _unknown_output(name: str, specs: tuple[TensorSpec, ...]) -> ModelError:
    return ModelError(
        f"the model has no output named {name!r}; its outputs are {_names(specs)} (backend.output_specs); "
        "read an output the manifest lists for this file"
    )


def _check_file(model: Path) -> None:
    check_model_file(model)


def graph_output_kind(interpreter: Any, tensor: int | None = None) -> OutputKind | None:
    """What a model's output holds, read from the graph op that computes it.

    Args:
        interpreter: an ``Interpreter`` of any of the three packages (tensors allocated or not).
        tensor: the tensor index of the output to read (the scores tensor); ``None`` reads the first output.

    Returns:
        ``probabilities`` when the output comes from a SOFTMAX or LOGISTIC op, ``logits`` when it comes from a
        layer that computes raw scores, ``None`` when the graph cannot tell (an Edge TPU custom op, or a package
        without op details).
    """
    try:
        # The public API has no graph introspection; this private call exists in ai_edge_litert, tflite_runtime
        # and tensorflow.lite alike.
        ops = interpreter._get_ops_details()
        if tensor is None:
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
        input_spec: the single input tensor.
        output_spec: the scores tensor (the output named ``scores_output``, else the first output).
        output_specs: every output tensor, in the interpreter's order.
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
        scores_output: str | None = None,
    ) -> None:
        """Args:
            interpreter: an allocated ``Interpreter``.
            backend: the interpreter package's name.
            delegate: where the model actually runs.
            intended: where the profile asked it to run (``degraded`` when they differ).
            degraded_reason: why it does not run where intended.
            keep_alive: delegate objects the interpreter uses (released after it).
            scores_output: tensor name of the classifier's scores output (the manifest's ``scores_output``);
                ``None`` takes the first output (manifests written before outputs were listed).

        Raises:
            ModelError: the model does not have exactly one input, or has no output named ``scores_output``.
        """
        self._interp = interpreter
        # The delegate objects must outlive the interpreter that uses their native pointers.
        self._keep_alive = keep_alive or []
        inputs = interpreter.get_input_details()
        outputs = interpreter.get_output_details()
        if len(inputs) != 1:
            raise ModelError(f"the model has {len(inputs)} inputs; edgemed runs single-input image classifiers")
        self.input_spec = _spec(inputs[0])
        self.output_specs = tuple(_spec(d) for d in outputs)
        scores = scores_position(self.output_specs, scores_output)
        self.output_spec = self.output_specs[scores]
        self._in_index = int(inputs[0]["index"])
        self._out_index = int(outputs[scores]["index"])
        # Names to tensor indices for output(); a name listed twice (never written by TFLite) keeps the first.
        self._out_indices: dict[str, int] = {}
        for spec, detail in zip(self.output_specs, outputs, strict=True):
            self._out_indices.setdefault(spec.name, int(detail["index"]))
        self._invoked = False
        self._in_shape = self.input_spec.shape
        self._in_dtype = np.dtype(inputs[0]["dtype"])
        self.output_kind = graph_output_kind(interpreter, self._out_index)
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
            The raw scores row, shape ``(classes,)``, in the scores tensor's dtype (see ``output_spec``). The
            other outputs of the same run are read with ``output(name)``.

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
        self._invoked = True
        out: np.ndarray = self._interp.get_tensor(self._out_index)
        return out.reshape(-1)

    def output(self, name: str) -> np.ndarray:
        """The flattened raw row of the output tensor ``name`` from the last ``invoke``.

        Raises:
            ModelError: the model has no output of that name (the message lists its outputs), nothing has been
                invoked yet, or the backend has been closed.
        """
        # Once per feature output per frame: one lookup and one test on the common path (close() clears
        # _invoked, so a closed backend takes the slow path too). get_tensor copies, so the row stays valid
        # after the next invoke; a view (interpreter.tensor) measured no cheaper and would not.
        index = self._out_indices.get(name)
        if index is None or not self._invoked:
            raise self._read_error(name, index)
        out: np.ndarray = self._interp.get_tensor(index)
        return out.reshape(-1)

    def _read_error(self, name: str, index: int | None) -> ModelError:
        if index is None:
            return _unknown_output(name, self.output_specs)
        if self._interp is None:
            return ModelError("the inference backend is closed; build a new one with make_backend")
        return ModelError(f"output {name!r} is read after invoke(); run the model on a frame first")

    def close(self) -> None:
        """Release the interpreter, then its delegates (in that order: the interpreter uses them)."""
        self._invoked = False
        self._interp = None
        self._keep_alive = []
