"""LiteRT's ``CompiledModel`` as a backend: the one way to its GPU accelerator (``ai_edge_litert`` only).

Its specs come from a plain interpreter (``CompiledModel`` reports no quantization), and its output buffers are
matched to the interpreter's outputs by size and, where sizes repeat, by one probe run: the buffer order is
verified, never assumed.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from edgemed.errors import DelegateUnavailableError, ModelError
from edgemed.inference.backends import (
    _spec,
    _unknown_output,
    graph_output_kind,
    graph_weights,
    open_interpreter,
    scores_position,
)
from edgemed.stderr_filter import LITERT_NOTICES, filtered_stderr
from edgemed.types import Delegate, TensorSpec

log = logging.getLogger("edgemed.inference")


class CompiledModelBackend:
    """A model running in LiteRT's ``CompiledModel`` on a hardware accelerator (used for the GPU).

    Attributes are those of ``InterpreterBackend`` (``output_specs`` in the interpreter's order, whatever order
    ``CompiledModel`` keeps its output buffers in), plus ``fully_accelerated``.
    """

    def __init__(
        self,
        module: ModuleType,
        model: Path,
        threads: int,
        *,
        accelerator: str = "gpu",
        scores_output: str | None = None,
    ) -> None:
        """Compile the model for the accelerator.

        Args:
            module: the ``ai_edge_litert.interpreter`` module (its package provides ``CompiledModel``).
            model: path of the model (float16 or float32 for the GPU).
            threads: CPU threads, for ops the accelerator leaves to the CPU.
            accelerator: ``gpu``, or ``cpu`` (to exercise this backend where no GPU exists).
            scores_output: tensor name of the scores output; ``None`` takes the interpreter's first output.

        Raises:
            ModelError: the model cannot be loaded at all, has no output named ``scores_output``, or its
                compiled output buffers cannot be matched to the interpreter's outputs.
            DelegateUnavailableError: the accelerator is absent or cannot run this model.
        """
        from ai_edge_litert.compiled_model import CompiledModel
        from ai_edge_litert.hardware_accelerator import HardwareAccelerator
        from ai_edge_litert.options import CpuOptions, Options

        # Specs (with quantization parameters, which CompiledModel does not report) come from a plain
        # interpreter; this also tells a broken model (ModelError) apart from an absent accelerator.
        probe = open_interpreter(module, model, threads)
        self.input_spec = _spec(probe.get_input_details()[0])
        self.output_specs = tuple(_spec(d) for d in probe.get_output_details())
        scores = scores_position(self.output_specs, scores_output)
        self.output_spec = self.output_specs[scores]
        self.output_kind = graph_output_kind(probe, int(probe.get_output_details()[scores]["index"]))
        self.weights = graph_weights(probe)
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
        self._in_shape = self.input_spec.shape
        self._in_dtype = np.dtype(self.input_spec.dtype)
        try:
            # buffer k holds interpreter output order[k]; the interpreter's order is the one output_specs keeps.
            order = _buffer_order(compiled, probe, self.output_specs, self._in_dtype, self._in_shape)
        except ModelError:
            compiled.close()
            raise
        del probe
        # (buffer position, element count, dtype) per interpreter output position.
        self._reads: list[tuple[int, int, np.dtype[Any]]] = [(0, 0, np.dtype("int8"))] * len(self.output_specs)
        for k, position in enumerate(order):
            spec = self.output_specs[position]
            self._reads[position] = (k, int(np.prod(spec.shape)), np.dtype(spec.dtype))
        self._scores = scores
        self._positions = {spec.name: i for i, spec in reversed(list(enumerate(self.output_specs)))}
        self._invoked = False
        self.fully_accelerated = bool(compiled.is_fully_accelerated())
        if accelerator == "gpu" and not self.fully_accelerated:
            log.info("some ops of the model run on the CPU: the GPU accelerator does not support them")
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
        self._invoked = True
        return self._read(self._scores)

    def output(self, name: str) -> np.ndarray:
        """The flattened raw row of the output tensor ``name`` from the last ``invoke``; see
        ``InterpreterBackend.output``."""
        position = self._positions.get(name)
        if position is None:
            raise _unknown_output(name, self.output_specs)
        if self._compiled is None:
            raise ModelError("the inference backend is closed; build a new one with make_backend")
        if not self._invoked:
            raise ModelError(f"output {name!r} is read after invoke(); run the model on a frame first")
        return self._read(position)

    def _read(self, position: int) -> np.ndarray:
        k, count, dtype = self._reads[position]
        out: np.ndarray = np.asarray(self._outputs[k].read(count, dtype))
        return out.reshape(-1)

    def close(self) -> None:
        """Release the buffers and the compiled model."""
        self._inputs = []
        self._outputs = []
        if self._compiled is not None:
            self._compiled.close()
        self._compiled = None


def _buffer_order(
    compiled: Any, probe: Any, specs: tuple[TensorSpec, ...], in_dtype: np.dtype[Any], in_shape: tuple[int, ...]
) -> list[int]:
    """Which interpreter output each of ``CompiledModel``'s output buffers holds (``order[k]`` for buffer k).

    ``CompiledModel`` keeps its buffers in its signature's order, which need not be the interpreter's (TFLite
    reorders a multi-output model's outputs). Nothing in its API ties a buffer to a tensor name for certain, so
    the order is verified: each buffer's size matches outputs of that size and dtype; outputs that share a size
    are told apart by running one probe input through both the compiled model and the interpreter and taking
    the assignment whose values agree best (the accelerator's float16 arithmetic is close, not identical).

    Raises:
        ModelError: the buffer count or sizes do not match the interpreter's outputs.
    """
    if len(specs) == 1:  # nothing to match (and buffer 0 was read whatever its size before outputs were listed)
        return [0]
    sizes = [int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s in specs]
    try:
        buffer_sizes = [int(compiled.get_output_buffer_requirements(k, 0)["buffer_size"]) for k in range(len(specs))]
    except (RuntimeError, KeyError, IndexError, TypeError, ValueError) as exc:
        raise ModelError(
            f"LiteRT's CompiledModel does not describe the model's {len(specs)} outputs ({exc}); run it on the "
            "CPU (accelerator: cpu) or update ai-edge-litert"
        ) from exc
    groups: dict[int, list[int]] = {}
    for position, size in enumerate(sizes):
        groups.setdefault(size, []).append(position)
    buffers: dict[int, list[int]] = {}
    for k, size in enumerate(buffer_sizes):
        buffers.setdefault(size, []).append(k)
    if {s: len(v) for s, v in groups.items()} != {s: len(v) for s, v in buffers.items()}:
        raise ModelError(
            f"LiteRT's CompiledModel holds outputs of {sorted(buffer_sizes)} bytes but the interpreter's are "
            f"{sorted(sizes)}; run the model on the CPU (accelerator: cpu) or update ai-edge-litert"
        )
    order = [0] * len(specs)
    ambiguous = {size: members for size, members in groups.items() if len(members) > 1}
    for size, members in groups.items():
        if size not in ambiguous:
            order[buffers[size][0]] = members[0]
    if ambiguous:
        compiled_rows, interp_rows = _probe_outputs(compiled, probe, specs, in_dtype, in_shape)
        for size, members in ambiguous.items():
            slots = buffers[size]
            best = min(
                itertools.permutations(members),
                key=lambda perm: sum(
                    _distance(compiled_rows[k], interp_rows[p]) for k, p in zip(slots, perm, strict=True)
                ),
            )
            for k, p in zip(slots, best, strict=True):
                order[k] = p
    return order


def _probe_outputs(
    compiled: Any, probe: Any, specs: tuple[TensorSpec, ...], in_dtype: np.dtype[Any], in_shape: tuple[int, ...]
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Every output row of the compiled model (buffer order) and of the interpreter (its order), for one
    fixed pseudo-random input (a constant input can give outputs that coincide)."""
    rng = np.random.default_rng(0)
    if np.issubdtype(in_dtype, np.integer):
        info = np.iinfo(in_dtype)
        x = rng.integers(info.min, info.max, in_shape, endpoint=True).astype(in_dtype)
    else:
        x = rng.random(in_shape).astype(in_dtype)
    inputs = compiled.create_input_buffers(0)
    outputs = compiled.create_output_buffers(0)
    inputs[0].write(np.ascontiguousarray(x))
    compiled.run_by_index(0, inputs, outputs)
    probe.set_tensor(int(probe.get_input_details()[0]["index"]), x)
    probe.invoke()
    interp_rows = [probe.get_tensor(int(d["index"])).reshape(-1).astype(np.float64) for d in probe.get_output_details()]
    compiled_rows = []
    for k in range(len(specs)):
        size = int(compiled.get_output_buffer_requirements(k, 0)["buffer_size"])
        # A buffer's dtype is that of an output of its size (the groups matched above share size and dtype).
        dtype = next(np.dtype(s.dtype) for s in specs if int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize == size)
        compiled_rows.append(np.asarray(outputs[k].read(size // dtype.itemsize, dtype)).astype(np.float64))
    return compiled_rows, interp_rows


def _distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference, relative to the values' range (0 for identical rows)."""
    scale = max(float(np.abs(b).max(initial=0.0)), 1e-12)
    return float(np.abs(a - b).mean()) / scale
