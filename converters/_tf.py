"""Import and run TensorFlow without the C++ notices it writes straight to the process's stderr.

TensorFlow 2.21 logs "oneDNN custom operations are on ..." (twice, once per shared library) through absl before
absl's logging is initialised, so ``TF_CPP_MIN_LOG_LEVEL`` cannot reach it, and its converter prints
``fully_quantize: 0, inference_type: 6, ...`` for every conversion; to a clinic's ML engineer each reads like a
problem. ``edgemed.stderr_filter.filtered_stderr`` drops exactly these lines around the import and the calls that
print them, and passes everything else straight on: a real error from a broken install (even a fatal one that
aborts the import, such as a CPU without AVX) still reaches the terminal. ``TF_CPP_MIN_LOG_LEVEL=0`` (or 1), as
TensorFlow documents, or ``edgemed --log-level DEBUG`` shows everything.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

from edgemed.stderr_filter import LITERT_NOTICES, filtered_stderr

_NOTICES = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called"
    r"|oneDNN custom operations are on"
    r"|Unable to register cu(DNN|FFT|BLAS) factory"
    r"|computation placer already registered"
    r"|Could not find cuda drivers"
    r"|TF-TRT Warning"
    r"|This TensorFlow binary is optimized to use available CPU instructions"
    r"|To enable the following instructions"
    r"|^fully_quantize: \d+, inference_type: "  # the converter's quantizer, once per conversion
    rf"|{LITERT_NOTICES.pattern}"  # the converter's own LiteRT interpreters (calibration check, evaluation)
)


def _wanted_by_user() -> bool:
    return os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2") in ("0", "1")


@contextmanager
def tensorflow_quiet() -> Iterator[None]:
    """Drop TensorFlow's and LiteRT's known notices written inside the block (see the module docstring)."""
    with nullcontext() if _wanted_by_user() else filtered_stderr(_NOTICES):
        yield


def quiet_tensorflow() -> None:
    """Import TensorFlow once, dropping its start-up notices (a no-op once it is imported)."""
    if "tensorflow" in sys.modules:
        return
    with tensorflow_quiet():
        import tensorflow  # noqa: F401  # loaded once per process: later imports are free
