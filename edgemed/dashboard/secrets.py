"""The dashboard's secret: one 0600 file outside the database, from which the audit and session keys are derived.

The audit trail is tamper-evident only if whoever can write the database cannot recompute its HMAC chain, so the
key must live somewhere else: a file of 32 random bytes (64 hex digits and a line break) readable by the
dashboard's user only. Two keys are derived from it with HMAC-SHA256 under distinct labels, so a session cookie
never reveals anything about the audit key and the other way round.

Where it lives: beside an SQLite database (``fleet.sqlite3.key`` for ``fleet.sqlite3``); for PostgreSQL there is
no file to put it beside, so ``--secret-file`` is required (every ``serve`` process and ``audit verify`` must read
the same file: copy it to each machine). It is never a file of the database itself (the SQLite file, its
``-wal``, ``-shm`` or ``-journal``).

Creation is race-free: the new key is written to a uniquely named temporary file (``O_EXCL``, mode 0600) in the
same folder and hard-linked into place, which fails when another process got there first; the loser then reads
the winner's key, so two processes starting at once agree on one key and neither ever reads a half-written file.

A key file readable or writable by other users is made private with one warning line (as the database file is,
``schema.open_private``); when that is not possible (another owner) it is refused. The keys never reach a log line
or a repr.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from edgemed.datadir import FILE_MODE
from edgemed.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["SECRET_BYTES", "Secrets", "default_secret_path", "load_secrets", "resolve_secret_path"]

#: Random bytes in the secret file.
SECRET_BYTES = 32
_AUDIT_LABEL = b"edgemed dashboard audit chain v1"
_SESSION_LABEL = b"edgemed dashboard session cookie v1"
#: Files of an SQLite database that the key must never be.
_DB_SUFFIXES = ("", "-wal", "-shm", "-journal")


@dataclass(frozen=True)
class Secrets:
    """The keys derived from the secret file (never shown by ``repr``) and where the file is."""

    audit_key: bytes = field(repr=False)
    session_key: bytes = field(repr=False)
    path: Path


def _derive(master: bytes, path: Path) -> Secrets:
    return Secrets(
        audit_key=hmac.new(master, _AUDIT_LABEL, hashlib.sha256).digest(),
        session_key=hmac.new(master, _SESSION_LABEL, hashlib.sha256).digest(),
        path=path,
    )


def default_secret_path(db: str | Path) -> Path | None:
    """Where the secret file of ``--db`` lives when ``--secret-file`` is not given.

    Args:
        db: the ``--db`` value: an SQLite file path, ``sqlite:///path`` or a PostgreSQL URL.

    Returns:
        ``<db file>.key`` beside an SQLite database; None for PostgreSQL (``--secret-file`` is then required).
    """
    text = str(db)
    if isinstance(db, Path) or "://" not in text:
        return Path(text + ".key")
    scheme, _, rest = text.partition("://")
    if scheme.split("+")[0] == "sqlite" and rest.startswith("/"):
        return Path(rest[1:] + ".key")  # sqlite:///relative or sqlite:////absolute, as SQLAlchemy reads it
    return None


def resolve_secret_path(db: str | Path, secret_file: Path | None) -> Path:
    """The secret file to use: ``--secret-file`` when given, else the default beside an SQLite database.

    Args:
        db: the ``--db`` value.
        secret_file: the ``--secret-file`` value, or None.

    Returns:
        The path.

    Raises:
        ConfigError: PostgreSQL without ``--secret-file``, or a secret file that is one of the database's files.
    """
    path = secret_file if secret_file is not None else default_secret_path(db)
    if path is None:
        raise ConfigError(
            "a PostgreSQL dashboard keeps its audit and session key outside the database: pass --secret-file FILE "
            "(e.g. --secret-file /etc/edgemed/dashboard.key, created 0600 on first use; give every serve process "
            "and `audit verify` the same file)"
        )
    fallback = default_secret_path(db)
    if fallback is not None:
        db_file = Path(str(fallback)[: -len(".key")]).resolve()
        resolved = path.resolve()
        if any(resolved == db_file.with_name(db_file.name + suffix) for suffix in _DB_SUFFIXES):
            raise ConfigError(
                f"--secret-file {path} is the dashboard database itself: the key must be kept outside the database "
                f"(the default is {fallback})"
            )
    return path


def _check_private(path: Path) -> None:
    st = os.stat(path, follow_symlinks=True)
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"the dashboard secret file {path} is not a regular file; remove it or pass --secret-file")
    mode = st.st_mode & 0o777
    if not mode & 0o077:
        return
    log.warning(
        "the dashboard secret file %s was open to other users (mode %04o); making it private (0600): whoever reads "
        "it can forge the audit trail and session cookies",
        path,
        mode,
    )
    try:
        os.chmod(path, mode & 0o700)
    except OSError as exc:
        raise ConfigError(
            f"the dashboard secret file {path} is open to other users (mode {mode:04o}) and cannot be made private "
            f"({exc.strerror}); run: chmod 600 {path} as its owner"
        ) from exc


def _read(path: Path) -> bytes:
    text = path.read_text(encoding="ascii", errors="replace").strip()
    try:
        master = bytes.fromhex(text)
    except ValueError:
        master = b""
    if len(master) != SECRET_BYTES:
        raise ConfigError(
            f"the dashboard secret file {path} does not hold {SECRET_BYTES * 2} hex digits; restore it from a backup "
            "(a new key cannot verify the audit rows written with the old one)"
        )
    return master


def _create(path: Path) -> None:
    """Write a new key beside ``path`` and link it into place; FileExistsError when another process won."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    try:
        try:
            os.write(fd, os.urandom(SECRET_BYTES).hex().encode("ascii") + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, path)  # atomic, and refuses an existing file: the first process's key is everyone's
    finally:
        tmp.unlink(missing_ok=True)
    log.info("created the dashboard secret file %s (0600); back it up: the audit trail is checked with it", path)


def load_secrets(path: Path, *, create: bool) -> Secrets:
    """Read (or create) the secret file and derive the audit and session keys from it.

    Args:
        path: the secret file (see ``resolve_secret_path``).
        create: create it (32 random bytes, 0600) when it does not exist; otherwise a missing file is an error.

    Returns:
        The keys.

    Raises:
        ConfigError: the file is missing (and ``create`` is false), unreadable, malformed, not a regular file, or
            open to others and not ours to make private.
    """
    try:
        if create and not path.exists():
            if not path.parent.is_dir():
                raise ConfigError(f"the folder {path.parent} of the dashboard secret file does not exist; create it")
            # FileExistsError: another process created it first; its key is the one (read below).
            with contextlib.suppress(FileExistsError):
                _create(path)
        _check_private(path)
        return _derive(_read(path), path)
    except FileNotFoundError as exc:
        raise ConfigError(
            f"the dashboard secret file {path} does not exist; it is created by the first `edgemed dashboard`, "
            "`serve` or `users add` on this database: pass the same --secret-file they used"
        ) from exc
    except OSError as exc:
        raise ConfigError(f"cannot use the dashboard secret file {path}: {exc.strerror or exc}") from exc
