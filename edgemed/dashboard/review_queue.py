"""The review queue's statements (``review.queue`` and ``review.queue_count`` run them): SQLAlchemy Core, both
engines.

Closing a review stamps the result's ``closed_at`` (``review.close``), which takes it out of the partial indexes
``results_waiting`` / ``studies_waiting`` (site, level, received_at; only rows not closed). The page is read per
(table, level, site) slice from them: an index range in time order that stops after the rows the page needs and
never steps over the closed ones, which a year of reviewing makes the great majority; the slices are merged by
the database (urgent before inconclusive, oldest first). The counts are index-only counts of the same few rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from edgemed.dashboard.tables import escalations, results, reviews, studies

if TYPE_CHECKING:
    from sqlalchemy import Connection

__all__ = ["QUEUE_LEVELS", "TABLES", "count_statements", "page_statement", "queue_row"]

#: The triage levels a person reviews, in the queue's order: every urgent one before any inconclusive one.
QUEUE_LEVELS = ("urgent", "inconclusive")
TABLES = (("frame", results), ("study", studies))


def still_waiting(table: sa.Table, dialect: str, level: str | None = None) -> list[Any]:
    """The terms that select the rows of the ``*_waiting`` partial indexes (of one level when given).

    SQLite uses a partial index only when the query repeats each term of its predicate; PostgreSQL proves
    ``level IN (...)`` from ``level = 'urgent'`` by itself, and with the redundant term it misjudges the rows and
    reads ``results_site_level`` instead (68 ms for a page of a million results, against 1 ms).
    """
    terms: list[Any] = [table.c.closed_at.is_(None)]
    if level is not None:
        terms.append(table.c.level == level)
    if level is None or dialect == "sqlite":
        terms.append(table.c.level.in_(QUEUE_LEVELS))
    return terms


def _slice(kind: str, table: sa.Table, level: str, site: str | None, n: int, dialect: str) -> sa.Subquery:
    """One (table, level, site) slice of the queue: not closed, oldest first, at most ``n`` rows."""
    label = sa.func.coalesce(table.c.triage_label, table.c.label) if kind == "frame" else table.c.triage_label
    confidence = table.c.confidence if kind == "frame" else sa.null()
    where = still_waiting(table, dialect, level)
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


def page_statement(conn: Connection, sites: list[str] | None, limit: int, offset: int) -> sa.Select[Any] | None:
    """The statement of one page of the queue (None: nothing to read).

    Args:
        conn: the connection it will run on (its dialect; without ``sites``, the sites with waiting rows).
        sites: the sites (sorted); None for every site.
        limit: rows of the page.
        offset: rows before it.
    """
    n = offset + limit
    dialect = conn.dialect.name
    per_table = {kind: sites if sites is not None else _waiting_sites(conn, table) for kind, table in TABLES}
    slices = [
        _slice(kind, table, level, site, n, dialect)
        for level in QUEUE_LEVELS
        for kind, table in TABLES
        for site in per_table[kind]
    ]
    if not slices:
        return None
    union = sa.union_all(*(sa.select(*s.c) for s in slices)).subquery()
    rank = sa.case((union.c.level == QUEUE_LEVELS[0], 0), else_=1)
    return sa.select(union).order_by(rank, union.c.received_at, union.c.result_id).limit(limit).offset(offset)


def _waiting_sites(conn: Connection, table: sa.Table) -> list[str]:
    """The sites with waiting rows in ``table``: one index probe per site (a loose scan of ``*_waiting``).

    Without a site the queue would read ``results_level`` in time order and step over every closed result; per
    site it reads the partial index, which holds the waiting ones only.
    """
    where = f"closed_at IS NULL AND level IN ('{QUEUE_LEVELS[0]}', '{QUEUE_LEVELS[1]}')"
    sql = (
        f"WITH RECURSIVE s(site) AS (SELECT min(site) FROM {table.name} WHERE {where} UNION ALL "
        f"SELECT (SELECT min(site) FROM {table.name} WHERE {where} AND site > s.site) FROM s WHERE s.site IS NOT NULL) "
        "SELECT site FROM s WHERE site IS NOT NULL"
    )
    return [str(row[0]) for row in conn.execute(sa.text(sql))]


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

    ``what`` is ``"level"`` for rows ``(site, level, n)`` added to that level's count (sign 1), or
    ``"escalated"`` for rows ``(site, n)``.

    Args:
        sites: the sites (sorted); None for every site.
    """
    # The waiting rows only (the partial indexes results_waiting, studies_waiting): an index-only count.
    waiting = [
        sa.select(table.c.site, table.c.level, sa.func.count())
        .where(*still_waiting(table, "any"), *_sites_filter(table.c.site, sites))
        .group_by(table.c.site, table.c.level)
        for _, table in TABLES
    ]
    escalated = (
        sa.select(escalations.c.site, sa.func.count())
        .select_from(escalations.outerjoin(reviews, reviews.c.result_id == escalations.c.result_id))
        .where(reviews.c.result_id.is_(None), *_sites_filter(escalations.c.site, sites))
        .group_by(escalations.c.site)
    )
    return [*(("level", 1, stmt) for stmt in waiting), ("escalated", 1, escalated)]
