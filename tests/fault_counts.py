"""Counting for the fault harness: what the dashboard's store holds, what the broker delivered, who holds a lock.

Every read of a database is read-only, so counting never takes the write lock of the process it watches.
"""

from __future__ import annotations

import re
import sqlite3
from collections import Counter
from pathlib import Path

DASHBOARD_CLIENT = "edgemed-dashboard"  # the dashboard's default --client-id


def read_only(db: Path) -> sqlite3.Connection:
    # A read-only connection never takes the write lock, so counting cannot slow the writer it watches.
    return sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)


def _tables(con: sqlite3.Connection) -> set[str]:
    return {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def stored_seqs(db: Path) -> dict[str, Counter[int]]:
    """device_id -> how many times each ``seq`` is stored, over the ``results`` and ``studies`` tables."""
    out: dict[str, Counter[int]] = {}
    if not db.exists():
        return out
    with read_only(db) as con:
        names = _tables(con) & {"results", "studies"}
        for table in sorted(names):
            for device_id, seq in con.execute(f"SELECT device_id, seq FROM {table}"):  # the two table names above
                out.setdefault(device_id, Counter())[seq] += 1
    return out


def stored_count(db: Path, device_id: str | None = None) -> int:
    """How many results the store holds (of one device)."""
    if not db.exists():
        return 0
    try:
        with read_only(db) as con:
            if "results" not in _tables(con):
                return 0
            if device_id is None:
                return int(con.execute("SELECT count(*) FROM results").fetchone()[0])
            return int(con.execute("SELECT count(*) FROM results WHERE device_id = ?", (device_id,)).fetchone()[0])
    except sqlite3.OperationalError:  # the file exists but its schema is not written yet
        return 0


def settled_lost(db: Path) -> int:
    """Rows the store settled as lost at a device (``settled.how = 'lost'``; 0 before that table exists)."""
    with read_only(db) as con:
        if "settled" not in _tables(con):
            return 0
        return int(con.execute("SELECT count(*) FROM settled WHERE how = 'lost'").fetchone()[0])


def holds_write_lock(db: Path) -> bool:
    """True while another connection holds the database's write lock (the dashboard is committing)."""
    con = sqlite3.connect(db, timeout=0, isolation_level=None)
    try:
        con.execute("BEGIN IMMEDIATE")
        con.execute("ROLLBACK")
        return False
    except sqlite3.OperationalError as exc:
        if "locked" not in str(exc):
            raise
        return True
    finally:
        con.close()


_SENT = re.compile(r"Sending PUBLISH to (\S+) \(d\d, q\d, r\d, m\d+, 'edgemed/([^/']+)/([^/']+)/(results|studies)'")


def deliveries(log: Path, client_id: str = DASHBOARD_CLIENT) -> Counter[str]:
    """device_id -> results and study decisions the broker sent to ``client_id`` (from its log, every restart)."""
    out: Counter[str] = Counter()
    for m in _SENT.finditer(log.read_text(errors="replace")):
        if m.group(1) == client_id:
            out[m.group(3)] += 1
    return out
