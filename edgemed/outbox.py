"""The durable outbox: every result is committed to disk before it is published and leaves only on a PUBACK.

A single SQLite file in WAL mode (``DATA_DIR/outbox.sqlite3``) holds three tables (and the ledger of processed
inputs, ``edgemed.ledger``):

* ``outbox``: results not yet acknowledged by the broker, in the order they were produced (``row_id``);
* ``meta``: the per-device sequence counter, written in the same transaction as the results it numbered, so a
  crash can never hand out a sequence number twice for two different committed results;
* ``acked``: a bounded log of recently acknowledged ``result_id`` values, so that a result missing at the
  consumer can be shown to have been accepted by the broker (a broker-side loss), not lost by the device; with
  ``replay_window_s`` it also keeps the payloads of the last seconds' acknowledgements, which the delivery
  publishes again on every connection (a broker that acknowledged before writing to disk may have lost them).

Batching and durability: ``put()`` inserts into an open transaction; the transaction is committed when
``commit_every`` results have accumulated or the oldest uncommitted one is ``commit_interval_s`` old (a small
committer thread enforces the time bound), or when ``flush()`` is called. Only committed rows are handed to
the publisher (``pending()``), so a result is never published before it is durable. A power cut or crash loses
at most the uncommitted tail (at most ``commit_every`` results, at most ``commit_interval_s`` old); those
results were never published and their sequence numbers are handed out again. ``commit_every=1`` makes every
``put()`` durable on return at the price of one fsync per result. ``synchronous="FULL"`` fsyncs the WAL on
every commit (survives power loss); ``"NORMAL"`` survives a process crash but may lose the last commits on
power loss.

Caps: ``max_pending`` and ``max_age_s`` bound the queue. When reached, ``on_full="block"`` makes ``is_full()``
true so the runtime stops accepting frames and alerts on its health topic, and ``put()`` raises
``OutboxFullError``; ``on_full="evict_oldest"`` deletes the oldest unacknowledged results, counts them in
``evicted_total`` (published on every heartbeat) and logs a warning: never a silent loss.

Threads
    One connection guarded by one lock. ``put()`` and ``next_seq()`` run on the runtime's thread (the one that
    runs the quality gate, inference and triage; the capture thread only reads frames), ``pending()`` and
    ``ack()``/``ack_many()`` on the delivery thread, and time-bound commits on the committer thread; they may run
    concurrently. ``next_seq()`` has a small lock of its own, so numbering a frame never waits behind the
    delivery thread's SQL.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from pydantic import Field, model_validator

from edgemed import ledger, recovery, walcheck
from edgemed.datadir import private_dir, private_file, tighten
from edgemed.errors import OutboxError
from edgemed.types import InputDone
from edgemed.validation import StrictModel

log = logging.getLogger(__name__)

OUTBOX_FILENAME = "outbox.sqlite3"
_SCHEMA_VERSION = 1
_ACK_CHUNK = 500  # row ids per statement in ack_many (SQLite allows 32,766 host parameters; older builds 999)
# Puts one "not full" answer of is_full() admits with on_full=block: what one frame produces (its result and the
# study decisions it closes) is kept even when the cap is reached while it is being processed.
_ADMITTED_PUTS = 4

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    row_id INTEGER PRIMARY KEY AUTOINCREMENT,
    result_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS acked (
    row_id INTEGER PRIMARY KEY,
    result_id TEXT NOT NULL,
    acked_at REAL NOT NULL,
    topic TEXT,
    payload BLOB
);
"""


class OutboxFullError(OutboxError):
    """The outbox reached its cap and the profile says to block rather than evict."""


class OutboxConfig(StrictModel):
    """How the outbox trades throughput against the size of the window a power cut can lose."""

    commit_every: int = Field(
        100,
        ge=1,
        description="results per durable commit; 1 = every put() is durable on return, at the price of two fsyncs "
        "per result with synchronous FULL (SQLite's log and the seq mark, DATA_DIR/outbox.seq)",
    )
    commit_interval_s: float = Field(
        0.05, gt=0, description="longest time a result may sit uncommitted (and unpublished)"
    )
    max_pending: int = Field(1_000_000, ge=1, description="cap on unacknowledged results kept on disk")
    max_age_s: float | None = Field(
        None, gt=0, description="cap on the age of the oldest unacknowledged result; None = no age cap"
    )
    on_full: Literal["block", "evict_oldest"] = Field(
        "block",
        description="at the cap: 'block' stops accepting results (the runtime alerts), "
        "'evict_oldest' deletes the oldest unacknowledged results and counts them",
    )
    synchronous: Literal["FULL", "NORMAL"] = Field(
        "FULL", description="SQLite commit level: FULL survives power loss, NORMAL only a process crash"
    )
    keep_acked: int = Field(
        100_000, ge=0, description="how many acknowledged result ids to keep as evidence of broker PUBACKs"
    )
    replay_window_s: float = Field(
        0.0,
        ge=0,
        description="on every broker connection, publish again the results acknowledged within N seconds before "
        "the latest acknowledgement (a broker that acknowledges before it writes to disk, as mosquitto does, "
        "loses those if it crashes); set it a little above the broker's autosave interval; 0 = off",
    )

    @model_validator(mode="after")
    def _replay_needs_the_log(self) -> OutboxConfig:
        if self.replay_window_s > 0 and self.keep_acked == 0:
            raise ValueError(
                "replay_window_s needs the acknowledgement log: set keep_acked above the results of one window "
                "(e.g. the default 100000)"
            )
        return self


@dataclass(frozen=True)
class OutboxItem:
    """One committed, unacknowledged result."""

    row_id: int
    result_id: str
    topic: str
    payload: bytes
    created_at: float


class Outbox:
    """A durable, ordered store-and-forward queue of results (see the module docstring for the guarantees)."""

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
        """The counters and the replay state, read from the opened database."""
        self._seq = self._seq_durable = self._read_seq()
        self._seq_explicit = False
        self._pending = int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        row = self._db.execute("SELECT MAX(row_id) FROM outbox").fetchone()[0]
        self._committed_max_row = self._last_row = int(row or 0)
        # Replay: the payloads of recent acknowledgements are kept so that the delivery can publish them again
        # after a (re)connection. What is kept is decided on the monotonic clock, relative to the latest
        # acknowledgement rather than to "now": when a broker dies silently, or during an outage, no
        # acknowledgement arrives and nothing expires. ``_kept`` maps row id -> when it was acknowledged (or last
        # re-sent); ``_kept_order`` schedules the expiry checks so a commit touches only what expires, by primary key.
        self._kept: dict[int, float] = {}
        self._kept_order: deque[tuple[float, list[int]]] = deque()
        self._last_ack_mono = time.monotonic()
        self._load_kept_payloads()

    # -- opening ---------------------------------------------------------------------------------------------

    def _connect(self, path: Path | None = None) -> sqlite3.Connection:
        path = path or self.path
        try:
            # Created 0600 before SQLite opens it: SQLite gives its -wal and -shm files the same mode.
            private_file(path)
            for suffix in ("-wal", "-shm"):
                tighten(path.with_name(path.name + suffix))
        except OSError as exc:
            raise OutboxError(
                f"cannot create the outbox {path}: {exc.strerror}; free disk space or fix the permissions "
                "of the data directory"
            ) from exc
        # isolation_level=None: we issue BEGIN/COMMIT ourselves so batching is explicit.
        db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=5.0)
        try:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise OutboxError(
                    f"{path}: SQLite refused WAL mode ({mode}); put the data directory on a local file system"
                )
            db.execute(f"PRAGMA synchronous={self.cfg.synchronous}")
            db.executescript(_SCHEMA + ledger.SCHEMA)
            columns = {str(r[1]) for r in db.execute("PRAGMA table_info(acked)")}
            for column, kind in (("topic", "TEXT"), ("payload", "BLOB")):
                if column not in columns:  # an outbox written before replay existed
                    db.execute(f"ALTER TABLE acked ADD COLUMN {column} {kind}")
            db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('schema', ?)", (_SCHEMA_VERSION,))
            db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('seq', 0)")
        except BaseException:
            db.close()
            raise
        return db

    def _open_checked(self) -> sqlite3.Connection:
        """Open the outbox; a damaged one is recovered first (``edgemed.recovery``), a lost one keeps its seq."""
        finished = recovery.finish_interrupted(self.path)
        if finished is not None:
            self.recovery, self.moved_aside = finished, finished.moved_to
            log.error("%s (a crash had interrupted the recovery; finished at this start)", finished.describe())
        existed = self.path.exists() and self.path.stat().st_size > 0
        wal_damage, reason = self._damage() if existed else (None, None)
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
            self._continue_after_mark(db, existed)
        except sqlite3.Error as exc:
            db.close()
            raise OutboxError(
                f"cannot write the outbox {self.path}: {exc}; free disk space or fix the permissions of the data "
                "directory"
            ) from exc
        return db

    def _continue_after_mark(self, db: sqlite3.Connection, existed: bool) -> None:
        """Never reuse a ``seq``: continue at the mark when the database is behind it. The file may be new (the old
        one deleted or lost) or have lost its last commits without any damage to detect (its ``-wal`` deleted, a
        damaged last transaction read as torn); the results of those commits may have been published."""
        mark = self._mark.read()
        if not mark:
            return
        seq = int(db.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()[0])
        if mark <= seq:
            return
        db.execute("UPDATE meta SET value = ? WHERE key = 'seq'", (mark,))
        if existed and self.recovery is None:
            # The mark is written after each commit, so a database behind it lost commits it once held.
            log.warning(
                "the outbox %s is behind its seq mark (%d, the mark says %d): its last commits were lost (its "
                "write-ahead log deleted or damaged?); up to %d results may be missing and seq continues at %d, "
                "so no number is used twice",
                self.path,
                seq,
                mark,
                mark - seq,
                mark,
            )

    def _damage(self) -> tuple[walcheck.WalDamage | None, str | None]:
        """What is wrong with the existing file, checked before SQLite opens it for writing (which could fold a
        damaged log into the database and delete it): the write-ahead log, then ``PRAGMA quick_check`` on a
        read-only connection.

        Raises:
            OutboxError: the file cannot be opened for a reason other than damage (permissions, locking).
        """
        damage = walcheck.inspect(self.path.with_name(self.path.name + "-wal"), self.path)
        if damage is not None:
            return damage, damage.describe()
        try:
            db = sqlite3.connect(f"file:{quote(str(self.path))}?mode=ro", uri=True, timeout=5.0)
        except sqlite3.Error as exc:
            raise OutboxError(f"cannot open the outbox {self.path}: {exc}; check its permissions") from exc
        try:
            check = str(db.execute("PRAGMA quick_check").fetchone()[0])
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError) and not _looks_corrupt(exc):
                raise OutboxError(
                    f"cannot open the outbox {self.path}: {exc}; check permissions and free "
                    "disk space in the data directory"
                ) from exc
            check = str(exc)
        finally:
            db.close()
        return None, None if check == "ok" else " ".join(check.split())[:200]

    def _read_seq(self) -> int:
        return int(self._db.execute("SELECT value FROM meta WHERE key='seq'").fetchone()[0])

    # -- writing ---------------------------------------------------------------------------------------------

    def put(
        self,
        result_id: str,
        topic: str,
        payload: bytes,
        seq: int | None = None,
        done: tuple[str, InputDone] | None = None,
        pass_state: tuple[str, str] | None = None,
    ) -> int:
        """Queue one result; it becomes durable (and publishable) at the next batch commit.

        Args:
            result_id: the envelope's unique id, kept through every retry.
            topic: the MQTT topic to publish it on.
            payload: the envelope as JSON bytes (opaque here).
            seq: the sequence number from ``next_seq()`` inside ``payload``. Passing it makes the persisted
                counter advance only with committed results, so a crash never leaves a gap in the published
                sequence (a consumer may read a gap as a lost result).
            done: ``(source, row)``: the ledger row this result brings its input to (see ``edgemed.ledger``);
                it is written in the same transaction as the result.
            pass_state: ``(source, JSON)``: the source's pass state after this result (``edgemed.resume``),
                written in the same transaction.

        Returns:
            The row id, increasing in production order.

        Raises:
            OutboxFullError: the cap is reached and ``on_full`` is ``block``, unless ``is_full()`` said there was
                room since: a producer that asks it before each frame keeps what that frame produces (up to a few
                results past the cap) and pauses before the next frame, instead of losing a result.
            OutboxError: the disk refused the write.
        """
        with self._lock:
            self._check_open()
            if not self._take_admission() and self._at_cap():
                if self.cfg.on_full == "block":
                    age = "no age cap" if self.cfg.max_age_s is None else f"max age {self.cfg.max_age_s:g} s"
                    raise OutboxFullError(
                        f"the outbox {self.path} holds {self._pending} unacknowledged results "
                        f"(cap {self.cfg.max_pending}, {age}); results are kept, "
                        "new ones are refused until the broker is reachable again"
                    )
                self._evict()
            now = time.time()
            try:
                self._begin()
                cur = self._db.execute(
                    "INSERT INTO outbox(result_id, topic, payload, created_at) VALUES (?, ?, ?, ?)",
                    (result_id, topic, payload, now),
                )
            except sqlite3.Error as exc:
                raise self._write_error(exc) from exc
            row_id = int(cur.lastrowid or 0)
            self._last_row = row_id
            if done is not None:
                self._ledger_done[(done[0], done[1].path)] = done[1]
            if pass_state is not None:
                self._ledger_passes[pass_state[0]] = pass_state[1]
            if seq is not None:
                self._seq_explicit = True
                self._seq_durable = max(self._seq_durable, seq + 1)
            self._pending += 1
            if self._uncommitted == 0:
                self._first_uncommitted_at = time.monotonic()
                self._wake.notify()
            self._uncommitted += 1
            if self._uncommitted >= self.cfg.commit_every:
                self._commit()
            return row_id

    def next_seq(self) -> int:
        """Hand out the next per-device sequence number.

        The counter is persisted with the next commit: up to the highest ``seq`` passed to ``put()`` once
        callers pass it, otherwise up to the last number handed out.

        Returns:
            0 for the first result ever produced from this data directory, then 1, 2, ...
        """
        self._check_open()
        with self._seq_lock:
            seq = self._seq
            self._seq += 1
            return seq

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

    def ack(self, row_id: int) -> None:
        """Remove one result the broker acknowledged.

        Args:
            row_id: as returned by ``put()`` or carried by an ``OutboxItem``.
        """
        self.ack_many((row_id,))

    def ack_many(self, row_ids: Iterable[int]) -> None:
        """Remove results the broker acknowledged, and log their ids as evidence of delivery.

        The deletions become durable with the next commit; a crash before it re-sends them (a duplicate the
        consumer drops by ``result_id``), never loses them.

        Args:
            row_ids: row ids of committed results; unknown ids are ignored.

        Raises:
            OutboxError: the disk refused the write.
        """
        ids = [int(r) for r in row_ids]
        if not ids:
            return
        with self._lock:
            self._check_open()
            now = time.time()
            try:
                self._begin()
                removed = 0
                # Set-based, in chunks under SQLite's host-parameter limit: two statements per chunk instead of
                # two per result (acknowledgements arrive in batches of up to the delivery's in-flight window).
                for start in range(0, len(ids), _ACK_CHUNK):
                    chunk = ids[start : start + _ACK_CHUNK]
                    marks = ",".join("?" * len(chunk))
                    if self.cfg.keep_acked:  # also true whenever replay is on (the config checks it)
                        kept = ", topic, payload" if self.cfg.replay_window_s > 0 else ""
                        self._db.execute(
                            f"INSERT OR IGNORE INTO acked(row_id, result_id, acked_at{kept}) "
                            f"SELECT row_id, result_id, ?{kept} FROM outbox WHERE row_id IN ({marks})",
                            (now, *chunk),
                        )
                    before = self._db.total_changes
                    self._db.execute(f"DELETE FROM outbox WHERE row_id IN ({marks})", chunk)
                    removed += self._db.total_changes - before
            except sqlite3.Error as exc:
                raise self._write_error(exc) from exc
            self._pending -= removed
            if self.cfg.replay_window_s > 0:
                self._last_ack_mono = self._keep(ids)
            if self._uncommitted == 0:
                self._first_uncommitted_at = time.monotonic()
                self._wake.notify()
            self._uncommitted += 1

    # -- reading ---------------------------------------------------------------------------------------------

    def pending(self, limit: int, after_row: int = 0) -> list[OutboxItem]:
        """The oldest committed, unacknowledged results, in production order.

        Args:
            limit: at most this many.
            after_row: only rows with a larger row id (a delivery cursor).

        Returns:
            Items ordered by ``row_id``; uncommitted results are not included (they are not durable yet).
        """
        with self._lock:
            self._check_open()
            rows = self._db.execute(
                "SELECT row_id, result_id, topic, payload, created_at FROM outbox "
                "WHERE row_id > ? AND row_id <= ? ORDER BY row_id LIMIT ?",
                (after_row, self._committed_max_row, limit),
            ).fetchall()
        return [_item(r) for r in rows]

    def replay_candidates(self) -> list[OutboxItem]:
        """The acknowledged results whose payloads are still kept, in production order (empty with replay off).

        Those are the results acknowledged within ``replay_window_s`` before the latest acknowledgement, plus
        any re-sent since. The delivery publishes them again on every connection: a broker that acknowledged
        them before writing them to disk has lost them if it crashed. Consumers drop the duplicates by
        ``result_id``.

        Returns:
            Items whose ``created_at`` is the wall-clock time of the (first) acknowledgement.
        """
        if self.cfg.replay_window_s <= 0:
            return []
        with self._lock:
            self._check_open()
            rows = self._db.execute(
                "SELECT row_id, result_id, topic, payload, acked_at FROM acked WHERE payload IS NOT NULL "
                "ORDER BY row_id"
            ).fetchall()
        return [_item(r) for r in rows]

    def renew_replayed(self, row_ids: Iterable[int]) -> None:
        """Keep re-sent results for another window: the broker may crash again before it writes them.

        Args:
            row_ids: as carried by the items from ``replay_candidates()``.
        """
        ids = [int(r) for r in row_ids]
        if not ids or self.cfg.replay_window_s <= 0:
            return
        with self._lock:
            self._keep(ids)

    def pending_count(self) -> int:
        """Results not yet acknowledged by the broker (committed or not)."""
        with self._lock:
            return self._pending

    def oldest_pending_s(self) -> float | None:
        """Age in seconds of the oldest unacknowledged result, or None when there is none."""
        with self._lock:
            self._check_open()
            row = self._db.execute("SELECT created_at FROM outbox ORDER BY row_id LIMIT 1").fetchone()
        return None if row is None else max(0.0, time.time() - float(row[0]))

    def is_full(self) -> bool:
        """True when the size or age cap is reached and the policy is to block new results.

        The producer's admission check: with ``on_full=block``, a False answer admits the calling thread's next
        few puts (the results of one frame), and ``put()`` keeps them even when the cap is reached meanwhile (the
        age cap can be crossed while a frame is being classified); a True answer withdraws it. Ask it before each
        frame and pause while it is True.
        """
        with self._lock:
            full = self.cfg.on_full == "block" and self._at_cap()
            if self.cfg.on_full == "block":
                # Per thread: the health thread asks too, and its answer must not withdraw the producer's admission
                # while the frame admitted is being classified.
                self._admitted[threading.get_ident()] = 0 if full else _ADMITTED_PUTS
            return full

    def acked_ids(self) -> set[str]:
        """The ``result_id`` of every acknowledgement still in the bounded evidence log (committed or not)."""
        with self._lock:
            self._check_open()
            return {str(r[0]) for r in self._db.execute("SELECT result_id FROM acked")}

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

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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

    def _commit(self) -> None:
        if not self._in_txn:
            return
        try:
            persisted = self._seq_durable if self._seq_explicit else self._seq
            self._db.execute("UPDATE meta SET value = ? WHERE key = 'seq'", (persisted,))
            if self.cfg.keep_acked and self._last_row > self.cfg.keep_acked:
                # Keep the acknowledgements of the last keep_acked results produced. Row ids grow by one per
                # result, so this is a range delete on the primary key: its cost is what it deletes, not the size
                # of the log (an OFFSET over the log scanned all 100,000 kept rows on every commit).
                # Rows still holding a replay payload stay: an outage can produce more than keep_acked results
                # while the ones acknowledged just before it still wait to be re-sent.
                self._db.execute(
                    "DELETE FROM acked WHERE row_id <= ? AND payload IS NULL",
                    (self._last_row - self.cfg.keep_acked,),
                )
            self._expire_payloads()
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

    def _keep(self, ids: list[int]) -> float:
        # Keep these rows' payloads for a window counted from now (monotonic); returns that time.
        mono = time.monotonic()
        self._kept.update(dict.fromkeys(ids, mono))
        self._kept_order.append((mono, ids))
        return mono

    def _expire_payloads(self) -> None:
        # Inside the commit's transaction. A payload goes once it was acknowledged (or re-sent) more than
        # replay_window_s before the latest acknowledgement: the broker has saved it by then, or has been
        # acknowledging newer results long enough to show it did not crash.
        if self.cfg.replay_window_s <= 0:
            return
        cutoff = self._last_ack_mono - self.cfg.replay_window_s
        while self._kept_order and self._kept_order[0][0] < cutoff:
            _, ids = self._kept_order.popleft()
            # A row re-sent since this entry was scheduled carries a newer time: it stays.
            expired = [i for i in ids if self._kept.get(i, cutoff) < cutoff]
            for i in expired:
                self._kept.pop(i, None)
            for start in range(0, len(expired), _ACK_CHUNK):
                chunk = expired[start : start + _ACK_CHUNK]
                marks = ",".join("?" * len(chunk))
                self._db.execute(f"UPDATE acked SET topic = NULL, payload = NULL WHERE row_id IN ({marks})", chunk)

    def _load_kept_payloads(self) -> None:
        # Payloads kept by an earlier run (a power cut may have taken the broker down too): with replay on they
        # are re-sent on this run's first connection, then expire as usual; with replay off they are dropped once.
        try:
            flag = self._db.execute("SELECT value FROM meta WHERE key = 'replay_payloads'").fetchone()
            if self.cfg.replay_window_s <= 0:
                if flag is not None and flag[0]:
                    self._db.execute("UPDATE acked SET topic = NULL, payload = NULL WHERE payload IS NOT NULL")
                    self._db.execute("UPDATE meta SET value = 0 WHERE key = 'replay_payloads'")
                return
            self._db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('replay_payloads', 1)")
            ids = [int(r[0]) for r in self._db.execute("SELECT row_id FROM acked WHERE payload IS NOT NULL")]
        except sqlite3.Error as exc:
            raise OutboxError(f"cannot read the acknowledgement log of {self.path}: {exc}") from exc
        if ids:
            self._keep(ids)

    def _take_admission(self) -> bool:
        """Whether this put was admitted by the calling thread's last ``is_full()``; uses one admitted put."""
        left = self._admitted.get(threading.get_ident(), 0) if self._admitted else 0
        if left:
            self._admitted[threading.get_ident()] = left - 1
        return left > 0

    def _at_cap(self) -> bool:
        if self._pending >= self.cfg.max_pending:
            return True
        if self.cfg.max_age_s is None or self._pending == 0:
            return False
        row = self._db.execute("SELECT created_at FROM outbox ORDER BY row_id LIMIT 1").fetchone()
        return row is not None and time.time() - float(row[0]) > self.cfg.max_age_s

    def _evict(self) -> None:
        try:
            self._begin()
            over = max(0, self._pending - self.cfg.max_pending + 1)
            before = self._db.total_changes
            if over:
                self._db.execute(
                    "DELETE FROM outbox WHERE row_id IN (SELECT row_id FROM outbox ORDER BY row_id LIMIT ?)",
                    (over,),
                )
            if self.cfg.max_age_s is not None:
                self._db.execute("DELETE FROM outbox WHERE created_at < ?", (time.time() - self.cfg.max_age_s,))
            evicted = self._db.total_changes - before
        except sqlite3.Error as exc:
            raise self._write_error(exc) from exc
        self._pending -= evicted
        self.evicted_total += evicted
        log.warning(
            "outbox %s at its cap: evicted the %d oldest unacknowledged results (on_full=evict_oldest; "
            "%d evicted since start)",
            self.path,
            evicted,
            self.evicted_total,
        )

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


def _item(row: tuple[Any, ...]) -> OutboxItem:
    # (row_id, result_id, topic, payload, time) as both queries select them.
    return OutboxItem(int(row[0]), str(row[1]), str(row[2]), bytes(row[3]), float(row[4]))


def _looks_corrupt(exc: sqlite3.Error) -> bool:
    text = str(exc).lower()
    return any(word in text for word in ("malformed", "not a database", "corrupt", "quick_check"))
