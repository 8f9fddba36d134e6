"""The review settings an admin changes from the page: when an urgent result is escalated, and where it is posted.

Kept in the ``settings`` table (JSON values), so every web process behind a load balancer reads the same ones:

* ``escalate_after_min``: an urgent result nobody acknowledged for this many minutes is escalated (default 15;
  1 to 1440);
* ``webhook_url``: where an escalation is POSTed (``http://`` or ``https://`` only; none by default).

A change is audited (``settings_changed``) in the transaction that makes it. The webhook address may carry a token
in its path or query (chat services work that way), so the audit row and the log name its origin only.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import sqlalchemy as sa

from edgemed.dashboard import audit
from edgemed.dashboard.settlement import dialect_insert
from edgemed.dashboard.tables import settings
from edgemed.errors import ConfigError

if TYPE_CHECKING:
    from edgemed.dashboard.secrets import Secrets
    from edgemed.dashboard.store import DashboardStore

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_ESCALATE_AFTER_MIN",
    "ReviewSettings",
    "check_minutes",
    "check_webhook_url",
    "load",
    "origin",
    "save",
]

DEFAULT_ESCALATE_AFTER_MIN = 15
MAX_ESCALATE_AFTER_MIN = 24 * 60
MAX_URL_CHARS = 2000


@dataclass(frozen=True)
class ReviewSettings:
    """The settings in force."""

    escalate_after_min: int = DEFAULT_ESCALATE_AFTER_MIN
    webhook_url: str | None = None


def check_minutes(value: Any) -> int:
    """``escalate_after_min`` from a form or JSON value.

    Raises:
        ConfigError: not a whole number of minutes from 1 to 1440.
    """
    try:
        minutes = int(str(value).strip())
    except ValueError as exc:
        raise ConfigError(f"escalate after {str(value)[:40]!r} minutes: give a whole number of minutes") from exc
    if not 1 <= minutes <= MAX_ESCALATE_AFTER_MIN:
        raise ConfigError(f"escalate after {minutes} minutes: give 1 to {MAX_ESCALATE_AFTER_MIN} minutes (a day)")
    return minutes


def check_webhook_url(value: str | None) -> str | None:
    """The webhook address, checked; None (or an empty string) means no webhook.

    Raises:
        ConfigError: not an ``http://`` or ``https://`` address with a host (the message says what to write).
    """
    text = (value or "").strip()
    if not text:
        return None
    if len(text) > MAX_URL_CHARS or any(c.isspace() or ord(c) < 32 for c in text):
        raise ConfigError(f"the webhook address must be one URL without spaces, at most {MAX_URL_CHARS} characters")
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as exc:
        raise ConfigError(f"the webhook address is not a URL ({exc}); write it like https://host/path") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError("the webhook address must start with http:// or https:// and name a host")
    return text


def origin(url: str | None) -> str | None:
    """``scheme://host[:port]`` of a webhook address: what may be logged and audited (never its path or query)."""
    if url is None:
        return None
    parts = urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


def load(store: DashboardStore) -> ReviewSettings:
    """The settings in force (defaults for what was never set; a stored value that no longer checks is ignored).

    Raises:
        sqlite3.Error, psycopg.Error: the database could not be read.
    """
    with store._read() as conn:
        rows = dict(conn.execute(sa.select(settings.c.key, settings.c.value)).all())
    out: dict[str, Any] = {}
    for key, check in (("escalate_after_min", check_minutes), ("webhook_url", check_webhook_url)):
        if key not in rows:
            continue  # never set: the default holds
        try:
            out[key] = check(json.loads(rows[key]))
        except (ValueError, TypeError, ConfigError) as exc:
            log.warning("the stored setting %s does not check (%s); using its default", key, type(exc).__name__)
    return ReviewSettings(**out)


def save(
    store: DashboardStore,
    secrets: Secrets,
    *,
    actor: str,
    address: str | None,
    escalate_after_min: Any,
    webhook_url: str | None,
    at: float | None = None,
) -> ReviewSettings:
    """Check and store new settings, audited (``settings_changed``) in the same transaction.

    Args:
        store: the dashboard's store.
        secrets: the audit key's holder.
        actor: the admin's name.
        address: the client's address.
        escalate_after_min: minutes (1-1440), as typed.
        webhook_url: an http(s) address, or None/empty for none.
        at: dashboard clock; now when None.

    Returns:
        The settings now in force.

    Raises:
        ConfigError: a value that does not check (nothing is stored).
        sqlite3.Error, psycopg.Error: the database failed.
    """
    new = ReviewSettings(check_minutes(escalate_after_min), check_webhook_url(webhook_url))
    old = load(store)
    now = time.time() if at is None else at
    with store._transaction() as conn:
        stmt = dialect_insert(conn, settings)
        stmt = stmt.on_conflict_do_update(
            index_elements=[settings.c.key],
            set_={"value": stmt.excluded.value, "updated_at": stmt.excluded.updated_at, "updated_by": actor},
        )
        values = {"escalate_after_min": new.escalate_after_min, "webhook_url": new.webhook_url}
        conn.execute(
            stmt,
            [{"key": k, "value": json.dumps(v), "updated_at": now, "updated_by": actor} for k, v in values.items()],
        )
        detail = {
            "escalate_after_min": [old.escalate_after_min, new.escalate_after_min],
            "webhook": [origin(old.webhook_url), origin(new.webhook_url)],
            "webhook_changed": old.webhook_url != new.webhook_url,
        }
        audit.append(
            conn, secrets.audit_key, at=now, actor=actor, address=address, action="settings_changed", detail=detail
        )
    return new
