"""Which ``seq`` stream a data directory's outbox numbers: an id that changes exactly when ``seq`` starts again at 0.

Receipts name the stream they are about (``edgemed.receipts``). A device re-flashed with a fresh data directory, or
whose outbox and seq mark were deleted, numbers from 0 again under the same device id; its consumer still holds,
and may still publish as its retained receipt, "settled through 5,000" for the old numbering. Were the stream
derived from something that outlives the counter (the device secret, which an operator may keep to keep the
study pseudonyms stable), that receipt would release the new results 0..5,000 before the consumer had stored
them. So the stream lives beside the counter, in ``DATA_DIR/outbox.stream`` (0600):

* no outbox and no seq mark (a sequence that begins now): a new random stream, replacing any old file;
* a sequence that goes on (the outbox or its mark exists): the file's stream; when the file is missing or garbled
  (a data directory written before the file existed), the id derived from the device secret
  (``receipts.stream_id``), which is what that data directory's results carried, written to the file.

Restoring a data directory from a backup rewinds ``seq`` without changing the stream: do not; start the device
with an empty data directory instead (a new stream), and let the backup's outbox be sent with ``edgemed flush``
from a machine of its own. (A device ignores receipts that settle a ``seq`` it has not committed yet, which
covers the time until the restored counter catches up, not after.)
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

from edgemed.datadir import open_private
from edgemed.errors import OutboxError
from edgemed.identity import load_or_create_secret
from edgemed.outbox.config import OUTBOX_FILENAME
from edgemed.receipts import stream_id

STREAM_FILENAME = "outbox.stream"
_STREAM = re.compile(r"^[0-9a-f]{16}$")


def _has_content(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except FileNotFoundError:
        return False


def sequence_stream(data_dir: Path) -> str:
    """The stream of the ``seq`` counter in ``data_dir`` (created when needed; see the module docstring).

    Call it with the data directory locked (``edgemed.lock.DataDirLock``) and before the outbox is opened.

    Args:
        data_dir: the device's data directory (it exists).

    Returns:
        16 lower-case hex digits.

    Raises:
        OutboxError: the file cannot be read or written.
    """
    path = data_dir / STREAM_FILENAME
    outbox = data_dir / OUTBOX_FILENAME
    begins = not _has_content(outbox) and not _has_content(outbox.with_suffix(".seq"))
    try:
        if not begins:
            try:
                text = path.read_text(encoding="ascii", errors="replace").strip()
            except FileNotFoundError:
                text = ""
            if _STREAM.match(text):
                return text
        stream = secrets.token_hex(8) if begins else stream_id(load_or_create_secret(data_dir))
        _write(path, stream)
    except OSError as exc:
        raise OutboxError(
            f"cannot write {path}: {exc.strerror}; free disk space or fix the permissions of the data directory"
        ) from exc
    return stream


def _write(path: Path, stream: str) -> None:
    # Whole or not at all: a new file beside it, fsynced, then renamed over the old one.
    tmp = path.with_name(path.name + ".tmp")
    fd = open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        os.write(fd, f"{stream}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
