"""Ingest workers' reports, the heartbeat history (raw and hourly) and its retention, on either engine.

Heartbeats. Each one the ingest stores (not a retained copy) also adds a row of its numeric fields to
``health_history``, stamped with the dashboard's clock. Every ``MAINTENANCE_INTERVAL_S`` the writer path (inside
the transaction of the batch it is filing, so no commit of its own) downsamples the hours that ended more than
``SETTLE_S`` ago into ``health_hourly`` (per device and hour: how many heartbeats, and the min, max and last value
of each field), each hour once, then deletes raw rows older than the retention in bounded batches, only from hours
already downsampled, and hourly rows older than ``HOURLY_KEPT_S``. Several workers on one PostgreSQL database do
not do it twice at once: the pass takes a transaction-scoped advisory lock and is skipped when another holds it.
"""

from __future__ import annotations

import json
import math
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection

from edgemed.dashboard.queries import as_number
from edgemed.dashboard.settlement import dialect_insert
from edgemed.dashboard.tables import HEALTH_FIELDS, health_history, health_hourly, ingest_workers

#: Raw heartbeats are kept this many days unless the store is told otherwise (``--health-retention-days``).
DEFAULT_RETENTION_DAYS = 7.0
#: Hourly rows are kept for a year.
HOURLY_KEPT_S = 365 * 86400.0
#: Shortest time between two maintenance passes of one store.
MAINTENANCE_INTERVAL_S = 120.0
#: Raw rows one DELETE removes, and DELETEs per pass: bounded work inside an ingest batch's transaction.
DELETE_BATCH = 10_000
DELETE_BATCHES = 5
#: Hours downsampled per pass at most (a backlog after a long stop is caught up over several passes).
HOURS_PER_PASS = 48
#: An hour is downsampled once it ended this long ago: a worker's batch stamped in it has committed by then.
SETTLE_S = 60.0
_HOUR = 3600
_LOCK_KEY = 0x6564676D65640002  # "edgmed" + 2: the maintenance pass (1 is the schema upgrade)


def heartbeat_row(site: str, device_id: str, health: dict[str, Any], now: float) -> dict[str, Any]:
    """The ``health_history`` row of one heartbeat: its numeric fields (a field missing or not a number is NULL)."""
    latency = health.get("latency_ms")
    values = {name: as_number(health.get(name)) for name in HEALTH_FIELDS}
    values["p95_ms"] = as_number(latency.get("p95")) if isinstance(latency, dict) else None
    return {"site": site, "device_id": device_id, "at": now, "hour": int(now // _HOUR) * _HOUR, **values}


def add_heartbeat(conn: Connection, site: str, device_id: str, health: dict[str, Any], now: float) -> None:
    """Keep one heartbeat's numeric fields (inside the store's transaction)."""
    conn.execute(sa.insert(health_history), heartbeat_row(site, device_id, health, now))


def report_worker(
    conn: Connection,
    worker_id: str,
    *,
    consumer_id: str,
    group: str | None,
    started_at: float,
    stats: dict[str, float | int],
    now: float,
) -> None:
    """Insert or replace a worker's row (inside a transaction).

    Raises:
        ValueError: a figure in ``stats`` is not a finite number.
    """
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in stats.values()):
        raise ValueError("worker stats must be finite numbers")
    stmt = dialect_insert(conn, ingest_workers)
    row = {
        "worker_id": worker_id,
        "consumer_id": consumer_id,
        "group_name": group,
        "started_at": started_at,
        "last_at": now,
        "stats": dict(stats),
    }
    conn.execute(
        stmt.on_conflict_do_update(
            index_elements=[ingest_workers.c.worker_id],
            set_={name: stmt.excluded[name] for name in row if name != "worker_id"},
        ),
        row,
    )


def workers(conn: Connection) -> list[dict[str, Any]]:
    """Every worker's last report, ordered by worker id."""
    rows = conn.execute(sa.select(ingest_workers).order_by(ingest_workers.c.worker_id)).mappings().all()
    out = []
    for row in rows:
        stats = row["stats"]
        item = {key: value for key, value in row.items() if key != "group_name"}
        # "group", as the ingest's live row names it (Ingest.worker_row): the page and /metrics read both alike.
        item.update(group=row["group_name"], stats=json.loads(stats) if isinstance(stats, str) else dict(stats))
        out.append(item)
    return out


def raw_history(conn: Connection, site: str, device_id: str, since: float) -> list[dict[str, Any]]:
    """A device's raw heartbeats since ``since`` (oldest first): ``at`` and the numeric fields."""
    cols = [health_history.c.at, *(health_history.c[name] for name in HEALTH_FIELDS)]
    query = (
        sa.select(*cols)
        .where(health_history.c.site == site, health_history.c.device_id == device_id, health_history.c.at >= since)
        .order_by(health_history.c.at, health_history.c.id)
    )
    return [dict(row) for row in conn.execute(query).mappings()]


def _aggregate(where: Any) -> Any:
    """Hourly rows (``health_hourly``'s columns) aggregated from the raw rows matching ``where``."""
    h = health_history
    ranked = (
        sa.select(
            h,
            sa.func.row_number()
            .over(partition_by=(h.c.site, h.c.device_id, h.c.hour), order_by=(h.c.at.desc(), h.c.id.desc()))
            .label("rn"),
        )
        .where(where)
        .subquery("ranked")
    )
    aggs: list[Any] = []
    for name in HEALTH_FIELDS:
        col = ranked.c[name]
        aggs += [
            sa.func.min(col).label(f"{name}_min"),
            sa.func.max(col).label(f"{name}_max"),
            sa.func.max(sa.case((ranked.c.rn == 1, col))).label(f"{name}_last"),
        ]
    group = (ranked.c.site, ranked.c.device_id, ranked.c.hour)
    return sa.select(*group, sa.func.count().label("n"), *aggs).group_by(*group)


def hourly_history(conn: Connection, site: str, device_id: str, since: float) -> list[dict[str, Any]]:
    """A device's hourly rows from the hour holding ``since`` on, oldest first; hours not downsampled yet (the
    current one) are aggregated from the raw rows on the fly."""
    first_hour = int(since // _HOUR) * _HOUR
    hh = health_hourly
    mine = (hh.c.site == site) & (hh.c.device_id == device_id)
    query = sa.select(hh).where(mine, hh.c.hour >= first_hour).order_by(hh.c.hour)
    stored = [dict(r) for r in conn.execute(query).mappings()]
    last = conn.execute(sa.select(sa.func.max(hh.c.hour)).where(mine)).scalar()
    live_from = max(first_hour, -1 if last is None else int(last) + _HOUR)
    h = health_history
    live = _aggregate((h.c.site == site) & (h.c.device_id == device_id) & (h.c.at >= live_from))
    fresh = [dict(r) for r in conn.execute(live.order_by(live.selected_columns.hour)).mappings()]
    return stored + fresh


def maintain(conn: Connection, now: float, retention_s: float) -> None:
    """One maintenance pass inside the caller's transaction: downsample finished hours, then age rows out.

    Args:
        conn: the store's connection, in the batch's transaction.
        now: dashboard clock.
        retention_s: raw heartbeats older than this are deleted (once their hour is downsampled).
    """
    if conn.dialect.name == "postgresql":
        got = conn.execute(sa.select(sa.func.pg_try_advisory_xact_lock(_LOCK_KEY))).scalar()
        if not got:
            return  # another worker does it now
    h, hh = health_history, health_hourly
    done_through = conn.execute(sa.select(sa.func.max(hh.c.hour))).scalar()
    after = -math.inf if done_through is None else float(done_through + _HOUR)
    # The first raw row not downsampled yet (read from the index on ``at``): hours without heartbeats are skipped.
    first_at = conn.execute(sa.select(sa.func.min(h.c.at)).where(h.c.at >= after)).scalar()
    end = int((now - SETTLE_S) // _HOUR) * _HOUR  # hours before this one have ended (and settled)
    if first_at is not None:
        start = int(first_at // _HOUR) * _HOUR
        stop = min(end, start + HOURS_PER_PASS * _HOUR)
        if stop > start:
            rows = _aggregate((h.c.at >= start) & (h.c.at < stop))
            conn.execute(sa.insert(hh).from_select([c.name for c in rows.selected_columns], rows))
            done_through = conn.execute(sa.select(sa.func.max(hh.c.hour))).scalar()
    if done_through is not None:
        cutoff = min(now - retention_s, float(done_through + _HOUR))  # only what is downsampled
        for _ in range(DELETE_BATCHES):
            batch = sa.select(h.c.id).where(h.c.at < cutoff).order_by(h.c.id).limit(DELETE_BATCH)
            deleted = conn.execute(sa.delete(h).where(h.c.id.in_(batch.scalar_subquery())).returning(h.c.id)).all()
            if len(deleted) < DELETE_BATCH:
                break
    oldest = int((now - HOURLY_KEPT_S) // _HOUR) * _HOUR
    conn.execute(sa.delete(hh).where(hh.c.hour < oldest))
