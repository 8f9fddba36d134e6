"""Reading the broker password file: checked and read through one open descriptor, never by its name twice.

Anyone who can change the file can point the device at a password (and, with the broker's ACL, at topics) of their
choosing; anyone who can read it can publish as the device. So the file must belong to the user edgemed runs as
(or to root) and be writable by nobody else; one others can read gets a warning. ``chmod 600``, owned by the
service's user, is the layout ``edgemed bundle`` asks for.

The checks are made on the descriptor the password is then read from (``fstat``), so the file cannot be swapped
between the check and the read. A symbolic link is resolved once, when the file is opened: configuration
management often provisions ``/etc/edgemed`` secrets as links (to a versioned file, or Kubernetes' ``..data``
links). The link itself must then belong to this user or root as well, the file it points at is opened with
``O_NOFOLLOW`` (a link put in its place afterwards is refused, not followed) and that file is what is checked.
Messages name both. A FIFO or device is refused without blocking on it (``O_NONBLOCK``).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
from pathlib import Path

from edgemed.errors import ConfigError

log = logging.getLogger(__name__)

MAX_BYTES = 64 * 1024  # a password is one line; a bigger file is not a password file
_warned_readable: set[str] = set()  # each readable password file is warned about once per process
_warned_lock = threading.Lock()


def _owner_ok(uid: int) -> bool:
    return uid in (os.geteuid(), 0)


def _user(uid: int) -> str | None:
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return None


def _owner_name(uid: int) -> str:
    name = _user(uid)
    return f"{name} (uid {uid})" if name else f"uid {uid}"


def _open(path: Path) -> tuple[int, str]:
    """Open the file (resolving a link once) and return the descriptor and how to name it in messages."""
    shown = str(path)
    try:
        link = os.lstat(path)
        if stat.S_ISLNK(link.st_mode):
            real = os.path.realpath(path)
            shown = f"{path} (a link to {real})"
            if not _owner_ok(link.st_uid):
                raise ConfigError(
                    f"the broker password file {shown}: the link belongs to {_owner_name(link.st_uid)}, who could "
                    f"point it elsewhere; make it belong to the user edgemed runs as or root (chown -h)"
                )
        else:
            real = str(path)
        return os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC), shown
    except ConfigError:
        raise
    except OSError as exc:
        why = "it was replaced by a link while being opened" if exc.errno == errno.ELOOP else exc.strerror
        raise ConfigError(f"cannot read the broker password file {shown}: {why}") from exc


def _check(fd: int, shown: str, path: Path) -> None:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"the broker password file {shown} is not a regular file; put the password in a file")
    if not _owner_ok(info.st_uid):
        raise ConfigError(
            f"the broker password file {shown} belongs to {_owner_name(info.st_uid)}, who could change it; run "
            f"`chown {_user(os.geteuid()) or os.geteuid()} {path}` (the user edgemed runs as), or make root own it"
        )
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o022:
        raise ConfigError(
            f"the broker password file {shown} can be changed by other users (mode {mode:04o}); "
            f"run `chmod 600 {path}` (owned by the user edgemed runs as)"
        )
    if mode & 0o044:
        with _warned_lock:
            first = shown not in _warned_readable
            _warned_readable.add(shown)
        if first:
            log.warning(
                "the broker password file %s is readable by other users (mode %04o); run `chmod 600 %s`",
                shown,
                mode,
                path,
            )


def read_password_file(path: Path) -> str:
    """The password on the first line of ``path``, after checking the open file's owner and mode.

    Args:
        path: the password file (a symbolic link is resolved once, see the module docstring).

    Returns:
        The first line, without its line ending.

    Raises:
        ConfigError: the file is missing or unreadable, not a regular file, belongs to another user, can be
            changed by other users, is empty, or is not UTF-8 text.
    """
    fd, shown = _open(Path(path))
    try:
        _check(fd, shown, Path(path))
        data = b""
        while len(data) <= MAX_BYTES:
            chunk = os.read(fd, MAX_BYTES + 1 - len(data))
            if not chunk:
                break
            data += chunk
    except OSError as exc:
        raise ConfigError(f"cannot read the broker password file {shown}: {exc.strerror}") from exc
    finally:
        os.close(fd)
    if len(data) > MAX_BYTES:
        raise ConfigError(
            f"the broker password file {shown} is over {MAX_BYTES // 1024} KB; put only the password in it"
        )
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"the broker password file {shown} is not UTF-8 text; write the password as text") from exc
    value = lines[0] if lines else ""
    if not value:
        raise ConfigError(f"the broker password file {shown} is empty; put the password on its first line")
    return value
