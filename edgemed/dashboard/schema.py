"""The dashboard database's schema: created private (0600) on SQLite, upgraded to the newest revision at open.

The tables are in ``tables.py``; the Alembic migrations in ``migrations/`` create and upgrade them on either
engine. ``migrate`` runs at every open of a store, under a lock, so that several processes starting at once
(ingest workers, the web process) upgrade a database once: PostgreSQL's ``pg_advisory_xact_lock``, SQLite's
``BEGIN IMMEDIATE`` (the write lock, for the whole upgrade; SQLite's DDL is transactional, so an upgrade
interrupted half way leaves the database as it was). A database made before Alembic (an SQLite file of an older
dashboard, with no ``alembic_version`` table) is recognised by its tables and ``PRAGMA user_version`` (1 from
the receipts upgrade, 0 before it), stamped at the revision it matches and upgraded in place, every row kept.

The database holds every result the fleet sent and the raw bytes of every refused payload, so an SQLite file is
created 0600 from the start, in a folder created 0700 when it is missing (``edgemed.datadir``'s helpers, which the
device uses for its outbox). SQLite gives its ``-wal`` and ``-shm`` files the mode of the database file, so
creating that one private covers them; files left open to others by an older dashboard are made private when it
opens them, with one warning line each (a backup job that relied on reading them needs to run as this user
instead).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa

from edgemed.datadir import DIR_MODE, private_file, tighten
from edgemed.errors import ConfigError

if TYPE_CHECKING:
    from alembic.config import Config
    from sqlalchemy import Connection

log = logging.getLogger(__name__)

#: ``PRAGMA user_version`` of an SQLite database whose ``settled`` table holds what its results, studies and dead
#: letters settle (written by the receipts upgrade: revision 0002).
SETTLED_VERSION = 1
#: The revision an SQLite database made before Alembic matches: by its ``user_version``.
_LEGACY_REVISION = {0: "0001", SETTLED_VERSION: "0002"}
HEAD = "0004"
_LOCK_KEY = 0x6564676D65640001  # "edgmed" + 1: the schema upgrade (2 is the heartbeat maintenance)
_MIGRATIONS = Path(__file__).resolve().parent / "migrations"

#: What an even older dashboard's database lacks for revision 0001, added in place: (table, column, SQL that
#: fills it for old rows).
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


def _alembic(conn: Connection) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    cfg.attributes["connection"] = conn
    return cfg


def _add_missing_columns(conn: Connection, tables: set[str]) -> None:
    """Add (and fill) the columns revision 0001 has and an even older SQLite database lacks (checked at every open,
    as the dashboard always did: cheap, and a file someone altered by hand is repaired the same way)."""
    for table, column, fill in _ADDED_COLUMNS:
        if table in tables and column not in {c["name"] for c in sa.inspect(conn).get_columns(table)}:
            conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {column} TEXT")
            if fill is not None:
                conn.exec_driver_sql(fill)
    if "dead_letters" in tables:
        conn.exec_driver_sql("CREATE INDEX IF NOT EXISTS dead_letters_sha256 ON dead_letters(payload_sha256)")


def _legacy_revision(conn: Connection, tables: set[str]) -> str | None:
    """The revision an SQLite database made before Alembic matches, or None when it is not one (new, or managed
    by Alembic already): ``PRAGMA user_version`` 1 (receipts) or 0 (before them)."""
    if "alembic_version" in tables or "results" not in tables:
        return None
    version = int(conn.exec_driver_sql("PRAGMA user_version").scalar() or 0)
    return _LEGACY_REVISION[min(version, SETTLED_VERSION)]


def migrate(conn: Connection) -> None:
    """Bring the database to the newest revision (a no-op when it is there), under the upgrade lock.

    Args:
        conn: a connection of the store, not in a transaction; on SQLite it is the store's own (the upgrade runs
            in one ``BEGIN IMMEDIATE`` transaction on it).

    Raises:
        ConfigError: the database is at a revision this version does not know (a newer one made it).
        sqlalchemy.exc.SQLAlchemyError: the database cannot be read or written (or another process holds the
            SQLite write lock for longer than the busy timeout).
    """
    from alembic import command
    from alembic.migration import MigrationContext
    from alembic.util import CommandError

    sqlite = conn.dialect.name == "sqlite"
    if sqlite:
        conn.execution_options(edgemed_begin="BEGIN IMMEDIATE")
    try:
        with conn.begin():
            if not sqlite:
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_LOCK_KEY)))
            tables = set(sa.inspect(conn).get_table_names()) if sqlite else set()
            if sqlite:
                _add_missing_columns(conn, tables)
            current = MigrationContext.configure(conn).get_current_revision()
            if current == HEAD:
                return
            cfg = _alembic(conn)
            legacy = _legacy_revision(conn, tables) if sqlite else None
            if legacy is not None:
                log.info("the dashboard database predates schema revisions; recognised as revision %s", legacy)
                command.stamp(cfg, legacy)
            try:
                command.upgrade(cfg, "head")
            except CommandError as exc:
                raise ConfigError(
                    f"the dashboard database is at schema revision {current}, which this edgemed does not know "
                    f"(a newer edgemed made it: {exc}); run that version, or restore a backup"
                ) from exc
    finally:
        if sqlite:
            conn.execution_options(edgemed_begin="BEGIN")
