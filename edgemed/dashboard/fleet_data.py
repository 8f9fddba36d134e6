"""The reads behind the fleet view, the charts and the drift view, limited to the sites a user may see.

Every function takes ``sites``: the sites the reader may see, or None for every site (an admin, a user not
limited). An empty set reads nothing. The charts and the drift view read ``result_hourly`` (a few rows per site,
hour, model, level and label, kept by the ingest in the commit that stores the results: ``rollup.py``), never the
results themselves, so they cost the same with a million results as with a hundred. The per-device series read
the heartbeat history through the store's own methods (raw heartbeats for a short span, hourly rows beyond).

Values from ``devices.status`` and ``devices.health`` are the device's: each is read defensively (a wrong type
is None), as ``queries.device_row`` does for the fleet table.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from edgemed.dashboard.queries import as_number, as_text, device_row
from edgemed.dashboard.rollup import hour_of
from edgemed.dashboard.tables import devices, result_hourly

if TYPE_CHECKING:
    from edgemed.dashboard.store import DashboardStore

__all__ = [
    "RAW_SPAN_S",
    "SERIES_FIELDS",
    "Sites",
    "class_mix_rows",
    "device_references",
    "device_series",
    "fleet_devices",
    "hourly_levels",
]

#: Spans up to this long are drawn from raw heartbeats; longer ones from the hourly rows (kept a year).
RAW_SPAN_S = 48 * 3600.0
#: Most points one series carries to a chart (a day of 30 s heartbeats is 2,880): thinned by bucket.
MAX_POINTS = 480
#: Fields drawn per device, and which hourly aggregate stands for an hour: the worst value of the hour (the
#: lowest frame rate, the highest latency, CPU and backlog), since a bad minute is what a chart must not hide.
SERIES_FIELDS: dict[str, str] = {"fps": "min", "p95_ms": "max", "cpu_percent": "max", "pending": "max"}

Sites = Collection[str] | None


def _site_filter(column: Any, sites: Sites) -> Any:
    if sites is None:
        return sa.true()
    return column.in_(sorted(sites)) if sites else sa.false()


def _status_fields(status: dict[str, Any]) -> dict[str, Any]:
    reference = status.get("reference")
    return {
        "model_version": as_text(status.get("model_version")),
        "model_sha256": as_text(status.get("model_sha256")),
        "edgemed": as_text(status.get("edgemed")),
        "reference": reference if isinstance(reference, dict) else None,
    }


def _loads(text: str | None) -> dict[str, Any]:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except ValueError:  # not written by this dashboard: the device is listed without it
        return {}
    return value if isinstance(value, dict) else {}


def fleet_devices(
    store: DashboardStore,
    sites: Sites,
    *,
    now: float | None = None,
    silent_after_s: float = 120.0,
    expire_after_s: float | None = None,
    device: tuple[str, str] | None = None,
    limit: int = 1000,
) -> list[dict[str, Any]]:
    """One row per device the reader may see: what ``StoreQueries.fleet`` lists, plus what runs there.

    Args:
        store: the dashboard's store.
        sites: the sites the reader may see (None: every site).
        now: dashboard clock; now when None.
        silent_after_s: an online device not heard from for this long is ``silent``.
        expire_after_s: leave out devices not heard from for this long (None: list every device).
        device: only this ``(site, device_id)``.
        limit: most rows.

    Returns:
        The fleet rows (``queries.device_row``) with ``rejected``, ``lost``, ``model_version``, ``model_sha256``,
        ``edgemed`` and ``reference`` (the status's drift reference object, unchecked; None without one), sorted
        by site and device.
    """
    t = time.time() if now is None else now
    since = t - expire_after_s if expire_after_s is not None else -math.inf
    where = [_site_filter(devices.c.site, sites), devices.c.last_seen >= since]
    if device is not None:
        where += [devices.c.site == device[0], devices.c.device_id == device[1]]
    query = sa.select(devices).where(*where).order_by(devices.c.site, devices.c.device_id).limit(limit)
    with store._read() as conn:
        rows = conn.execute(query).mappings().all()
    unsettled = store._unstored_counts() if rows else {}
    out = []
    for row in rows:
        item = device_row(row, t, silent_after_s)  # a mapping row reads like sqlite3.Row
        item["rejected"], item["lost"] = unsettled.get((row["site"], row["device_id"]), (0, 0))
        item.update(_status_fields(_loads(row["status"])))
        out.append(item)
    return out


def device_references(store: DashboardStore, sites: Sites) -> list[dict[str, Any]]:
    """Each device's model and drift reference from its latest status, newest status first.

    Returns:
        Dicts with ``site, device_id, model, model_version, reference, status_at`` (``reference`` the object the
        device sent, unchecked, or None).
    """
    query = (
        sa.select(devices.c.site, devices.c.device_id, devices.c.status, devices.c.status_at)
        .where(_site_filter(devices.c.site, sites), devices.c.status.is_not(None))
        .order_by(devices.c.status_at.desc().nulls_last(), devices.c.site, devices.c.device_id)
    )
    with store._read() as conn:
        rows = conn.execute(query).all()
    out = []
    for site, device_id, status_text, status_at in rows:
        status = _loads(status_text)
        fields = _status_fields(status)
        out.append(
            {
                "site": site,
                "device_id": device_id,
                "model": as_text(status.get("model")),
                "model_version": fields["model_version"],
                "reference": fields["reference"],
                "status_at": status_at,
            }
        )
    return out


def class_mix_rows(store: DashboardStore, sites: Sites, since: float) -> list[dict[str, Any]]:
    """Results per site, model and top label from the hour holding ``since`` on (from ``result_hourly``).

    Returns:
        Dicts with ``site, model, label, n, confidence_sum`` (``model`` and ``label`` are ``''`` where the result
        had none), sorted by site, model and label.
    """
    rh = result_hourly
    group = (rh.c.site, rh.c.model, rh.c.label)
    query = (
        sa.select(*group, sa.func.sum(rh.c.n).label("n"), sa.func.sum(rh.c.confidence_sum).label("confidence_sum"))
        .where(_site_filter(rh.c.site, sites), rh.c.hour >= hour_of(since))
        .group_by(*group)
        .order_by(*group)
    )
    with store._read() as conn:
        rows = conn.execute(query).all()
    return [
        {"site": s, "model": m, "label": lb, "n": int(n), "confidence_sum": float(c or 0.0)} for s, m, lb, n, c in rows
    ]


def hourly_levels(store: DashboardStore, sites: Sites, since: float) -> list[dict[str, Any]]:
    """Results per site, hour and triage level from the hour holding ``since`` on (from ``result_hourly``).

    Returns:
        Dicts with ``site, hour, level, n``, sorted by site, hour and level.
    """
    rh = result_hourly
    group = (rh.c.site, rh.c.hour, rh.c.level)
    query = (
        sa.select(*group, sa.func.sum(rh.c.n).label("n"))
        .where(_site_filter(rh.c.site, sites), rh.c.hour >= hour_of(since))
        .group_by(*group)
        .order_by(*group)
    )
    with store._read() as conn:
        rows = conn.execute(query).all()
    return [{"site": s, "hour": int(h), "level": lv, "n": int(n)} for s, h, lv, n in rows]


def _thin(points: Sequence[tuple[float, float]], worst: str) -> list[tuple[float, float]]:
    """At most ``MAX_POINTS`` points: consecutive points share a bucket, which keeps its worst value."""
    if len(points) <= MAX_POINTS:
        return list(points)
    size = math.ceil(len(points) / MAX_POINTS)
    pick = min if worst == "min" else max
    out = []
    for i in range(0, len(points), size):
        bucket = points[i : i + size]
        out.append((bucket[-1][0], pick(v for _, v in bucket)))
    return out


def device_series(
    store: DashboardStore, site: str, device_id: str, *, span_s: float, now: float | None = None
) -> dict[str, list[tuple[float, float]]]:
    """A device's frame rate, latency p95, CPU and backlog over the last ``span_s`` seconds.

    Up to ``RAW_SPAN_S`` from the raw heartbeats, longer from the hourly rows (each hour's worst value, see
    ``SERIES_FIELDS``). The caller checks that the reader may see ``site``.

    Args:
        store: the dashboard's store.
        site: the device's site.
        device_id: the device.
        span_s: how far back (seconds).
        now: dashboard clock; now when None.

    Returns:
        ``{field: [(time, value), ...]}`` for each of ``SERIES_FIELDS``, oldest first, heartbeats without the
        figure left out, at most ``MAX_POINTS`` points each.
    """
    t = time.time() if now is None else now
    since = t - span_s
    series: dict[str, list[tuple[float, float]]] = {name: [] for name in SERIES_FIELDS}
    if span_s <= RAW_SPAN_S:
        for beat in store.health_history(site, device_id, since):
            for name in SERIES_FIELDS:
                value = as_number(beat.get(name))
                if value is not None:
                    series[name].append((float(beat["at"]), float(value)))
    else:
        for hour in store.health_hourly(site, device_id, since):
            for name, agg in SERIES_FIELDS.items():
                value = as_number(hour.get(f"{name}_{agg}"))
                if value is not None:
                    series[name].append((float(hour["hour"]), float(value)))
    return {name: _thin(points, SERIES_FIELDS[name]) for name, points in series.items()}
