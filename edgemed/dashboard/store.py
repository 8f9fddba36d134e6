"""The dashboard's SQLite store: results, study decisions, the latest status and heartbeat per device, and acks.

Delivery from the devices is at least once, so the same result can arrive twice (a device that restarts replays
its outbox; a broker redelivers an unacknowledged QoS 1 message). ``result_id`` is the primary key and rows go in
with ``INSERT OR IGNORE``: a duplicate is dropped by the database itself, in one statement, so two ingest threads
racing on the same id still keep exactly one row.

Times: ``received_at`` is the dashboard's own clock (seconds since the epoch). Devices may run without a
synchronised clock, so "last seen" and ordering use the dashboard's clock; ``created_at`` is kept as the device
reported it and shown beside ``clock_synced``.

One connection is shared by the ingest thread and the web threads behind a lock: SQLite serialises writers anyway,
and the dashboard's load (a few hundred messages a second at most) does not need a pool. WAL lets an external
reader (a backup, ``sqlite3`` on the command line) read while the dashboard writes.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Any

from edgemed.dashboard.validate import LEVELS, Filing
from edgemed.errors import ConfigError

__all__ = ["LEVELS", "AckOutcome", "DashboardStore"]

_SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS results (
    result_id   TEXT PRIMARY KEY,
    site        TEXT NOT NULL,
    device_id   TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    created_at  TEXT NOT NULL,
    clock_synced INTEGER,
    received_at REAL NOT NULL,
    level       TEXT NOT NULL,
    reason      TEXT NOT NULL,
    label       TEXT,
    delegate    TEXT,
    degraded    INTEGER,
    session_id  TEXT,
    payload     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS results_level ON results(level, received_at);
CREATE INDEX IF NOT EXISTS results_received ON results(received_at);
CREATE TABLE IF NOT EXISTS studies (
    result_id   TEXT PRIMARY KEY,
    site        TEXT NOT NULL,
    device_id   TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    created_at  TEXT NOT NULL,
    received_at REAL NOT NULL,
    level       TEXT NOT NULL,
    reason      TEXT NOT NULL,
    frames      INTEGER,
    first_seq   INTEGER,
    last_seq    INTEGER,
    session_id  TEXT,
    payload     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS studies_level ON studies(level, received_at);
CREATE TABLE IF NOT EXISTS devices (
    site        TEXT NOT NULL,
    device_id   TEXT NOT NULL,
    last_seen   REAL NOT NULL,
    status      TEXT,
    status_at   REAL,
    health      TEXT,
    health_at   REAL,
    PRIMARY KEY (site, device_id)
);
CREATE TABLE IF NOT EXISTS acks (
    result_id   TEXT PRIMARY KEY,
    acked_at    REAL NOT NULL,
    acked_by    TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letters (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at REAL NOT NULL,
    topic       TEXT NOT NULL,
    reason      TEXT NOT NULL,
    payload     BLOB NOT NULL,
    payload_bytes INTEGER NOT NULL,
    site        TEXT,
    device_id   TEXT,
    seq         INTEGER,
    result_id   TEXT
);
CREATE INDEX IF NOT EXISTS dead_letters_received ON dead_letters(received_at);
CREATE TABLE IF NOT EXISTS dead_letter_counts (
    reason      TEXT PRIMARY KEY,
    n           INTEGER NOT NULL,
    last_at     REAL NOT NULL
);
"""

#: Dead letters kept (the newest); their counts by reason are kept for ever in ``dead_letter_counts``.
DEAD_LETTERS_KEPT = 10_000
#: Bytes of one dead letter's payload kept (the whole payload up to the ingest's size limit).
DEAD_LETTER_BYTES_KEPT = 256 * 1024


class AckOutcome(Enum):
    """What ``DashboardStore.acknowledge`` did."""

    ACKNOWLEDGED = "acknowledged"
    ALREADY = "already acknowledged"
    NOT_FOUND = "not found"


def _strip_private(payload: dict[str, Any]) -> dict[str, Any]:
    # A device profile may opt in to publishing local file names (privacy.publish_source_names); the central
    # dashboard never keeps or shows them, whatever a device sends.
    source = payload.get("source")
    if isinstance(source, dict) and "name" in source:
        payload = {**payload, "source": {k: v for k, v in source.items() if k != "name"}}
    return payload


def _text(value: Any) -> str | None:
    # Validation checks the fields the page needs; optional ones are kept only when they have the right type, so
    # that no payload can make the INSERT fail (a failing INSERT leaves the message unacknowledged at the broker).
    return value if isinstance(value, str) else None


def _int(value: Any) -> int | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63
    return value if ok else None


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _flag(value: Any) -> int | None:
    return int(value) if isinstance(value, bool) else None


def _number(value: Any) -> float | int | None:
    # Heartbeat fields come from devices: only a finite number reaches the page (not a string, bool, object or
    # NaN, which is not JSON and blanked the page for everyone). The ingest refuses them; this also covers rows
    # stored by an older dashboard.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None


def _bool(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


def _dumps(value: Any) -> str:
    # allow_nan=False: NaN and Infinity are not JSON; the ingest refuses them, so this raising is a bug caught
    # there (the message becomes a dead letter), never invalid JSON in the database.
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


def _loads(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    value = json.loads(text)
    return value if isinstance(value, dict) else None


def _device_row(row: sqlite3.Row, now: float, silent_after_s: float) -> dict[str, Any]:
    status = _loads(row["status"]) or {}
    health = _loads(row["health"]) or {}
    # The newer of status and heartbeat says which delegate runs now; both carry it.
    newest = health if (row["health_at"] or 0) >= (row["status_at"] or 0) else status
    latency = _obj(health.get("latency_ms"))
    state = _text(status.get("state")) or "unknown"
    return {
        "site": row["site"],
        "device_id": row["device_id"],
        "state": state,
        "last_seen": row["last_seen"],
        "last_seen_s_ago": round(max(0.0, now - row["last_seen"]), 1),
        "delegate": _text(newest.get("delegate", status.get("delegate"))),
        "degraded": bool(_bool(newest.get("degraded", status.get("degraded", False)))),
        "degraded_reason": _text(health.get("degraded_reason")),
        "pending": _number(health.get("pending")),
        "oldest_pending_s": _number(health.get("oldest_pending_s")),
        "outbox_full": _bool(health.get("outbox_full")),
        "fps": _number(health.get("fps")),
        "p95_ms": _number(latency.get("p95")),
        "frames": _number(health.get("frames")),
        "errors": _number(health.get("errors")),
        "connected": _bool(health.get("connected")),
        "source_state": _text(health.get("source_state")),
        "cpu_percent": _number(health.get("cpu_percent")),
        "cpu_temp_c": _number(health.get("cpu_temp_c")),
        "peak_rss_mb": _number(health.get("peak_rss_mb")),
        "model": _text(status.get("model")),
        "offline_reason": _text(status.get("reason")) if state == "offline" else None,
        "silent": state == "online" and now - row["last_seen"] > silent_after_s,
    }


class DashboardStore:
    """SQLite store of everything the fleet publishes, shared by the ingest thread and the web server."""

    def __init__(self, path: Path) -> None:
        """Open (and create if needed) the database.

        Args:
            path: the SQLite file; its folder is created if missing.

        Raises:
            ConfigError: the file cannot be created or is not a database.
        """
        self.path = Path(path)
        self._lock = threading.Lock()
        self._dead_since_prune = 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Default isolation: sqlite3 opens a transaction before each write and ``with self._db`` commits it, so
            # a result and its device's last_seen change together.
            self._db = sqlite3.connect(str(self.path), check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode survives a process crash; a power cut may lose the last transactions, which the
            # devices still hold (they only drop a result once the broker acknowledged it to them, and the broker
            # keeps our session's undelivered messages).
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(_SCHEMA_SQL)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(
                f"cannot open the dashboard database {self.path}: {exc}; pass --db with a writable file path"
            ) from exc

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._db.close()

    # -- writes (ingest) ---------------------------------------------------------------------------------------

    def _touch(self, site: str, device_id: str, received_at: float) -> None:
        self._db.execute(
            "INSERT INTO devices(site, device_id, last_seen) VALUES (?, ?, ?) "
            "ON CONFLICT(site, device_id) DO UPDATE SET last_seen = max(last_seen, excluded.last_seen)",
            (site, device_id, received_at),
        )

    def _insert_result(self, result: dict[str, Any], now: float) -> bool:
        runtime = _obj(result.get("runtime"))
        prediction = _obj(result.get("prediction"))
        triage = result["triage"]
        row = (
            result["result_id"],
            result["site"],
            result["device_id"],
            result["seq"],
            result["created_at"],
            _flag(result.get("clock_synced")),
            now,
            triage["level"],
            triage["reason"],
            _text(prediction.get("label")),
            _text(runtime.get("delegate")),
            _flag(runtime.get("degraded")),
            _text(result.get("session_id")),
            _dumps(_strip_private(result)),
        )
        cur = self._db.execute("INSERT OR IGNORE INTO results VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)", row)
        self._touch(result["site"], result["device_id"], now)
        return cur.rowcount == 1

    def _insert_study(self, study: dict[str, Any], now: float) -> bool:
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
            _int(triage.get("frames")),
            _int(study.get("first_seq")),
            _int(study.get("last_seq")),
            _text(study.get("session_id")),
            _dumps(study),
        )
        cur = self._db.execute("INSERT OR IGNORE INTO studies VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", row)
        self._touch(study["site"], study["device_id"], now)
        return cur.rowcount == 1

    def _replace_device_state(self, column: str, site: str, device_id: str, body: dict[str, Any], now: float) -> None:
        self._touch(site, device_id, now)
        self._db.execute(
            f"UPDATE devices SET {column} = ?, {column}_at = ? WHERE site = ? AND device_id = ?",
            (_dumps(body), now, site, device_id),
        )

    def _insert_dead_letter(self, filing: Filing, now: float) -> None:
        reason = filing.reason or "unusable payload"
        self._db.execute(
            "INSERT INTO dead_letters(received_at, topic, reason, payload, payload_bytes, site, device_id, seq, "
            "result_id) VALUES (?,?,?,?,?,?,?,?,?)",
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

    def _file_one(self, filing: Filing, now: float) -> str:
        body = filing.body
        if filing.kind == "results" and body is not None:
            return "stored" if self._insert_result(body, now) else "duplicate"
        if filing.kind == "studies" and body is not None:
            return "stored" if self._insert_study(body, now) else "duplicate"
        if filing.kind in ("status", "health") and body is not None and filing.site and filing.device_id:
            self._replace_device_state(filing.kind, filing.site, filing.device_id, body, now)
            return "updated"
        if filing.kind == "ignored":
            return "ignored"
        self._insert_dead_letter(filing, now)
        return f"rejected: {filing.reason}"

    def file(self, filings: Sequence[Filing], received_at: float | None = None) -> list[str]:
        """Store what the ingest classified, all in ONE transaction (one commit, one fsync for the lot).

        Args:
            filings: from ``validate.classify``; dead letters go to the dead-letter table.
            received_at: dashboard clock; now when None.

        Returns:
            One outcome per filing: ``"stored"``, ``"duplicate"``, ``"updated"``, ``"ignored"`` or
            ``"rejected: <reason>"``.

        Raises:
            sqlite3.Error, OSError: the write failed and nothing of the batch was stored.
        """
        now = time.time() if received_at is None else received_at
        with self._lock, self._db:
            return [self._file_one(f, now) for f in filings]

    def add_result(self, result: dict[str, Any], received_at: float | None = None) -> bool:
        """Store one validated ``edgemed.result/1`` envelope.

        Args:
            result: the envelope (already validated by the ingest).
            received_at: dashboard clock; now when None.

        Returns:
            True when stored, False when a result with this ``result_id`` was already there (a duplicate).
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

    # -- reads (web) -------------------------------------------------------------------------------------------

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            cur = self._db.cursor()
            cur.row_factory = sqlite3.Row
            return list(cur.execute(sql, params).fetchall())

    def fleet(self, now: float | None = None, silent_after_s: float = 120.0) -> list[dict[str, Any]]:
        """One row per device: connection state, delegate, backlog and speed from its latest status and heartbeat.

        Args:
            now: dashboard clock used for "seconds since last seen"; now when None.
            silent_after_s: an online device not heard from for this long is flagged ``silent`` (heartbeats come
                every 30 s by default, so 120 s is four missed in a row: a hung process or a half-open link that
                the broker has not yet noticed).

        Returns:
            Dicts with ``site, device_id, state ("online", "offline", another word sent, or "unknown"), last_seen,
            last_seen_s_ago, delegate, degraded, degraded_reason, pending, oldest_pending_s, outbox_full, fps,
            p95_ms, frames, errors, connected, source_state, cpu_percent, cpu_temp_c, peak_rss_mb, model,
            offline_reason, silent``, sorted by site and device (a load figure a device did not send is None).
        """
        t = time.time() if now is None else now
        rows = self._query("SELECT * FROM devices ORDER BY site, device_id")
        return [_device_row(row, t, silent_after_s) for row in rows]

    @staticmethod
    def _result_row(row: sqlite3.Row) -> dict[str, Any]:
        return {
            "kind": "frame",
            "result_id": row["result_id"],
            "site": row["site"],
            "device_id": row["device_id"],
            "seq": row["seq"],
            "created_at": row["created_at"],
            "received_at": row["received_at"],
            "level": row["level"],
            "reason": row["reason"],
            "label": row["label"],
            "delegate": row["delegate"],
            "degraded": None if row["degraded"] is None else bool(row["degraded"]),
            "acked_at": row["acked_at"],
            "acked_by": row["acked_by"],
        }

    def recent_results(self, level: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Newest frame results first, optionally of one triage level.

        Args:
            level: one of ``LEVELS``, or None for all.
            limit: most rows returned (1-1000).

        Returns:
            Result summaries (no probabilities, no payload) with their acknowledgement, if any.

        Raises:
            ConfigError: unknown level or limit out of range.
        """
        if level is not None and level not in LEVELS:
            raise ConfigError(f"unknown triage level {level!r}; use one of {', '.join(LEVELS)}")
        if not 1 <= limit <= 1000:
            raise ConfigError(f"limit must be between 1 and 1000, not {limit}")
        where, params = ("WHERE r.level = ?", (level,)) if level else ("", ())
        rows = self._query(
            "SELECT r.*, a.acked_at, a.acked_by FROM results r LEFT JOIN acks a USING (result_id) "
            f"{where} ORDER BY r.received_at DESC, r.seq DESC LIMIT ?",
            (*params, limit),
        )
        return [self._result_row(r) for r in rows]

    def level_counts(self) -> dict[str, dict[str, int]]:
        """How many frame results and study decisions have each triage level (every level present, maybe 0).

        Returns:
            ``{"results": {level: n}, "studies": {level: n}}``.
        """
        out: dict[str, dict[str, int]] = {}
        for table in ("results", "studies"):
            counts = dict.fromkeys(LEVELS, 0)
            for row in self._query(f"SELECT level, count(*) AS n FROM {table} GROUP BY level"):
                counts[row["level"]] = row["n"]
            out[table] = counts
        return out

    def unacknowledged_urgent(self, limit: int = 200) -> list[dict[str, Any]]:
        """Urgent frame results and urgent study decisions no person has acknowledged yet, oldest first.

        Oldest first because the one waiting longest is the one to look at first.

        Args:
            limit: most rows returned.

        Returns:
            Summaries with ``kind`` ``"frame"`` or ``"study"``.
        """
        rows = self._query(
            "SELECT 'frame' AS kind, r.result_id, r.site, r.device_id, r.seq, r.created_at, r.received_at, "
            "r.reason, r.label, NULL AS frames FROM results r LEFT JOIN acks a USING (result_id) "
            "WHERE r.level = 'urgent' AND a.result_id IS NULL "
            "UNION ALL "
            "SELECT 'study', s.result_id, s.site, s.device_id, s.seq, s.created_at, s.received_at, "
            "s.reason, NULL, s.frames FROM studies s LEFT JOIN acks a USING (result_id) "
            "WHERE s.level = 'urgent' AND a.result_id IS NULL "
            "ORDER BY received_at ASC, seq ASC LIMIT ?",
            (limit,),
        )
        return [dict(r) for r in rows]

    def dead_letter_counts(self) -> dict[str, int]:
        """How many payloads were refused, by reason, since the database was created (pruning keeps counts)."""
        return {
            r["reason"]: int(r["n"]) for r in self._query("SELECT reason, n FROM dead_letter_counts ORDER BY n DESC")
        }

    def recent_dead_letters(self, limit: int = 50) -> list[dict[str, Any]]:
        """The newest dead letters without their payload (it is hostile or broken; read it with sqlite3).

        Args:
            limit: most rows returned.

        Returns:
            Dicts with ``id, received_at, topic, reason, payload_bytes, site, device_id, seq, result_id``.
        """
        rows = self._query(
            "SELECT id, received_at, substr(topic, 1, 300) AS topic, reason, payload_bytes, site, device_id, seq, "
            "result_id FROM dead_letters ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        return [dict(r) for r in rows]

    def result_count(self) -> int:
        """Number of stored frame results (duplicates are never stored, so this counts unique results)."""
        return int(self._query("SELECT count(*) AS n FROM results")[0]["n"])

    def study_count(self) -> int:
        """Number of stored study decisions."""
        return int(self._query("SELECT count(*) AS n FROM studies")[0]["n"])
