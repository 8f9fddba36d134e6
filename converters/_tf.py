"""Import TensorFlow without the C++ start-up lines it writes straight to the process's stderr.

TensorFlow 2.21 logs "oneDNN custom operations are on ..." (twice, once per shared library) through absl before
absl's logging is initialised, so ``TF_CPP_MIN_LOG_LEVEL`` cannot reach it; to a clinic's ML engineer it reads
like a problem. The import runs with file descriptor 2 captured; the known notices are dropped and anything else
(a real error from a broken install) is written back to stderr. ``TF_CPP_MIN_LOG_LEVEL=0`` (or 1) shows
everything, as TensorFlow documents.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile

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


def quiet_tensorflow() -> None:
    """Import TensorFlow once, dropping its start-up notices (a no-op once it is imported)."""
    if "tensorflow" in sys.modules or os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2") in ("0", "1"):
        import tensorflow  # loaded once per process: later imports are free

        return
    sys.stderr.flush()
    with tempfile.TemporaryFile() as captured:
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode("utf-8", "replace")
            kept = [line for line in text.splitlines() if line.strip() and not _NOTICES.search(line)]
            if kept:
                print("\n".join(kept), file=sys.stderr)
