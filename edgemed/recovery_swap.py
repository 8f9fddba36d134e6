"""Putting a recovered outbox in place of the damaged one so that a crash at any moment loses nothing.

The swap is several renames: the damaged file, its ``-wal`` and ``-shm`` to ``outbox.sqlite3.corrupt-<time>``,
then the new file into place. A crash between them used to leave either a stray ``outbox.sqlite3-wal`` that
SQLite would replay into the next new (empty) outbox, or no outbox at all while the backlog sat in the moved
file. So the swap is written down first: ``outbox.sqlite3.swap`` names the moves (and carries the recovery's
report), and the next start finishes them (``finish``) before it looks at the outbox, or undoes them when the new
file was lost with its working folder, so that the recovery simply runs again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from edgemed.datadir import open_private, tighten

log = logging.getLogger(__name__)

SIDE_FILES = ("-wal", "-shm")


def marker_path(path: Path) -> Path:
    """Where the swap of the outbox ``path`` is written down while it is in progress."""
    return path.with_name(path.name + ".swap")


def working_folders(path: Path) -> list[Path]:
    """The recovery working folders beside the outbox ``path`` (one process owns a data directory: any found at
    start is left by a recovery that was interrupted)."""
    return sorted(p for p in path.parent.glob(f".{path.name}.recovering-*") if p.is_dir())


def swap(path: Path, target: Path, fresh: Path, report: dict[str, Any]) -> None:
    """Move the damaged outbox ``path`` (with its side files) to ``target`` and ``fresh`` into its place.

    Args:
        path: the outbox file.
        target: the name the damaged file is kept under, beside it.
        fresh: the recovered outbox, in a working folder beside ``path``.
        report: what the recovery found, kept in the marker so that the start that finishes an interrupted swap
            can still report it.

    Raises:
        OSError: a rename or the marker could not be written (the next start finishes or undoes the swap).
    """
    marker = marker_path(path)
    record = {"target": target.name, "fresh": [fresh.parent.name, fresh.name], "report": report}
    tmp = marker.with_name(marker.name + ".tmp")
    fd = open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(record))
        fh.flush()
        os.fsync(fh.fileno())
    os.rename(tmp, marker)  # the marker is there complete, or not at all
    fsync_dir(path.parent)
    _complete(path, target, fresh)
    marker.unlink()
    fsync_dir(path.parent)


def finish(path: Path) -> tuple[Path, dict[str, Any]] | None:
    """Finish (or undo) a swap a crash interrupted; a no-op when there is none.

    Returns:
        The damaged file's new name and the recovery's report when an interrupted swap was finished; None when
        there was nothing to finish, or the swap was undone (the new file was lost: the damaged one is back in
        place, and the recovery runs again).

    Raises:
        OSError: a rename failed.
    """
    marker = marker_path(path)
    marker.with_name(marker.name + ".tmp").unlink(missing_ok=True)  # a marker never completed: no move was made
    if not marker.exists():
        return None
    record = _read(marker)
    target = path.with_name(record["target"])
    folder, name = record["fresh"]
    fresh = path.with_name(folder) / name
    placed = path.exists() and target.exists()  # the new file was renamed into place already
    if not placed and not fresh.exists():
        _undo(path, target)
        log.warning("an outbox recovery was interrupted before its new file was complete: it runs again")
        marker.unlink()
        fsync_dir(path.parent)
        return None
    _complete(path, target, fresh)
    marker.unlink()
    fsync_dir(path.parent)
    shutil.rmtree(fresh.parent, ignore_errors=True)
    return target, dict(record["report"])


def _read(marker: Path) -> dict[str, Any]:
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
        target, fresh = str(record["target"]), [str(p) for p in record["fresh"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise OSError(f"{marker} is unreadable ({exc}); move it away and start again") from exc
    # Only names beside the outbox: a marker is never a way to rename files elsewhere.
    if any(not n or "/" in n or n in (".", "..") for n in (target, *fresh)) or len(fresh) != 2:
        raise OSError(f"{marker} names files outside the data directory; move it away and start again")
    return {"target": target, "fresh": fresh, "report": record.get("report") or {}}


def _complete(path: Path, target: Path, fresh: Path) -> None:
    # While the marker exists nothing opens the outbox, so a file at `path` is the damaged one until `target`
    # exists, and its side files are the damaged one's.
    if path.exists() and not target.exists():
        path.rename(target)
    tighten(target)  # an outbox from before files were private may be 0644: its results are no less private
    for suffix in SIDE_FILES:  # the WAL may hold committed results that are not yet in the main file
        side = path.with_name(path.name + suffix)
        moved = target.with_name(target.name + suffix)
        if side.exists() and not moved.exists():
            side.rename(moved)
        tighten(moved)
    if not path.exists():
        os.rename(fresh, path)
    fsync_dir(path.parent)


def _undo(path: Path, target: Path) -> None:
    for suffix in ("", *SIDE_FILES):
        moved = target.with_name(target.name + suffix)
        if moved.exists():
            moved.rename(path.with_name(path.name + suffix))


def fsync_dir(folder: Path) -> None:
    """Make the renames in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
