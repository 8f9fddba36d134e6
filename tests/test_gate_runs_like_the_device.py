"""The acceptance gate runs a converted model through the device's own inference code, and gets what it gets.

Real parts only: the real int8 model fixture, the device's ``make_backend`` and ``Classifier`` (``edgemed.runtime``)
on real BreastMNIST images. No TensorFlow is imported here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from converters.data import load_dataset
from converters.runner import DeviceModel
from edgemed.errors import ModelError
from edgemed.inference import BackendConfig, make_backend
from edgemed.manifest import verify_model


def test_the_gate_gets_the_devices_probabilities_image_for_image(int8_model: Path, data_dir: Path) -> None:
    from edgemed.runtime import Classifier

    manifest, art = verify_model(int8_model)
    images, _ = load_dataset(data_dir / "breastmnist_28.npz", labels=list(manifest.labels)).splits["test"]
    assert [o.role for o in art.outputs][:2] == ["scores", "features"]  # multi-output: found by name
    with DeviceModel(int8_model, manifest.input, art.outputs) as gate:
        assert gate.backend.output_kind == art.output_kind == "logits"  # read from the graph, as the device does
        assert gate.backend.delegate == "cpu" and not gate.backend.degraded
        gated = gate.probabilities(images, art.output_kind)
        assert np.array_equal(gate.run(images, art.output_kind).probs, gated)
        assert gate.median_latency_ms(images[0], runs=5) > 0.0

    # The device, as `edgemed run` builds it from a profile with default inference settings.
    backend = make_backend(int8_model, BackendConfig(), manifest=manifest)
    try:
        device = Classifier(backend, manifest, art)
        on_device = [device.scores(backend.invoke(device.preprocess(image))).probabilities for image in images]
    finally:
        backend.close()
    assert gated.shape == (len(images), len(manifest.labels)) and gated.dtype == np.float64
    assert np.array_equal(gated, np.array(on_device))  # bit for bit, not approximately


def test_the_gate_refuses_what_the_device_refuses(tmp_path: Path, int8_model: Path) -> None:
    manifest, _ = verify_model(int8_model)
    with pytest.raises(ModelError, match="is a folder"):
        DeviceModel(int8_model.parent, manifest.input)
    broken = tmp_path / "broken.tflite"
    broken.write_bytes(int8_model.read_bytes()[:200])
    with pytest.raises(ModelError, match="cannot be loaded"):
        DeviceModel(broken, manifest.input)
