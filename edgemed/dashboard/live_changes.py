"""What changed in the dashboard database since a cursor: new results and study decisions, devices heard from,
reviews acknowledged or closed, limited to some sites (the live stream's source, ``web/live.py``).

A ``ChangeFeed`` keeps one connection's cursors. Their times are the database's own (``received_at``,
``last_seen``... stamped by whichever process stored the row), never this process's clock, so a web process on
another host sees the same order.

Results and study decisions are read past a keyset cursor ``(received_at, result_id)``: a batch stamps all its
rows with one time, so a time alone would skip the rest of a batch bigger than one poll. A transaction stamps its
rows when it starts and commits a little later, so with several ingest workers a row can become visible with a
time just below the cursor: each poll also counts the rows of the last ``LAG_S`` seconds below the cursor, and
only when there are more than it reported does it read them to report the late ones (in a flood of more than
``WINDOW_ROWS`` rows within ``LAG_S`` late rows are not looked for: the flood's own events refresh the page).
Devices (a few hundred rows) and reviews (a person's clicks) are simply read over the last ``LAG_S`` seconds and
compared with what was reported. Only small facts leave here (ids, site, level, state), never a payload.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import Connection

from edgemed.dashboard.tables import devices, results, reviews, studies

if TYPE_CHECKING:
    from edgemed.dashboard.store import DashboardStore

__all__ = ["LAG_S", "PER_POLL", "Change", "ChangeFeed"]

#: How far behind its cursor a poll looks for rows that committed late.
LAG_S = 5.0
#: Most new rows of each kind one poll reports (a flood is reported over the following polls).
PER_POLL = 200
#: Most rows a poll reads to find late ones, or to compare devices and reviews with what it reported.
WINDOW_ROWS = 2000
_START = -1e18  # before any time a row can carry (the cursor of an empty table)


@dataclass(frozen=True)
class Change:
    """One thing that changed: ``event`` is ``result``, ``device`` or ``review``; ``data`` its small JSON."""

    event: str
    data: dict[str, Any]


def _sites(column: Any, sites: Collection[str] | None) -> Any:
    if sites is None:
        return sa.true()
    return column.in_(sorted(sites)) if sites else sa.false()


@dataclass
class _Keyset:
    """The cursor of one results-like table, and what it reported within ``LAG_S`` below it."""

    at: float = _START
    rid: str = ""
    seen: dict[str, float] = field(default_factory=dict)


@dataclass
class ChangeFeed:
    """The changes one reader may see, since its last poll.

    Attributes:
        sites: the sites the reader may see (None: every site).
    """

    sites: Collection[str] | None
    _keysets: dict[str, _Keyset] = field(default_factory=dict)
    _window: dict[str, dict[Any, float]] = field(default_factory=dict)
    _window_at: dict[str, float] = field(default_factory=dict)

    def start(self, store: DashboardStore) -> None:
        """Set the cursors to what is stored now: the feed reports what is stored after.

        Raises:
            sqlite3.Error, psycopg.Error: the database could not be read.
        """
        with store._read() as conn:
            for name, table in (("results", results), ("studies", studies)):
                newest = conn.execute(sa.select(sa.func.max(table.c.received_at))).scalar()
                keyset = _Keyset()
                if newest is not None:
                    keyset.at = float(newest)
                    last = sa.select(sa.func.max(table.c.result_id)).where(table.c.received_at == newest)
                    keyset.rid = str(conn.execute(last).scalar())
                    rows = conn.execute(self._late_query(table, keyset, sa.true())).all()
                    keyset.seen = {row[0]: float(row[4]) for row in rows}
                self._keysets[name] = keyset
            for name, (query, key_of, _) in self._windowed().items():
                newest = conn.execute(sa.select(sa.func.max(list(query.selected_columns)[-1]))).scalar()
                self._window_at[name] = _START if newest is None else float(newest)
                rows = conn.execute(self._in_window(name, query)).all()
                self._window[name] = {key_of(row): float(row[-1]) for row in rows}

    def poll(self, store: DashboardStore) -> list[Change]:
        """What was stored since the previous poll (or ``start``) that the reader may see, oldest first per kind.

        Raises:
            sqlite3.Error, psycopg.Error: the database could not be read.
        """
        if not self._keysets:
            self.start(store)
        out: list[Change] = []
        with store._read() as conn:
            for name, table in (("results", results), ("studies", studies)):
                out += self._poll_keyset(conn, name, table)
            for name, (query, key_of, make) in self._windowed().items():
                out += self._poll_window(conn, name, query, key_of, make)
        return out

    # -- results and study decisions: a keyset cursor --------------------------------------------------------------

    def _columns(self, table: sa.Table) -> tuple[Any, ...]:
        return (table.c.result_id, table.c.site, table.c.device_id, table.c.level, table.c.received_at)

    def _late_query(self, table: sa.Table, keyset: _Keyset, where: Any) -> Any:
        lower = table.c.received_at >= keyset.at - LAG_S
        return (
            sa.select(*self._columns(table))
            .where(lower, table.c.received_at <= keyset.at, where, _sites(table.c.site, self.sites))
            .limit(WINDOW_ROWS)
        )

    def _poll_keyset(self, conn: Connection, name: str, table: sa.Table) -> list[Change]:
        keyset = self._keysets[name]
        kind = "frame" if name == "results" else "study"
        key = sa.tuple_(table.c.received_at, table.c.result_id)
        cursor = sa.tuple_(sa.literal(keyset.at, sa.Float), sa.literal(keyset.rid, sa.Text))
        fresh = conn.execute(
            sa.select(*self._columns(table))
            .where(key > cursor, _sites(table.c.site, self.sites))
            .order_by(table.c.received_at, table.c.result_id)
            .limit(PER_POLL)
        ).all()
        late: list[Any] = []
        below = key <= cursor
        counted = conn.execute(
            sa.select(sa.func.count()).select_from(self._late_query(table, keyset, below).subquery())
        ).scalar()
        if int(counted or 0) > len(keyset.seen):
            late = [r for r in conn.execute(self._late_query(table, keyset, below)).all() if r[0] not in keyset.seen]
        out = []
        for row in [*late, *fresh]:
            keyset.seen[row[0]] = float(row[4])
            data = {"kind": kind, "result_id": row[0], "site": row[1], "device_id": row[2], "level": row[3]}
            out.append(Change("result", data))
        if fresh:
            keyset.at, keyset.rid = float(fresh[-1][4]), fresh[-1][0]
        keyset.seen = {rid: at for rid, at in keyset.seen.items() if at >= keyset.at - LAG_S}
        return out

    # -- devices and reviews: the last few seconds, compared ------------------------------------------------------

    def _windowed(self) -> dict[str, tuple[Any, Any, Any]]:
        d, r = devices, reviews
        return {
            "devices": (
                sa.select(d.c.site, d.c.device_id, d.c.last_seen).where(_sites(d.c.site, self.sites)),
                lambda row: (row[0], row[1], float(row[2])),
                lambda row: Change("device", {"site": row[0], "device_id": row[1]}),
            ),
            "acked": (
                sa.select(r.c.result_id, r.c.site, r.c.state, r.c.acked_at).where(_sites(r.c.site, self.sites)),
                lambda row: row[0],
                lambda row: Change("review", {"result_id": row[0], "site": row[1], "state": "acknowledged"}),
            ),
            "closed": (
                sa.select(r.c.result_id, r.c.site, r.c.state, r.c.closed_at).where(_sites(r.c.site, self.sites)),
                lambda row: row[0],
                lambda row: Change("review", {"result_id": row[0], "site": row[1], "state": "closed"}),
            ),
        }

    def _in_window(self, name: str, query: Any) -> Any:
        column = list(query.selected_columns)[-1]
        return query.where(column >= self._window_at[name] - LAG_S).order_by(column).limit(WINDOW_ROWS)

    def _poll_window(self, conn: Connection, name: str, query: Any, key_of: Any, make: Any) -> list[Change]:
        seen = self._window[name]
        out = []
        for row in conn.execute(self._in_window(name, query)).all():
            key = key_of(row)
            if key in seen:
                continue
            seen[key] = float(row[-1])
            self._window_at[name] = max(self._window_at[name], float(row[-1]))
            out.append(make(row))
        floor = self._window_at[name] - LAG_S
        self._window[name] = {k: at for k, at in seen.items() if at >= floor}
        return out
