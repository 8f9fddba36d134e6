"""Host-side tools: load datasets, train, convert to TFLite, gate and report.

This package is the only part of edgemed that imports TensorFlow, and it does so inside the modules that
need it (``train``, ``convert``, ``models``), never here: ``import converters`` and ``converters.data`` stay
cheap so the command line can print its help and validate a dataset without paying two seconds and 500 MB for
TensorFlow.
"""

from __future__ import annotations

import os

# Before any submodule can import TensorFlow: its C++ start-up lines (oneDNN notices, CUDA probing) are noise to
# someone converting a model. Set TF_CPP_MIN_LOG_LEVEL=0 to see them again.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__all__: list[str] = []
