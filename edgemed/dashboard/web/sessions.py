"""Login sessions in the database (``web_sessions``), so any web process behind a load balancer serves any of them.

The cookie ``edgemed_session`` is ``TOKEN.SIG``: a random token and its HMAC-SHA256 under the deployment's
``session_key``. The database keeps only the token's sha256: a copy of the database (a backup, a read-only
replica) logs no one in, and a forged cookie is refused before the database is asked. A session ends after
``idle_timeout_s`` without a request, after ``absolute_timeout_s`` however busy, or at logout; expired rows are
pruned whenever a session is created.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets as random
import sqlite3
from dataclasses import dataclass
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from edgemed.dashboard import tables

if TYPE_CHECKING:
    from edgemed.dashboard.store import DashboardStore
    from edgemed.dashboard.web.config import WebConfig

__all__ = [
    "COOKIE",
    "Session",
    "clear_cookie_header",
    "cookie_header",
    "create",
    "lookup",
    "revoke",
    "revoke_user",
    "sign",
    "touch",
    "unsign",
]

log = logging.getLogger(__name__)

COOKIE = "edgemed_session"
#: ``last_at`` is written at most this often per session: the idle time-out is that much coarser, and a page
#: that polls does not turn every read into a write.
TOUCH_EVERY_S = 30.0

_t = tables.web_sessions


@dataclass(frozen=True)
class Session:
    """A live session as stored (the token itself is never kept)."""

    token_sha256: str
    user_name: str
    csrf: str
    created_at: float
    last_at: float


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def sign(key: bytes, token: str) -> str:
    """The cookie value for a token: ``TOKEN.HMAC``.

    Args:
        key: ``Secrets.session_key``.
        token: the session's random token.

    Returns:
        The value to set in the cookie.
    """
    mac = hmac.new(key, token.encode(), hashlib.sha256).hexdigest()
    return f"{token}.{mac}"


def unsign(key: bytes, value: str) -> str | None:
    """The token inside a cookie value, or None when the signature does not hold (or the value is malformed)."""
    token, dot, mac = value.rpartition(".")
    if not dot or not token or len(value) > 200:
        return None
    good = hmac.new(key, token.encode(), hashlib.sha256).hexdigest()
    return token if hmac.compare_digest(good.encode(), mac.encode("utf-8", "replace")) else None


def create(
    store: DashboardStore, user_name: str, address: str | None, now: float, *, idle_s: float, absolute_s: float
) -> tuple[str, Session]:
    """Start a session for a user (and prune the expired ones).

    Args:
        store: the dashboard database.
        user_name: who logged in.
        address: where from (kept for the admin's view).
        now: the time, seconds since the epoch.
        idle_s: the idle time-out (rows idle for longer are pruned).
        absolute_s: the absolute time-out (rows older are pruned).

    Returns:
        The token (sign it for the cookie) and the stored session.
    """
    token = random.token_urlsafe(32)
    session = Session(_digest(token), user_name, random.token_urlsafe(32), now, now)
    with store._transaction() as conn:
        conn.execute(sa.delete(_t).where(sa.or_(_t.c.last_at < now - idle_s, _t.c.created_at < now - absolute_s)))
        conn.execute(
            sa.insert(_t).values(
                token_sha256=session.token_sha256,
                user_name=user_name,
                csrf=session.csrf,
                created_at=now,
                last_at=now,
                address=address,
            )
        )
    return token, session


def lookup(store: DashboardStore, token: str, now: float, *, idle_s: float, absolute_s: float) -> Session | None:
    """The live session of a token, or None when there is none or it has expired (it is then deleted).

    Args:
        store: the dashboard database.
        token: the token from a verified cookie (``unsign``).
        now: the time.
        idle_s: the idle time-out.
        absolute_s: the absolute time-out.

    Returns:
        The session, or None.
    """
    digest = _digest(token)
    with store._read() as conn:
        row = conn.execute(sa.select(_t).where(_t.c.token_sha256 == digest)).first()
    if row is None:
        return None
    session = Session(row.token_sha256, row.user_name, row.csrf, float(row.created_at), float(row.last_at))
    if now - session.last_at > idle_s or now - session.created_at > absolute_s:
        revoke(store, session.token_sha256)
        return None
    return session


def _write_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [sqlite3.Error, SQLAlchemyError, OSError]
    try:
        import psycopg
    except ImportError:  # an SQLite-only install: no PostgreSQL driver to fail
        return tuple(errors)
    return (*errors, psycopg.Error)


def touch(store: DashboardStore, session: Session, now: float) -> None:
    """Record that a session was used (at most every ``TOUCH_EVERY_S``): the idle time-out starts again.

    A database that refuses writes (a full disk) must not stop anyone reading the page that says so: the failure is
    logged and the request goes on (the idle time-out then counts from the last write that worked).
    """
    if now - session.last_at < TOUCH_EVERY_S:
        return
    try:
        with store._transaction() as conn:
            conn.execute(sa.update(_t).where(_t.c.token_sha256 == session.token_sha256).values(last_at=now))
    except _write_errors() as exc:
        log.warning("could not record a session's use in the dashboard database (%s); the page is served anyway", exc)


def revoke(store: DashboardStore, token_sha256: str) -> None:
    """End one session (logout, expiry)."""
    with store._transaction() as conn:
        conn.execute(sa.delete(_t).where(_t.c.token_sha256 == token_sha256))


def revoke_user(store: DashboardStore, user_name: str) -> int:
    """End every session of a user (disabled, password changed); returns how many there were."""
    with store._transaction() as conn:
        return int(conn.execute(sa.delete(_t).where(_t.c.user_name == user_name)).rowcount or 0)


def cookie_header(value: str, config: WebConfig) -> str:
    """The ``Set-Cookie`` value for a session: HttpOnly, SameSite=Strict, Path=/, Secure under TLS.

    Args:
        value: ``sign(key, token)``.
        config: the web config (its absolute time-out is the cookie's lifetime; TLS or https origins: Secure).

    Returns:
        The header's value.
    """
    secure = "; Secure" if config.secure_cookies else ""
    return f"{COOKIE}={value}; Path=/; Max-Age={int(config.absolute_timeout_s)}; HttpOnly; SameSite=Strict{secure}"


def clear_cookie_header(config: WebConfig, name: str = COOKIE, path: str = "/") -> str:
    """The ``Set-Cookie`` value that deletes a cookie (logout, a session that ended)."""
    secure = "; Secure" if config.secure_cookies else ""
    return f"{name}=; Path={path}; Max-Age=0; HttpOnly; SameSite=Strict{secure}"
