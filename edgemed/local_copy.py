"""``DATA_DIR/results.jsonl``: a local, append-only copy of every result envelope (``run.results_jsonl``).

It is a convenience for the person at the device and for benchmarks, not the store of record (that is the
outbox, on the same disk): it is buffered, and flushed at the end of a run. The file is created 0600 in the
private data directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO

from edgemed.datadir import open_private
from edgemed.errors import OutboxError

FILENAME = "results.jsonl"


class LocalCopy:
    """Appends encoded envelopes to ``results.jsonl``, one per line."""

    def __init__(self, data_dir: Path) -> None:
        """Open (create, 0600) ``data_dir/results.jsonl`` for appending.

        Raises:
            OutboxError: the file cannot be opened (disk full, permissions): exit 7, as for the outbox.
        """
        self.path = Path(data_dir) / FILENAME
        try:
            fd = open_private(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        except OSError as exc:
            raise OutboxError(
                f"cannot open {self.path}: {exc.strerror}; free disk space or fix its permissions"
            ) from exc
        self._fh: IO[str] = os.fdopen(fd, "a", encoding="utf-8")

    def append(self, payload: bytes) -> None:
        """Add one envelope (the bytes that went to the outbox).

        Raises:
            OutboxError: the disk refused the write (full, read-only).
        """
        try:
            self._fh.write(payload.decode("utf-8") + "\n")
        except OSError as exc:
            raise self._error(exc) from exc

    def flush(self) -> None:
        """Write out what is buffered.

        Raises:
            OutboxError: the disk refused the write.
        """
        try:
            self._fh.flush()
        except OSError as exc:
            raise self._error(exc) from exc

    def close(self) -> None:
        """Flush and close (a failure to flush raises ``OSError``, which the runtime reports on one line)."""
        self._fh.close()

    def _error(self, exc: OSError) -> OutboxError:
        return OutboxError(
            f"cannot write {self.path}: {exc.strerror}; free disk space in the data directory (the results "
            "themselves are in the outbox)"
        )
