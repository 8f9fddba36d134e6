"""The review workflow: urgent and inconclusive results wait in a queue per site until a person closes them.

States: ``new`` (no ``reviews`` row) -> ``acknowledged`` (by whom, when) -> ``closed`` (by whom, when, with an
outcome of ``tables.OUTCOMES`` and an optional note). Each change writes its audit row (``acknowledged``,
``closed``) in the SAME transaction as the change, so the trail never misses an action nor records one that did
not happen. Frame results and study decisions are reviewed alike (``kind`` ``frame`` or ``study``).

Sites: a person limited to some sites (``sites``, a set) sees and acts on their results only; a result of another
site is answered as if it did not exist (``ReviewNotFound``), so its id is not even confirmed. ``sites=None`` is
every site.

Speed at a million results. Closing a review also stamps the result's ``closed_at``, which takes it out of the
partial indexes ``results_waiting`` / ``studies_waiting`` (site, level, received_at; only rows not closed). The
queue is read per (table, level, site) from them: an index range in time order that stops after the page and never
steps over the closed ones, which a year of reviewing makes the great majority. The counts are index-only counts
of the same few rows.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from edgemed.dashboard import audit
from edgemed.dashboard.settlement import dialect_insert
from edgemed.dashboard.tables import OUTCOMES, escalations, results, reviews, studies
from edgemed.errors import EdgemedError

if TYPE_CHECKING:
    from sqlalchemy import Connection

    from edgemed.dashboard.secrets import Secrets
    from edgemed.dashboard.store import DashboardStore

__all__ = [
    "MAX_NOTE_CHARS",
    "QUEUE_LEVELS",
    "ReviewConflict",
    "ReviewError",
    "ReviewInvalid",
    "ReviewNotFound",
    "acknowledge",
    "close",
    "item",
    "queue",
    "queue_count",
]

#: The triage levels a person reviews, in the queue's order: every urgent one before any inconclusive one.
QUEUE_LEVELS = ("urgent", "inconclusive")
MAX_NOTE_CHARS = 2000
MAX_PAGE = 1000
_TABLES = (("frame", results), ("study", studies))


class ReviewError(EdgemedError):
    """A review action that cannot be done; ``status`` is the HTTP status the web answers with."""

    status = 400


class ReviewInvalid(ReviewError):
    """A bad outcome or note (400)."""


class ReviewNotFound(ReviewError):
    """No such result, or one of a site the person may not see (404: the same answer for both)."""

    status = 404


class ReviewConflict(ReviewError):
    """The result is not in a state that allows the action: already acknowledged, not acknowledged, closed (409)."""

    status = 409


def _page(limit: int, offset: int) -> None:
    if not 1 <= limit <= MAX_PAGE:
        raise ReviewInvalid(f"limit must be between 1 and {MAX_PAGE}, not {limit}")
    if offset < 0:
        raise ReviewInvalid(f"offset must be 0 or more, not {offset}")


def _site_list(sites: Collection[str] | None) -> list[str] | None:
    return None if sites is None else sorted(sites)


def _still_waiting(table: sa.Table, dialect: str, level: str | None = None) -> list[Any]:
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


def _waiting(kind: str, table: sa.Table, level: str, site: str | None, n: int, dialect: str) -> sa.Subquery:
    """One (table, level, site) slice of the queue: not closed, oldest first, at most ``n`` rows."""
    label = sa.func.coalesce(table.c.triage_label, table.c.label) if kind == "frame" else table.c.triage_label
    confidence = table.c.confidence if kind == "frame" else sa.null()
    where = _still_waiting(table, dialect, level)
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


def _queue_row(row: Any) -> dict[str, Any]:
    out = dict(row._mapping)
    out["state"] = out["state"] or "new"
    out["escalated"] = out.pop("escalated_at") is not None
    return out


def queue(
    store: DashboardStore, sites: Collection[str] | None, *, limit: int = 50, offset: int = 0
) -> list[dict[str, Any]]:
    """The results and study decisions waiting for a person: every urgent one (oldest first), then inconclusive.

    Args:
        store: the dashboard's store.
        sites: the sites the person may see; None for every site.
        limit: most rows returned (1-1000).
        offset: rows to skip (paging).

    Returns:
        Dicts with ``kind`` (``frame``/``study``), ``result_id, site, device_id, level, reason, label, confidence,
        received_at, created_at, state`` (``new``/``acknowledged``), ``acked_by, acked_at, escalated`` (bool).

    Raises:
        ReviewInvalid: limit or offset out of range.
        sqlite3.Error, psycopg.Error: the database could not be read.
    """
    _page(limit, offset)
    wanted = _site_list(sites)
    if wanted == []:
        return []
    n = offset + limit
    with store._read() as conn:
        per_table = {kind: wanted if wanted is not None else _waiting_sites(conn, table) for kind, table in _TABLES}
        # One slice per table, level and site, each an index range that stops after n rows; merged here.
        slices = [
            _waiting(kind, table, level, site, n, conn.dialect.name)
            for level in QUEUE_LEVELS
            for kind, table in _TABLES
            for site in per_table[kind]
        ]
        if not slices:
            return []
        union = sa.union_all(*(sa.select(*s.c) for s in slices)).subquery()
        rank = sa.case((union.c.level == QUEUE_LEVELS[0], 0), else_=1)
        stmt = sa.select(union).order_by(rank, union.c.received_at, union.c.result_id).limit(limit).offset(offset)
        return [_queue_row(row) for row in conn.execute(stmt)]


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


def _sites_filter(column: Any, sites: list[str] | None) -> list[Any]:
    return [] if sites is None else [column.in_(sites)]


def queue_count(store: DashboardStore, sites: Collection[str] | None) -> dict[str, dict[str, int]]:
    """How many results wait per site: ``{site: {"urgent": n, "inconclusive": n, "escalated": n}}``.

    ``escalated`` counts the escalated results nobody has acknowledged yet. A site with nothing waiting is left out.

    Args:
        store: the dashboard's store.
        sites: the sites the person may see; None for every site.

    Raises:
        sqlite3.Error, psycopg.Error: the database could not be read.
    """
    wanted = _site_list(sites)
    if wanted == []:
        return {}
    counts: dict[str, dict[str, int]] = {}

    def add(site: str, key: str, n: int) -> None:
        counts.setdefault(site, {"urgent": 0, "inconclusive": 0, "escalated": 0})[key] += n

    # The waiting rows only (the partial indexes results_waiting, studies_waiting): an index-only count.
    waiting = [
        sa.select(table.c.site, table.c.level, sa.func.count())
        .where(*_still_waiting(table, "any"), *_sites_filter(table.c.site, wanted))
        .group_by(table.c.site, table.c.level)
        for _, table in _TABLES
    ]
    escalated = (
        sa.select(escalations.c.site, sa.func.count())
        .select_from(escalations.outerjoin(reviews, reviews.c.result_id == escalations.c.result_id))
        .where(reviews.c.result_id.is_(None), *_sites_filter(escalations.c.site, wanted))
        .group_by(escalations.c.site)
    )
    with store._read() as conn:
        for stmt in waiting:
            for site, level, n in conn.execute(stmt):
                add(site, level, int(n))
        for site, n in conn.execute(escalated):
            add(site, "escalated", int(n))
    return {site: c for site, c in sorted(counts.items()) if any(c.values())}


def _find(conn: Connection, result_id: str) -> tuple[str, sa.Table, Any] | None:
    for kind, table in _TABLES:
        row = conn.execute(sa.select(table).where(table.c.result_id == result_id)).first()
        if row is not None:
            return kind, table, row
    return None


def _visible_in(conn: Connection, result_id: str, sites: Collection[str] | None) -> tuple[str, sa.Table, Any]:
    found = _find(conn, result_id) if isinstance(result_id, str) and 0 < len(result_id) <= 200 else None
    if found is None or (sites is not None and found[2].site not in sites):
        raise ReviewNotFound(f"no result {result_id[:80]!r} (or not one of your sites)")
    return found


def _visible(conn: Connection, result_id: str, sites: Collection[str] | None) -> tuple[str, Any]:
    kind, _, row = _visible_in(conn, result_id, sites)
    return kind, row


def _review(conn: Connection, result_id: str) -> dict[str, Any] | None:
    row = conn.execute(sa.select(reviews).where(reviews.c.result_id == result_id)).first()
    return None if row is None else dict(row._mapping)


def item(store: DashboardStore, result_id: str, sites: Collection[str] | None) -> dict[str, Any]:
    """One result or study decision with its review and escalation: what the result page shows.

    Args:
        store: the dashboard's store.
        result_id: the id.
        sites: the sites the person may see; None for every site.

    Returns:
        ``{"kind", "row"`` (its stored columns, without the payload), ``"payload"`` (the envelope the device
        published, as text), ``"review"`` (the ``reviews`` row or None), ``"escalation"`` (or None)``}``.

    Raises:
        ReviewNotFound: no such result, or not one of ``sites``.
    """
    with store._read() as conn:
        kind, row = _visible(conn, result_id, sites)
        esc = conn.execute(sa.select(escalations).where(escalations.c.result_id == result_id)).first()
        fields = dict(row._mapping)
        payload = fields.pop("payload")
        return {
            "kind": kind,
            "row": fields,
            "payload": payload,
            "review": _review(conn, result_id),
            "escalation": None if esc is None else dict(esc._mapping),
        }


def acknowledge(
    store: DashboardStore,
    result_id: str,
    actor: str,
    address: str | None,
    secrets: Secrets,
    at: float | None = None,
    *,
    sites: Collection[str] | None = None,
) -> dict[str, Any]:
    """A person takes an urgent or inconclusive result (new -> acknowledged), audited in the same transaction.

    Args:
        store: the dashboard's store.
        result_id: the result's or study decision's id.
        actor: the logged-in user's name.
        address: the client's address (for the audit trail).
        secrets: the audit key's holder.
        at: dashboard clock; now when None.
        sites: the sites the person may act on; None for every site.

    Returns:
        The ``reviews`` row.

    Raises:
        ReviewNotFound: no such result, or not one of ``sites``.
        ReviewConflict: not urgent or inconclusive, or acknowledged before (by whom, when).
        sqlite3.Error, psycopg.Error: the database failed (nothing is kept).
    """
    now = time.time() if at is None else at
    with store._transaction() as conn:
        kind, row = _visible(conn, result_id, sites)
        if row.level not in QUEUE_LEVELS:
            raise ReviewConflict(f"result {result_id} is {row.level}: only urgent and inconclusive ones are reviewed")
        values = {"result_id": result_id, "site": row.site, "state": "acknowledged", "acked_by": actor, "acked_at": now}
        stmt = dialect_insert(conn, reviews).on_conflict_do_nothing(index_elements=[reviews.c.result_id])
        if conn.execute(stmt.returning(reviews.c.result_id), values).first() is None:
            before = _review(conn, result_id) or {}
            raise ReviewConflict(
                f"result {result_id} was already {before.get('state')} by {before.get('acked_by')} "
                f"at {_when(before.get('acked_at'))}"
            )
        audit.append(
            conn,
            secrets.audit_key,
            at=now,
            actor=actor,
            address=address,
            action="acknowledged",
            target=result_id,
            site=row.site,
            detail={"kind": kind, "level": row.level},
        )
        return values


def _when(at: Any) -> str:
    if not isinstance(at, (int, float)):
        return "an unknown time"
    return datetime.fromtimestamp(float(at), timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _check_note(outcome: str, note: str | None) -> str | None:
    if outcome not in OUTCOMES:
        raise ReviewInvalid(f"outcome {str(outcome)[:40]!r} is not one of {', '.join(OUTCOMES)}")
    if note is None:
        return None
    if not isinstance(note, str):
        raise ReviewInvalid("the note must be text")
    note = note.strip()
    if len(note) > MAX_NOTE_CHARS:
        raise ReviewInvalid(f"the note has {len(note)} characters; keep it to {MAX_NOTE_CHARS}")
    if "\x00" in note:
        raise ReviewInvalid("the note holds a NUL character; remove it")
    return note or None


def close(
    store: DashboardStore,
    result_id: str,
    outcome: str,
    note: str | None,
    actor: str,
    address: str | None,
    secrets: Secrets,
    at: float | None = None,
    *,
    sites: Collection[str] | None = None,
) -> dict[str, Any]:
    """Close an acknowledged result with an outcome (acknowledged -> closed), audited in the same transaction.

    Args:
        store: the dashboard's store.
        result_id: the result's or study decision's id.
        outcome: one of ``tables.OUTCOMES``.
        note: optional free text, at most ``MAX_NOTE_CHARS`` characters (kept in the review, not in the audit).
        actor: the logged-in user's name.
        address: the client's address.
        secrets: the audit key's holder.
        at: dashboard clock; now when None.
        sites: the sites the person may act on; None for every site.

    Returns:
        The ``reviews`` row after the change.

    Raises:
        ReviewInvalid: an unknown outcome, or a note too long.
        ReviewNotFound: no such result, or not one of ``sites``.
        ReviewConflict: not acknowledged yet, or closed before.
        sqlite3.Error, psycopg.Error: the database failed (nothing is kept).
    """
    text = _check_note(outcome, note)
    now = time.time() if at is None else at
    with store._transaction() as conn:
        kind, table, row = _visible_in(conn, result_id, sites)
        done = conn.execute(
            sa.update(reviews)
            .where(reviews.c.result_id == result_id, reviews.c.state == "acknowledged")
            .values(state="closed", closed_by=actor, closed_at=now, outcome=outcome, note=text)
            .returning(reviews.c.result_id)
        ).first()
        if done is not None:
            # Leaves the queue's partial index (results_waiting / studies_waiting) in the same transaction.
            conn.execute(sa.update(table).where(table.c.result_id == result_id).values(closed_at=now))
        else:
            before = _review(conn, result_id)
            if before is None:
                raise ReviewConflict(f"result {result_id} is not acknowledged yet: acknowledge it, then close it")
            raise ReviewConflict(
                f"result {result_id} was already closed by {before['closed_by']} at {_when(before['closed_at'])}"
            )
        audit.append(
            conn,
            secrets.audit_key,
            at=now,
            actor=actor,
            address=address,
            action="closed",
            target=result_id,
            site=row.site,
            detail={"kind": kind, "level": row.level, "outcome": outcome, "note_chars": len(text or "")},
        )
        return _review(conn, result_id) or {}
