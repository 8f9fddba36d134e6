"""The review workflow: urgent and inconclusive results wait in a queue per site until a person closes them.

States: ``new`` (no ``reviews`` row) -> ``acknowledged`` (by whom, when) -> ``closed`` (by whom, when, with an
outcome of ``tables.OUTCOMES`` and an optional note). Each change writes its audit row (``acknowledged``,
``closed``) in the SAME transaction as the change, so the trail never misses an action nor records one that did
not happen. Frame results and study decisions are reviewed alike (``kind`` ``frame`` or ``study``).

Sites: a person limited to some sites (``sites``, a set) sees and acts on their results only; a result of another
site is answered as if it did not exist (``ReviewNotFound``), so its id is not even confirmed. ``sites=None`` is
every site.

The queue's statements, and what makes them fast at a million results, are in ``review_queue.py``.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from edgemed.dashboard import audit, review_queue
from edgemed.dashboard.review_queue import QUEUE_LEVELS, TABLES
from edgemed.dashboard.settlement import dialect_insert
from edgemed.dashboard.tables import OUTCOMES, escalations, reviews
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

MAX_NOTE_CHARS = 2000
MAX_PAGE = 1000


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
    if sites is not None and not sites:
        return []
    with store._read() as conn:
        stmt = review_queue.page_statement(conn, None if sites is None else sorted(sites), limit, offset)
        return [] if stmt is None else [review_queue.queue_row(row) for row in conn.execute(stmt)]


def queue_count(store: DashboardStore, sites: Collection[str] | None) -> dict[str, dict[str, int]]:
    """How many results wait per site: ``{site: {"urgent": n, "inconclusive": n, "escalated": n}}``.

    ``escalated`` counts the escalated results nobody has acknowledged yet. A site with nothing waiting is left out.

    Args:
        store: the dashboard's store.
        sites: the sites the person may see; None for every site.

    Raises:
        sqlite3.Error, psycopg.Error: the database could not be read.
    """
    if sites is not None and not sites:
        return {}
    counts: dict[str, dict[str, int]] = {}
    with store._read() as conn:
        for key, sign, stmt in review_queue.count_statements(None if sites is None else sorted(sites)):
            for site, *level, n in conn.execute(stmt):
                per_site = counts.setdefault(site, {"urgent": 0, "inconclusive": 0, "escalated": 0})
                per_site[level[0] if key == "level" else key] += sign * int(n)
    return {site: c for site, c in sorted(counts.items()) if any(c.values())}


def _find(conn: Connection, result_id: str) -> tuple[str, sa.Table, Any] | None:
    for kind, table in TABLES:
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
