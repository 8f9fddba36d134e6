"""Run a converted ``.tflite`` file on this host through the device's own inference code.

The gate must judge the bytes the device runs, run the way the device runs them, so nothing here is the
converter's own: the file is loaded by ``edgemed.inference.make_backend`` (CPU with XNNPACK, the interpreter
package the device would pick), each uint8 image goes through ``edgemed.preprocess.Preprocessor`` (colour mode,
resize and the uint8 -> input lookup of the manifest's input spec) and ``Backend.invoke``, and each raw output
through ``edgemed.inference.classify.probabilities`` (dequantize, then softmax for logits): the calls the device's
``Classifier`` makes for every frame. Latency is timed around ``Backend.invoke``, as the device times inference.
A model with feature outputs is opened as the device opens it, by the scores tensor's name, and its features are
read after each invoke with ``Backend.output(name)`` and dequantized, so statistics fitted on them (the OOD
feature score) see the numbers the device will see.

One difference is deliberate: the gate runs on one CPU thread (the device uses its profile's ``threads``), so
that latencies measured on a busy build machine stay comparable between targets.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgemed.errors import ModelError
from edgemed.inference import Backend, BackendConfig, make_backend
from edgemed.inference.classify import dequantize, probabilities
from edgemed.manifest import InputSpec, OutputKind, OutputSpec, QuantSpec
from edgemed.preprocess import Preprocessor
from edgemed.types import TensorSpec

# No fallback: a model that does not load on the CPU is an error here, not a degraded run.
GATE_BACKEND = BackendConfig(accelerator="cpu", threads=1, allow_cpu_fallback=False)


@dataclass(frozen=True)
class ModelOutputs:
    """What a converted model computed for a batch of images, run one image at a time as on the device.

    Attributes:
        probs: ``(N, K)`` class probabilities, exactly as ``DeviceModel.probabilities`` gives them.
        logits: ``(N, K)`` the dequantized scores when the model outputs logits, else None.
        features: tensor name -> ``(N, D)`` the dequantized feature output (float64), in the order of the
            ``outputs`` the model was opened with.
        layers: tensor name -> the Keras layer it pools (None when the manifest does not say).
    """

    probs: np.ndarray
    logits: np.ndarray | None
    features: dict[str, np.ndarray]
    layers: dict[str, str | None]


class DeviceModel:
    """A converted model loaded as the device loads it, fed and read as the device feeds and reads it.

    Attributes:
        backend: from ``make_backend``; ``backend.output_kind`` is what the graph's output op computes, and
            ``backend.output_spec`` is the scores tensor.
        preprocess: the device's preprocessing for ``spec`` and this model's input tensor.
        features: the feature outputs (role ``features``) of ``outputs``, with the interpreter's own tensor specs.
    """

    def __init__(self, path: Path, spec: InputSpec, outputs: Sequence[OutputSpec] = ()) -> None:
        """Load ``path`` on the CPU.

        Args:
            path: the ``.tflite`` file.
            spec: the manifest's input spec.
            outputs: the file's outputs by name and role (``converters.outputs.name_outputs``, or an artifact's
                ``outputs``); empty: the first output is the scores and no features are read.

        Raises:
            ModelError: the file cannot be loaded, it has more than one input, or a listed output is not in it.
            ConfigError: no TensorFlow Lite interpreter is installed.
        """
        scores = next((o.name for o in outputs if o.role == "scores"), None)
        self.backend: Backend = make_backend(Path(path), GATE_BACKEND, scores_output=scores)
        self.preprocess = Preprocessor(spec, self.backend.input_spec)
        real = {s.name: s for s in self.backend.output_specs}
        missing = [o.name for o in outputs if o.name not in real]
        if missing:
            self.backend.close()
            raise ModelError(
                f"{Path(path).name} has no output named {', '.join(missing)} (it has {', '.join(real)}); "
                "name the outputs of this very file with converters.outputs.name_outputs"
            )
        self.features = [(real[o.name], o.layer) for o in outputs if o.role == "features"]
        # Without names, a file with several outputs has no known scores tensor (TFLite orders outputs freely).
        self._unnamed = not outputs and len(real) > 1

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
        self._check_named()
        logits = output_kind == "logits"
        spec = self.backend.output_spec
        rows = []
        for image in images:
            rows.append(probabilities(self.backend.invoke(self.preprocess(image)), spec, logits=logits))
            if progress is not None:
                progress.update(1)
        return np.asarray(rows, dtype=np.float64)

    def run(self, images: np.ndarray, output_kind: OutputKind, progress: Any = None) -> ModelOutputs:
        """Every output for uint8 images ``(N, H, W, C)``: one invoke per image, then each feature read.

        Args:
            images: uint8 images; prepared by the device's preprocessing.
            output_kind: ``logits`` or ``probabilities`` (as for :meth:`probabilities`).
            progress: an optional tqdm-like object whose ``update(1)`` is called per image.

        Returns:
            The probabilities (the same numbers :meth:`probabilities` gives), the dequantized logits when
            ``output_kind`` is ``logits``, and each feature output dequantized to float64.
        """
        self._check_named()
        logits = output_kind == "logits"
        spec = self.backend.output_spec
        width = int(np.prod(spec.shape))
        probs = np.empty((len(images), width), dtype=np.float64)
        scores = np.empty((len(images), width), dtype=np.float64)
        features = {f.name: np.empty((len(images), int(np.prod(f.shape))), np.float64) for f, _ in self.features}
        for i, image in enumerate(images):
            raw = self.backend.invoke(self.preprocess(image))
            probs[i] = probabilities(raw, spec, logits=logits)  # the device's own post-processing
            scores[i] = dequantize(raw, spec)
            for feature, _ in self.features:
                features[feature.name][i] = dequantize(self.backend.output(feature.name), feature)
            if progress is not None:
                progress.update(1)
        layers = {f.name: layer for f, layer in self.features}
        return ModelOutputs(probs=probs, logits=scores if logits else None, features=features, layers=layers)

    def _check_named(self) -> None:
        if self._unnamed:
            names = ", ".join(s.name for s in self.backend.output_specs)
            raise ModelError(
                f"the model has {len(self.backend.output_specs)} outputs ({names}) and none was named the scores; "
                "open it with DeviceModel(path, spec, outputs) (the artifact's outputs, or name_outputs)"
            )

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
