"""Test models built once by the real converter, in a subprocess, and kept in the pytest cache.

TensorFlow never loads into the test process (the device side must not need it). pytest-xdist workers share the
cache: the first to ask builds the model under a file lock while the others wait for it.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def cached_model(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, name: str, builder: str, what: str
) -> Path:
    """The path ``converters.testing.<builder>(folder)`` returns, built once per cache key.

    Args:
        name: the cache folder's name, with the key of everything that decides the built files.
        builder: a function of ``converters.testing`` that takes the folder and returns the model's path.
        what: the model, for the error message when building fails.
    """
    # Without the pytest cache (-p no:cacheprovider) the model is built once per session.
    store = getattr(request.config, "cache", None)
    cache = Path(store.mkdir(name)) if store is not None else tmp_path_factory.mktemp(name)
    done = cache / "DONE"
    with open(cache / "LOCK", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            code = (
                f"import sys; from pathlib import Path; from converters.testing import {builder}; "
                f"print({builder}(Path(sys.argv[1])))"
            )
            env = {**os.environ, "KERAS_HOME": str(cache / "keras_home"), "PYTHONPATH": str(ROOT)}
            proc = subprocess.run(
                [sys.executable, "-c", code, str(cache)], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env
            )
            if proc.returncode != 0:
                raise RuntimeError(f"building the {what} failed:\n{proc.stdout}\n{proc.stderr}")
            done.write_text(proc.stdout.strip().splitlines()[-1])
    return Path(done.read_text().strip())
