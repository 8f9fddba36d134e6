"""Results export for clinical governance: every result and study decision of a period (and sites), with its review.

CSV (a header row, then one row each) or JSON Lines (one object each), oldest first by the dashboard's reception
time. Columns (``COLUMNS``): what the device published that the dashboard keeps as columns (ids, site, device,
times, triage level and reason, labels, model, confidence, delegate) and the review (state, who acknowledged and
closed it, when, outcome, note, when it was escalated). Never the payload: no probabilities, no source details.
Times are ISO 8601 in UTC.

Streamed: rows are read in pages of ``PAGE_ROWS`` (sent in chunks of ``CHUNK_ROWS``) with a keyset
(``received_at``, ``result_id``) per table and site, each page a short read (on SQLite the store's lock is held
for one page only, so the ingest keeps filing during a long export), and merged in time order; a year of a fleet's
results needs the memory of a few pages. At a million stored results on PostgreSQL a day of ~9,500 rows takes
about 0.25 s, mostly in Python (about 25 us a row).

A spreadsheet runs a cell that starts with ``=``, ``+``, ``-`` or ``@`` as a formula: such a CSV cell (a device
controls its reason and labels) is written with a leading ``'``, which spreadsheets show as text.
"""

from __future__ import annotations

import csv
import heapq
import io
import json
import math
from collections.abc import Collection, Iterator
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from edgemed.dashboard.tables import escalations, results, reviews, studies
from edgemed.errors import ConfigError

if TYPE_CHECKING:
    from edgemed.dashboard.store import DashboardStore

__all__ = ["COLUMNS", "FORMATS", "PAGE_ROWS", "count_rows", "export_results", "iso", "parse_time", "rows"]

FORMATS = ("csv", "jsonl")
#: Rows per read (one short query each; at a million results a day's 2,000-row page takes a few ms).
PAGE_ROWS = 2000
#: Rows per chunk sent.
CHUNK_ROWS = 500
COLUMNS = (
    "kind",
    "result_id",
    "site",
    "device_id",
    "seq",
    "created_at",
    "received_at",
    "level",
    "reason",
    "label",
    "top_label",
    "model",
    "confidence",
    "delegate",
    "review_state",
    "acked_by",
    "acked_at",
    "closed_by",
    "closed_at",
    "outcome",
    "note",
    "escalated_at",
)
_TIMES = ("received_at", "acked_at", "closed_at", "escalated_at")
_FORMULA = ("=", "+", "-", "@", "\t", "\r")
# The times an export period may span: each has an ISO 8601 form (Python's years 1 to 9999).
_EARLIEST = datetime(1, 1, 1, tzinfo=timezone.utc).timestamp()
_LATEST = datetime(9999, 12, 31, tzinfo=timezone.utc).timestamp()


def parse_time(text: str, name: str) -> float:
    """Seconds since the epoch of an ISO 8601 date or time (no zone = UTC).

    Args:
        text: e.g. ``2026-11-25`` or ``2026-11-25T10:00:00Z``.
        name: the parameter, for the message.

    Raises:
        ConfigError: not such a time.
    """
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise ConfigError(f"{name} {text[:40]!r} is not a date; write it like 2026-11-25 or 2026-11-25T10:00Z") from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def iso(at: Any) -> str | None:
    """An epoch time as ISO 8601 UTC with milliseconds (``1970-01-01T00:01:40.000Z``); None when not a number."""
    if not isinstance(at, (int, float)) or not math.isfinite(at):
        return None
    return datetime.fromtimestamp(float(at), timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _select(kind: str, table: sa.Table) -> sa.Select[Any]:
    frame = kind == "frame"
    return sa.select(
        sa.literal(kind).label("kind"),
        table.c.result_id,
        table.c.site,
        table.c.device_id,
        table.c.seq,
        table.c.created_at,
        table.c.received_at,
        table.c.level,
        table.c.reason,
        (sa.func.coalesce(table.c.triage_label, table.c.label) if frame else table.c.triage_label).label("label"),
        (table.c.label if frame else sa.null()).label("top_label"),
        (table.c.model if frame else sa.null()).label("model"),
        sa.cast(table.c.confidence if frame else sa.null(), sa.Float).label("confidence"),
        (table.c.delegate if frame else sa.null()).label("delegate"),
        reviews.c.state.label("review_state"),
        reviews.c.acked_by,
        reviews.c.acked_at,
        reviews.c.closed_by,
        reviews.c.closed_at,
        reviews.c.outcome,
        reviews.c.note,
        escalations.c.escalated_at,
    ).select_from(
        table.outerjoin(reviews, reviews.c.result_id == table.c.result_id).outerjoin(
            escalations, escalations.c.result_id == table.c.result_id
        )
    )


def _stream(
    store: DashboardStore, kind: str, table: sa.Table, since: float, until: float, site: str | None
) -> Iterator[dict[str, Any]]:
    """One table's (and site's) rows of the period in (received_at, result_id) order, a page at a time."""
    base = _select(kind, table).where(table.c.received_at >= since, table.c.received_at < until)
    if site is not None:
        base = base.where(table.c.site == site)
    after: tuple[float, str] | None = None
    while True:
        stmt = base
        if after is not None:
            stmt = stmt.where(
                sa.or_(
                    table.c.received_at > after[0],
                    sa.and_(table.c.received_at == after[0], table.c.result_id > after[1]),
                )
            )
        stmt = stmt.order_by(table.c.received_at, table.c.result_id).limit(PAGE_ROWS)
        with store._read() as conn:
            page = [dict(row._mapping) for row in conn.execute(stmt)]
        yield from page
        if len(page) < PAGE_ROWS:
            return
        after = (page[-1]["received_at"], page[-1]["result_id"])


def rows(
    store: DashboardStore, *, since: float, until: float, sites: Collection[str] | None
) -> Iterator[dict[str, Any]]:
    """Every result and study decision received in ``[since, until)`` at ``sites``, oldest first, with its review.

    Args:
        store: the dashboard's store.
        since: start of the period (seconds since the epoch), included.
        until: end of the period, excluded.
        sites: the sites to export; None for every site.

    Yields:
        Dicts with ``COLUMNS`` (times as stored: seconds since the epoch).
    """
    wanted: list[str | None] = [None] if sites is None else list(sorted(sites))
    # One keyset stream per table and site: each reads an index range in order (results_site_recent, or
    # results_recent for every site); merged here by time.
    streams = [
        _stream(store, kind, table, since, until, site)
        for kind, table in (("frame", results), ("study", studies))
        for site in wanted
    ]
    yield from heapq.merge(*streams, key=lambda r: (r["received_at"], r["kind"], r["result_id"]))


def count_rows(store: DashboardStore, *, since: float, until: float, sites: Collection[str] | None) -> int:
    """How many rows ``rows`` yields for the same arguments (for the audit row written before the download)."""
    total = 0
    with store._read() as conn:
        for table in (results, studies):
            where = [table.c.received_at >= since, table.c.received_at < until]
            if sites is not None:
                where.append(table.c.site.in_(sorted(sites)))
            total += int(conn.execute(sa.select(sa.func.count()).select_from(table).where(*where)).scalar() or 0)
    return total


def _cell(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(_FORMULA):
        return "'" + value
    return "" if value is None else value


def _shown(row: dict[str, Any]) -> dict[str, Any]:
    out = {name: row.get(name) for name in COLUMNS}
    for name in _TIMES:
        if out[name] is not None:
            out[name] = iso(out[name])
    out["review_state"] = out["review_state"] or "new"
    confidence = out["confidence"]
    out["confidence"] = confidence if isinstance(confidence, float) and math.isfinite(confidence) else None
    return out


def export_results(
    store: DashboardStore, fmt: str, *, since: float, until: float, sites: Collection[str] | None
) -> Iterator[bytes]:
    """The export as bytes, a page of rows at a time (for a streamed HTTP response).

    Args:
        store: the dashboard's store.
        fmt: ``csv`` or ``jsonl``.
        since: start of the period, included.
        until: end of the period, excluded.
        sites: the sites to export; None for every site.

    Yields:
        UTF-8 chunks: for CSV the header first.

    Raises:
        ConfigError: an unknown format, a period that ends before it starts, or one outside years 1 to 9999.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"format {fmt[:20]!r} is not one of {', '.join(FORMATS)}")
    if not (math.isfinite(since) and math.isfinite(until)) or until <= since:
        raise ConfigError("the period must end after it starts: give since before until")
    if since < _EARLIEST or until > _LATEST:
        # A time outside the calendar has no ISO form for the file name and the audit row (it was a 500).
        raise ConfigError("the period must lie between 0001-01-01 and 9999-12-30 (UTC)")
    return _chunks(store, fmt, since, until, sites)


def _chunks(
    store: DashboardStore, fmt: str, since: float, until: float, sites: Collection[str] | None
) -> Iterator[bytes]:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    if fmt == "csv":
        writer.writerow(COLUMNS)
    for n, row in enumerate(rows(store, since=since, until=until, sites=sites), 1):
        shown = _shown(row)
        if fmt == "csv":
            writer.writerow([_cell(shown[name]) for name in COLUMNS])
        else:
            buffer.write(json.dumps(shown, ensure_ascii=False, allow_nan=False, separators=(",", ":")) + "\n")
        if n % CHUNK_ROWS == 0:
            yield buffer.getvalue().encode("utf-8")
            buffer.seek(0)
            buffer.truncate()
    if buffer.tell():
        yield buffer.getvalue().encode("utf-8")
