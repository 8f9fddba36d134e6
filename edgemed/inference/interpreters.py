"""The one place that imports a TensorFlow Lite interpreter package.

Three packages provide the same ``Interpreter`` / ``load_delegate`` / ``Delegate`` API. They are tried in this
order:

1. ``ai_edge_litert`` (LiteRT): maintained, numpy 2, XNNPACK for int8 and float, 41 MB RSS after import.
2. ``tflite_runtime``: the legacy package (last release 2.14). It needs numpy<2, so importing it under numpy 2
   fails inside its extension module; and it breaks (``vector::reserve``) when TensorFlow is already imported
   in the same process, so ``auto`` skips it in that case.
3. ``tensorflow.lite``: always works where TensorFlow is installed, but costs ~2 s and ~500 MB to import, so
   it is imported only when neither of the others is usable.

The returned module is the *interpreter* module of the package, so callers find ``Interpreter``,
``load_delegate`` and ``Delegate`` on it whichever package won.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Literal

from edgemed.errors import ConfigError

RuntimeName = Literal["ai_edge_litert", "tflite_runtime", "tensorflow"]
RuntimePreference = Literal["auto", "ai_edge_litert", "tflite_runtime", "tensorflow"]

_MODULES: dict[str, str] = {
    "ai_edge_litert": "ai_edge_litert.interpreter",
    "tflite_runtime": "tflite_runtime.interpreter",
    "tensorflow": "tensorflow.lite.python.interpreter",
}
_INSTALL: dict[str, str] = {
    "ai_edge_litert": "pip install ai-edge-litert",
    "tflite_runtime": "pip install tflite-runtime 'numpy<2'",
    "tensorflow": "pip install tensorflow-cpu",
}
_ORDER: tuple[RuntimeName, ...] = ("ai_edge_litert", "tflite_runtime", "tensorflow")

# What a broken install raises on import: a missing package (ImportError), an extension module built against
# numpy 1 under numpy 2 (ImportError, or AttributeError/ValueError from its C init), or a wrong platform
# (OSError).
_IMPORT_FAILURES = (ImportError, AttributeError, ValueError, OSError, RuntimeError)


def _try_import(name: RuntimeName) -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module(_MODULES[name]), ""
    except _IMPORT_FAILURES as exc:
        return None, f"{name}: {type(exc).__name__}: {exc}".splitlines()[0]


def interpreter_module(preference: RuntimePreference = "auto") -> tuple[RuntimeName, ModuleType]:
    """Import the interpreter package to use and return its name and interpreter module.

    Args:
        preference: ``auto`` tries ai_edge_litert, then tflite_runtime, then tensorflow.lite; a package name
            imports only that package.

    Returns:
        ``(name, module)`` where ``module`` has ``Interpreter``, ``load_delegate`` and ``Delegate``.

    Raises:
        ConfigError: the preferred package (or, with ``auto``, every package) cannot be imported; the message
            says what to install.
    """
    if preference != "auto":
        if preference not in _MODULES:
            raise ConfigError(f"unknown interpreter runtime {preference!r}; use one of auto, {', '.join(_ORDER)}")
        module, why = _try_import(preference)
        if module is None:
            raise ConfigError(
                f"interpreter runtime {preference!r} cannot be imported ({why}); install it with "
                f"`{_INSTALL[preference]}` or set runtime: auto"
            )
        return preference, module
    failures: list[str] = []
    for name in _ORDER:
        if name == "tflite_runtime" and "tensorflow" in sys.modules:
            failures.append("tflite_runtime: skipped because tensorflow is already imported in this process")
            continue
        module, why = _try_import(name)
        if module is not None:
            return name, module
        failures.append(why)
    raise ConfigError(
        "no TensorFlow Lite interpreter is installed (" + "; ".join(failures) + "); install one "
        f"with `{_INSTALL['ai_edge_litert']}`"
    )
