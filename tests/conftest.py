"""Shared fixtures: real data from data/, a real int8 model built by our own converter, real mosquitto brokers."""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

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
    # The pytest cache keeps the model across runs; without it (-p no:cacheprovider) build once per session.
    store = getattr(request.config, "cache", None)
    name = f"edgemed-model-{_model_key()}"
    cache = Path(store.mkdir(name)) if store is not None else tmp_path_factory.mktemp(name)
    done = cache / "DONE"
    # pytest-xdist workers share the cache: the first builds the model while the others wait for it.
    with open(cache / "LOCK", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            _build_model(cache, done)
    return Path(done.read_text().strip())


def _build_model(cache: Path, done: Path) -> None:
    code = (
        "import sys; from pathlib import Path; from converters.testing import build_reference_model; "
        "print(build_reference_model(Path(sys.argv[1])))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(cache)], capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    if proc.returncode != 0:
        raise RuntimeError(f"building the test model failed:\n{proc.stdout}\n{proc.stderr}")
    done.write_text(proc.stdout.strip().splitlines()[-1])
