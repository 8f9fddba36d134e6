"""A real native TensorFlow Lite delegate built with ctypes, standing in for libedgetpu at the load_delegate seam.

LiteRT calls its ``Prepare`` through the C ABI; the delegate claims no nodes (or fails), and the model runs on
the CPU kernels, as the interpreter treats any external delegate. Used by the fallback and multi-output tests.
"""

from __future__ import annotations

import ctypes

_PREPARE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)


class _TfLiteDelegate(ctypes.Structure):
    # tensorflow/lite/core/c/common.h: data_, Prepare, CopyFromBufferHandle, CopyToBufferHandle,
    # FreeBufferHandle, flags, opaque_delegate_builder; padded in case a later release appends fields.
    _fields_ = [
        ("data_", ctypes.c_void_p),
        ("Prepare", _PREPARE),
        ("CopyFromBufferHandle", ctypes.c_void_p),
        ("CopyToBufferHandle", ctypes.c_void_p),
        ("FreeBufferHandle", ctypes.c_void_p),
        ("flags", ctypes.c_int64),
        ("opaque_delegate_builder", ctypes.c_void_p),
        ("_reserved", ctypes.c_void_p * 8),
    ]


class CtypesDelegate:
    """A real native delegate whose Prepare claims no nodes (status 0) or fails (status 1)."""

    def __init__(self, status: int = 0) -> None:
        self.prepared = 0

        def prepare(_context: int, _delegate: int) -> int:
            self.prepared += 1
            return status

        self._prepare = _PREPARE(prepare)
        self._struct = _TfLiteDelegate()
        self._struct.Prepare = self._prepare
        self._struct.flags = 1  # kTfLiteDelegateFlagsAllowDynamicTensors

    def _get_native_delegate_pointer(self) -> int:
        return ctypes.addressof(self._struct)
