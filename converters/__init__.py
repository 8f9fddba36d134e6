"""Host-side tools: load datasets, train, convert to TFLite, gate and report.

This package is the only part of edgemed that imports TensorFlow, and it does so inside the functions that
need it (in ``train``, ``models``, ``source``, ``convert`` and ``record``), never at import time: ``import
converters``, ``converters.data`` and even ``converters.convert`` stay cheap, so the command line can print its
help and validate a dataset without paying two seconds and 500 MB for TensorFlow.

``convert()`` reads top to bottom as its steps; the modules it draws on:

    samples.py    the calibration sample and the held-out split
    source.py     the Keras model and its device graph
    cam.py        the GAP + Dense head: its feature map as an extra output, the artifact's ``cam`` section
    outputs.py    the converted file's outputs named by tensor and role (TFLite reorders them)
    runner.py     a converted file run through the device's own inference code
    gate.py       the acceptance gate (thresholds, floors, GateResult); metrics.py: the numbers behind it
    edgetpu.py    the Edge TPU compatibility check and compiler
    outcome.py    typed outcomes (per target, Edge TPU, the whole conversion)
    record.py     the manifest written from them; report.py: report.json and report.html
"""

from __future__ import annotations

import os

# Before any submodule can import TensorFlow: its C++ start-up lines (oneDNN notices, CUDA probing) are noise to
# someone converting a model. Set TF_CPP_MIN_LOG_LEVEL=0 to see them again.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__all__: list[str] = []
