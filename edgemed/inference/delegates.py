"""Loading external delegate libraries (Edge TPU, GPU) without the runtime's noisy failure path.

Why this module exists: ``load_delegate(lib)`` in ai_edge_litert, tflite_runtime and tf.lite builds a
``Delegate`` whose ``__init__`` first calls ``ctypes.pydll.LoadLibrary(lib)``. When the library is absent that
raises ``OSError`` before ``self._library`` is assigned; the half-built object is then garbage-collected and
its ``__del__`` reads ``self._library``, which raises ``AttributeError``. CPython can only print that one
("Exception ignored in: <function Delegate.__del__ ...>") to stderr, where it reaches the user. When the
library loads but its ``tflite_plugin_create_delegate`` returns NULL (for example no Edge TPU is plugged in),
``__init__`` raises ``ValueError`` and ``__del__`` would pass the NULL pointer to
``tflite_plugin_destroy_delegate``.

So we (1) check with ``ctypes`` that the library loads and exports the external-delegate entry points before
touching the runtime's class, which gives a precise reason, and (2) construct the ``Delegate`` ourselves with
``_library`` preset to ``None`` and reset to ``None`` on failure, so that ``__del__`` of a failed object is a
no-op.
"""

from __future__ import annotations

import ctypes
from types import ModuleType
from typing import Any

from edgemed.errors import DelegateUnavailableError

EDGETPU_INSTALL = (
    "install the Edge TPU runtime (`apt-get install libedgetpu1-std` from Coral's apt repository, "
    "https://coral.ai/software/#debian-packages), plug in the accelerator, and check that `lsusb` "
    "lists 1a6e:089a or 18d1:9302 (USB) or that /dev/apex_0 exists (PCIe)"
)
GPU_INSTALL = (
    "put the TensorFlow Lite GPU delegate library (libtensorflowlite_gpu_delegate.so, from the board "
    "vendor or built from TensorFlow) on the library path, or leave gpu_library unset to use LiteRT's "
    "GPU accelerator (needs ai-edge-litert and a GPU driver with OpenCL or Vulkan)"
)
_ENTRY_POINTS = ("tflite_plugin_create_delegate", "tflite_plugin_destroy_delegate")


def check_library(library: str) -> str | None:
    """Check that a shared library loads and is a TensorFlow Lite external delegate.

    Args:
        library: file name (searched on the library path) or absolute path.

    Returns:
        ``None`` when it is usable, otherwise the reason in one line.
    """
    try:
        handle = ctypes.CDLL(library)
    except OSError as exc:
        return f"{library} cannot be loaded ({exc})"
    missing = [name for name in _ENTRY_POINTS if not hasattr(handle, name)]
    if missing:
        return f"{library} is not a TensorFlow Lite external delegate (it lacks {', '.join(missing)})"
    return None


def load_external_delegate(
    module: ModuleType, library: str, options: dict[str, str], *, delegate: str, install_hint: str
) -> Any:
    """Create a delegate from an external delegate library, or explain why it cannot be created.

    Args:
        module: the interpreter module returned by ``interpreter_module`` (it provides ``Delegate``).
        library: shared library name or path.
        options: delegate options (for the Edge TPU: ``{"device": "usb:0"}``).
        delegate: ``edgetpu`` or ``gpu``, for the error.
        install_hint: what to install or check, appended to the error.

    Returns:
        The runtime's ``Delegate`` object, to pass in ``experimental_delegates``.

    Raises:
        DelegateUnavailableError: the library is absent, is not a delegate, or refused to create a delegate.
    """
    reason = check_library(library)
    if reason is not None:
        raise DelegateUnavailableError(delegate, f"{reason}; {install_hint}")
    cls = module.Delegate
    obj = cls.__new__(cls)
    obj._library = None  # read by Delegate.__del__; see the module docstring
    try:
        obj.__init__(library, options)
    except (OSError, ValueError, RuntimeError, AttributeError) as exc:
        obj._library = None  # no native delegate exists: keep __del__ from destroying a NULL pointer
        detail = str(exc).strip().replace("\n", " ") or "the library returned no delegate"
        where = f" for device {options['device']!r}" if "device" in options else ""
        raise DelegateUnavailableError(
            delegate, f"{library} loaded but could not create a delegate{where} ({detail}); {install_hint}"
        ) from exc
    return obj
