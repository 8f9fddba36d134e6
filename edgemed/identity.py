"""Device identity and privacy helpers: the device secret, study pseudonyms, and clock trust.

A study id (a DICOM StudyInstanceUID or one typed with ``--study-id``) is patient-linked, so it never leaves the
device. Results carry ``session_id = HMAC-SHA256(device_secret, study_id)``: stable for one study on one device,
so the dashboard can group frames, but useless to anyone without the secret, which stays in a 0600 file.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import hmac
import os
import re
import secrets
import time
from pathlib import Path

from edgemed.errors import ConfigError, OutboxError

ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
SECRET_FILE = "device.secret"


def check_id(kind: str, value: str) -> str:
    """Validate a device id or site name (``[A-Za-z0-9_-]{1,64}``) and return it.

    Raises:
        ConfigError: the value would break the MQTT topic or could smuggle a name into it.
    """
    if not ID_PATTERN.match(value):
        raise ConfigError(
            f"{kind} {value!r} is invalid: use 1-64 letters, digits, '_' or '-' (it becomes part of the MQTT topic)"
        )
    return value


def load_or_create_secret(data_dir: Path) -> bytes:
    """The device's 32-byte pseudonymisation key, created with mode 0600 on first run.

    The key is written to a temporary file, fsynced and then linked into place, so an interrupted first run (a
    full disk, a power cut) never leaves a short key behind. An empty key file (left by an older version in that
    case) was never used for any pseudonym and is replaced.

    Raises:
        ConfigError: the file exists but is group/world readable or not 32 bytes, so pseudonyms are not safe.
        OutboxError: the data directory cannot be written (disk full, permissions): exit 7 like the outbox.
    """
    path = Path(data_dir) / SECRET_FILE
    try:
        if path.exists() and path.stat().st_size == 0:
            path.unlink()
        if not path.exists():
            _create_secret(path)
        mode = path.stat().st_mode & 0o777
        key = path.read_bytes()
    except OSError as exc:
        raise OutboxError(
            f"cannot create the device secret {path}: {exc.strerror}; free disk space in the data directory "
            "or fix its permissions"
        ) from exc
    if mode & 0o077:
        raise ConfigError(f"{path} is readable by other users (mode {mode:o}); run: chmod 600 {path}")
    if len(key) != 32:
        raise ConfigError(
            f"{path} is damaged ({len(key)} bytes, expected 32); delete it to create a new one "
            "(existing pseudonyms will no longer match new results)"
        )
    return key


def _create_secret(path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(32))
            fh.flush()
            os.fsync(fh.fileno())
        with contextlib.suppress(FileExistsError):  # another process created it meanwhile: that key stands
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)  # the new name survives a power cut too
    finally:
        os.close(dir_fd)


def pseudonym(secret: bytes, study_id: str) -> str:
    """The published stand-in for a study id: the first 32 hex digits of HMAC-SHA256(secret, study_id)."""
    return hmac.new(secret, study_id.encode("utf-8"), hashlib.sha256).hexdigest()[:32]


class _Timex(ctypes.Structure):
    # struct timex from <sys/timex.h> (Linux, 64-bit): mode, then long fields; we only read the return value,
    # but the kernel writes the whole struct, so it must be large enough.
    _fields_ = [("modes", ctypes.c_uint), ("_pad", ctypes.c_long * 64)]


_TIME_ERROR = 5  # adjtimex() return value meaning "clock not synchronised"
_EARLIEST_PLAUSIBLE = 1704067200.0  # 2024-01-01: a clock before this was never set (no RTC, no NTP yet)


def clock_synced() -> bool | None:
    """Whether the system clock is trustworthy: False when unsynchronised or implausible, None when unknown.

    Devices without a real-time clock boot at 1970 or at their last shutdown time; results then carry
    ``clock_synced: false`` so the dashboard orders them by ``seq`` rather than by ``created_at``.
    """
    if time.time() < _EARLIEST_PLAUSIBLE:
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        state = libc.adjtimex(ctypes.byref(_Timex()))
    except (OSError, AttributeError):
        return None
    if state < 0:
        return None
    return bool(state != _TIME_ERROR)
