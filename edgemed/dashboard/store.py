"""The dashboard's SQLite store: results, study decisions, the latest status and heartbeat per device, and acks.

Delivery from the devices is at least once, so the same result can arrive twice (a device that restarts replays
its outbox; a broker redelivers an unacknowledged QoS 1 message). ``result_id`` is the primary key and rows go in
with ``INSERT OR IGNORE``: a duplicate is dropped by the database itself, in one statement, so two ingest threads
racing on the same id still keep exactly one row.

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

One connection is shared by the ingest thread and the web threads behind a lock: SQLite serialises writers anyway,
and the dashboard's load (a few hundred messages a second at most) does not need a pool. WAL lets an external
reader (a backup, ``sqlite3`` on the command line) read while the dashboard writes. The file is private (0600,
see ``schema.py``): it holds every result and the raw bytes of refused payloads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Any

from edgemed.dashboard.batch import summarize_batch
from edgemed.dashboard.queries import StoreQueries, as_flag, as_int, as_obj, as_text
from edgemed.dashboard.schema import SCHEMA_SQL, open_private, upgrade
from edgemed.dashboard.settlement import settle, settle_lost
from edgemed.dashboard.validate import LEVELS, Filing
from edgemed.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["LEVELS", "AckOutcome", "DashboardStore", "IdConflict"]

#: Dead letters kept (the newest); their counts by reason are kept for ever in ``dead_letter_counts``.
DEAD_LETTERS_KEPT = 10_000
#: Bytes of one dead letter's payload kept (the whole payload up to the ingest's size limit).
DEAD_LETTER_BYTES_KEPT = 256 * 1024
# Errors a write raises because of one message's content (the database itself works): that message becomes a
# dead letter. Anything else (disk full, locked, I/O error) is the database's fault: the batch is retried.
_MESSAGE_ERRORS = (sqlite3.IntegrityError, sqlite3.DataError, ValueError, TypeError, OverflowError)


# STUB (processes helper, issue 12): the ingest workers' reports, until the engine helper's store (SQLAlchemy,
# migrations) lands with its own ``ingest_workers`` table; the lead merges that version over this one.
_WORKERS_SQL = """
CREATE TABLE IF NOT EXISTS ingest_workers (
    worker_id TEXT PRIMARY KEY, consumer_id TEXT NOT NULL, group_name TEXT, started_at REAL NOT NULL,
    last_at REAL NOT NULL, stats TEXT NOT NULL
);
"""


class IdConflict(ValueError):
    """A message the store cannot keep because of what it holds already; ``reason`` is its dead letter's reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class AckOutcome(Enum):
    """What ``DashboardStore.acknowledge`` did."""

    ACKNOWLEDGED = "acknowledged"
    ALREADY = "already acknowledged"
    NOT_FOUND = "not found"


def _dumps(value: Any) -> str:
    # allow_nan=False: NaN and Infinity are not JSON; the ingest refuses them, so this raising is a bug caught
    # there (the message becomes a dead letter), never invalid JSON in the database.
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


def _published_at(body: dict[str, Any] | None, key: str, now: float) -> float | None:
    """The time a device stamped on a message (``at``, ``created_at``), never later than ``now``; None if unreadable."""
    text = body.get(key) if body is not None else None
    if not isinstance(text, str):
        return None
    try:
        stamp = datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except (ValueError, OverflowError, OSError):
        return None
    return min(stamp, now) if math.isfinite(stamp) else None


def _kept_text(payload: dict[str, Any], raw: bytes | None) -> str:
    """The envelope as the store keeps it: the JSON text the device sent, or re-encoded when that was not given.

    A device profile may opt in to publishing local file names (privacy.publish_source_names); the central
    dashboard never keeps or shows them, whatever a device sends: such an envelope is kept re-encoded compactly
    without ``source.name`` (the only case where the stored text differs from what the device sent).
    """
    source = payload.get("source")
    if isinstance(source, dict) and "name" in source:
        return _dumps({**payload, "source": {k: v for k, v in source.items() if k != "name"}})
    return raw.decode("utf-8") if raw is not None else _dumps(payload)


def _stream_of(body: dict[str, Any]) -> str:
    stream = body.get("stream")
    return stream if isinstance(stream, str) else ""  # the ingest checked it: 16 hex digits when present


class DashboardStore(StoreQueries):
    """SQLite store of everything the fleet publishes, shared by the ingest thread and the web server."""

    def __init__(self, path: Path, *, busy_timeout_s: float = 5.0) -> None:
        """Open (and create if needed) the database.

        Args:
            path: the SQLite file; its folder is created if missing.
            busy_timeout_s: how long a write waits for another process's lock (a backup, ``sqlite3``) before it
                fails; the ingest then retries it (see ``writer.py``).

        Raises:
            ConfigError: the file cannot be created or is not a database.
        """
        self.path = Path(path)
        self._lock = threading.Lock()
        self._dead_since_prune = 0
        try:
            open_private(self.path)
            # Default isolation: sqlite3 opens a transaction before each write and ``with self._db`` commits it, so
            # a result and its device's last_seen change together.
            self._db = sqlite3.connect(str(self.path), check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: the write-ahead log is fsynced at every commit. The ingest acknowledges a message to the
            # broker only after the commit that holds it, and the broker then forgets it: with NORMAL a power cut
            # could lose what was already acknowledged. The ingest commits in batches, so the cost is one fsync
            # per batch, not per message.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
            self._db.executescript(SCHEMA_SQL)
            upgrade(self._db)
            self._db.executescript(_WORKERS_SQL)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(
                f"cannot open the dashboard database {self.path}: {exc}; pass --db with a writable file path"
            ) from exc

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._db.close()

    # -- writes (ingest) ---------------------------------------------------------------------------------------

    def _touch(self, site: str, device_id: str, seen_at: float, *, retained: bool = False) -> None:
        if retained:
            # Old news (see the module docstring): a device never heard of is added, dated ``seen_at``; a known
            # one keeps its last_seen.
            self._db.execute(
                "INSERT INTO devices(site, device_id, last_seen) VALUES (?, ?, ?) "
                "ON CONFLICT(site, device_id) DO NOTHING",
                (site, device_id, seen_at),
            )
            return
        self._db.execute(
            "INSERT INTO devices(site, device_id, last_seen) VALUES (?, ?, ?) "
            "ON CONFLICT(site, device_id) DO UPDATE SET last_seen = max(last_seen, excluded.last_seen)",
            (site, device_id, seen_at),
        )

    def _touch_for(self, body: dict[str, Any], now: float, retained: bool) -> None:
        seen = _published_at(body, "created_at", now) if retained else None
        self._touch(body["site"], body["device_id"], now if seen is None else seen, retained=retained)

    def _insert_result(
        self, result: dict[str, Any], now: float, retained: bool = False, raw: bytes | None = None
    ) -> bool:
        runtime = as_obj(result.get("runtime"))
        prediction = as_obj(result.get("prediction"))
        triage = result["triage"]
        row = (
            result["result_id"],
            result["site"],
            result["device_id"],
            result["seq"],
            result["created_at"],
            as_flag(result.get("clock_synced")),
            now,
            triage["level"],
            triage["reason"],
            as_text(prediction.get("label")),
            as_text(runtime.get("delegate")),
            as_flag(runtime.get("degraded")),
            as_text(result.get("session_id")),
            _kept_text(result, raw),
            as_text(triage.get("label")),
        )
        cur = self._db.execute(
            "INSERT OR IGNORE INTO results(result_id, site, device_id, seq, created_at, clock_synced, received_at, "
            "level, reason, label, delegate, degraded, session_id, payload, triage_label) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            row,
        )
        self._settle_stored("results", result, inserted=cur.rowcount == 1)
        self._touch_for(result, now, retained)
        return cur.rowcount == 1

    def _insert_study(
        self, study: dict[str, Any], now: float, retained: bool = False, raw: bytes | None = None
    ) -> bool:
        triage = study["triage"]
        row = (
            study["result_id"],
            study["site"],
            study["device_id"],
            study["seq"],
            study["created_at"],
            now,
            triage["level"],
            triage["reason"],
            as_int(triage.get("frames")),
            as_int(study.get("first_seq")),
            as_int(study.get("last_seq")),
            as_text(study.get("session_id")),
            _kept_text(study, raw),
            as_text(triage.get("label")),
        )
        cur = self._db.execute(
            "INSERT OR IGNORE INTO studies(result_id, site, device_id, seq, created_at, received_at, level, reason, "
            "frames, first_seq, last_seq, session_id, payload, triage_label) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            row,
        )
        self._settle_stored("studies", study, inserted=cur.rowcount == 1)
        self._touch_for(study, now, retained)
        return cur.rowcount == 1

    def _settle_stored(self, table: str, body: dict[str, Any], *, inserted: bool) -> None:
        key = (body["site"], body["device_id"], _stream_of(body))
        if not inserted:
            # Dropped as a duplicate of the row already kept under this result_id: that row's seq is what is
            # stored. A copy naming another device, stream or seq (a device bug, or a forged id) stores nothing,
            # so its seq must not be receipted as stored: it is refused (a dead letter with its seq) instead.
            kept = self._db.execute(
                f"SELECT site, device_id, coalesce(json_extract(payload, '$.stream'), ''), seq FROM {table} "
                "WHERE result_id = ?",
                (body["result_id"],),
            ).fetchone()
            if kept is None or tuple(kept) != (*key, body["seq"]):
                raise IdConflict("result_id is already stored for another result (another device, stream or seq)")
        settle(self._db, key, body["seq"], "stored")

    def _replace_device_state(
        self, column: str, site: str, device_id: str, body: dict[str, Any], now: float, retained: bool = False
    ) -> str:
        text = _dumps(body)
        if not retained:
            self._touch(site, device_id, now)
            self._db.execute(
                f"UPDATE devices SET {column} = ?, {column}_at = ? WHERE site = ? AND device_id = ?",
                (text, now, site, device_id),
            )
            return "updated"
        stored = self._db.execute(
            f"SELECT {column} FROM devices WHERE site = ? AND device_id = ?", (site, device_id)
        ).fetchone()
        if stored is not None and stored[0] == text:
            return "unchanged"  # the broker's copy of what we hold: nothing new, nothing moves
        stamped = _published_at(body, "at", now)
        self._touch(site, device_id, now if stamped is None else stamped, retained=True)
        # Without a stamp, the time it replaces keeps its place (or, first heard of, when the device was).
        self._db.execute(
            f"UPDATE devices SET {column} = ?, {column}_at = coalesce(?, {column}_at, last_seen) "
            "WHERE site = ? AND device_id = ?",
            (text, stamped, site, device_id),
        )
        return "updated"

    def _insert_dead_letter(self, filing: Filing, now: float) -> bool:
        reason = filing.reason or "unusable payload"
        digest = hashlib.sha256(filing.payload).hexdigest()
        key = filing.stream_key
        if key is not None and filing.seq is not None:
            settle(self._db, key, filing.seq, "rejected")  # sending it again would not help: receipted
        if filing.retained:
            known = self._db.execute(
                "SELECT 1 FROM dead_letters WHERE payload_sha256 = ? AND topic = ? LIMIT 1", (digest, filing.topic)
            ).fetchone()
            if known is not None:
                return False  # the broker sends a retained message again at each new subscription: kept once
        self._db.execute(
            "INSERT INTO dead_letters(received_at, topic, reason, payload, payload_bytes, site, device_id, seq, "
            "result_id, payload_sha256, stream) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (
                now,
                filing.topic,
                reason,
                filing.payload[:DEAD_LETTER_BYTES_KEPT],
                len(filing.payload),
                filing.site,
                filing.device_id,
                filing.seq,
                filing.result_id,
                digest,
                filing.stream if filing.seq is not None else None,
            ),
        )
        self._db.execute(
            "INSERT INTO dead_letter_counts VALUES (?, 1, ?) "
            "ON CONFLICT(reason) DO UPDATE SET n = n + 1, last_at = excluded.last_at",
            (reason, now),
        )
        self._dead_since_prune += 1
        if self._dead_since_prune >= 100:  # a flood of junk must not fill the disk: keep the newest only
            self._dead_since_prune = 0
            self._db.execute(
                "DELETE FROM dead_letters WHERE id <= (SELECT max(id) FROM dead_letters) - ?", (DEAD_LETTERS_KEPT,)
            )
        return True

    def _file_one(self, filing: Filing, now: float) -> str:
        body, retained, raw = filing.body, filing.retained, filing.payload
        if filing.kind == "results" and body is not None:
            return "stored" if self._insert_result(body, now, retained, raw) else "duplicate"
        if filing.kind == "studies" and body is not None:
            return "stored" if self._insert_study(body, now, retained, raw) else "duplicate"
        if filing.kind == "batch":
            return summarize_batch([self._file_isolated(element, now) for element in filing.elements])
        if filing.kind == "lost" and filing.lost is not None:
            settle_lost(self._db, filing.lost, now)
            return "recorded"
        if filing.kind in ("status", "health") and body is not None and filing.site and filing.device_id:
            return self._replace_device_state(filing.kind, filing.site, filing.device_id, body, now, retained)
        if filing.kind == "ignored":
            return "ignored"
        if not self._insert_dead_letter(filing, now):
            return "unchanged"
        return f"rejected: {filing.reason}"

    def _file_isolated(self, filing: Filing, now: float) -> str:
        # A savepoint per message: one the database refuses is undone alone and filed as a dead letter, in the same
        # transaction as the rest of its batch. Filing it in a commit of its own would leave it behind when a later
        # message of the batch then hits a database error, and the retried batch would keep it a second time.
        self._db.execute("SAVEPOINT filing")
        try:
            outcome = self._file_one(filing, now)
        except _MESSAGE_ERRORS as exc:
            self._db.execute("ROLLBACK TO filing")
            if isinstance(exc, IdConflict):
                reason = exc.reason  # the ingest logs dead letters by reason (and never their payload)
            else:
                log.exception("could not store a message on %r; keeping it as a dead letter", filing.topic[:200])
                reason = f"could not be stored ({type(exc).__name__})"
            outcome = self._file_one(replace(filing, kind="dead", body=None, reason=reason), now)
        self._db.execute("RELEASE filing")
        return outcome

    def file(self, filings: Sequence[Filing], received_at: float | None = None) -> list[str]:
        """Store what the ingest classified, all in ONE transaction (one commit, one fsync for the lot).

        A message the database refuses (a constraint, a value SQLite cannot hold) becomes a dead letter in the same
        transaction; the others go in as they are.

        Args:
            filings: from ``validate.classify``; dead letters go to the dead-letter table.
            received_at: dashboard clock; now when None.

        Returns:
            One outcome per filing: ``"stored"``, ``"duplicate"``, ``"updated"``, ``"ignored"``,
            ``"unchanged"`` (a retained message the store already holds), ``"recorded"`` (a lost announcement),
            ``"batch: S stored, D duplicates, R rejected"`` or ``"rejected: <reason>"``.

        Raises:
            sqlite3.Error, OSError: the write failed and nothing of the batch was stored.
        """
        now = time.time() if received_at is None else received_at
        touched = {key for key in (f.stream_key for f in filings) if key is not None}
        with self._lock, self._db:
            self._db.execute("BEGIN")  # explicit: releasing the first savepoint must not commit on its own
            outcomes = [self._file_isolated(f, now) for f in filings]
            # One row per touched stream and commit (not per message): which receipts to send again after a
            # reconnection (see receipt_sender.py).
            self._db.executemany(
                "INSERT INTO stream_seen(site, device_id, stream, seen_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(site, device_id, stream) DO UPDATE SET seen_at = max(seen_at, excluded.seen_at)",
                [(*key, now) for key in touched],
            )
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
        """
        now = time.time() if received_at is None else received_at
        with self._lock, self._db:
            return self._insert_result(result, now)

    def add_study(self, study: dict[str, Any], received_at: float | None = None) -> bool:
        """Store one validated ``edgemed.study/1`` decision.

        Args:
            study: the decision (already validated by the ingest).
            received_at: dashboard clock; now when None.

        Returns:
            True when stored, False for a duplicate ``result_id``.

        Raises:
            IdConflict: the ``result_id`` is stored for another device, stream or seq.
        """
        now = time.time() if received_at is None else received_at
        with self._lock, self._db:
            return self._insert_study(study, now)

    def set_status(self, site: str, device_id: str, status: dict[str, Any], received_at: float | None = None) -> None:
        """Replace the device's latest status (``online``/``offline``, retained on the broker).

        Args:
            site: from the topic.
            device_id: from the topic.
            status: the status payload.
            received_at: dashboard clock; now when None.
        """
        now = time.time() if received_at is None else received_at
        with self._lock, self._db:
            self._replace_device_state("status", site, device_id, status, now)

    def set_health(self, site: str, device_id: str, health: dict[str, Any], received_at: float | None = None) -> None:
        """Replace the device's latest heartbeat.

        Args:
            site: from the topic.
            device_id: from the topic.
            health: the heartbeat payload.
            received_at: dashboard clock; now when None.
        """
        now = time.time() if received_at is None else received_at
        with self._lock, self._db:
            self._replace_device_state("health", site, device_id, health, now)

    def acknowledge(self, result_id: str, by: str = "", at: float | None = None) -> AckOutcome:
        """Record that a person has seen an (urgent) result or study decision.

        Args:
            result_id: the result's or study decision's id.
            by: free text (initials) typed by the person; may be empty.
            at: dashboard clock; now when None.

        Returns:
            Whether it was acknowledged now, had been before, or no such result exists.
        """
        now = time.time() if at is None else at
        with self._lock, self._db:
            known = self._db.execute(
                "SELECT 1 FROM results WHERE result_id = ? UNION ALL SELECT 1 FROM studies WHERE result_id = ?",
                (result_id, result_id),
            ).fetchone()
            if known is None:
                return AckOutcome.NOT_FOUND
            cur = self._db.execute("INSERT OR IGNORE INTO acks VALUES (?, ?, ?)", (result_id, now, by.strip()[:64]))
            return AckOutcome.ACKNOWLEDGED if cur.rowcount == 1 else AckOutcome.ALREADY

    # -- ingest workers (STUB until the engine helper's store lands) -------------------------------------------

    def report_worker(
        self, worker_id: str, *, consumer_id: str, group: str | None, stats: dict[str, float | int]
    ) -> None:
        """Record an ingest worker's latest counters (its first report sets ``started_at``).

        Args:
            worker_id: the worker's MQTT client id.
            consumer_id: the consumer of record it belongs to.
            group: its shared-subscription group, None without one.
            stats: its counters (numbers only).
        """
        now = time.time()
        with self._lock, self._db:
            self._db.execute(
                "INSERT INTO ingest_workers VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(worker_id) DO UPDATE SET "
                "consumer_id = excluded.consumer_id, group_name = excluded.group_name, last_at = excluded.last_at, "
                "stats = excluded.stats",
                (worker_id, consumer_id, group, now, now, _dumps(stats)),
            )

    def workers(self) -> list[dict[str, Any]]:
        """Every ingest worker that reported, with its last report, by worker id.

        Returns:
            Dicts with ``worker_id, consumer_id, group, started_at, last_at, stats``.
        """
        rows = self._query("SELECT * FROM ingest_workers ORDER BY worker_id")
        return [
            {
                "worker_id": r["worker_id"],
                "consumer_id": r["consumer_id"],
                "group": r["group_name"],
                "started_at": r["started_at"],
                "last_at": r["last_at"],
                "stats": json.loads(r["stats"]),
            }
            for r in rows
        ]
