"""converters._tf: TensorFlow's start-up notices are dropped, everything else it writes still reaches the user.

A stand-in ``tensorflow`` module (first on the path of a child process) writes to file descriptor 2 the way the
real library's C++ code does, so these tests run without TensorFlow and in a fraction of a second.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTICES = (
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
    "I0000 00:00:1795660630.849327 24969 port.cc:153] oneDNN custom operations are on. You may see slightly "
    "different numerical results due to floating-point round-off errors.\n"
)


def _run(tmp_path: Path, body: str, level: str = "2") -> subprocess.CompletedProcess[str]:
    fake = tmp_path / "fake"
    fake.mkdir(exist_ok=True)
    (fake / "tensorflow.py").write_text(f"import os\nos.write(2, {NOTICES!r}.encode())\n{body}\n")
    code = "from converters._tf import quiet_tensorflow\nquiet_tensorflow()\nprint('imported')\n"
    env = {**os.environ, "PYTHONPATH": f"{fake}{os.pathsep}{ROOT}", "TF_CPP_MIN_LOG_LEVEL": level}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)


def test_notices_are_dropped_and_other_lines_kept(tmp_path: Path) -> None:
    proc = _run(tmp_path, "os.write(2, b'E0000 something is really wrong\\n')")
    assert proc.returncode == 0 and proc.stdout == "imported\n"
    assert "oneDNN" not in proc.stderr and "absl::InitializeLog" not in proc.stderr
    assert "something is really wrong" in proc.stderr


def test_a_fatal_error_that_aborts_the_import_still_reaches_the_terminal(tmp_path: Path) -> None:
    # TensorFlow aborts the process (LOG(FATAL)) on a CPU without AVX: nothing may swallow that message.
    proc = _run(tmp_path, "os.write(2, b'F0000 compiled to use AVX instructions, not available\\n')\nos.abort()")
    assert proc.returncode != 0 and "imported" not in proc.stdout
    assert "compiled to use AVX" in proc.stderr
    assert "oneDNN" not in proc.stderr


def test_an_import_error_propagates_with_stderr_restored(tmp_path: Path) -> None:
    proc = _run(tmp_path, "raise ImportError('libtensorflow_framework.so.2: cannot open shared object file')")
    assert proc.returncode != 0
    assert "cannot open shared object file" in proc.stderr  # the traceback, written after stderr came back


@pytest.mark.parametrize("level", ["0", "1"])
def test_a_user_who_asks_for_tensorflow_logs_gets_them(tmp_path: Path, level: str) -> None:
    proc = _run(tmp_path, "", level=level)
    assert proc.returncode == 0 and "oneDNN custom operations are on" in proc.stderr
