"""The dashboard store's reads: what the web page asks for, in pages, from device data read defensively.

Every value here comes from a device. The ingest checks each field the page reads, but rows stored by an older
dashboard were not checked as strictly, so a value reaches the page only when it has the expected type (a finite
number, a bool, a string): anything else is None, never a NaN (not JSON) or an object where a number belongs.

Long lists come in pages (``offset``/``limit``): 20,000 device ids made every refresh of the page take seconds.
A device silent for longer than ``expire_after_s`` is left out of the fleet (and counted as ``hidden``); its
results stay.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from edgemed.dashboard.validate import LEVELS
from edgemed.errors import ConfigError

if TYPE_CHECKING:
    from sqlalchemy import Connection

    from edgemed.dashboard.db import Database

MAX_PAGE = 1000


class Record(tuple[Any, ...]):
    """A row read from PostgreSQL that reads like ``sqlite3.Row``: by position, by column name, and ``dict(row)``."""

    _names: dict[str, int]

    def __new__(cls, names: dict[str, int], values: Sequence[Any]) -> Record:
        row = super().__new__(cls, values)
        row._names = names
        return row

    def __getitem__(self, key: Any) -> Any:
        return super().__getitem__(self._names[key] if isinstance(key, str) else key)

    def keys(self) -> list[str]:
        """The column names, in order."""
        return list(self._names)


Row = sqlite3.Row | Record
"""A row of ``StoreQueries._query``: SQLite's own row on SQLite, a ``Record`` on PostgreSQL; both read alike."""


def driver_sql(dialect: str, sql: str, with_params: bool) -> str:
    """``sql`` written with ``?`` placeholders (SQLite's) in the driver's own style (psycopg's ``%s``).

    Args:
        dialect: ``sqlite`` or ``postgresql``.
        sql: the statement; no ``?`` inside its string literals.
        with_params: parameters are passed (psycopg reads ``%`` as a placeholder only then).
    """
    if dialect == "sqlite" or not with_params:
        return sql
    return sql.replace("%", "%%").replace("?", "%s")


def as_text(value: Any) -> str | None:
    """``value`` when it is a string, else None."""
    return value if isinstance(value, str) else None


def as_int(value: Any) -> int | None:
    """``value`` when it is an integer SQLite can hold (not a bool), else None."""
    ok = isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63
    return value if ok else None


def as_obj(value: Any) -> dict[str, Any]:
    """``value`` when it is a JSON object, else an empty one."""
    return value if isinstance(value, dict) else {}


def as_flag(value: Any) -> int | None:
    """A bool as SQLite's 0/1, anything else None."""
    return int(value) if isinstance(value, bool) else None


def as_number(value: Any) -> float | int | None:
    """``value`` when it is a finite number (not a bool), else None: a NaN is not JSON and blanked the page."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None


def as_bool(value: Any) -> bool | None:
    """``value`` when it is a bool, else None."""
    return value if isinstance(value, bool) else None


def _loads(text: str | None) -> dict[str, Any]:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except ValueError:  # written by something other than this dashboard: show the device without it
        return {}
    return value if isinstance(value, dict) else {}


def _page(offset: int, limit: int) -> None:
    if not 1 <= limit <= MAX_PAGE:
        raise ConfigError(f"limit must be between 1 and {MAX_PAGE}, not {limit}")
    if offset < 0:
        raise ConfigError(f"offset must be 0 or more, not {offset}")


def _pending(status: dict[str, Any], health: dict[str, Any], status_at: float, health_at: float) -> Any:
    # The backlog from whichever report is newer: a device that stops (cleanly or with an error) says in its
    # offline status how many results it leaves on disk; before that, its heartbeats say it. A device killed
    # outright (its last will) says nothing new: its last heartbeat stands.
    newer_status = status_at > health_at and as_number(status.get("pending")) is not None
    return as_number((status if newer_status else health).get("pending"))


def device_row(row: Row, now: float, silent_after_s: float) -> dict[str, Any]:
    """One fleet row from a ``devices`` row (see ``StoreQueries.fleet``)."""
    status = _loads(row["status"])
    health = _loads(row["health"])
    status_at, health_at = row["status_at"] or 0.0, row["health_at"] or 0.0
    # The newer of status and heartbeat says which delegate runs now; both carry it.
    newest = health if health_at >= status_at else status
    latency = as_obj(health.get("latency_ms"))
    state = as_text(status.get("state")) or "unknown"
    return {
        "site": row["site"],
        "device_id": row["device_id"],
        "state": state,
        "last_seen": row["last_seen"],
        "last_seen_s_ago": round(max(0.0, now - row["last_seen"]), 1),
        "delegate": as_text(newest.get("delegate", status.get("delegate"))),
        "degraded": bool(as_bool(newest.get("degraded", status.get("degraded", False)))),
        "degraded_reason": as_text(health.get("degraded_reason")),
        "pending": _pending(status, health, status_at, health_at),
        "oldest_pending_s": as_number(health.get("oldest_pending_s")),
        "awaiting_receipt": as_number(health.get("awaiting_receipt")),
        "outbox_full": as_bool(health.get("outbox_full")),
        "fps": as_number(health.get("fps")),
        "p95_ms": as_number(latency.get("p95")),
        "frames": as_number(health.get("frames")),
        "errors": as_number(health.get("errors")),
        "connected": as_bool(health.get("connected")),
        "source_state": as_text(health.get("source_state")),
        "cpu_percent": as_number(health.get("cpu_percent")),
        "cpu_temp_c": as_number(health.get("cpu_temp_c")),
        "peak_rss_mb": as_number(health.get("peak_rss_mb")),
        "model": as_text(status.get("model")),
        "offline_reason": as_text(status.get("reason")) if state == "offline" else None,
        # The last will (connection lost) and a run that ended with an error both say clean: false.
        "ended_abnormally": state == "offline" and status.get("clean") is False,
        "silent": state == "online" and now - row["last_seen"] > silent_after_s,
    }


def _result_row(row: Row) -> dict[str, Any]:
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
        # The label triage acted on (an urgent class can win below the top prediction), and the top prediction.
        "label": row["triage_label"] or row["label"],
        "top_label": row["label"],
        "delegate": row["delegate"],
        "degraded": None if row["degraded"] is None else bool(row["degraded"]),
        "acked_at": row["acked_at"],
        "acked_by": row["acked_by"],
    }


class StoreQueries:
    """The reads of ``DashboardStore``; it provides the database, and on SQLite its one connection and the lock.

    On SQLite the reads share the store's connection, behind its lock, outside any transaction (each statement
    reads a consistent snapshot on its own; the writer's batches are never held up by a reader's transaction). On
    PostgreSQL each read takes a connection from the pool, so the page never waits for the writer.
    """

    database: Database
    _db: sqlite3.Connection | None
    _lock: threading.Lock

    @contextmanager
    def _reader(self) -> Iterator[Connection]:
        """A pooled connection for a read on PostgreSQL (its read-only transaction ends with it)."""
        with self.database.engine.connect() as conn:
            yield conn

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[Row]:
        """Rows of one read, ``sql`` written with ``?`` placeholders on either engine.

        Raises:
            sqlite3.Error, psycopg.Error: the database could not be read.
        """
        if self._db is not None:
            with self._lock:
                cur = self._db.cursor()
                cur.row_factory = sqlite3.Row
                return list(cur.execute(sql, params).fetchall())
        from sqlalchemy.exc import DBAPIError

        try:
            with self._reader() as conn:
                result = conn.exec_driver_sql(driver_sql("postgresql", sql, bool(params)), params or None)
                names = {name: i for i, name in enumerate(result.keys())}
                return [Record(names, row) for row in result.all()]
        except DBAPIError as exc:
            raise (exc.orig or exc) from None  # the driver's error, without SQLAlchemy's SQL text

    def _count(self, sql: str, params: tuple[Any, ...] = ()) -> int:
        return int(self._query(sql, params)[0][0])

    def fleet(
        self,
        now: float | None = None,
        silent_after_s: float = 120.0,
        *,
        offset: int = 0,
        limit: int = MAX_PAGE,
        expire_after_s: float | None = None,
    ) -> list[dict[str, Any]]:
        """One row per device: connection state, delegate, backlog and speed from its latest status and heartbeat.

        Args:
            now: dashboard clock used for "seconds since last seen"; now when None.
            silent_after_s: an online device not heard from for this long is flagged ``silent`` (heartbeats come
                every 30 s by default, so 120 s is four missed in a row: a hung process or a half-open link that
                the broker has not yet noticed).
            offset: rows to skip (paging).
            limit: most rows returned (1-1000).
            expire_after_s: leave out devices not heard from for this long; None lists every device.

        Returns:
            Dicts with ``site, device_id, state ("online", "offline", another word sent, or "unknown"), last_seen,
            last_seen_s_ago, delegate, degraded, degraded_reason, pending, oldest_pending_s, outbox_full, fps,
            p95_ms, frames, errors, connected, source_state, cpu_percent, cpu_temp_c, peak_rss_mb, model,
            offline_reason, ended_abnormally, silent, rejected, lost``, sorted by site and device (a figure a
            device did not send, or sent with the wrong type, is None). ``rejected`` counts the device's results
            kept as dead letters with a readable ``seq`` (receipted as refused), ``lost`` the ``seq`` it announced
            lost for good (evicted, or gone from a damaged outbox).

        Raises:
            ConfigError: offset or limit out of range.
        """
        _page(offset, limit)
        t = time.time() if now is None else now
        since = t - expire_after_s if expire_after_s is not None else -math.inf
        rows = self._query(
            "SELECT * FROM devices WHERE last_seen >= ? ORDER BY site, device_id LIMIT ? OFFSET ?",
            (since, limit, offset),
        )
        unsettled = self._unstored_counts()
        out = []
        for row in rows:
            device = device_row(row, t, silent_after_s)
            device["rejected"], device["lost"] = unsettled.get((row["site"], row["device_id"]), (0, 0))
            out.append(device)
        return out

    def _unstored_counts(self) -> dict[tuple[str, str], tuple[int, int]]:
        # Settled seqs that are not stored are few (the partial index settled_unstored holds only them), so one
        # query over all devices costs less than one per listed device.
        rows = self._query(
            "SELECT site, device_id, sum(CASE WHEN how = 'rejected' THEN 1 ELSE 0 END) AS rejected, "
            "sum(CASE WHEN how = 'lost' THEN 1 ELSE 0 END) AS lost FROM settled "
            "WHERE how <> 'stored' GROUP BY site, device_id"
        )
        return {(r["site"], r["device_id"]): (int(r["rejected"]), int(r["lost"])) for r in rows}

    def device_counts(self, now: float | None = None, expire_after_s: float | None = None) -> tuple[int, int]:
        """How many devices ``fleet`` lists, and how many it leaves out as silent for over ``expire_after_s``.

        Args:
            now: dashboard clock; now when None.
            expire_after_s: as for ``fleet``.

        Returns:
            ``(listed, hidden)``.
        """
        t = time.time() if now is None else now
        since = t - expire_after_s if expire_after_s is not None else -math.inf
        total = self._count("SELECT count(*) FROM devices")
        listed = self._count("SELECT count(*) FROM devices WHERE last_seen >= ?", (since,))
        return listed, total - listed

    def recent_results(self, level: str | None = None, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        """Newest frame results first, optionally of one triage level.

        Args:
            level: one of ``LEVELS``, or None for all.
            limit: most rows returned (1-1000).
            offset: rows to skip (paging).

        Returns:
            Result summaries (no probabilities, no payload) with their acknowledgement, if any.

        Raises:
            ConfigError: unknown level, or offset or limit out of range.
        """
        if level is not None and level not in LEVELS:
            raise ConfigError(f"unknown triage level {level!r}; use one of {', '.join(LEVELS)}")
        _page(offset, limit)
        where, params = ("WHERE r.level = ?", (level,)) if level else ("", ())
        rows = self._query(
            "SELECT r.*, a.acked_at, a.acked_by FROM results r LEFT JOIN reviews a USING (result_id) "
            f"{where} ORDER BY r.received_at DESC, r.seq DESC LIMIT ? OFFSET ?",
            (*params, limit, offset),
        )
        return [_result_row(r) for r in rows]

    def level_counts(self) -> dict[str, dict[str, int]]:
        """How many frame results and study decisions have each triage level (every level present, maybe 0).

        Returns:
            ``{"results": {level: n}, "studies": {level: n}}``.
        """
        out: dict[str, dict[str, int]] = {}
        for table in ("results", "studies"):
            counts = dict.fromkeys(LEVELS, 0)
            for row in self._query(f"SELECT level, count(*) AS n FROM {table} GROUP BY level"):
                counts[row["level"]] = int(row["n"])
            out[table] = counts
        return out

    def _urgent_waiting(self) -> str:
        # Unacknowledged rows are not closed, so they are in the partial indexes results_waiting/studies_waiting
        # (tables.py). SQLite uses one only when its predicate's terms are repeated; PostgreSQL proves them itself
        # and misjudges the rows when they are repeated.
        waiting = "IS NULL" + (
            " AND {t}.level IN ('urgent', 'inconclusive')" if self.database.dialect == "sqlite" else ""
        )
        return (
            "SELECT 'frame' AS kind, r.result_id, r.site, r.device_id, r.seq, r.created_at, r.received_at, "
            "r.reason, coalesce(r.triage_label, r.label) AS label, r.label AS top_label, NULL AS frames "
            "FROM results r LEFT JOIN reviews a USING (result_id) "
            f"WHERE r.level = 'urgent' AND r.closed_at {waiting.format(t='r')} AND a.result_id IS NULL "
            "UNION ALL "
            "SELECT 'study', s.result_id, s.site, s.device_id, s.seq, s.created_at, s.received_at, "
            "s.reason, s.triage_label, NULL, s.frames FROM studies s LEFT JOIN reviews a USING (result_id) "
            f"WHERE s.level = 'urgent' AND s.closed_at {waiting.format(t='s')} AND a.result_id IS NULL"
        )

    def unacknowledged_urgent(self, limit: int = 200, offset: int = 0) -> list[dict[str, Any]]:
        """Urgent frame results and urgent study decisions no person has acknowledged yet, oldest first.

        Oldest first because the one waiting longest is the one to look at first. Acknowledged means a ``reviews``
        row exists (``review.py``: acknowledged or closed).

        Args:
            limit: most rows returned (1-1000).
            offset: rows to skip (paging).

        Returns:
            Summaries with ``kind`` ``"frame"`` or ``"study"``.

        Raises:
            ConfigError: offset or limit out of range.
        """
        _page(offset, limit)
        rows = self._query(
            f"{self._urgent_waiting()} ORDER BY received_at ASC, seq ASC LIMIT ? OFFSET ?",
            (limit, offset),
        )
        return [dict(r) for r in rows]

    def unacknowledged_urgent_count(self) -> int:
        """How many urgent results and study decisions wait for a person (all of them, not one page)."""
        return self._count(f"SELECT count(*) FROM ({self._urgent_waiting()}) AS waiting")

    def dead_letter_counts(self) -> dict[str, int]:
        """How many payloads were refused, by reason, since the database was created (pruning keeps counts)."""
        rows = self._query("SELECT reason, n FROM dead_letter_counts ORDER BY n DESC, reason")
        return {r["reason"]: int(r["n"]) for r in rows}

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
        return self._count("SELECT count(*) FROM results")
