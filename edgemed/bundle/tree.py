"""What a bundle may hold on disk and in its archive: plain files and folders inside one top-level folder.

``SHA256SUMS`` and its signature vouch for the files they list, not for what else sits beside them: a symbolic
link ``NAME/wheels -> ../EVIL`` added to a signed bundle leaves both valid, and the install would then run pip as
root on whatever ``EVIL/`` holds. So a symbolic link, a hard link, a device file or pipe, or a path that leaves
the bundle's folder is refused outright, when unpacking (:func:`extract_bundle`) and when checking an unpacked
folder (:func:`refuse_unsafe_entries`); ``install.sh`` applies the same rule with ``find``.
"""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
from pathlib import Path, PurePosixPath

from edgemed.errors import ConfigError

_FIX = "a bundle holds only plain files and folders; refusing it: rebuild it or copy the original again"


def refuse_unsafe_entries(folder: Path) -> None:
    """Refuse an unpacked bundle holding anything but plain files and folders.

    Args:
        folder: the unpacked bundle.

    Raises:
        ConfigError: a symbolic link, a hard-linked file, a device file, pipe or socket; the message names it.
    """
    folder = Path(folder)
    # os.walk lists a symbolic link to a folder among the folders without entering it (followlinks=False).
    for root, dirs, files in os.walk(folder):
        for name in sorted(dirs + files):
            path = Path(root) / name
            rel = path.relative_to(folder).as_posix()
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                raise ConfigError(f"{folder.name}: {rel} is a symbolic link (to {os.readlink(path)}); {_FIX}")
            if stat.S_ISDIR(info.st_mode):
                continue
            if not stat.S_ISREG(info.st_mode):
                raise ConfigError(f"{folder.name}: {rel} is a device file, pipe or socket; {_FIX}")
            if info.st_nlink > 1:
                raise ConfigError(
                    f"{folder.name}: {rel} is hard-linked to another file ({info.st_nlink} names); {_FIX}"
                )


def extract_bundle(archive: Path, into: Path) -> Path:
    """Unpack a bundle archive after checking every member, and return the bundle's folder.

    Args:
        archive: the ``NAME.tar.gz`` written by ``edgemed bundle``.
        into: the folder to unpack into (the bundle lands in ``into/NAME``, which must not exist yet).

    Returns:
        ``into/NAME``.

    Raises:
        ConfigError: the archive is unreadable or cannot be unpacked (nothing of it is then left behind), holds a
            member that is not a plain file or folder, a path that is absolute or climbs out with ``..``, more than
            one top-level folder, or ``into/NAME`` exists.
    """
    archive = Path(archive)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            top = _check_members(archive, members)
            dest = Path(into) / top
            if dest.exists() or dest.is_symlink():
                raise ConfigError(f"{dest} exists; remove it or unpack {archive.name} into another folder")
            _extract(tar, members, Path(into), dest)
    except (OSError, tarfile.TarError) as exc:
        raise ConfigError(f"{archive}: cannot unpack the bundle ({exc}); copy it again") from exc
    return dest


def _extract(tar: tarfile.TarFile, members: list[tarfile.TarInfo], into: Path, dest: Path) -> None:
    """Unpack ``members`` into ``into``; on any failure remove ``dest`` (which did not exist before) again.

    Half a bundle left behind would be refused on the next try as "exists", and could be mistaken for a bundle.
    """
    try:
        # Every member is checked before; the standard library's own "data" filter is a second line where this
        # Python has it (3.10.12 and later).
        if hasattr(tarfile, "data_filter"):
            tar.extractall(into, members=members, filter="data")
        else:
            tar.extractall(into, members=members)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def _check_members(archive: Path, members: list[tarfile.TarInfo]) -> str:
    tops: set[str] = set()
    for member in members:
        parts = PurePosixPath(member.name).parts
        if not parts or member.name.startswith("/") or ".." in parts:
            raise ConfigError(f"{archive.name}: {member.name!r} points outside the bundle's folder; {_FIX}")
        if not (member.isfile() or member.isdir()):
            kind = (
                f"a symbolic link (to {member.linkname})"
                if member.issym()
                else f"a hard link (to {member.linkname})"
                if member.islnk()
                else "a device file or pipe"
            )
            raise ConfigError(f"{archive.name}: {member.name} is {kind}; {_FIX}")
        tops.add(parts[0])
    if len(tops) != 1:
        found = ", ".join(sorted(tops)) or "nothing"
        raise ConfigError(f"{archive.name}: a bundle is one folder, but this archive holds {found}; {_FIX}")
    return tops.pop()
