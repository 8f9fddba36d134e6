"""The review queue's statements (``review.queue`` and ``review.queue_count`` run them): SQLAlchemy Core, both
engines.

The page is read per (table, level, site) slice: each an index range of ``results_site_level`` /
``studies_site_level`` (site, level, received_at) in time order that stops after the rows the page needs, never a
sort of every waiting result; the slices are merged by the database (urgent before inconclusive, oldest first).
The counts of a fleet come from ``result_hourly`` (totals per site and level, a few thousand rows) minus the
closed reviews, instead of a scan of every urgent and inconclusive result.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from edgemed.dashboard.tables import escalations, result_hourly, results, reviews, studies

__all__ = ["QUEUE_LEVELS", "TABLES", "count_statements", "page_statement", "queue_row"]

#: The triage levels a person reviews, in the queue's order: every urgent one before any inconclusive one.
QUEUE_LEVELS = ("urgent", "inconclusive")
TABLES = (("frame", results), ("study", studies))


def _slice(kind: str, table: sa.Table, level: str, site: str | None, n: int) -> sa.Subquery:
    """One (table, level, site) slice of the queue: not closed, oldest first, at most ``n`` rows."""
    label = sa.func.coalesce(table.c.triage_label, table.c.label) if kind == "frame" else table.c.triage_label
    confidence = table.c.confidence if kind == "frame" else sa.null()
    where = [table.c.level == level, sa.or_(reviews.c.state.is_(None), reviews.c.state != "closed")]
    if site is not None:
        where.append(table.c.site == site)
    stmt = (
        sa.select(
            sa.literal(kind).label("kind"),
            table.c.result_id,
            table.c.site,
            table.c.device_id,
            table.c.level,
            table.c.reason,
            label.label("label"),
            sa.cast(confidence, sa.Float).label("confidence"),
            table.c.received_at,
            table.c.created_at,
            reviews.c.state,
            reviews.c.acked_by,
            reviews.c.acked_at,
            escalations.c.escalated_at,
        )
        .select_from(
            table.outerjoin(reviews, reviews.c.result_id == table.c.result_id).outerjoin(
                escalations, escalations.c.result_id == table.c.result_id
            )
        )
        .where(*where)
        .order_by(table.c.received_at, table.c.result_id)
        .limit(n)
    )
    return stmt.subquery()


def page_statement(sites: list[str] | None, limit: int, offset: int) -> sa.Select[Any] | None:
    """The statement of one page of the queue (None: nothing to read).

    Args:
        sites: the sites (sorted); None for every site.
        limit: rows of the page.
        offset: rows before it.
    """
    n = offset + limit
    slices = [
        _slice(kind, table, level, site, n)
        for level in QUEUE_LEVELS
        for kind, table in TABLES
        for site in (sites if sites is not None else [None])
    ]
    if not slices:
        return None
    union = sa.union_all(*(sa.select(*s.c) for s in slices)).subquery()
    rank = sa.case((union.c.level == QUEUE_LEVELS[0], 0), else_=1)
    return sa.select(union).order_by(rank, union.c.received_at, union.c.result_id).limit(limit).offset(offset)


def queue_row(row: Any) -> dict[str, Any]:
    """A queue row as ``review.queue`` returns it (``state`` ``new`` without a review, ``escalated`` a bool)."""
    out = dict(row._mapping)
    out["state"] = out["state"] or "new"
    out["escalated"] = out.pop("escalated_at") is not None
    return out


def _sites_filter(column: Any, sites: list[str] | None) -> list[Any]:
    return [] if sites is None else [column.in_(sites)]


def count_statements(sites: list[str] | None) -> list[tuple[str, int, sa.Select[Any]]]:
    """The statements of the per-site counts: ``(what, sign, statement)``.

    ``what`` is ``"level"`` for rows ``(site, level, n)`` added (sign 1) or taken off (sign -1) that level's count,
    or ``"escalated"`` for rows ``(site, n)``.

    Args:
        sites: the sites (sorted); None for every site.
    """
    levels = list(QUEUE_LEVELS)
    # Frame results: stored totals (result_hourly is kept in the storing commit) minus the closed ones.
    totals = (
        sa.select(result_hourly.c.site, result_hourly.c.level, sa.func.sum(result_hourly.c.n))
        .where(result_hourly.c.level.in_(levels), *_sites_filter(result_hourly.c.site, sites))
        .group_by(result_hourly.c.site, result_hourly.c.level)
    )
    closed = (
        sa.select(results.c.site, results.c.level, sa.func.count())
        .select_from(reviews.join(results, results.c.result_id == reviews.c.result_id))
        .where(reviews.c.state == "closed", results.c.level.in_(levels), *_sites_filter(reviews.c.site, sites))
        .group_by(results.c.site, results.c.level)
    )
    # Study decisions are few (one per video or series): counted directly.
    open_studies = (
        sa.select(studies.c.site, studies.c.level, sa.func.count())
        .select_from(studies.outerjoin(reviews, reviews.c.result_id == studies.c.result_id))
        .where(
            studies.c.level.in_(levels),
            sa.or_(reviews.c.state.is_(None), reviews.c.state != "closed"),
            *_sites_filter(studies.c.site, sites),
        )
        .group_by(studies.c.site, studies.c.level)
    )
    escalated = (
        sa.select(escalations.c.site, sa.func.count())
        .select_from(escalations.outerjoin(reviews, reviews.c.result_id == escalations.c.result_id))
        .where(reviews.c.result_id.is_(None), *_sites_filter(escalations.c.site, sites))
        .group_by(escalations.c.site)
    )
    return [("level", 1, totals), ("level", -1, closed), ("level", 1, open_studies), ("escalated", 1, escalated)]
