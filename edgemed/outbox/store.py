"""The outbox's file and its transactions: open (recovering a damaged file), batch commits, the seq mark, close.

``OutboxStore`` is the base of ``Outbox``: it owns the connection, the lock that guards it and the open
transaction that ``put()`` and the acknowledgements write into; the queue (``edgemed.outbox.queue``), the replay
log (``edgemed.outbox.replay``) and the receipt state (``edgemed.outbox.awaiting``) build on it. The ledger of
processed inputs (``edgemed.ledger``) is written with the results it accounts for, so it lives here too.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from edgemed import ledger, recovery
from edgemed.datadir import private_dir
from edgemed.errors import OutboxError
from edgemed.outbox import storage
from edgemed.outbox.config import OutboxConfig
from edgemed.types import InputDone

log = logging.getLogger("edgemed.outbox")


class OutboxStore:
    """The file, the lock and the transaction under every outbox operation (see ``edgemed.outbox``)."""

    def __init__(self, path: Path, cfg: OutboxConfig | None = None) -> None:
        """Open (or create) the outbox at ``path``; a damaged file is recovered into a new one (``edgemed.recovery``).

        Args:
            path: the SQLite file, normally ``DATA_DIR/outbox.sqlite3``. Its folder is created if missing.
            cfg: batching, caps and commit level; defaults to ``OutboxConfig()``.

        Raises:
            OutboxError: the file or its folder cannot be created or written (permissions, disk full).
        """
        self.path = Path(path)
        self.cfg = cfg or OutboxConfig()
        self.moved_aside: Path | None = None
        #: set when the file was found damaged at open: what was recovered from it, and what was not
        self.recovery: recovery.OutboxRecovery | None = None
        self.evicted_total = 0
        self._lock = threading.RLock()
        # next_seq() runs once per frame on the producing thread: its own small lock keeps it from queueing
        # behind the delivery thread's SQL, which holds the main lock.
        self._seq_lock = threading.Lock()
        self._commit_listeners: list[Callable[[], None]] = []
        self._in_txn = False
        self._uncommitted = 0
        self._first_uncommitted_at = 0.0
        self._committed_max_row = 0
        self._last_row = 0
        self._closed = False
        self._failed: OutboxError | None = None
        self._admitted: dict[int, int] = {}  # thread id -> puts its last is_full() admitted (on_full=block)
        # The ledger rows of the results in the open transaction, written with them at the commit (one row per
        # input file per commit, not one statement per frame), and the sources whose pass ended in it.
        self._ledger_done: dict[tuple[str, str], InputDone] = {}
        self._ledger_ended: set[str] = set()
        self._ledger_passes: dict[str, str | None] = {}  # each source's pass state (edgemed.resume), the latest
        try:
            private_dir(self.path.parent)
        except OSError as exc:
            raise OutboxError(
                f"cannot create the data directory {self.path.parent}: {exc.strerror}; pick a writable --data-dir"
            ) from exc
        try:
            self._mark = recovery.SeqMark(self.path.with_suffix(".seq"), sync=self.cfg.synchronous == "FULL")
        except OSError as exc:
            raise OutboxError(
                f"cannot create {self.path.with_suffix('.seq')}: {exc.strerror}; free disk space or fix the "
                "permissions of the data directory"
            ) from exc
        try:
            self._db = self._open_checked()
            try:
                self._load_state()
            except BaseException:
                self._db.close()
                raise
        except BaseException:
            self._mark.close()  # a failed open or recovery keeps nothing open
            raise
        self._wake = threading.Condition(self._lock)
        self._committer = threading.Thread(target=self._commit_loop, name="edgemed-outbox-commit", daemon=True)
        self._committer.start()

    def _load_state(self) -> None:
        """The counters, read from the opened database (the parts built on this one add theirs)."""
        self._seq = self._seq_durable = self._seq_committed = self._read_seq()
        self._seq_explicit = False
        self._pending = int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        row = self._db.execute("SELECT MAX(row_id) FROM outbox").fetchone()[0]
        self._committed_max_row = self._last_row = int(row or 0)

    # -- opening ---------------------------------------------------------------------------------------------

    def _connect(self, path: Path | None = None) -> sqlite3.Connection:
        return storage.connect(path or self.path, self.cfg.synchronous)

    def _open_checked(self) -> sqlite3.Connection:
        """Open the outbox; a damaged one is recovered first (``edgemed.recovery``), a lost one keeps its seq."""
        finished = recovery.finish_interrupted(self.path)
        if finished is not None:
            self.recovery, self.moved_aside = finished, finished.moved_to
            log.error("%s (a crash had interrupted the recovery; finished at this start)", finished.describe())
        existed = self.path.exists() and self.path.stat().st_size > 0
        wal_damage, reason = storage.damage(self.path) if existed else (None, None)
        if reason is not None:
            self.recovery = recovery.recover(
                self.path, reason, wal_damage, connect=self._connect, mark=self._mark.read()
            )
            self.moved_aside = self.recovery.moved_to
            log.error("%s", self.recovery.describe())
        try:
            db = self._connect()
        except sqlite3.Error as exc:
            raise OutboxError(
                f"cannot open the outbox {self.path}: {exc}; check permissions and free disk space in the data "
                "directory"
            ) from exc
        try:
            storage.continue_after_mark(db, self.path, self._mark.read(), warn=existed and self.recovery is None)
        except sqlite3.Error as exc:
            db.close()
            raise OutboxError(
                f"cannot write the outbox {self.path}: {exc}; free disk space or fix the permissions of the data "
                "directory"
            ) from exc
        return db

    def _read_seq(self) -> int:
        return int(self._db.execute("SELECT value FROM meta WHERE key='seq'").fetchone()[0])

    # -- commits ---------------------------------------------------------------------------------------------

    def add_commit_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` after every commit that made new results publishable.

        It runs on whichever thread committed, with the outbox lock held: it must be quick and must not call
        back into the outbox (setting an event is the intended use). The delivery uses it so that it wakes when
        there is something to send, not on every ``put()`` (uncommitted results are not publishable).
        """
        with self._lock:
            self._commit_listeners.append(listener)

    def flush(self) -> None:
        """Commit everything put so far, durably, now.

        Raises:
            OutboxError: the disk refused the commit.
        """
        with self._lock:
            self._check_open()
            self._commit()

    # -- the ledger of processed inputs (edgemed/ledger.py) ------------------------------------------------------

    def source_ledger(self, source: str) -> tuple[ledger.SourceState, dict[str, InputDone]]:
        """What the ledger knows of ``source``: whether its last pass was interrupted, and its files' rows."""
        with self._lock:
            self._check_open()
            return ledger.state(self._db, source), ledger.inputs(self._db, source)

    def source_pass_state(self, source: str) -> str | None:
        """The pass state (JSON, ``edgemed.resume``) the last committed result of ``source`` left, or None."""
        with self._lock:
            self._check_open()
            return ledger.pass_state(self._db, source)

    def start_source(self, source: str, *, keep: bool, add: Iterable[InputDone] = (), drop: Iterable[str] = ()) -> None:
        """Begin a pass over ``source``, durably: forget its rows unless ``keep``, add and drop the given rows.

        Raises:
            OutboxError: the disk refused the write.
        """
        with self._lock:
            self._check_open()
            try:
                self._begin()
                ledger.start(self._db, source, keep=keep)
                if not keep:
                    ledger.write_pass_states(self._db, {source: None})
                ledger.drop(self._db, source, drop)
                ledger.write(self._db, {(source, row.path): row for row in add}, ())
            except sqlite3.Error as exc:
                raise self._write_error(exc) from exc
            self._commit()

    def end_source(self, source: str) -> None:
        """Mark the pass over ``source`` complete, with the next commit (after its last results)."""
        with self._lock:
            self._check_open()
            try:
                self._begin()
            except sqlite3.Error as exc:
                raise self._write_error(exc) from exc
            self._ledger_ended.add(source)

    def forget_source(self, source: str) -> None:
        """Drop the ledger's rows for ``source`` durably (a ``--loop`` run is no basis for resuming).

        Raises:
            OutboxError: the disk refused the write.
        """
        with self._lock:
            self._check_open()
            try:
                self._begin()
                ledger.forget(self._db, source)
            except sqlite3.Error as exc:
                raise self._write_error(exc) from exc
            self._commit()

    # -- lifecycle -------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Commit what is pending and close the file. Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            try:
                self._commit()
            finally:
                self._closed = True
                self._wake.notify_all()
                self._db.close()
                self._mark.close()
        self._committer.join(timeout=5.0)

    # -- internals (call with the lock held) -----------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise OutboxError(f"the outbox {self.path} is closed")
        if self._failed is not None:
            # Sticky: a failed commit discarded uncommitted results; the producer must not carry on.
            raise OutboxError(str(self._failed)) from self._failed

    def _begin(self) -> None:
        if not self._in_txn:
            self._db.execute("BEGIN IMMEDIATE")
            self._in_txn = True

    def _touch(self) -> None:
        """Count a write in the open transaction (not a new result): the committer makes it durable in time."""
        if self._uncommitted == 0:
            self._first_uncommitted_at = time.monotonic()
            self._wake.notify()
        self._uncommitted += 1

    def _before_commit(self) -> None:
        """Work done inside each commit's transaction (the replay log trims itself here)."""

    def _commit(self) -> None:
        if not self._in_txn:
            return
        try:
            persisted = self._seq_durable if self._seq_explicit else self._seq
            self._db.execute("UPDATE meta SET value = ? WHERE key = 'seq'", (persisted,))
            self._before_commit()
            ledger.write(self._db, self._ledger_done, self._ledger_ended)
            ledger.write_pass_states(self._db, self._ledger_passes)
            self._db.execute("COMMIT")
        except (sqlite3.Error, OSError) as exc:
            raise self._write_error(exc) from exc
        self._in_txn = False
        self._ledger_done.clear()
        self._ledger_ended.clear()
        self._ledger_passes.clear()
        self._uncommitted = 0
        self._seq_committed = persisted
        try:
            # Outside the database (edgemed/recovery.py), after the commit and before any of it can be published
            # (the delivery reads only up to _committed_max_row, moved below): the mark is never behind a published
            # seq. Written before the commit, a crash between the two left the mark ahead of what was committed,
            # and the next start skipped a batch of numbers that nobody had ever seen: a gap read as lost results.
            self._mark.write(persisted)
        except OSError as exc:
            raise self._write_error(exc) from exc
        published = self._last_row > self._committed_max_row
        self._committed_max_row = self._last_row
        if published:
            for listener in self._commit_listeners:
                listener()

    def _write_error(self, exc: sqlite3.Error | OSError) -> OutboxError:
        if self._in_txn:
            # A failed statement may leave the transaction open or rolled back; start clean either way.
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error as rollback_exc:
                log.debug("rollback after a failed write: %s", rollback_exc)
            self._in_txn = False
            self._uncommitted = 0
            self._ledger_done.clear()  # rolled back with the results they account for
            self._ledger_ended.clear()
            self._ledger_passes.clear()
        why = exc.strerror if isinstance(exc, OSError) else exc
        self._failed = OutboxError(
            f"cannot write the outbox {self.path}: {why}; free disk space or fix the permissions of the data "
            "directory (results produced since the last commit were not kept)"
        )
        return self._failed

    def _commit_loop(self) -> None:
        with self._lock:
            while not self._closed:
                if self._uncommitted == 0:
                    self._wake.wait()
                    continue
                due = self._first_uncommitted_at + self.cfg.commit_interval_s - time.monotonic()
                if due > 0:
                    self._wake.wait(due)
                    continue
                try:
                    self._commit()
                except OutboxError as exc:
                    # Recorded in self._failed: the next put() or flush() on the producing thread raises it.
                    log.error("%s", exc)
                    return
