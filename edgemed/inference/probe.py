"""What accelerators this machine offers, for ``edgemed doctor``: one row per delegate, nothing constructed.

Probing never builds a delegate (building one can claim the Edge TPU from a running `edgemed run`); it checks
that the libraries load and that a device node or USB id is present. Only a real run proves a delegate works.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgemed.errors import ConfigError
from edgemed.inference.delegates import check_library
from edgemed.inference.interpreters import interpreter_module

if TYPE_CHECKING:
    from edgemed.inference import BackendConfig

# Coral USB Accelerator: 1a6e:089a before its firmware is loaded, 18d1:9302 after.
CORAL_USB_IDS = {("1a6e", "089a"), ("18d1", "9302")}
_DISTRIBUTIONS = {
    "ai_edge_litert": "ai-edge-litert",
    "tflite_runtime": "tflite-runtime",
    "tensorflow": "tensorflow",
}


@dataclass(frozen=True)
class DelegateStatus:
    """One row of the doctor's accelerator table.

    Attributes:
        name: ``cpu``, ``edgetpu`` or ``gpu``.
        available: the library loads and a device is present (for ``cpu``: an interpreter is installed).
        detail: what was found, or what is missing and how to fix it.
    """

    name: str
    available: bool
    detail: str


def runtime_version(name: str) -> str:
    """Installed version of an interpreter package (``ai_edge_litert`` -> ``2.3.0``), or ``unknown``."""
    for dist in (_DISTRIBUTIONS.get(name, name), "tensorflow-cpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def coral_usb_devices(sysfs: Path = Path("/sys/bus/usb/devices")) -> int:
    """Number of Coral USB Accelerators visible in sysfs."""
    found = 0
    for dev in sysfs.glob("*") if sysfs.is_dir() else []:
        try:
            ids = ((dev / "idVendor").read_text().strip(), (dev / "idProduct").read_text().strip())
        except OSError:
            continue  # interfaces and hubs without ids
        found += ids in CORAL_USB_IDS
    return found


def _cpu(cfg: BackendConfig) -> DelegateStatus:
    try:
        name, _ = interpreter_module(cfg.runtime)
    except ConfigError as exc:
        return DelegateStatus("cpu", False, str(exc))
    return DelegateStatus("cpu", True, f"{name} {runtime_version(name)}, XNNPACK, {cfg.threads} threads")


def _edgetpu(cfg: BackendConfig, dev: Path, sysfs: Path) -> DelegateStatus:
    problem = check_library(cfg.edgetpu_library)
    usb = coral_usb_devices(sysfs)
    pci = sorted(p.name for p in dev.glob("apex_*"))
    devices = ([f"{usb} USB"] if usb else []) + pci
    seen = ", ".join(devices) if devices else "no Coral USB (1a6e:089a/18d1:9302) or /dev/apex_* device"
    if problem is not None:
        return DelegateStatus("edgetpu", False, f"{problem}; devices: {seen}; install libedgetpu1-std")
    if not devices:
        return DelegateStatus("edgetpu", False, f"{cfg.edgetpu_library} loads, but {seen} is present")
    return DelegateStatus("edgetpu", True, f"{cfg.edgetpu_library} loads; devices: {seen}")


def _gpu(cfg: BackendConfig, dev: Path) -> DelegateStatus:
    nodes = sorted(p.name for pattern in ("dri/renderD*", "nvidia*", "mali*", "kgsl-3d0") for p in dev.glob(pattern))
    seen = ", ".join(nodes) if nodes else "no GPU device node (/dev/dri/renderD*, /dev/nvidia*, /dev/mali*)"
    if cfg.gpu_library is not None:
        problem = check_library(cfg.gpu_library)
        if problem is not None:
            return DelegateStatus("gpu", False, f"{problem}; devices: {seen}")
        return DelegateStatus("gpu", bool(nodes), f"{cfg.gpu_library} loads; devices: {seen}")
    return DelegateStatus(
        "gpu",
        bool(nodes),
        f"LiteRT GPU accelerator; devices: {seen}"
        + ("" if nodes else "; a run with accelerator gpu will fall back to the CPU or stop (exit 6)"),
    )


def probe_delegates(
    cfg: BackendConfig, *, dev: Path = Path("/dev"), sysfs: Path = Path("/sys/bus/usb/devices")
) -> list[DelegateStatus]:
    """Check the CPU interpreter, the Edge TPU and the GPU without building any delegate.

    Args:
        cfg: backend settings (library names, runtime preference, threads).
        dev: device directory (a parameter so tests can point it at a temporary tree).
        sysfs: USB device directory in sysfs.

    Returns:
        One ``DelegateStatus`` each for ``cpu``, ``edgetpu`` and ``gpu``, in that order.
    """
    return [_cpu(cfg), _edgetpu(cfg, dev, sysfs), _gpu(cfg, dev)]
