"""The ledger of processed inputs: which files of a source have committed results, and how far.

It lives in the outbox's SQLite file and is written in the same transaction as the results it accounts for (the
outbox's batch commit), so after a crash or a power cut it never claims a frame whose result was lost, and never
misses one that was kept. Two tables:

* ``inputs``: one row per file of a source: its path relative to the source, size, mtime, SHA-256 of its content,
  how many of its frames have a committed result, and how many it holds;
* ``sources``: one row per source (a folder, file or ``watch:`` folder, by absolute path): whether its last pass
  ended (``complete``) or was interrupted.
* ``passes``: one row per source: the rest of what a resumed pass needs, as JSON (``edgemed.resume`` writes and
  reads it): the study still open at its last committed frame, and whether the region of interest has fitted a
  frame. An older outbox file gets this table when it is opened (``CREATE TABLE IF NOT EXISTS``).

What the runtime does with it (``edgemed run``):

* a folder or file whose last run was interrupted resumes after its last committed frame: finished files are
  skipped unopened when their size and mtime are unchanged (a copied or touched file is compared by hash), and a
  half-done multi-frame file resumes inside; frames keep the ``source.index`` they had;
* a source whose last pass completed, ``--loop``, and ``--from-start`` process everything again (new results);
* ``watch:`` reads each file once, across restarts: files that arrived while edgemed was not running are read at
  the next start, and files already done are not read again.

Functions here take the outbox's connection, inside the transaction the outbox holds (see ``Outbox``).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Mapping
from typing import Literal

from edgemed.types import InputDone

SCHEMA = """
CREATE TABLE IF NOT EXISTS inputs (
    id INTEGER PRIMARY KEY,
    source TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT,
    frames_done INTEGER NOT NULL,
    frames_total INTEGER,
    UNIQUE (source, path)
);
CREATE TABLE IF NOT EXISTS sources (
    id INTEGER PRIMARY KEY,
    source TEXT NOT NULL UNIQUE,
    complete INTEGER NOT NULL,
    started_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS passes (
    source TEXT PRIMARY KEY,
    state TEXT NOT NULL
);
"""

SourceState = Literal["new", "interrupted", "complete"]

_UPSERT = (
    "INSERT INTO inputs(source, path, size, mtime_ns, sha256, frames_done, frames_total) "
    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(source, path) DO UPDATE SET size = excluded.size, "
    "mtime_ns = excluded.mtime_ns, sha256 = excluded.sha256, frames_done = excluded.frames_done, "
    "frames_total = excluded.frames_total"
)


def state(db: sqlite3.Connection, source: str) -> SourceState:
    """Whether ``source`` was never seen, was interrupted in its last pass, or completed it.

    Rows in ``inputs`` without one in ``sources`` (a recovery that could read one table and not the other) count
    as an interrupted pass: taken for new, a ``watch:`` folder would mark its present files as seen, and the files
    that arrived while edgemed was down would never be read.
    """
    row = db.execute("SELECT complete FROM sources WHERE source = ?", (source,)).fetchone()
    if row is not None:
        return "complete" if row[0] else "interrupted"
    seen = db.execute("SELECT 1 FROM inputs WHERE source = ? LIMIT 1", (source,)).fetchone()
    return "new" if seen is None else "interrupted"


def inputs(db: sqlite3.Connection, source: str) -> dict[str, InputDone]:
    """The ledger's rows for ``source``, by relative path."""
    rows = db.execute(
        "SELECT path, size, mtime_ns, sha256, frames_done, frames_total FROM inputs WHERE source = ?", (source,)
    )
    return {str(r[0]): InputDone(str(r[0]), int(r[1]), int(r[2]), r[3], int(r[4]), r[5]) for r in rows}


def start(db: sqlite3.Connection, source: str, *, keep: bool) -> None:
    """Mark a pass over ``source`` as started (interrupted until :func:`end` runs); forget its rows unless ``keep``."""
    if not keep:
        db.execute("DELETE FROM inputs WHERE source = ?", (source,))
    db.execute(
        "INSERT INTO sources(source, complete, started_at) VALUES (?, 0, ?) "
        "ON CONFLICT(source) DO UPDATE SET complete = 0, started_at = excluded.started_at",
        (source, time.time()),
    )


def forget(db: sqlite3.Connection, source: str) -> None:
    """Drop everything the ledger knows about ``source`` (a ``--loop`` run leaves nothing to resume from)."""
    db.execute("DELETE FROM inputs WHERE source = ?", (source,))
    db.execute("DELETE FROM sources WHERE source = ?", (source,))


def write(db: sqlite3.Connection, done: Mapping[tuple[str, str], InputDone], ended: Iterable[str]) -> None:
    """Record the inputs whose results are in this transaction, and the sources whose pass ended in it."""
    if done:
        db.executemany(
            _UPSERT,
            [
                (src, d.path, d.size, d.mtime_ns, d.sha256, d.frames_done, d.frames_total)
                for (src, _), d in done.items()
            ],
        )
    for source in ended:
        db.execute("UPDATE sources SET complete = 1 WHERE source = ?", (source,))


def drop(db: sqlite3.Connection, source: str, paths: Iterable[str]) -> None:
    """Forget the rows of files that are gone from the source."""
    db.executemany("DELETE FROM inputs WHERE source = ? AND path = ?", [(source, p) for p in paths])


def pass_state(db: sqlite3.Connection, source: str) -> str | None:
    """The JSON the last committed result of ``source``'s pass left in ``passes``, or None."""
    row = db.execute("SELECT state FROM passes WHERE source = ?", (source,)).fetchone()
    return None if row is None else str(row[0])


def write_pass_states(db: sqlite3.Connection, states: Mapping[str, str | None]) -> None:
    """Record each source's pass state (JSON) with the results in this transaction; None removes it."""
    for source, value in states.items():
        if value is None:
            db.execute("DELETE FROM passes WHERE source = ?", (source,))
        else:
            db.execute(
                "INSERT INTO passes(source, state) VALUES (?, ?) "
                "ON CONFLICT(source) DO UPDATE SET state = excluded.state",
                (source, value),
            )
