"""The device's data directory is private: the folder is created 0700 and every file in it is 0600.

It holds results (the outbox and ``results.jsonl``), the ledger of processed inputs (file names), and the device
secret. Files are created with mode 0600 from the start (never created open and tightened afterwards), and files
left group- or world-readable by an older version are tightened when they are next opened. SQLite creates its
``-wal`` and ``-shm`` files with the mode of the database file, so creating that one 0600 covers them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600

# Folders already warned about in this process: the lock and the outbox both prepare the data directory.
_warned_open: set[Path] = set()


def private_dir(path: Path) -> None:
    """Create ``path`` (and missing parents) with mode 0700; warn (once per process) when it is open to others.

    An existing folder is not changed: it was chosen by the operator and may be shared with something else. The
    files edgemed keeps in it are 0600 either way.

    Raises:
        OSError: the folder cannot be created.
    """
    path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077 and path.resolve() not in _warned_open:
        _warned_open.add(path.resolve())
        log.warning(
            "the data directory %s is open to other users (mode %o); its files are private (0600), "
            "but to hide even their names run: chmod 700 %s",
            path,
            mode,
            path,
        )


def private_file(path: Path) -> None:
    """Make sure ``path`` exists with mode 0600: create it empty, or tighten an existing one.

    Raises:
        OSError: it cannot be created or its mode cannot be changed.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    except FileExistsError:
        tighten(path)
    else:
        os.close(fd)


def tighten(path: Path) -> None:
    """Remove group and other permissions from an existing file (a no-op when it is already private or absent).

    A file this user may not change (another owner) is reported in one warning line and left as it is.
    """
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        return
    except PermissionError:  # a folder on the way that this user may not search
        log.warning("cannot check whether %s is private (permission denied); run: chmod 600 %s", path, path)
        return
    if not mode & 0o077:
        return
    try:
        os.chmod(path, mode & 0o700)
    except FileNotFoundError:
        return
    except PermissionError:
        log.warning("%s is open to other users (mode %o) and not ours to change; run: chmod 600 %s", path, mode, path)


def open_private(path: Path, flags: int) -> int:
    """``os.open`` with mode 0600 for a new file, tightening an existing one; returns the descriptor.

    Raises:
        OSError: as ``os.open``.
    """
    fd = os.open(path, flags | os.O_CLOEXEC, FILE_MODE)
    try:
        mode = os.fstat(fd).st_mode & 0o777
        if mode & 0o077:
            os.fchmod(fd, mode & 0o700)
    except OSError:
        os.close(fd)
        raise
    return fd
