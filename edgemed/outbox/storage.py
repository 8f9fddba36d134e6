"""The outbox file: opening and creating it, its schema and the in-place upgrades of older files, damage checks.

Schema versions (``meta.schema``):

* 1: ``outbox(row_id, result_id, topic, payload, created_at)``, ``meta``, ``acked`` (``topic``/``payload`` added
  in place when replay came);
* 2: ``outbox`` gains ``seq`` (the envelope's sequence number, NULL for a row without one: a lost announcement)
  and ``sent_at`` (NULL = not yet acknowledged by the broker; set = acknowledged, awaiting the consumer's
  receipt), with an index on ``seq`` for releasing rows by receipt. An older file is upgraded when it is opened:
  its rows' ``seq`` is read from their JSON payloads, and they start unsent.

Nothing here holds state: the functions take a path or a connection, so the outbox and the recovery of a damaged
file (``edgemed.recovery``) open files the same way.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from urllib.parse import quote

from edgemed import ledger, walcheck
from edgemed.datadir import private_file, tighten
from edgemed.errors import OutboxError
from edgemed.recovery import payload_seq

log = logging.getLogger("edgemed.outbox")  # one logger for the package, as when it was one module

SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    row_id INTEGER PRIMARY KEY AUTOINCREMENT,
    result_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    created_at REAL NOT NULL,
    seq INTEGER,
    sent_at REAL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS acked (
    row_id INTEGER PRIMARY KEY,
    result_id TEXT NOT NULL,
    acked_at REAL NOT NULL,
    topic TEXT,
    payload BLOB
);
"""
# Created after the upgrade: on a version 1 file the column does not exist before it.
_INDEX = "CREATE INDEX IF NOT EXISTS outbox_by_seq ON outbox(seq) WHERE seq IS NOT NULL"


def connect(path: Path, synchronous: str) -> sqlite3.Connection:
    """Open (or create) an outbox file, 0600, in WAL mode, with the current schema (upgrading an older one).

    Args:
        path: the SQLite file.
        synchronous: ``FULL`` or ``NORMAL``.

    Raises:
        OutboxError: the file cannot be created, or SQLite refuses WAL mode.
        sqlite3.Error: the file cannot be opened or written.
    """
    try:
        # Created 0600 before SQLite opens it: SQLite gives its -wal and -shm files the same mode.
        private_file(path)
        for suffix in ("-wal", "-shm"):
            tighten(path.with_name(path.name + suffix))
    except OSError as exc:
        raise OutboxError(
            f"cannot create the outbox {path}: {exc.strerror}; free disk space or fix the permissions "
            "of the data directory"
        ) from exc
    # isolation_level=None: the outbox issues BEGIN/COMMIT itself so batching is explicit.
    db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=5.0)
    try:
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise OutboxError(
                f"{path}: SQLite refused WAL mode ({mode}); put the data directory on a local file system"
            )
        db.execute(f"PRAGMA synchronous={synchronous}")
        db.executescript(_SCHEMA + ledger.SCHEMA)
        _upgrade(db, path)
        db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('seq', 0)")
    except BaseException:
        db.close()
        raise
    return db


def _columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {str(r[1]) for r in db.execute(f"PRAGMA table_info({table})")}


def _upgrade(db: sqlite3.Connection, path: Path) -> None:
    """Bring a file of an older schema to the current one, in one transaction."""
    acked, outbox = _columns(db, "acked"), _columns(db, "outbox")
    if {"topic", "payload"} <= acked and {"seq", "sent_at"} <= outbox:
        db.execute(_INDEX)
        db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('schema', ?)", (SCHEMA_VERSION,))
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        for column, kind in (("topic", "TEXT"), ("payload", "BLOB")):
            if column not in acked:  # an outbox written before replay existed
                db.execute(f"ALTER TABLE acked ADD COLUMN {column} {kind}")
        if "seq" not in outbox:  # an outbox written before receipts existed: every row starts unsent
            db.execute("ALTER TABLE outbox ADD COLUMN seq INTEGER")
            db.execute("ALTER TABLE outbox ADD COLUMN sent_at REAL")
            filled = _fill_seq(db)
            log.info("outbox %s upgraded to schema %d (%d rows numbered)", path, SCHEMA_VERSION, filled)
        db.execute(_INDEX)
        db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('schema', ?)", (SCHEMA_VERSION,))
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _fill_seq(db: sqlite3.Connection) -> int:
    # In Python rather than with json_extract: the payload is a BLOB, which SQLite's JSON functions refuse (or, from
    # 3.45, read as binary JSONB), and not every device's SQLite has JSON at all.
    updates = []
    for row_id, payload in db.execute("SELECT row_id, payload FROM outbox"):
        seq = payload_seq(bytes(payload))
        if seq is not None:
            updates.append((seq, int(row_id)))
    db.executemany("UPDATE outbox SET seq = ? WHERE row_id = ?", updates)
    return len(updates)


def damage(path: Path) -> tuple[walcheck.WalDamage | None, str | None]:
    """What is wrong with an existing outbox file, checked before SQLite opens it for writing (which could fold a
    damaged log into the database and delete it): the write-ahead log, then ``PRAGMA quick_check`` on a
    read-only connection.

    Returns:
        The write-ahead log's damage (when that is what is wrong) and a one-line reason; ``(None, None)`` when
        the file is sound.

    Raises:
        OutboxError: the file cannot be opened for a reason other than damage (permissions, locking).
    """
    wal_damage = walcheck.inspect(path.with_name(path.name + "-wal"), path)
    if wal_damage is not None:
        return wal_damage, wal_damage.describe()
    try:
        db = sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True, timeout=5.0)
    except sqlite3.Error as exc:
        raise OutboxError(f"cannot open the outbox {path}: {exc}; check its permissions") from exc
    try:
        check = str(db.execute("PRAGMA quick_check").fetchone()[0])
    except sqlite3.DatabaseError as exc:
        if isinstance(exc, sqlite3.OperationalError) and not looks_corrupt(exc):
            raise OutboxError(
                f"cannot open the outbox {path}: {exc}; check permissions and free disk space in the data directory"
            ) from exc
        check = str(exc)
    finally:
        db.close()
    return None, None if check == "ok" else " ".join(check.split())[:200]


def looks_corrupt(exc: sqlite3.Error) -> bool:
    """True when an SQLite error says the file is damaged (rather than locked or unwritable)."""
    text = str(exc).lower()
    return any(word in text for word in ("malformed", "not a database", "corrupt", "quick_check"))


def continue_after_mark(db: sqlite3.Connection, path: Path, mark: int | None, *, warn: bool) -> None:
    """Never reuse a ``seq``: continue at the mark when the database is behind it.

    The file may be new (the old one deleted or lost) or have lost its last commits without any damage to detect
    (its ``-wal`` deleted, a damaged last transaction read as torn); the results of those commits may have been
    published.

    Args:
        db: the opened outbox.
        path: its file, for the message.
        mark: the ``outbox.seq`` mark (None or 0: nothing to continue after).
        warn: say so when the database is behind (a file that existed and was not recovered lost commits).
    """
    if not mark:
        return
    seq = int(db.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()[0])
    if mark <= seq:
        return
    db.execute("UPDATE meta SET value = ? WHERE key = 'seq'", (mark,))
    if warn:
        # The mark is written after each commit, so a database behind it lost commits it once held.
        log.warning(
            "the outbox %s is behind its seq mark (%d, the mark says %d): its last commits were lost (its "
            "write-ahead log deleted or damaged?); up to %d results may be missing and seq continues at %d, "
            "so no number is used twice",
            path,
            seq,
            mark,
            mark - seq,
            mark,
        )
