"""The login slow-down: failed logins counted per user name and per client address, in the database.

Each failed login adds two rows to ``login_failures``: one for the user name, one for the client
address. ``login_delay`` looks at the failures of the last 15 minutes under either key (the larger count wins): the
first 3 cost nothing, then each further one doubles the wait from 1 s up to 300 s, counted from the last failure.
Per user name, a password is not guessed from many addresses; per address, many names are not tried from one. The
rows live in the database, so every ``serve`` process behind a load balancer counts the same failures.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import sqlalchemy as sa

from edgemed.dashboard.tables import login_failures

if TYPE_CHECKING:
    from edgemed.dashboard.store import DashboardStore

__all__ = ["FAILURE_WINDOW_S", "FREE_FAILURES", "MAX_DELAY_S", "clear_failures", "login_delay", "record_failure"]

#: Failed logins count for this long.
FAILURE_WINDOW_S = 15 * 60.0
#: Failures (per user name, per address) that cost no wait.
FREE_FAILURES = 3
#: The longest wait.
MAX_DELAY_S = 300.0


def _keys(name: str, address: str | None) -> list[str]:
    keys = [f"user:{name[:200]}"]
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
    since = now - FAILURE_WINDOW_S
    stmt = (
        sa.select(login_failures.c.key, sa.func.count(), sa.func.max(login_failures.c.at))
        .where(login_failures.c.key.in_(_keys(name, address)), login_failures.c.at >= since)
        .group_by(login_failures.c.key)
    )
    with store._read() as conn:
        found = conn.execute(stmt).all()
    wait = 0.0
    for _key, n, last in found:
        wait = max(wait, float(last) + _backoff(int(n)) - now)
    return max(0.0, wait)


def record_failure(store: DashboardStore, name: str, address: str | None, now: float) -> None:
    """Count a failed login against the user name and the address (and forget failures older than the window)."""
    with store._transaction() as conn:
        conn.execute(sa.delete(login_failures).where(login_failures.c.at < now - FAILURE_WINDOW_S))
        conn.execute(sa.insert(login_failures), [{"key": key, "at": now} for key in _keys(name, address)])


def clear_failures(store: DashboardStore, name: str, now: float) -> None:
    """Forget the user name's failures after a successful login (the address's stay: one account's owner must not
    wipe the count of names guessed from their address)."""
    with store._transaction() as conn:
        conn.execute(sa.delete(login_failures).where(login_failures.c.key == f"user:{name[:200]}"))
        conn.execute(sa.delete(login_failures).where(login_failures.c.at < now - FAILURE_WINDOW_S))
