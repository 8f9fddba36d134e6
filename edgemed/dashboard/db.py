"""Which database the dashboard uses (``--db``), and the SQLAlchemy engine for it, with errors in its own terms.

``--db`` takes a file path (SQLite, the embedded default, as before), ``sqlite:///path``, or
``postgresql://user@host:port/dbname`` (psycopg 3; the password from the URL, ``PGPASSWORD`` or ``PGPASSFILE``, as
libpq reads them). The password never reaches a message or a log line: ``Database.display`` masks it.

SQLite. Every connection runs in WAL mode with ``synchronous=FULL`` (the ingest acknowledges a message only after
the commit that holds it, so that commit must survive a power cut) and a busy timeout. Python's ``sqlite3``
module opens transactions on its own, which breaks savepoints, so the driver is put in autocommit mode and the
engine says ``BEGIN`` itself at the start of each transaction (``BEGIN IMMEDIATE`` when a connection asks for it
with the ``edgemed_begin`` execution option: the schema upgrade and the store's write transactions, which must
hold the write lock from the start).

PostgreSQL. Server defaults (``synchronous_commit`` on: a commit is durable when it returns). A pool sized for the
writer thread, the receipt thread and the web threads; connections are checked before use, so a restarted server
costs one failed batch at most (the writer retries it), not a restart of the dashboard.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from edgemed.errors import ConfigError

if TYPE_CHECKING:
    from sqlalchemy import Connection, Engine

__all__ = ["Database", "describe_error", "mask_url", "open_database"]

#: Connections kept open to PostgreSQL per process (the writer, the receipt thread, a few web threads), and how
#: many more a burst of page requests may open for a moment.
PG_POOL_SIZE = 4
PG_MAX_OVERFLOW = 12
#: Longest wait for a connection to PostgreSQL (at open, and for a free one in the pool).
PG_CONNECT_TIMEOUT_S = 10

_URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://")
_COLLAPSED_URL = re.compile(r"^(postgres|postgresql|sqlite)(\+\w+)?:/[^/]")

Dialect = Literal["sqlite", "postgresql"]


def mask_url(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``: for messages and logs.

    Everything before the last ``@`` but the user name is hidden, so a password holding an unencoded ``@``, ``:``
    or ``/`` does not leak its tail.
    """
    scheme, sep, rest = url.partition("://")
    at = rest.rfind("@")
    if not sep or at < 0:
        return url
    userinfo = rest[:at]
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}://{user}{':***' if colon else ''}@{rest[at + 1 :]}"


@dataclass(frozen=True)
class Database:
    """An open database: the engine, which of the two it is, and how to name it in messages (password masked)."""

    engine: Engine
    dialect: Dialect
    display: str
    path: Path | None = None  # the SQLite file, None on PostgreSQL

    def connect(self) -> Connection:
        """A connection from the engine's pool, with errors translated (see ``describe_error``).

        Raises:
            ConfigError: the server cannot be reached, refuses the login, or the database does not exist.
        """
        from sqlalchemy.exc import DBAPIError

        try:
            return self.engine.connect()
        except DBAPIError as exc:
            raise ConfigError(describe_error(self.display, exc)) from None

    def dispose(self) -> None:
        """Close every pooled connection (the store and any receipt thread are done with it)."""
        self.engine.dispose()


def describe_error(display: str, exc: BaseException) -> str:
    """One line for a database that cannot be opened, naming the fix; never the password.

    Args:
        display: the database as ``Database.display`` names it (password masked).
        exc: what the driver raised (SQLAlchemy's wrapper or the driver's own error).

    Returns:
        ``cannot open the dashboard database <db>: <what>; <fix>``.
    """
    orig = getattr(exc, "orig", None) or exc
    text = " ".join(str(orig).split())  # libpq's messages run over several lines
    low = text.lower()
    if "password authentication failed" in low or "no password supplied" in low:
        what = "the server refused the login (wrong user name or password)"
        fix = "check the user in --db and the password (in the URL, PGPASSWORD or PGPASSFILE)"
    elif "does not exist" in low and "database" in low:
        what = "the database does not exist on the server"
        fix = "create it (createdb -O USER NAME) or name an existing one in --db"
    elif "connection refused" in low or "could not connect" in low or "timeout expired" in low or "no route" in low:
        what = "the server cannot be reached"
        fix = "check the host and port in --db and that PostgreSQL is running and listening there"
    elif "could not translate host name" in low or "name or service not known" in low:
        what = "the server's host name is unknown"
        fix = "check the host in --db"
    else:
        what = mask_url(text)[:300]
        fix = "pass --db with a file path or a postgresql://user@host:port/dbname the dashboard can write"
    return f"cannot open the dashboard database {display}: {what}; {fix}"


def _sqlite_events(engine: Engine, busy_timeout_s: float, read_only: bool) -> None:
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # the engine says BEGIN itself (savepoints need it)
        cursor = dbapi_connection.cursor()
        if not read_only:  # a reader (export) takes the file as it is
            cursor.execute("PRAGMA journal_mode=WAL")
        # FULL: the write-ahead log is fsynced at every commit. The ingest acknowledges a message to the broker
        # only after the commit that holds it, and the broker then forgets it: with NORMAL a power cut could lose
        # what was already acknowledged. Commits come in batches, so it costs one fsync per batch.
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql(conn.get_execution_options().get("edgemed_begin", "BEGIN"))


def _sqlite(path: Path, busy_timeout_s: float, *, read_only: bool) -> Database:
    from sqlalchemy import create_engine

    url = f"sqlite:///file:{path.resolve()}?mode=ro&uri=true" if read_only else f"sqlite:///{path}"
    engine = create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": busy_timeout_s},
        hide_parameters=True,  # parameters are results: never in an exception's text
    )
    _sqlite_events(engine, busy_timeout_s, read_only)
    return Database(engine, "sqlite", str(path), path)


def _postgresql(url: str) -> Database:
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url).set(drivername="postgresql+psycopg")
    except (ArgumentError, ValueError) as exc:
        raise ConfigError(
            f"--db {mask_url(url)!r} is not a database URL; write it like postgresql://user@host:5432/dbname"
        ) from exc
    display = parsed.render_as_string(hide_password=True).replace("postgresql+psycopg://", "postgresql://", 1)
    engine = create_engine(
        parsed,
        pool_size=PG_POOL_SIZE,
        max_overflow=PG_MAX_OVERFLOW,
        pool_timeout=PG_CONNECT_TIMEOUT_S,
        pool_pre_ping=True,  # a connection the server closed (restart, idle timeout) is replaced, not used
        hide_parameters=True,
        connect_args={"connect_timeout": PG_CONNECT_TIMEOUT_S},
    )
    return Database(engine, "postgresql", display)


def open_database(db: str | Path, *, busy_timeout_s: float = 5.0, read_only: bool = False) -> Database:
    """The engine for ``--db``: a file path or ``sqlite:///path`` (SQLite), or ``postgresql://...``.

    Nothing is connected yet (``Database.connect`` does, with one-line errors).

    Args:
        db: what ``--db`` says.
        busy_timeout_s: SQLite: how long a statement waits for another connection's lock.
        read_only: SQLite: open the file read-only (``export``); PostgreSQL sessions are not restricted.

    Returns:
        The database.

    Raises:
        ConfigError: a URL of another kind, or a path mangled into one (see below).
    """
    if isinstance(db, Path) and _COLLAPSED_URL.match(str(db)):
        # Path() folds "//" into "/": the URL can no longer be read reliably (which part was the host?).
        raise ConfigError(f"--db {mask_url(str(db))!r} looks like a URL passed as a file path; pass it as text")
    text = str(db)
    match = _URL.match(text)
    if match is None:
        return _sqlite(Path(text), busy_timeout_s, read_only=read_only)
    scheme = match["scheme"].lower()
    if scheme == "sqlite":
        rest = text[len("sqlite:///") :] if text.lower().startswith("sqlite:///") else ""
        if not rest:
            raise ConfigError(f"--db {text!r}: write an SQLite URL as sqlite:///relative/path or sqlite:////abs/path")
        return _sqlite(Path(rest), busy_timeout_s, read_only=read_only)
    if scheme in ("postgresql", "postgres", "postgresql+psycopg"):
        return _postgresql(text)
    raise ConfigError(
        f"--db {mask_url(text)!r}: unknown kind of database {scheme!r}; pass a file path (SQLite), sqlite:///path "
        "or postgresql://user@host:port/dbname"
    )
