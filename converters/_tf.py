"""Import TensorFlow without the C++ start-up lines it writes straight to the process's stderr.

TensorFlow 2.21 logs "oneDNN custom operations are on ..." (twice, once per shared library) through absl before
absl's logging is initialised, so ``TF_CPP_MIN_LOG_LEVEL`` cannot reach it; to a clinic's ML engineer it reads
like a problem. During the import, file descriptor 2 feeds a small filter process that drops the known notices
and passes everything else straight on: a real error from a broken install (even a fatal one that aborts the
import, such as a CPU without AVX) still reaches the terminal, because the filter outlives this process.
``TF_CPP_MIN_LOG_LEVEL=0`` (or 1) shows everything, as TensorFlow documents.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

_NOTICES = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called"
    r"|oneDNN custom operations are on"
    r"|Unable to register cu(DNN|FFT|BLAS) factory"
    r"|computation placer already registered"
    r"|Could not find cuda drivers"
    r"|TF-TRT Warning"
    r"|This TensorFlow binary is optimized to use available CPU instructions"
    r"|To enable the following instructions"
)

# Runs as `python -I -S -c`: the standard library only, line by line, flushed at once.
_FILTER = """
import re, sys
notice = re.compile(sys.argv[1])
for raw in sys.stdin.buffer:
    if not notice.search(raw.decode("utf-8", "replace")):
        sys.stderr.buffer.write(raw)
        sys.stderr.buffer.flush()
"""


def quiet_tensorflow() -> None:
    """Import TensorFlow once, dropping its start-up notices (a no-op once it is imported)."""
    if "tensorflow" in sys.modules or os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2") in ("0", "1"):
        import tensorflow  # loaded once per process: later imports are free

        return
    sys.stderr.flush()
    try:
        # Started before fd 2 is redirected, so it inherits the real stderr.
        filt = subprocess.Popen([sys.executable, "-I", "-S", "-c", _FILTER, _NOTICES.pattern], stdin=subprocess.PIPE)
    except OSError:
        import tensorflow  # no filter process possible: show everything rather than nothing

        return
    assert filt.stdin is not None
    saved = os.dup(2)
    os.dup2(filt.stdin.fileno(), 2)
    try:
        import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        filt.stdin.close()  # the filter sees end of input, forwards what is left and exits
        try:
            filt.wait(timeout=10)
        except subprocess.TimeoutExpired:
            filt.kill()
