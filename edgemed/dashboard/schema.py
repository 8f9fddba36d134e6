"""The dashboard database's file and tables: created private (0600), upgraded in place when older.

The database holds every result the fleet sent and the raw bytes of every refused payload, so it is created
0600 from the start, in a folder created 0700 when it is missing (``edgemed.datadir``'s helpers, which the device
uses for its outbox). SQLite gives its ``-wal`` and ``-shm`` files the mode of the database file, so creating that
one private covers them; files left open to others by an older dashboard are made private when it opens them,
with one warning line each (a backup job that relied on reading them needs to run as this user instead).
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

from edgemed.datadir import DIR_MODE, private_file, tighten

log = logging.getLogger(__name__)

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS results (
    result_id   TEXT PRIMARY KEY,
    site        TEXT NOT NULL,
    device_id   TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    created_at  TEXT NOT NULL,
    clock_synced INTEGER,
    received_at REAL NOT NULL,
    level       TEXT NOT NULL,
    reason      TEXT NOT NULL,
    label       TEXT,
    delegate    TEXT,
    degraded    INTEGER,
    session_id  TEXT,
    payload     TEXT NOT NULL,
    triage_label TEXT
);
CREATE INDEX IF NOT EXISTS results_level ON results(level, received_at);
CREATE INDEX IF NOT EXISTS results_received ON results(received_at);
CREATE TABLE IF NOT EXISTS studies (
    result_id   TEXT PRIMARY KEY,
    site        TEXT NOT NULL,
    device_id   TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    created_at  TEXT NOT NULL,
    received_at REAL NOT NULL,
    level       TEXT NOT NULL,
    reason      TEXT NOT NULL,
    frames      INTEGER,
    first_seq   INTEGER,
    last_seq    INTEGER,
    session_id  TEXT,
    payload     TEXT NOT NULL,
    triage_label TEXT
);
CREATE INDEX IF NOT EXISTS studies_level ON studies(level, received_at);
CREATE TABLE IF NOT EXISTS devices (
    site        TEXT NOT NULL,
    device_id   TEXT NOT NULL,
    last_seen   REAL NOT NULL,
    status      TEXT,
    status_at   REAL,
    health      TEXT,
    health_at   REAL,
    PRIMARY KEY (site, device_id)
);
CREATE INDEX IF NOT EXISTS devices_last_seen ON devices(last_seen);
CREATE TABLE IF NOT EXISTS acks (
    result_id   TEXT PRIMARY KEY,
    acked_at    REAL NOT NULL,
    acked_by    TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letters (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at REAL NOT NULL,
    topic       TEXT NOT NULL,
    reason      TEXT NOT NULL,
    payload     BLOB NOT NULL,
    payload_bytes INTEGER NOT NULL,
    site        TEXT,
    device_id   TEXT,
    seq         INTEGER,
    result_id   TEXT,
    payload_sha256 TEXT,
    stream      TEXT
);
CREATE INDEX IF NOT EXISTS dead_letters_received ON dead_letters(received_at);
CREATE TABLE IF NOT EXISTS dead_letter_counts (
    reason      TEXT PRIMARY KEY,
    n           INTEGER NOT NULL,
    last_at     REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS studies_received ON studies(received_at);
-- Every seq the dashboard has settled for a device's seq stream (see settlement.py): its result or study decision
-- is stored, its payload is a dead letter, or the device announced it lost. Receipts are computed from it.
CREATE TABLE IF NOT EXISTS settled (
    site        TEXT NOT NULL,
    device_id   TEXT NOT NULL,
    stream      TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    how         TEXT NOT NULL CHECK (how IN ('stored', 'rejected', 'lost')),
    PRIMARY KEY (site, device_id, stream, seq)
) WITHOUT ROWID;
-- The page counts what is not stored per device: few rows, so a partial index keeps that cheap.
CREATE INDEX IF NOT EXISTS settled_unstored ON settled(site, device_id, how) WHERE how <> 'stored';
CREATE TABLE IF NOT EXISTS lost_ranges (
    site        TEXT NOT NULL,
    device_id   TEXT NOT NULL,
    stream      TEXT NOT NULL,
    first_seq   INTEGER NOT NULL,
    last_seq    INTEGER NOT NULL,
    reason      TEXT NOT NULL,
    received_at REAL NOT NULL,
    PRIMARY KEY (site, device_id, stream, first_seq, last_seq)
);
-- When the dashboard last settled something of each seq stream: after a (re)connection it sends again the
-- receipts of the recent ones (a broker restarted without persistence has lost the retained receipts).
CREATE TABLE IF NOT EXISTS stream_seen (
    site        TEXT NOT NULL,
    device_id   TEXT NOT NULL,
    stream      TEXT NOT NULL,
    seen_at     REAL NOT NULL,
    PRIMARY KEY (site, device_id, stream)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS stream_seen_at ON stream_seen(seen_at);
-- Per seq stream, a through_seq every seq up to which is settled: a receipt then reads only the rows above it.
CREATE TABLE IF NOT EXISTS stream_progress (
    site        TEXT NOT NULL,
    device_id   TEXT NOT NULL,
    stream      TEXT NOT NULL,
    through_seq INTEGER NOT NULL,
    PRIMARY KEY (site, device_id, stream)
);
"""

#: ``PRAGMA user_version`` of a database whose ``settled`` table holds what its results, studies and dead letters
#: settle (an older database is filled in once, at its first open by this dashboard).
SETTLED_VERSION = 1
# Rows stored by an older dashboard: the seqs their results, studies and dead letters settle. A row without a
# stream (an older device) belongs to stream ''. A dead letter settles only on a results or studies topic.
_FILL_SETTLED = (
    "INSERT OR IGNORE INTO settled SELECT site, device_id, coalesce(json_extract(payload, '$.stream'), ''), seq, "
    "'stored' FROM results WHERE json_valid(payload)",
    "INSERT OR IGNORE INTO settled SELECT site, device_id, coalesce(json_extract(payload, '$.stream'), ''), seq, "
    "'stored' FROM studies WHERE json_valid(payload)",
    "INSERT OR IGNORE INTO settled SELECT site, device_id, coalesce(stream, ''), seq, 'rejected' FROM dead_letters "
    "WHERE seq IS NOT NULL AND site IS NOT NULL AND device_id IS NOT NULL "
    "AND (topic LIKE 'edgemed/%/results' OR topic LIKE 'edgemed/%/studies')",
)

#: What an older dashboard's database lacks, added in place: (table, column, SQL that fills it for old rows).
_ADDED_COLUMNS = (
    # A result without a triage label (from an older device) shows its top prediction as before.
    (
        "results",
        "triage_label",
        "UPDATE results SET triage_label = json_extract(payload, '$.triage.label') "
        "WHERE json_type(payload, '$.triage.label') = 'text'",
    ),
    (
        "studies",
        "triage_label",
        "UPDATE studies SET triage_label = json_extract(payload, '$.triage.label') "
        "WHERE json_type(payload, '$.triage.label') = 'text'",
    ),
    # Old dead letters keep no hash: a retained one the broker sends again is then kept once more, and only once.
    ("dead_letters", "payload_sha256", None),
    # The seq stream a dead letter names, when it was readable (older ones: unknown, stream '').
    ("dead_letters", "stream", None),
)


def open_private(path: Path) -> None:
    """Make sure the database file (and a ``-wal``/``-shm`` beside it) exists and is readable by this user only.

    Args:
        path: the SQLite file.

    Raises:
        OSError: the folder or the file cannot be created.
    """
    if path.is_dir():
        return  # not a database file: opening it fails next, with the reason
    if not path.parent.exists():
        # Only a folder made here is made private: an existing one (the working directory) is the operator's.
        path.parent.mkdir(parents=True, mode=DIR_MODE)
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            mode = file.stat().st_mode & 0o777
        except FileNotFoundError:
            continue
        if mode & 0o077:
            log.warning(
                "the dashboard database file %s was open to other users (mode %04o); making it private (0600): "
                "it holds every result and refused payload",
                file,
                mode,
            )
            tighten(file)
    private_file(path)  # creates it 0600 when missing; SQLite then gives its -wal and -shm the same mode


def upgrade(db: sqlite3.Connection) -> None:
    """Add the columns (and index) a database made by an older dashboard lacks, filling them from its rows.

    A database older than ``SETTLED_VERSION`` also gets its ``settled`` table filled from the results, study
    decisions and dead letters it holds, so that the first receipts after the upgrade already count them.

    Args:
        db: the open database, with ``SCHEMA_SQL`` applied.
    """
    for table, column, fill in _ADDED_COLUMNS:
        columns = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        if column not in columns:
            with db:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} TEXT")
                if fill is not None:
                    db.execute(fill)
    with db:
        db.execute("CREATE INDEX IF NOT EXISTS dead_letters_sha256 ON dead_letters(payload_sha256)")
    if db.execute("PRAGMA user_version").fetchone()[0] < SETTLED_VERSION:
        with db:
            for sql in _FILL_SETTLED:
                db.execute(sql)
            db.execute(f"PRAGMA user_version = {SETTLED_VERSION}")
