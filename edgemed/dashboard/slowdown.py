"""The login slow-down: failed logins counted per user name and per client address, in the database.

Each failed login adds two rows to ``login_failures``: one for the user name (a SHA-256 digest of it, never the name
as typed), one for the client address. ``login_delay`` looks at the failures of the last 15 minutes under either key
(the larger count wins): the first 3 cost nothing, then each further one doubles the wait from 1 s up to 300 s,
counted from the last failure. Per user name, a password is not guessed from many addresses; per address, many names
are not tried from one. The rows live in the database, so every ``serve`` process behind a load balancer counts the
same failures.

Checking the wait and counting the failure in two steps (``login_delay``, then ``record_failure`` after the
password was checked) lets attempts sent at once all find no wait: each checks before any has failed. A login
should use ``claim_attempt`` instead, which checks and counts the attempt in one transaction (under a lock on
PostgreSQL, SQLite's write lock), and ``attempt_succeeded`` when the password was right, which takes the attempt
back out (so a clinic's staff logging in through one address never slow each other down).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import sqlalchemy as sa

from edgemed.dashboard.tables import login_failures

if TYPE_CHECKING:
    from sqlalchemy import Connection

    from edgemed.dashboard.store import DashboardStore

__all__ = [
    "FAILURE_WINDOW_S",
    "FREE_FAILURES",
    "MAX_DELAY_S",
    "attempt_succeeded",
    "claim_attempt",
    "clear_failures",
    "login_delay",
    "record_failure",
]

#: Failed logins count for this long.
FAILURE_WINDOW_S = 15 * 60.0
#: Failures (per user name, per address) that cost no wait.
FREE_FAILURES = 3
#: The longest wait.
MAX_DELAY_S = 300.0
# The login slow-down's advisory lock (the schema upgrade is 1, the heartbeat maintenance 2, the audit trail 3).
_LOCK_KEY = 0x6564676D65640004


def _name_key(name: str) -> str:
    # A digest, not the name: what was typed may be a password typed into the name field, and the rows stay in the
    # database (and its backups) for the window.
    return "user:" + hashlib.sha256(b"edgemed login name\n" + name[:200].encode("utf-8", "replace")).hexdigest()


def _keys(name: str, address: str | None) -> list[str]:
    keys = [_name_key(name)]
    if address:
        keys.append(f"addr:{address[:200]}")
    return keys


def _backoff(failures: int) -> float:
    if failures <= FREE_FAILURES:
        return 0.0
    return float(min(MAX_DELAY_S, 2.0 ** (failures - FREE_FAILURES - 1)))


def login_delay(store: DashboardStore, name: str, address: str | None, now: float) -> float:
    """Seconds to wait before another login attempt for ``name`` from ``address`` is even checked.

    Args:
        store: the dashboard's store.
        name: the login name as typed.
        address: the client's address (``context.client_address``), or None.
        now: dashboard clock.

    Returns:
        0 when an attempt may be checked now; else the seconds left (for ``Retry-After``).
    """
    with store._read() as conn:
        return _wait(conn, _keys(name, address), now)


def _wait(conn: Connection, keys: list[str], now: float) -> float:
    stmt = (
        sa.select(login_failures.c.key, sa.func.count(), sa.func.max(login_failures.c.at))
        .where(login_failures.c.key.in_(keys), login_failures.c.at >= now - FAILURE_WINDOW_S)
        .group_by(login_failures.c.key)
    )
    wait = 0.0
    for _key, n, last in conn.execute(stmt).all():
        wait = max(wait, float(last) + _backoff(int(n)) - now)
    return max(0.0, wait)


def claim_attempt(store: DashboardStore, name: str, address: str | None, now: float) -> tuple[float, list[int]]:
    """Check the wait and, when there is none, count this attempt as a failure, in one transaction.

    Attempts made at once are counted one after the other, so no more than the free ones pass without a wait.

    Args:
        store: the dashboard's store.
        name: the login name as typed.
        address: the client's address, or None.
        now: dashboard clock.

    Returns:
        ``(wait, [])`` when the attempt must wait ``wait`` seconds (nothing counted); ``(0.0, ids)`` when it may be
        checked now: ``ids`` are its rows, for ``attempt_succeeded`` when the password was right.
    """
    keys = _keys(name, address)
    with store._transaction() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_LOCK_KEY)))
        wait = _wait(conn, keys, now)
        if wait > 0:
            return wait, []
        conn.execute(sa.delete(login_failures).where(login_failures.c.at < now - FAILURE_WINDOW_S))
        insert = sa.insert(login_failures).returning(login_failures.c.id)
        return 0.0, [int(conn.execute(insert, {"key": key, "at": now}).scalar_one()) for key in keys]


def attempt_succeeded(store: DashboardStore, name: str, ids: list[int], now: float) -> None:
    """Take a successful attempt's rows (``claim_attempt``) back out, and forget the user name's failures."""
    with store._transaction() as conn:
        mine = login_failures.c.id.in_(ids) | (login_failures.c.key == _name_key(name))
        conn.execute(sa.delete(login_failures).where(mine | (login_failures.c.at < now - FAILURE_WINDOW_S)))


def record_failure(store: DashboardStore, name: str, address: str | None, now: float) -> None:
    """Count a failed login against the user name and the address (and forget failures older than the window)."""
    with store._transaction() as conn:
        conn.execute(sa.delete(login_failures).where(login_failures.c.at < now - FAILURE_WINDOW_S))
        conn.execute(sa.insert(login_failures), [{"key": key, "at": now} for key in _keys(name, address)])


def clear_failures(store: DashboardStore, name: str, now: float) -> None:
    """Forget the user name's failures after a successful login (the address's stay: one account's owner must not
    wipe the count of names guessed from their address)."""
    with store._transaction() as conn:
        conn.execute(sa.delete(login_failures).where(login_failures.c.key == _name_key(name)))
        conn.execute(sa.delete(login_failures).where(login_failures.c.at < now - FAILURE_WINDOW_S))
