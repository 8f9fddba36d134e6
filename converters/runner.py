"""Run a converted ``.tflite`` file on this host through the device's own inference code.

The gate must judge the bytes the device runs, run the way the device runs them, so nothing here is the
converter's own: the file is loaded by ``edgemed.inference.make_backend`` (CPU with XNNPACK, the interpreter
package the device would pick), each uint8 image goes through ``edgemed.preprocess.Preprocessor`` (colour mode,
resize and the uint8 -> input lookup of the manifest's input spec) and ``Backend.invoke``, and each raw output
through ``edgemed.inference.classify.probabilities`` (dequantize, then softmax for logits): the calls the device's
``Classifier`` makes for every frame. Latency is timed around ``Backend.invoke``, as the device times inference.

One difference is deliberate: the gate runs on one CPU thread (the device uses its profile's ``threads``), so
that latencies measured on a busy build machine stay comparable between targets.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from edgemed.inference import Backend, BackendConfig, make_backend
from edgemed.inference.classify import probabilities
from edgemed.manifest import InputSpec, OutputKind, QuantSpec
from edgemed.preprocess import Preprocessor
from edgemed.types import TensorSpec

# No fallback: a model that does not load on the CPU is an error here, not a degraded run.
GATE_BACKEND = BackendConfig(accelerator="cpu", threads=1, allow_cpu_fallback=False)


class DeviceModel:
    """A converted model loaded as the device loads it, fed and read as the device feeds and reads it.

    Attributes:
        backend: from ``make_backend``; ``backend.output_kind`` is what the graph's output op computes.
        preprocess: the device's preprocessing for ``spec`` and this model's input tensor.
    """

    def __init__(self, path: Path, spec: InputSpec) -> None:
        """Load ``path`` on the CPU.

        Raises:
            ModelError: the file cannot be loaded, or it has more than one input.
            ConfigError: no TensorFlow Lite interpreter is installed.
        """
        self.backend: Backend = make_backend(Path(path), GATE_BACKEND)
        self.preprocess = Preprocessor(spec, self.backend.input_spec)

    def __enter__(self) -> DeviceModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def probabilities(self, images: np.ndarray, output_kind: OutputKind, progress: Any = None) -> np.ndarray:
        """Class probabilities for uint8 images ``(N, H, W, C)``, one invoke per image as on the device.

        Args:
            images: uint8 images; prepared to the model's size and colour mode by the device's preprocessing.
            output_kind: ``logits`` (softmax applied, in float64) or ``probabilities`` (clipped to [0, 1]).
            progress: an optional tqdm-like object whose ``update(1)`` is called per image.

        Returns:
            ``(N, K)`` float64 probabilities.
        """
        logits = output_kind == "logits"
        spec = self.backend.output_spec
        rows = []
        for image in images:
            rows.append(probabilities(self.backend.invoke(self.preprocess(image)), spec, logits=logits))
            if progress is not None:
                progress.update(1)
        return np.asarray(rows, dtype=np.float64)

    def median_latency_ms(self, image: np.ndarray, runs: int = 50) -> float:
        """Median wall time of one ``Backend.invoke`` on one image after a warm-up run, in milliseconds."""
        x = self.preprocess(image)
        self.backend.invoke(x)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            self.backend.invoke(x)
            times.append(time.perf_counter() - start)
        return float(np.median(times) * 1000.0)

    def close(self) -> None:
        """Release the interpreter."""
        self.backend.close()


def quant_spec(spec: TensorSpec) -> QuantSpec:
    """A backend's TensorSpec as the manifest's QuantSpec."""
    return QuantSpec(
        name=spec.name, shape=list(spec.shape), dtype=spec.dtype, scale=spec.scale, zero_point=spec.zero_point
    )
