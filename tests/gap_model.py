"""The ``gap_model`` fixture: a BreastMNIST model that ends in global average pooling, converted int8 with its CAM.

``converters.testing.build_gap_model`` trains the ``best`` recipe briefly and converts it with the defaults (OOD
auto, CAM auto), in a subprocess so TensorFlow never loads into the test process. The result is cached in the
pytest cache, keyed on the converter's code, the training data and the manifest's code, and built once for all
pytest-xdist workers (a file lock, as ``int8_model`` in ``conftest.py``).

Import it into a test module with ``from gap_model import gap_model_fixture`` and ask for ``gap_model``: the int8
``.tflite`` path; its manifest sits beside it and the Keras model is ``<dir>/keras/breast_gap.keras``.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    store = getattr(request.config, "cache", None)
    name = f"edgemed-gap-model-{gap_model_key()}"
    cache = Path(store.mkdir(name)) if store is not None else tmp_path_factory.mktemp(name)
    done = cache / "DONE"
    # pytest-xdist workers share the cache: the first builds the model while the others wait for it.
    with open(cache / "LOCK", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            _build(cache, done)
    return Path(done.read_text().strip())


def _build(cache: Path, done: Path) -> None:
    code = (
        "import sys; from pathlib import Path; from converters.testing import build_gap_model; "
        "print(build_gap_model(Path(sys.argv[1])))"
    )
    env = {**os.environ, "KERAS_HOME": str(cache / "keras_home"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(cache)], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env
    )
    if proc.returncode != 0:
        raise RuntimeError(f"building the GAP test model failed:\n{proc.stdout}\n{proc.stderr}")
    done.write_text(proc.stdout.strip().splitlines()[-1])
