"""The JSON API's reads, limited to the sites a principal may see (``sites=None``: every site).

The store's own reads (``queries.StoreQueries``) serve the whole fleet; these add ``site IN (...)`` so a user
limited to some sites never gets another site's row, count or total, and paging stays right (filtering a page
after the fact would return short pages and leak totals).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from edgemed.dashboard.queries import _result_row, device_row
from edgemed.dashboard.store import DashboardStore
from edgemed.dashboard.validate import LEVELS
from edgemed.errors import ConfigError

__all__ = ["dead_letters", "device_counts", "fleet", "level_counts", "recent_results", "urgent_waiting"]

Sites = frozenset[str] | None
#: ``urgent_waiting`` counts this many at most; a larger total is reported as TOTAL_CAP + 1 ("more than").
TOTAL_CAP = 1000


def _where(sites: Sites, column: str = "site") -> tuple[str, tuple[Any, ...]]:
    """``AND column IN (?, ...)`` for a site-limited principal ("" for everyone; never true for no site)."""
    if sites is None:
        return "", ()
    if not sites:
        return " AND 1 = 0", ()
    ordered = tuple(sorted(sites))
    return f" AND {column} IN ({', '.join('?' for _ in ordered)})", ordered


def _page(offset: int, limit: int) -> None:
    if not 1 <= limit <= 1000:
        raise ConfigError(f"limit must be between 1 and 1000, not {limit}")


def fleet(
    store: DashboardStore, sites: Sites, now: float, expire_after_s: float | None, *, offset: int, limit: int
) -> list[dict[str, Any]]:
    """``store.fleet`` limited to ``sites``."""
    _page(offset, limit)
    since = now - expire_after_s if expire_after_s is not None else -math.inf
    where, params = _where(sites)
    rows = store._query(
        f"SELECT * FROM devices WHERE last_seen >= ?{where} ORDER BY site, device_id LIMIT ? OFFSET ?",
        (since, *params, limit, offset),
    )
    unsettled = store._unstored_counts()
    out = []
    for row in rows:
        device = device_row(row, now, 120.0)
        device["rejected"], device["lost"] = unsettled.get((row["site"], row["device_id"]), (0, 0))
        out.append(device)
    return out


def device_counts(store: DashboardStore, sites: Sites, now: float, expire_after_s: float | None) -> tuple[int, int]:
    """``store.device_counts`` limited to ``sites``: (listed, hidden as silent for too long)."""
    since = now - expire_after_s if expire_after_s is not None else -math.inf
    where, params = _where(sites)
    total = store._count(f"SELECT count(*) FROM devices WHERE 1 = 1{where}", params)
    listed = store._count(f"SELECT count(*) FROM devices WHERE last_seen >= ?{where}", (since, *params))
    return listed, total - listed


def recent_results(
    store: DashboardStore, sites: Sites, level: str | None, *, limit: int, offset: int
) -> list[dict[str, Any]]:
    """Newest frame results first (optionally of one level), limited to ``sites``, with their acknowledgement.

    Raises:
        ConfigError: an unknown level, or a limit out of range.
    """
    if level is not None and level not in LEVELS:
        raise ConfigError(f"unknown triage level {level!r}; use one of {', '.join(LEVELS)}")
    _page(offset, limit)
    where, params = _where(sites, "r.site")
    level_sql, level_params = (" AND r.level = ?", (level,)) if level else ("", ())
    rows = store._query(
        "SELECT r.*, v.acked_at, v.acked_by FROM results r LEFT JOIN reviews v ON v.result_id = r.result_id "
        f"WHERE 1 = 1{level_sql}{where} ORDER BY r.received_at DESC, r.seq DESC LIMIT ? OFFSET ?",
        (*level_params, *params, limit, offset),
    )
    return [_result_row(r) for r in rows]


def level_counts(store: DashboardStore, sites: Sites) -> dict[str, dict[str, int]]:
    """``store.level_counts`` limited to ``sites``.

    Frame results are counted from ``result_hourly`` (kept in the commit that stores them, equal to a GROUP BY
    over ``results``: ``tests/test_dashboard_rollup.py``): at a million results the GROUP BY itself took 0.4 s.
    """
    where, params = _where(sites)
    out: dict[str, dict[str, int]] = {}
    for table, count in (("result_hourly", "sum(n)"), ("studies", "count(*)")):
        counts = dict.fromkeys(LEVELS, 0)
        sql = f"SELECT level, {count} AS n FROM {table} WHERE 1 = 1{where} GROUP BY level"
        for row in store._query(sql, params):
            counts[row["level"]] = int(row["n"])
        out["results" if table == "result_hourly" else "studies"] = counts
    return out


def _urgent_sql(store: DashboardStore, sites: Sites) -> tuple[str, tuple[Any, ...]]:
    rwhere, rparams = _where(sites, "r.site")
    swhere, sparams = _where(sites, "s.site")
    # Not closed, so in the partial indexes results_waiting/studies_waiting (as queries._urgent_waiting): without
    # the term every urgent result ever stored was read. SQLite uses the index only with its level term repeated.
    sqlite = store.database.dialect == "sqlite"
    waiting = " AND {t}.closed_at IS NULL" + (" AND {t}.level IN ('urgent', 'inconclusive')" if sqlite else "")
    rwhere, swhere = waiting.format(t="r") + rwhere, waiting.format(t="s") + swhere
    sql = (
        "SELECT 'frame' AS kind, r.result_id, r.site, r.device_id, r.seq, r.created_at, r.received_at, "
        "r.reason, coalesce(r.triage_label, r.label) AS label, r.label AS top_label, NULL AS frames "
        "FROM results r LEFT JOIN reviews v ON v.result_id = r.result_id "
        f"WHERE r.level = 'urgent' AND v.result_id IS NULL{rwhere} "
        "UNION ALL "
        "SELECT 'study', s.result_id, s.site, s.device_id, s.seq, s.created_at, s.received_at, "
        "s.reason, s.triage_label, NULL, s.frames FROM studies s LEFT JOIN reviews v ON v.result_id = s.result_id "
        f"WHERE s.level = 'urgent' AND v.result_id IS NULL{swhere}"
    )
    return sql, (*rparams, *sparams)


def urgent_waiting(store: DashboardStore, sites: Sites, limit: int) -> tuple[list[dict[str, Any]], int]:
    """Urgent results and study decisions nobody acknowledged yet, oldest first (a page, and the total, counted up
    to ``TOTAL_CAP + 1``: beyond ``TOTAL_CAP`` it means "more than TOTAL_CAP")."""
    _page(0, limit)
    sql, params = _urgent_sql(store, sites)
    rows = store._query(f"{sql} ORDER BY received_at ASC, seq ASC LIMIT ?", (*params, limit))
    # Counted up to TOTAL_CAP (the API says "at least" beyond it): an exact count read every unreviewed urgent
    # result's row, 190 ms of /api/summary at a million results with 25,000 of them waiting.
    total = store._count(f"SELECT count(*) FROM ({sql} LIMIT ?) AS waiting", (*params, TOTAL_CAP + 1))
    return [dict(r) for r in rows], total


def dead_letters(store: DashboardStore, sites: Sites, limit: int = 50) -> list[dict[str, Any]]:
    """The newest dead letters without their payload, limited to ``sites`` (one with no site: everyone only)."""
    where, params = _where(sites)
    rows = store._query(
        "SELECT id, received_at, substr(topic, 1, 300) AS topic, reason, payload_bytes, site, device_id, seq, "
        f"result_id FROM dead_letters WHERE 1 = 1{where} ORDER BY id DESC LIMIT ?",
        (*params, limit),
    )
    return [dict(r) for r in rows]


def dead_letter_counts(store: DashboardStore, sites: Sites) -> dict[str, int]:
    """Refused payloads by reason: all time for an unrestricted principal, else those still kept for its sites."""
    if sites is None:
        return store.dead_letter_counts()
    where, params = _where(sites)
    rows = store._query(
        f"SELECT reason, count(*) AS n FROM dead_letters WHERE 1 = 1{where} GROUP BY reason ORDER BY n DESC, reason",
        params,
    )
    return {r["reason"]: int(r["n"]) for r in rows}


def visible(sites: Sites, items: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The items whose ``site`` the principal may see."""
    return [i for i in items if sites is None or i.get("site") in sites]
