"""Shared fixtures: real data from data/, a real int8 model built by our own converter, real mosquitto brokers."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import pytest
from model_cache import cached_model

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"

# Keras writes ~/.keras/keras.json on first import; keep the home directory clean.
os.environ.setdefault("KERAS_HOME", tempfile.mkdtemp(prefix="edgemed-keras-"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

pytest_plugins = ["broker_fixtures", "pg_fixtures", "receipt_helpers"]  # receipt_helpers: the `outbox` fixture


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--hardware",
        action="store_true",
        default=False,
        help="run tests that need a real Edge TPU or GPU attached to this machine",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--hardware"):
        return
    skip = pytest.mark.skip(reason="needs a real Edge TPU or GPU: run with --hardware on a device that has one")
    for item in items:
        if "hardware" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real images shipped with the repository (see data/LICENSES.md)."""
    return DATA


def _model_key() -> str:
    # The cached model is rebuilt whenever the converter's code or the training data changes.
    digest = hashlib.sha256()
    for path in sorted((ROOT / "converters").rglob("*")):
        if path.is_file() and path.suffix in {".py", ".yaml", ".json"}:
            digest.update(path.read_bytes())
    digest.update((DATA / "breastmnist_28.npz").read_bytes())
    digest.update((ROOT / "edgemed" / "manifest.py").read_bytes())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def int8_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real BreastMNIST-trained reference CNN, converted to int8 by our converter; its manifest sits beside it.

    Built in a subprocess so TensorFlow never loads into the test process (the device side must not need it).
    """
    name = f"edgemed-model-{_model_key()}"
    return cached_model(request, tmp_path_factory, name, "build_reference_model", "test model")
