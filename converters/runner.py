"""Run a ``.tflite`` file in the on-device LiteRT interpreter, the way the device will.

The gate must judge the bytes the device runs, with the device's interpreter: images go through the same
uint8 -> input lookup (``edgemed.preprocess.input_lut``) and the same dequantize/softmax as on the device.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from edgemed.manifest import Normalisation, QuantSpec
from edgemed.preprocess import dequantize, input_lut, softmax
from edgemed.stderr_filter import LITERT_NOTICES, filtered_stderr
from edgemed.types import TensorSpec


def load_interpreter(model: bytes | str, threads: int = 1) -> Any:
    """A LiteRT interpreter with tensors allocated (XNNPACK is applied by default, as on the device)."""
    from ai_edge_litert.interpreter import Interpreter

    with filtered_stderr(LITERT_NOTICES):  # LiteRT's "Created TensorFlow Lite XNNPACK delegate" notice
        if isinstance(model, bytes):
            interp = Interpreter(model_content=model, num_threads=threads)
        else:
            interp = Interpreter(model_path=model, num_threads=threads)
        interp.allocate_tensors()
    return interp


def tensor_spec(detail: dict[str, Any]) -> TensorSpec:
    """The interpreter's tensor details as an edgemed TensorSpec."""
    scale, zero_point = detail["quantization"]
    return TensorSpec(
        name=str(detail["name"]),
        shape=tuple(int(v) for v in detail["shape"]),
        dtype=np.dtype(detail["dtype"]).name,
        scale=float(scale),
        zero_point=int(zero_point),
    )


def quant_spec(spec: TensorSpec) -> QuantSpec:
    """TensorSpec to the manifest's QuantSpec."""
    return QuantSpec(
        name=spec.name, shape=list(spec.shape), dtype=spec.dtype, scale=spec.scale, zero_point=spec.zero_point
    )


def io_specs(interp: Any) -> tuple[TensorSpec, TensorSpec]:
    """Input and output TensorSpec of a single-input, single-output model."""
    return tensor_spec(interp.get_input_details()[0]), tensor_spec(interp.get_output_details()[0])


def predict(interp: Any, images: np.ndarray, output_kind: str, norm: Normalisation, progress: Any = None) -> np.ndarray:
    """Class probabilities for uint8 images ``(N, H, W, C)``, one invoke per image as on the device.

    Args:
        interp: from :func:`load_interpreter`.
        images: uint8 frames already prepared to the model's size.
        output_kind: ``logits`` (softmax applied here, in float64) or ``probabilities``.
        norm: pixel normalisation the model was trained with.
        progress: an optional tqdm-like object whose ``update(1)`` is called per image.

    Returns:
        ``(N, K)`` float64 probabilities.
    """
    in_spec, out_spec = io_specs(interp)
    lut = input_lut(norm, in_spec)
    in_index = interp.get_input_details()[0]["index"]
    out_index = interp.get_output_details()[0]["index"]
    rows = []
    for image in images:
        interp.set_tensor(in_index, lut[image][None, ...])
        interp.invoke()
        rows.append(dequantize(interp.get_tensor(out_index)[0], out_spec))
        if progress is not None:
            progress.update(1)
    raw = np.stack(rows)
    return softmax(raw) if output_kind == "logits" else raw


def median_latency_ms(interp: Any, image: np.ndarray, norm: Normalisation, runs: int = 50) -> float:
    """Median wall time of one ``invoke()`` on one image after a warm-up run, in milliseconds."""
    in_spec, _ = io_specs(interp)
    interp.set_tensor(interp.get_input_details()[0]["index"], input_lut(norm, in_spec)[image][None, ...])
    interp.invoke()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        interp.invoke()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000.0)


def op_names(interp: Any) -> list[str]:
    """Builtin or custom op name of every node, in execution order."""
    return [str(op["op_name"]) for op in interp._get_ops_details()]
