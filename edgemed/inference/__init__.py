"""Inference backends: run a converted model on the CPU, an Edge TPU or a GPU, and say honestly which one ran.

``make_backend(model, cfg)`` loads the intended accelerator. When it cannot (library absent, no device, model
not compiled for it) the profile decides: with ``allow_cpu_fallback`` the model runs on the CPU and the
backend reports ``degraded=True`` with the reason; without it ``DelegateUnavailableError`` (exit 6) says what
to install.

No interpreter package is imported by this module, so configuration can be validated on a machine without LiteRT.
``interpreter_module`` in ``interpreters.py`` is the one place that picks and imports the ``Interpreter`` package
(ai_edge_litert, tflite_runtime or tensorflow.lite), when a backend is built. The one other LiteRT import is
``CompiledModelBackend`` in ``compiled.py``: LiteRT's GPU accelerator exists only as its ``CompiledModel`` API,
which only ai_edge_litert has, and it is imported there, on first use of the GPU path.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Literal, Protocol

from pydantic import Field, field_validator

from edgemed.inference.factory import make_backend
from edgemed.inference.interpreters import interpreter_module
from edgemed.validation import FrozenModel

if TYPE_CHECKING:
    import numpy as np

    from edgemed.manifest import OutputKind
    from edgemed.types import Delegate, TensorSpec

_EDGETPU_DEVICE = re.compile(r"^(usb|pci)(:\d+)?$")


class BackendConfig(FrozenModel):
    """Which accelerator a device should use, and what to do when it is missing."""

    accelerator: Literal["cpu", "edgetpu", "gpu"] = Field(
        "cpu", description="the intended accelerator: cpu (XNNPACK), edgetpu (Coral) or gpu"
    )
    allow_cpu_fallback: bool = Field(
        True,
        description="run on the CPU (results marked degraded) when the accelerator cannot be used; "
        "false makes the run stop with exit code 6 instead",
    )
    threads: int = Field(2, ge=1, description="CPU threads for XNNPACK and for ops an accelerator leaves to the CPU")
    edgetpu_device: str | None = Field(
        None, description="Edge TPU to open: usb, usb:N, pci or pci:N; null opens the first one found"
    )
    edgetpu_library: str = Field(
        "libedgetpu.so.1", description="Edge TPU runtime library name or path (libedgetpu1-std or -max)"
    )
    gpu_library: str | None = Field(
        None,
        description="TensorFlow Lite GPU delegate library (e.g. libtensorflowlite_gpu_delegate.so); "
        "null uses LiteRT's built-in GPU accelerator",
    )
    runtime: Literal["auto", "ai_edge_litert", "tflite_runtime", "tensorflow"] = Field(
        "auto", description="interpreter package; auto tries ai_edge_litert, tflite_runtime, then tensorflow"
    )

    @field_validator("edgetpu_device")
    @classmethod
    def _device_form(cls, value: str | None) -> str | None:
        if value is not None and not _EDGETPU_DEVICE.match(value):
            raise ValueError(
                f"edgetpu_device {value!r} is not usb, usb:N, pci or pci:N (N = 0, 1, ...); "
                "leave it unset to use the first Edge TPU found"
            )
        return value


class Backend(Protocol):
    """A loaded model ready to run one input at a time.

    Attributes:
        input_spec: the model's input tensor (shape with batch axis, dtype, quantization).
        output_spec: the scores tensor (the output ``make_backend``'s ``scores_output`` names, else the first).
        output_specs: every output tensor, in the interpreter's order (TFLite may reorder a model's outputs, so
            callers find one by name, never by position).
        backend: interpreter package that runs it: ``ai_edge_litert``, ``tflite_runtime`` or ``tensorflow``.
        delegate: where it actually runs: ``cpu``, ``edgetpu`` or ``gpu``.
        degraded: True when ``delegate`` is not the accelerator the profile asked for.
        degraded_reason: why it is degraded, in one line, or ``None``.
        output_kind: what the graph's output op computes, ``probabilities`` or ``logits`` (``None``: the graph
            cannot tell, e.g. an Edge TPU custom op).
    """

    input_spec: TensorSpec
    output_spec: TensorSpec
    output_specs: tuple[TensorSpec, ...]
    backend: str
    delegate: Delegate
    degraded: bool
    degraded_reason: str | None
    output_kind: OutputKind | None

    def invoke(self, x: np.ndarray) -> np.ndarray:
        """Run one quantized input; return the raw scores row, shape ``(classes,)``."""
        ...

    def output(self, name: str) -> np.ndarray:
        """The flattened raw row of output ``name`` from the last ``invoke`` (``ModelError`` naming the model's
        outputs for an unknown name)."""
        ...

    def close(self) -> None:
        """Release the interpreter and its delegates."""
        ...


__all__ = ["Backend", "BackendConfig", "interpreter_module", "make_backend"]
