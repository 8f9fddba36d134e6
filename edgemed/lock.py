"""One process owns a data directory at a time.

The lock is an advisory ``fcntl.flock`` on ``DATA_DIR/.lock``, which the kernel releases when the owner exits,
however it exits (SIGKILL and power loss included), so a stale lock file never blocks a restart. The owner's
PID is written inside only to name it in the refusal message.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from edgemed.datadir import open_private, private_dir
from edgemed.errors import OutboxError, OutboxLockedError

LOCK_FILENAME = ".lock"


class DataDirLock:
    """Exclusive ownership of a data directory, as a context manager.

    Example::

        with DataDirLock(data_dir):
            outbox = Outbox(data_dir / "outbox.sqlite3")
    """

    def __init__(self, data_dir: Path) -> None:
        """Prepare the lock; nothing is touched until ``acquire()`` or ``with``.

        Args:
            data_dir: the device's data directory; created on acquire if missing.
        """
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / LOCK_FILENAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """True while this object owns the directory."""
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock without waiting.

        Raises:
            OutboxLockedError: another live process owns the directory (the message names its PID).
            OutboxError: the directory or the lock file cannot be created.
        """
        if self._fd is not None:
            return
        try:
            private_dir(self.data_dir)
            fd = open_private(self.path, os.O_RDWR | os.O_CREAT)
        except OSError as exc:
            raise OutboxError(
                f"cannot create the lock file {self.path}: {exc.strerror}; pick a writable --data-dir"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            owner = _read_owner(fd)
            os.close(fd)
            raise OutboxLockedError(
                f"the data directory {self.data_dir} is in use by another edgemed process (PID {owner}); "
                "stop that process or pass a different --data-dir"
            ) from exc
        except OSError as exc:
            os.close(fd)
            raise OutboxError(f"cannot lock {self.path}: {exc}") from exc
        # On a full disk the PID cannot be written: the lock is held all the same (the PID only names the owner in
        # a refusal), and the outbox, which needs the space, reports the full disk with its own exit code.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        """Give the directory up. Safe to call when not held."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> DataDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_owner(fd: int) -> str:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"
