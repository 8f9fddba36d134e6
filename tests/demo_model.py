"""The ``demo_model`` fixture: the model ``scripts/demo`` trains, built by its own commands (3 epochs), cached.

Import it into a test module with ``from demo_model import demo_model_fixture`` and ask for ``demo_model``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", name="demo_model")
def demo_model_fixture(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's model (``examples/demo.py``'s train and convert commands, 3 epochs), cached like ``int8_model``."""
    sys.path.insert(0, str(ROOT / "examples"))
    import demo

    digest = hashlib.sha256((ROOT / "examples" / "demo.py").read_bytes())
    for path in sorted((ROOT / "converters").rglob("*.py")):
        digest.update(path.read_bytes())
    digest.update((ROOT / "data" / "breastmnist_28.npz").read_bytes())
    name = f"edgemed-demo-model-{digest.hexdigest()[:16]}"
    store = getattr(request.config, "cache", None)
    folder = Path(store.mkdir(name)) if store is not None else tmp_path_factory.mktemp(name)
    done = folder / "DONE"
    if not done.exists():
        env = {**os.environ, "KERAS_HOME": str(folder / "keras"), "PYTHONPATH": str(ROOT)}
        for args in (demo.train_args(folder, epochs=3), None):
            if args is None:
                args = demo.convert_args(next(folder.glob("*.keras")), folder)
            proc = subprocess.run(
                [sys.executable, "-m", "edgemed", *args, "--no-progress"],
                capture_output=True,
                text=True,
                timeout=600,
                env=env,
                cwd=ROOT,
            )
            assert proc.returncode == 0, proc.stdout + proc.stderr
        done.write_text("ok")
    return folder
