"""The ``gap_model`` fixture: a BreastMNIST model that ends in global average pooling, converted int8 with its CAM.

``converters.testing.build_gap_model`` trains the ``best`` recipe briefly and converts it with the defaults (OOD
auto, CAM auto), in a subprocess so TensorFlow never loads into the test process. The result is cached in the
pytest cache, keyed on the converter's code, the training data and the manifest's code, and built once for all
pytest-xdist workers (a file lock, as ``int8_model`` in ``conftest.py``).

Import it into a test module with ``from gap_model import gap_model_fixture`` and ask for ``gap_model``: the int8
``.tflite`` path; its manifest sits beside it and the Keras model is ``<dir>/keras/breast_gap.keras``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from model_cache import cached_model

ROOT = Path(__file__).resolve().parent.parent


def gap_model_key() -> str:
    """The cache key: everything that decides the built files (the converter, the data, the manifest's code)."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "converters").rglob("*")):
        if path.is_file() and path.suffix in {".py", ".yaml", ".json"}:
            digest.update(path.read_bytes())
    digest.update((ROOT / "data" / "breastmnist_28.npz").read_bytes())
    for path in sorted((ROOT / "edgemed").glob("manifest*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="session", name="gap_model")
def gap_model_fixture(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The int8 ``.tflite`` of a GAP model trained on BreastMNIST (manifest beside it, Keras model in keras/)."""
    name = f"edgemed-gap-model-{gap_model_key()}"
    return cached_model(request, tmp_path_factory, name, "build_gap_model", "GAP test model")
