"""Results counted per site, hour, model, triage level and top label (``result_hourly``), in the commit that stores
them.

The charts (triage mix per site over time, results per hour) and the drift view read these rows: a few thousand a
month for a fleet, where the results themselves are millions. Only rows that went in are counted (a duplicate is
not), so the counts equal a ``GROUP BY`` over ``results``; ``tests/test_dashboard_rollup.py`` checks that on both
engines.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection

from edgemed.dashboard.settlement import dialect_insert
from edgemed.dashboard.tables import result_hourly

__all__ = ["count_results", "hour_of"]


def hour_of(at: float) -> int:
    """The start of the hour holding ``at`` (seconds since the epoch)."""
    return int(at // 3600) * 3600


def count_results(conn: Connection, rows: Iterable[dict[str, Any]]) -> None:
    """Add newly stored ``results`` rows (``rows.result_row``) to ``result_hourly``.

    Args:
        conn: in the transaction that inserted the rows.
        rows: the rows that went in (not the duplicates).
    """
    totals: dict[tuple[str, int, str, str, str], list[float]] = {}
    for row in rows:
        key = (row["site"], hour_of(row["received_at"]), row["model"] or "", row["level"], row["label"] or "")
        n_conf = totals.setdefault(key, [0, 0.0])
        n_conf[0] += 1
        n_conf[1] += row["confidence"] or 0.0
    if not totals:
        return
    stmt = dialect_insert(conn, result_hourly)
    stmt = stmt.on_conflict_do_update(
        index_elements=[result_hourly.c[name] for name in ("site", "hour", "model", "level", "label")],
        set_={
            "n": result_hourly.c.n + stmt.excluded.n,
            "confidence_sum": result_hourly.c.confidence_sum + stmt.excluded.confidence_sum,
        },
    )
    # Sorted: two PostgreSQL workers updating the same rows then lock them in one order (no deadlock).
    conn.execute(
        stmt,
        [
            {"site": s, "hour": h, "model": m, "level": lv, "label": lb, "n": int(v[0]), "confidence_sum": v[1]}
            for (s, h, m, lv, lb), v in sorted(totals.items())
        ],
    )
