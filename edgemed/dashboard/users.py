"""The people who may log in to the dashboard: argon2id password hashes, roles, sites, and the login slow-down.

Passwords are hashed with argon2id (argon2-cffi's ``PasswordHasher`` defaults: RFC 9106's low-memory profile,
64 MiB, 3 passes); the database holds only the encoded hash. There is no default password anywhere: a user has
the password an admin typed for them, or none (single sign-on through a trusted proxy only). A password is at
least 12 characters and not the user's name; it never reaches a log line, an audit row or an error message.

Every change (add, password, disable, enable, role) appends its audit row in the same transaction as the change
(``audit.append``), so the trail cannot miss a change that committed. Disabling a user or changing their password
also ends their open sessions (``web_sessions``) in that transaction; a disabled user's next request is refused
anyway, since the web layer re-reads the user on every request. The last enabled admin can be neither disabled
nor demoted: nobody could then manage users from the page. An admin sees every site: an admin limited to sites
could add an unlimited user (or admin) and log in as them, so the limit would protect nothing; ``add_user`` and
``set_role`` refuse an admin with sites instead of pretending.

The login slow-down (``login_delay``, ``record_failure``, ``clear_failures``) is in ``slowdown.py``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from edgemed.dashboard import audit
from edgemed.dashboard.slowdown import (
    FAILURE_WINDOW_S,
    MAX_DELAY_S,
    attempt_succeeded,
    claim_attempt,
    clear_failures,
    login_delay,
    record_failure,
)
from edgemed.dashboard.tables import ROLES, users, web_sessions

if TYPE_CHECKING:
    from sqlalchemy import Connection

    from edgemed.dashboard.secrets import Secrets
    from edgemed.dashboard.store import DashboardStore

__all__ = [
    "FAILURE_WINDOW_S",
    "MAX_DELAY_S",
    "MIN_PASSWORD_CHARS",
    "UserError",
    "UserRecord",
    "add_user",
    "attempt_succeeded",
    "check_name",
    "check_password",
    "claim_attempt",
    "clear_failures",
    "failed_login_subject",
    "get_user",
    "list_users",
    "login_delay",
    "record_failure",
    "set_disabled",
    "set_password",
    "set_role",
    "user_count",
    "verify_password",
]

_NAME = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
_SITE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # as a device's site in its topic
MIN_PASSWORD_CHARS = 12
_MAX_PASSWORD_CHARS = 1024  # argon2 takes any length; a megabyte "password" is only a way to burn CPU
_hasher = PasswordHasher()


class UserError(ValueError):
    """A user change that cannot be made: the message names the problem and what to do."""


@dataclass(frozen=True)
class UserRecord:
    """A user as the web layer needs them: ``sites`` None means every site."""

    name: str
    role: str
    sites: frozenset[str] | None
    disabled: bool
    has_password: bool


def check_name(name: str) -> str:
    """Refuse a user name outside 1-64 characters of letters, digits, ``.``, ``_``, ``@`` or ``-``.

    Raises:
        UserError: a bad name.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise UserError(
            f"user name {name!r:.80} is not allowed: use 1-64 letters, digits, '.', '_', '@' or '-' (e.g. a.smith)"
        )
    return name


def check_password(name: str, password: str) -> None:
    """Refuse a password shorter than 12 characters, longer than 1024, or equal to the user name.

    Raises:
        UserError: a bad password (the message never repeats it).
    """
    if not isinstance(password, str) or len(password) < MIN_PASSWORD_CHARS:
        raise UserError(f"the password is too short: use at least {MIN_PASSWORD_CHARS} characters (a passphrase)")
    if len(password) > _MAX_PASSWORD_CHARS:
        raise UserError(f"the password is too long: use at most {_MAX_PASSWORD_CHARS} characters")
    if password.strip().casefold() == name.casefold():
        raise UserError("the password must not be the user name")


def _check_role(role: str) -> str:
    if role not in ROLES:
        raise UserError(f"role {role!r:.40} is not one of {', '.join(ROLES)}")
    return role


def _check_sites(sites: Iterable[str] | None) -> str | None:
    if sites is None:
        return None
    if isinstance(sites, str):  # a str is an iterable of one-letter "sites": never what the caller meant
        raise TypeError("sites must be a collection of site ids (or None), not one string")
    chosen = sorted({s.strip() for s in sites if s.strip()})
    if not chosen:
        raise UserError("a user limited to no site would see nothing: name sites (--sites A,B) or leave them out")
    for site in chosen:
        if not _SITE.match(site):
            raise UserError(f"site {site!r:.80} is not a site id: 1-64 letters, digits, '_' or '-'")
    return json.dumps(chosen)


def _admin_sites(role: str, sites_json: str | None, name: str) -> None:
    if role == "admin" and sites_json is not None:
        raise UserError(
            f"{name!r:.80} cannot be an admin limited to sites: an admin manages every user, so could lift the "
            "limit; make them a reviewer with --sites, or an admin of every site"
        )


def _record(row: Any) -> UserRecord:
    sites = None if row.sites is None else frozenset(json.loads(row.sites))
    return UserRecord(row.name, row.role, sites, bool(row.disabled), row.password_hash is not None)


def _row(conn: Connection, name: str) -> Any:
    return conn.execute(sa.select(users).where(users.c.name == name)).first()


def _existing(conn: Connection, name: str) -> Any:
    row = _row(conn, name)
    if row is None:
        raise UserError(f"no user {name!r:.80}; `edgemed dashboard users list --db DB` shows who there is")
    return row


def _other_enabled_admins(conn: Connection, name: str) -> int:
    stmt = sa.select(sa.func.count()).where(users.c.role == "admin", users.c.disabled == 0, users.c.name != name)
    return int(conn.execute(stmt).scalar_one())


def _end_sessions(conn: Connection, name: str) -> None:
    conn.execute(sa.delete(web_sessions).where(web_sessions.c.user_name == name))


def add_user(
    store: DashboardStore,
    name: str,
    role: str,
    sites: Iterable[str] | None,
    password: str | None,
    *,
    secrets: Secrets,
    actor: str,
    address: str | None,
    at: float | None = None,
) -> UserRecord:
    """Add a user (audited ``user_added``, with role and sites; never the password).

    Args:
        store: the dashboard's store.
        name: the login name (see ``check_name``).
        role: ``viewer``, ``reviewer`` or ``admin``.
        sites: the sites they may see; None for every site.
        password: their password (see ``check_password``); None for a single-sign-on-only user.
        secrets: the audit key's holder.
        actor: who adds them (a user name or ``cli:<os user>``).
        address: from where.
        at: dashboard clock; now when None.

    Returns:
        The new user.

    Raises:
        UserError: a bad name, role, site or password, an admin limited to sites, or the name is taken.
    """
    check_name(name)
    _check_role(role)
    sites_json = _check_sites(sites)
    _admin_sites(role, sites_json, name)
    hashed = None
    if password is not None:
        check_password(name, password)
        hashed = _hasher.hash(password)
    now = time.time() if at is None else at
    with store._transaction() as conn:
        if _row(conn, name) is not None:
            raise UserError(f"user {name!r} exists already; change them with `users passwd`, `role` or `enable`")
        row = {"name": name, "password_hash": hashed, "role": role, "sites": sites_json, "disabled": 0}
        conn.execute(sa.insert(users), {**row, "created_at": now, "updated_at": now})
        detail = {"role": role, "sites": None if sites_json is None else json.loads(sites_json)}
        audit.append(
            conn, secrets.audit_key, at=now, actor=actor, address=address, action="user_added", target=name,
            detail={**detail, "password": hashed is not None},
        )  # fmt: skip
        return _record(_row(conn, name))


def set_password(
    store: DashboardStore,
    name: str,
    password: str,
    *,
    secrets: Secrets,
    actor: str,
    address: str | None,
    at: float | None = None,
) -> None:
    """Replace a user's password and end their sessions (audited ``password_changed``).

    Raises:
        UserError: no such user, or a bad password.
    """
    check_password(name, password)
    hashed = _hasher.hash(password)
    now = time.time() if at is None else at
    with store._transaction() as conn:
        _existing(conn, name)
        conn.execute(sa.update(users).where(users.c.name == name).values(password_hash=hashed, updated_at=now))
        _end_sessions(conn, name)
        audit.append(
            conn, secrets.audit_key, at=now, actor=actor, address=address, action="password_changed", target=name
        )


def set_disabled(
    store: DashboardStore,
    name: str,
    disabled: bool,
    *,
    secrets: Secrets,
    actor: str,
    address: str | None,
    at: float | None = None,
) -> bool:
    """Disable (ending their sessions) or enable a user (audited ``user_disabled`` / ``user_enabled``).

    Returns:
        True when it changed something, False when the user was in that state already (nothing audited).

    Raises:
        UserError: no such user, or it is the last enabled admin.
    """
    now = time.time() if at is None else at
    with store._transaction() as conn:
        row = _existing(conn, name)
        if bool(row.disabled) == disabled:
            return False
        if disabled and row.role == "admin" and _other_enabled_admins(conn, name) == 0:
            raise UserError(f"{name!r} is the last enabled admin: add or enable another admin first")
        conn.execute(sa.update(users).where(users.c.name == name).values(disabled=int(disabled), updated_at=now))
        if disabled:
            _end_sessions(conn, name)
        action = "user_disabled" if disabled else "user_enabled"
        audit.append(conn, secrets.audit_key, at=now, actor=actor, address=address, action=action, target=name)
        return True


def set_role(
    store: DashboardStore,
    name: str,
    role: str,
    *,
    secrets: Secrets,
    actor: str,
    address: str | None,
    at: float | None = None,
) -> bool:
    """Change a user's role (audited ``role_changed`` with the old and new role).

    Returns:
        True when it changed, False when they had that role already.

    Raises:
        UserError: no such user, an unknown role, it would demote the last enabled admin, or it would make a user
            limited to sites an admin.
    """
    _check_role(role)
    now = time.time() if at is None else at
    with store._transaction() as conn:
        row = _existing(conn, name)
        if row.role == role:
            return False
        _admin_sites(role, row.sites, name)
        if row.role == "admin" and not row.disabled and _other_enabled_admins(conn, name) == 0:
            raise UserError(f"{name!r} is the last enabled admin: make another user admin first")
        conn.execute(sa.update(users).where(users.c.name == name).values(role=role, updated_at=now))
        audit.append(
            conn, secrets.audit_key, at=now, actor=actor, address=address, action="role_changed", target=name,
            detail={"from": row.role, "to": role},
        )  # fmt: skip
        return True


def get_user(store: DashboardStore, name: str) -> UserRecord | None:
    """The user called ``name``, or None."""
    with store._read() as conn:
        row = _row(conn, name)
    return None if row is None else _record(row)


def list_users(store: DashboardStore) -> list[dict[str, Any]]:
    """Every user by name: ``name, role, sites`` (sorted list or None), ``disabled, has_password, created_at,
    updated_at`` (never the hash)."""
    cols = [users.c.name, users.c.role, users.c.sites, users.c.disabled, users.c.created_at, users.c.updated_at]
    with store._read() as conn:
        found = conn.execute(sa.select(*cols, users.c.password_hash.is_not(None)).order_by(users.c.name)).all()
    return [
        {
            "name": r[0],
            "role": r[1],
            "sites": None if r[2] is None else json.loads(r[2]),
            "disabled": bool(r[3]),
            "has_password": bool(r[6]),
            "created_at": r[4],
            "updated_at": r[5],
        }
        for r in found
    ]


def user_count(store: DashboardStore) -> int:
    """How many users exist (disabled ones included): 0 means nobody can log in yet."""
    with store._read() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(users)).scalar_one())


def failed_login_subject(store: DashboardStore, name: str, key: bytes) -> tuple[str | None, dict[str, Any]]:
    """What a ``login_failed`` audit row may say about the name typed: ``(target, detail)``.

    The name is the target only when such a user exists. Anything else may be a password typed into the name
    field, and the trail is read by every admin and exported: it gets no target, only a fingerprint (HMAC with the
    audit key, 16 hex digits) in ``detail["unknown_name"]``, so an admin still sees one unknown name tried again
    and again, without the name itself (nor a plain hash of it, which a weak password would be found from).

    Args:
        store: the dashboard's store.
        name: the login name as typed.
        key: the audit key (``Secrets.audit_key``).

    Returns:
        ``(name, {})`` for an existing user, else ``(None, {"unknown_name": fingerprint})``.
    """
    text = name if isinstance(name, str) else ""
    if _NAME.match(text) and get_user(store, text) is not None:
        return text, {}
    mark = hmac.new(key, b"login name\n" + text.encode("utf-8", "replace"), hashlib.sha256).hexdigest()[:16]
    return None, {"unknown_name": mark}


@lru_cache(maxsize=1)
def _dummy_hash() -> str:
    return _hasher.hash("not a password: compared against when the user is unknown")


def verify_password(store: DashboardStore, name: str, password: str) -> UserRecord | None:
    """The user when ``password`` is theirs and they are enabled; None otherwise, in the same time either way.

    An unknown name, a user without a password or a disabled user still costs one argon2 verification (against a
    dummy hash), so the answer's timing does not tell which names exist. A hash made with older parameters is
    replaced by one with the current parameters after a successful check (not audited: the password is the same).

    Args:
        store: the dashboard's store.
        name: the login name as typed.
        password: the password as typed.

    Returns:
        The user, or None.
    """
    row = None
    if isinstance(name, str) and _NAME.match(name):
        with store._read() as conn:
            row = _row(conn, name)
    hashed = row.password_hash if row is not None and row.password_hash is not None else None
    try:
        _hasher.verify(hashed or _dummy_hash(), password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return None
    if hashed is None or row is None or row.disabled:
        return None
    if _hasher.check_needs_rehash(hashed):
        with store._transaction() as conn:
            update = sa.update(users).where(users.c.name == name, users.c.password_hash == hashed)
            conn.execute(update.values(password_hash=_hasher.hash(password)))
    return _record(row)
