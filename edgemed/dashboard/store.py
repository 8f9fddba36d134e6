"""The dashboard's store (SQLite or PostgreSQL): results, study decisions, the latest state per device.

Delivery from the devices is at least once, so the same result can arrive twice (a device that restarts replays
its outbox; a broker redelivers an unacknowledged QoS 1 message). ``result_id`` is the primary key and rows go in
with ``INSERT ... ON CONFLICT (result_id) DO NOTHING``: a duplicate is dropped by the database itself, in one
statement, so two ingest processes racing on the same id still keep exactly one row.

Times: ``received_at`` is the dashboard's own clock (seconds since the epoch). Devices may run without a
synchronised clock, so "last seen" and ordering use the dashboard's clock; ``created_at`` is kept as the device
reported it and shown beside ``clock_synced``.

Retained messages. The broker sends a topic's retained message again to every new subscription: at each start of
a dashboard with a new database, under a new client id, on MQTT 3.1.1 at every reconnection. Such a delivery
(``Filing.retained``) is old news, so it never moves a device's ``last_seen`` (or ``status_at``) forward: a device
decommissioned a month ago must not look "seen just now" after each restart, and its old offline status must not
outrank its last heartbeat. A retained status identical to the stored one changes nothing; a different one (it
changed while nobody listened) is stored with the time the device stamped on it (``at``, never later than now).
A device first heard of through a retained message is dated the same way. A retained payload that is refused is
kept as a dead letter once, not once per reconnection (matched by topic and payload hash).

Settled seqs. Each stored result and study decision, each dead letter with a readable ``seq`` and each lost
announcement also writes ``settled`` rows in the same transaction (``settlement.py``): the receipts are computed
from them.

A batch is filed in one transaction: its results and study decisions set-based (``bulk.py``), everything else
message by message, each in a savepoint of its own, so that a message the database refuses becomes a dead letter
in the same transaction (PostgreSQL aborts the whole transaction on an error unless a savepoint was taken).

Connections. On SQLite one connection is shared by the ingest thread and the web threads behind a lock: SQLite
serialises writers anyway; WAL lets an external reader (a backup, ``sqlite3`` on the command line) read while the
dashboard writes. The file is private (0600, see ``schema.py``): it holds every result and the raw bytes of
refused payloads. On PostgreSQL each write and each read takes a connection from the engine's pool (``db.py``);
writes of one process still go one at a time, behind the lock. Errors reach callers as the driver's own
(``sqlite3.Error``, ``psycopg.Error``), without SQLAlchemy's rendering of the statement.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, SQLAlchemyError

from edgemed.dashboard import history
from edgemed.dashboard.batch import summarize_batch
from edgemed.dashboard.bulk import Conflict, Refused, file_set, touch_devices
from edgemed.dashboard.db import Database, describe_error, open_database
from edgemed.dashboard.queries import StoreQueries
from edgemed.dashboard.rollup import count_results
from edgemed.dashboard.rows import dumps, published_at, result_row, row_key, study_row
from edgemed.dashboard.schema import migrate, open_private
from edgemed.dashboard.settlement import dialect_insert, greatest, settle, settle_lost
from edgemed.dashboard.tables import dead_letter_counts, dead_letters, devices, results, stream_seen, studies
from edgemed.dashboard.validate import LEVELS, Filing
from edgemed.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["LEVELS", "DashboardStore", "IdConflict"]

#: Dead letters kept (the newest); their counts by reason are kept for ever in ``dead_letter_counts``.
DEAD_LETTERS_KEPT = 10_000
#: Bytes of one dead letter's payload kept (the whole payload up to the ingest's size limit).
DEAD_LETTER_BYTES_KEPT = 256 * 1024
# Errors a write raises because of one message's content (the database itself works): that message becomes a
# dead letter. Anything else (disk full, locked, I/O error, a lost server) is the database's fault: the batch is
# retried.
_MESSAGE_ERRORS = (IntegrityError, DataError, ValueError, TypeError, OverflowError)
#: PostgreSQL's SQLSTATEs for a transaction it rolled back to break a deadlock or a serialization conflict.
_ROLLED_BACK = ("40P01", "40001")
_DEADLOCK_ATTEMPTS = 3


class IdConflict(ValueError):
    """A message the store cannot keep because of what it holds already; ``reason`` is its dead letter's reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class DashboardStore(StoreQueries):
    """The store of everything the fleet publishes (SQLite or PostgreSQL), shared by the ingest and the web server."""

    def __init__(
        self,
        db: str | Path,
        *,
        busy_timeout_s: float = 5.0,
        health_retention_days: float = history.DEFAULT_RETENTION_DAYS,
    ) -> None:
        """Open the database (an SQLite file is created if needed) and upgrade it to the newest schema.

        Args:
            db: an SQLite file path, ``sqlite:///path`` or ``postgresql://user@host:port/dbname`` (``--db``).
            busy_timeout_s: SQLite: how long a write waits for another process's lock (a backup, ``sqlite3``)
                before it fails; the ingest then retries it (see ``writer.py``).
            health_retention_days: raw heartbeats older than this are deleted (hourly rows stay a year).

        Raises:
            ConfigError: the file cannot be created or is not a database; the server cannot be reached, refuses
                the login, or has no such database (one line naming the fix, the password masked).
        """
        self.database: Database = open_database(db, busy_timeout_s=busy_timeout_s)
        #: The SQLite file; on PostgreSQL the ``Database`` itself (what ``ReceiptSender`` takes either way).
        self.path: Path | Database = self.database.path or self.database
        self.health_retention_s = health_retention_days * 86400.0
        self._lock = threading.Lock()
        self._dead_since_prune = 0
        self._next_maintenance = 0.0
        self._started: dict[str, float] = {}
        self._conn: Connection | None = None
        self._db: sqlite3.Connection | None = None
        try:
            if self.database.path is not None:
                open_private(self.database.path)
            conn = self.database.connect()
            try:
                migrate(conn)
            except BaseException:
                conn.close()
                raise
        except OSError as exc:
            self.database.dispose()
            where = self.database.display
            raise ConfigError(
                f"cannot open the dashboard database {where}: {exc}; pass --db with a writable file path"
            ) from exc
        except (SQLAlchemyError, sqlite3.Error) as exc:
            self.database.dispose()
            raise ConfigError(describe_error(self.database.display, exc)) from exc
        except ConfigError:
            self.database.dispose()
            raise
        if self.database.dialect == "sqlite":
            self._conn = conn  # the store's one connection (see the module docstring)
            self._db = conn.connection.driver_connection
        else:
            conn.close()

    def close(self) -> None:
        """Close the database connections."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
            self.database.dispose()

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        """One write transaction, behind the lock; the driver's own error when it fails (nothing is kept)."""
        with self._lock:
            try:
                if self._conn is not None:
                    # IMMEDIATE: the write lock from the start (waiting up to the busy timeout for it). A plain
                    # BEGIN reads a snapshot first, and when another process (ingest, serve, the receipt thread)
                    # commits before this transaction's first write, SQLite refuses that write at once.
                    self._conn.execution_options(edgemed_begin="BEGIN IMMEDIATE")
                    try:
                        with self._conn.begin():
                            yield self._conn
                    finally:
                        self._conn.execution_options(edgemed_begin="BEGIN")  # the reads (see _Reading)
                        self._end_failed_commit()
                else:
                    with self.database.engine.begin() as conn:
                        yield conn
            except DBAPIError as exc:
                raise (exc.orig or exc) from None  # the driver's message, without the statement's text

    def _end_failed_commit(self) -> None:
        # A COMMIT that failed (busy, I/O error, disk full) may leave SQLite's transaction open while SQLAlchemy
        # counts it as ended: the next BEGIN would then fail for good ("cannot start a transaction within a
        # transaction") and the next commit would carry the failed batch's rows, which the writer files again.
        # (A pooled PostgreSQL connection is rolled back when it returns to the pool.)
        if self._db is not None and self._db.in_transaction:
            try:
                self._db.rollback()
            except sqlite3.Error as exc:
                log.warning("could not roll back a failed commit of the dashboard database (%s)", exc)

    # -- writes (ingest) ---------------------------------------------------------------------------------------

    def _touch(self, conn: Connection, site: str, device_id: str, seen_at: float, *, retained: bool = False) -> None:
        if retained:
            # Old news (see the module docstring): a device never heard of is added, dated ``seen_at``; a known
            # one keeps its last_seen.
            conn.execute(
                dialect_insert(conn, devices).on_conflict_do_nothing(),
                {"site": site, "device_id": device_id, "last_seen": seen_at},
            )
            return
        touch_devices(conn, {(site, device_id): seen_at})

    def _touch_for(self, conn: Connection, body: dict[str, Any], now: float, retained: bool) -> None:
        seen = published_at(body, "created_at", now) if retained else None
        self._touch(conn, body["site"], body["device_id"], now if seen is None else seen, retained=retained)

    def _insert_kind(
        self, conn: Connection, kind: str, body: dict[str, Any], now: float, retained: bool, raw: bytes | None
    ) -> bool:
        table, row = (
            (results, result_row(body, now, raw)) if kind == "results" else (studies, study_row(body, now, raw))
        )
        # RETURNING says whether the row went in (psycopg reports no rowcount for it through SQLAlchemy).
        stmt = dialect_insert(conn, table).on_conflict_do_nothing(index_elements=[table.c.result_id])
        inserted = conn.execute(stmt.returning(table.c.result_id), row).first() is not None
        if not inserted:
            # Dropped as a duplicate of the row already kept under this result_id: that row's seq is what is
            # stored. A copy naming another device, stream or seq (a device bug, or a forged id) stores nothing,
            # so its seq must not be receipted as stored: it is refused (a dead letter with its seq) instead.
            cols = (table.c.site, table.c.device_id, table.c.stream, table.c.seq)
            kept = conn.execute(sa.select(*cols).where(table.c.result_id == row["result_id"])).first()
            if kept is None or tuple(kept) != row_key(row):
                raise IdConflict(Conflict().reason)
        if inserted and table is results:
            count_results(conn, [row])
        key = row_key(row)
        settle(conn, key[:3], key[3], "stored")
        self._touch_for(conn, body, now, retained)
        return inserted

    def _replace_device_state(
        self,
        conn: Connection,
        column: str,
        site: str,
        device_id: str,
        body: dict[str, Any],
        now: float,
        retained: bool = False,
    ) -> str:
        text = dumps(body)
        mine = (devices.c.site == site) & (devices.c.device_id == device_id)
        if not retained:
            self._touch(conn, site, device_id, now)
            conn.execute(sa.update(devices).where(mine).values({column: text, f"{column}_at": now}))
            if column == "health":
                history.add_heartbeat(conn, site, device_id, body, now)
            return "updated"
        stored = conn.execute(sa.select(devices.c[column]).where(mine)).first()
        if stored is not None and stored[0] == text:
            return "unchanged"  # the broker's copy of what we hold: nothing new, nothing moves
        stamped = published_at(body, "at", now)
        self._touch(conn, site, device_id, now if stamped is None else stamped, retained=True)
        # Without a stamp, the time it replaces keeps its place (or, first heard of, when the device was).
        at = devices.c[f"{column}_at"]
        when = sa.func.coalesce(sa.literal(stamped, sa.Float), at, devices.c.last_seen)
        conn.execute(sa.update(devices).where(mine).values({column: text, f"{column}_at": when}))
        return "updated"

    def _insert_dead_letter(self, conn: Connection, filing: Filing, now: float) -> bool:
        reason = filing.reason or "unusable payload"
        digest = hashlib.sha256(filing.payload).hexdigest()
        key = filing.stream_key
        if key is not None and filing.seq is not None:
            settle(conn, key, filing.seq, "rejected")  # sending it again would not help: receipted
        if filing.retained:
            known = conn.execute(
                sa.select(1)
                .where(dead_letters.c.payload_sha256 == digest, dead_letters.c.topic == filing.topic)
                .limit(1)
            ).first()
            if known is not None:
                return False  # the broker sends a retained message again at each new subscription: kept once
        conn.execute(
            sa.insert(dead_letters),
            {
                "received_at": now,
                "topic": filing.topic,
                "reason": reason,
                "payload": filing.payload[:DEAD_LETTER_BYTES_KEPT],
                "payload_bytes": len(filing.payload),
                "site": filing.site,
                "device_id": filing.device_id,
                "seq": filing.seq,
                "result_id": filing.result_id,
                "payload_sha256": digest,
                "stream": filing.stream if filing.seq is not None else None,
            },
        )
        stmt = dialect_insert(conn, dead_letter_counts)
        conn.execute(
            stmt.on_conflict_do_update(
                index_elements=[dead_letter_counts.c.reason],
                set_={"n": dead_letter_counts.c.n + 1, "last_at": stmt.excluded.last_at},
            ),
            {"reason": reason, "n": 1, "last_at": now},
        )
        self._dead_since_prune += 1
        if self._dead_since_prune >= 100:  # a flood of junk must not fill the disk: keep the newest only
            self._dead_since_prune = 0
            newest = sa.select(sa.func.max(dead_letters.c.id)).scalar_subquery()
            conn.execute(sa.delete(dead_letters).where(dead_letters.c.id <= newest - DEAD_LETTERS_KEPT))
        return True

    def _file_one(self, conn: Connection, filing: Filing, now: float) -> str:
        body, retained, raw = filing.body, filing.retained, filing.payload
        if filing.kind in ("results", "studies") and body is not None:
            return "stored" if self._insert_kind(conn, filing.kind, body, now, retained, raw) else "duplicate"
        if filing.kind == "batch":
            return summarize_batch([self._file_isolated(conn, element, now) for element in filing.elements])
        if filing.kind == "lost" and filing.lost is not None:
            settle_lost(conn, filing.lost, now)
            return "recorded"
        if filing.kind in ("status", "health") and body is not None and filing.site and filing.device_id:
            return self._replace_device_state(conn, filing.kind, filing.site, filing.device_id, body, now, retained)
        if filing.kind == "ignored":
            return "ignored"
        if not self._insert_dead_letter(conn, filing, now):
            return "unchanged"
        return f"rejected: {filing.reason}"

    def _file_isolated(self, conn: Connection, filing: Filing, now: float) -> str:
        # A savepoint per message: one the database refuses is undone alone and filed as a dead letter, in the same
        # transaction as the rest of its batch. Filing it in a commit of its own would leave it behind when a later
        # message of the batch then hits a database error, and the retried batch would keep it a second time. On
        # PostgreSQL the savepoint is also what lets the transaction go on after the error at all.
        savepoint = conn.begin_nested()
        try:
            outcome = self._file_one(conn, filing, now)
        except _MESSAGE_ERRORS as exc:
            savepoint.rollback()
            if isinstance(exc, IdConflict):
                reason = exc.reason  # the ingest logs dead letters by reason (and never their payload)
            else:
                log.warning("could not store a message on %r (%s); keeping it as a dead letter", filing.topic[:200],
                            type(exc).__name__)  # fmt: skip
                reason = f"could not be stored ({type(exc).__name__})"
            # Filed outside any savepoint: if the database refuses the dead letter too, the batch fails (retried).
            return self._file_one(conn, replace(filing, kind="dead", body=None, reason=reason), now)
        except BaseException:
            savepoint.rollback()
            raise
        savepoint.commit()
        return outcome

    def _file_all(self, conn: Connection, filings: Sequence[Filing], now: float) -> list[str]:
        # Results and study decisions set-based (the bulk of a batch); when the database refuses anything in that
        # set, the same messages one by one (each its own savepoint), as everything else.
        bulk = [(i, f) for i, f in enumerate(filings) if f.kind in ("results", "studies") and f.body is not None]
        bulk = [(i, f) for i, f in bulk if not f.retained]
        done: dict[int, str | Conflict] = {}
        if bulk:
            try:
                done = file_set(conn, bulk, now)
            except Refused:
                done = {}
        outcomes = []
        for i, filing in enumerate(filings):
            outcome = done.get(i)
            if isinstance(outcome, Conflict):
                outcome = self._file_isolated(conn, replace(filing, kind="dead", body=None, reason=outcome.reason), now)
            outcomes.append(outcome if outcome is not None else self._file_isolated(conn, filing, now))
        return outcomes

    def file(self, filings: Sequence[Filing], received_at: float | None = None) -> list[str]:
        """Store what the ingest classified, all in ONE transaction (one commit, one fsync for the lot).

        A message the database refuses (a constraint, a value it cannot hold) becomes a dead letter in the same
        transaction; the others go in as they are. Every few minutes the same transaction also downsamples and
        ages out heartbeats (``history.maintain``: bounded work).

        Args:
            filings: from ``validate.classify``; dead letters go to the dead-letter table.
            received_at: dashboard clock; now when None.

        Returns:
            One outcome per filing: ``"stored"``, ``"duplicate"``, ``"updated"``, ``"ignored"``,
            ``"unchanged"`` (a retained message the store already holds), ``"recorded"`` (a lost announcement),
            ``"batch: S stored, D duplicates, R rejected"`` or ``"rejected: <reason>"``.

        Raises:
            sqlite3.Error, psycopg.Error, OSError: the write failed and nothing of the batch was stored.
        """
        now = time.time() if received_at is None else received_at
        attempt = 1
        while True:
            try:
                return self._file_once(filings, now)
            except Exception as exc:
                # PostgreSQL: two workers' transactions waited for each other (their batches touched the same
                # devices in another order) and one was rolled back: nothing of it is kept, so file it again now.
                if attempt >= _DEADLOCK_ATTEMPTS or getattr(exc, "sqlstate", None) not in _ROLLED_BACK:
                    raise
                attempt += 1
                log.info("the dashboard database rolled a batch back (%s); filing it again", type(exc).__name__)

    def _file_once(self, filings: Sequence[Filing], now: float) -> list[str]:
        touched = {key for key in (f.stream_key for f in filings) if key is not None}
        with self._transaction() as conn:
            outcomes = self._file_all(conn, filings, now)
            if touched:
                # One row per touched stream and commit (not per message): which receipts to send again after a
                # reconnection (see receipt_sender.py).
                stmt = dialect_insert(conn, stream_seen)
                conn.execute(
                    stmt.on_conflict_do_update(
                        index_elements=[stream_seen.c.site, stream_seen.c.device_id, stream_seen.c.stream],
                        set_={"seen_at": greatest(stream_seen.c.seen_at, stmt.excluded.seen_at)},
                    ),
                    [{"site": s, "device_id": d, "stream": st, "seen_at": now} for s, d, st in sorted(touched)],
                )
            if time.monotonic() >= self._next_maintenance:
                self._next_maintenance = time.monotonic() + history.MAINTENANCE_INTERVAL_S
                history.maintain(conn, now, self.health_retention_s)
            return outcomes

    def add_result(self, result: dict[str, Any], received_at: float | None = None) -> bool:
        """Store one validated ``edgemed.result/1`` envelope.

        Args:
            result: the envelope (already validated by the ingest).
            received_at: dashboard clock; now when None.

        Returns:
            True when stored, False when a result with this ``result_id`` was already there (a duplicate).

        Raises:
            IdConflict: the ``result_id`` is stored for another device, stream or seq.
            sqlite3.Error, psycopg.Error: the database failed.
        """
        now = time.time() if received_at is None else received_at
        with self._transaction() as conn:
            return self._insert_kind(conn, "results", result, now, False, None)

    def add_study(self, study: dict[str, Any], received_at: float | None = None) -> bool:
        """Store one validated ``edgemed.study/1`` decision.

        Args:
            study: the decision (already validated by the ingest).
            received_at: dashboard clock; now when None.

        Returns:
            True when stored, False for a duplicate ``result_id``.

        Raises:
            IdConflict: the ``result_id`` is stored for another device, stream or seq.
            sqlite3.Error, psycopg.Error: the database failed.
        """
        now = time.time() if received_at is None else received_at
        with self._transaction() as conn:
            return self._insert_kind(conn, "studies", study, now, False, None)

    def set_status(self, site: str, device_id: str, status: dict[str, Any], received_at: float | None = None) -> None:
        """Replace the device's latest status (``online``/``offline``, retained on the broker).

        Args:
            site: from the topic.
            device_id: from the topic.
            status: the status payload.
            received_at: dashboard clock; now when None.
        """
        now = time.time() if received_at is None else received_at
        with self._transaction() as conn:
            self._replace_device_state(conn, "status", site, device_id, status, now)

    def set_health(self, site: str, device_id: str, health: dict[str, Any], received_at: float | None = None) -> None:
        """Replace the device's latest heartbeat (and keep its figures in the heartbeat history).

        Args:
            site: from the topic.
            device_id: from the topic.
            health: the heartbeat payload.
            received_at: dashboard clock; now when None.
        """
        now = time.time() if received_at is None else received_at
        with self._transaction() as conn:
            self._replace_device_state(conn, "health", site, device_id, health, now)

    # -- ingest workers and heartbeat history ---------------------------------------------------------------------

    def report_worker(
        self, worker_id: str, *, consumer_id: str, group: str | None, stats: dict[str, float | int]
    ) -> None:
        """Record an ingest worker's latest counters (its row in ``ingest_workers``, replaced at each report).

        ``started_at`` is the time of this store's first report for the worker: a worker restarted under the same
        id starts again.

        Args:
            worker_id: the worker (its MQTT client id).
            consumer_id: the consumer of record it belongs to.
            group: its ``--group`` (None without one).
            stats: its counters (finite numbers), e.g. ``{"received": 10, "stored": 9}``.

        Raises:
            ValueError: a figure in ``stats`` is not a finite number.
            sqlite3.Error, psycopg.Error: the database failed.
        """
        now = time.time()
        started = self._started.setdefault(worker_id, now)
        with self._transaction() as conn:
            history.report_worker(
                conn, worker_id, consumer_id=consumer_id, group=group, started_at=started, stats=stats, now=now
            )

    def _read(self) -> Any:
        # The history reads use SQLAlchemy constructs: on SQLite the store's connection (behind the lock, its
        # read transaction ended at once), on PostgreSQL a pooled one.
        return _Reading(self)

    def workers(self) -> list[dict[str, Any]]:
        """Every ingest worker's last report: ``worker_id, consumer_id, group, started_at, last_at, stats``."""
        with self._read() as conn:
            return history.workers(conn)

    def health_history(self, site: str, device_id: str, since: float) -> list[dict[str, Any]]:
        """A device's raw heartbeats (kept ``health_retention_days``) received at or after ``since``, oldest first.

        Args:
            site: the device's site.
            device_id: the device.
            since: dashboard clock, seconds since the epoch.

        Returns:
            Dicts with ``at`` and each of ``tables.HEALTH_FIELDS`` (None where the heartbeat had no number).
        """
        with self._read() as conn:
            return history.raw_history(conn, site, device_id, since)

    def health_hourly(self, site: str, device_id: str, since: float) -> list[dict[str, Any]]:
        """A device's heartbeats per hour (kept a year) from the hour holding ``since``, oldest first.

        Args:
            site: the device's site.
            device_id: the device.
            since: dashboard clock, seconds since the epoch.

        Returns:
            Dicts with ``site, device_id, hour`` (its start), ``n`` and ``<field>_min``, ``_max``, ``_last`` for
            each of ``tables.HEALTH_FIELDS``; the current hour is aggregated from the raw rows.
        """
        with self._read() as conn:
            return history.hourly_history(conn, site, device_id, since)


class _Reading:
    """A read with SQLAlchemy constructs: the store's connection on SQLite (lock held), a pooled one otherwise."""

    def __init__(self, store: DashboardStore) -> None:
        self._store = store
        self._pooled: Connection | None = None

    def __enter__(self) -> Connection:
        store = self._store
        if store._conn is None:
            self._pooled = store.database.engine.connect()
            return self._pooled
        store._lock.acquire()
        return store._conn

    def __exit__(self, *exc: object) -> None:
        store = self._store
        if self._pooled is not None:
            self._pooled.close()
            return
        try:
            if store._conn is not None and store._conn.in_transaction():
                store._conn.rollback()
        finally:
            store._lock.release()
