"""The Jinja2 environment of the pages: autoescaped templates, the filters, the navigation, the system alerts.

Filters: ``utc`` (epoch seconds -> ``2026-12-01 21:14:05 UTC``), ``ago`` (epoch seconds -> ``5 min ago``),
``clip(n=300)`` (a device string cut for a table cell: ``text… (shortened: 20,000 characters)``).
Every page of a logged-in user shows ``alerts``: results not being saved (the database refuses writes) or no
ingest receiving from the broker, from the embedded ingest's counters or the workers' reports in the database.
"""

from __future__ import annotations

import math
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import jinja2

if TYPE_CHECKING:
    from edgemed.dashboard.store import DashboardStore
    from edgemed.dashboard.web.config import WebConfig

__all__ = ["ENV", "TEMPLATES", "nav", "system_alerts"]


class _Viewer(Protocol):
    # What ``nav`` needs of ``context.Principal`` (a Protocol: context imports this module, not the other way).
    def can(self, role: str) -> bool: ...

TEMPLATES = Path(__file__).parent / "templates"
#: A worker whose last report is older than this is not counted as receiving.
WORKER_FRESH_S = 30.0


def _utc(value: Any) -> str:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return ""
    return datetime.fromtimestamp(value, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _ago(value: Any) -> str:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return ""
    seconds = max(0.0, time.time() - value)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit} ago"
    return f"{int(seconds)} s ago"


def clip(value: Any, n: int = 300) -> str:
    """A device string cut to ``n`` characters for a table cell, saying that and how long it was.

    Twenty thousand combining accents in one cell took a browser seconds to lay out: the page never cut them.
    """
    text = "" if value is None else str(value)
    if len(text) <= n:
        return text
    return f"{text[:n]}… (shortened: {len(text):,} characters)"


ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATES),
    autoescape=True,  # device strings are hostile until shown otherwise: everything is escaped
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
ENV.filters["utc"] = _utc
ENV.filters["ago"] = _ago
ENV.filters["clip"] = clip

_NAV = (
    ("Queue", "/queue", "viewer"),
    ("Fleet", "/fleet", "viewer"),
    ("Charts", "/charts", "viewer"),
    ("Export", "/export", "reviewer"),
    ("Users", "/admin/users", "admin"),
    ("Audit", "/admin/audit", "admin"),
    ("Settings", "/admin/settings", "admin"),
    ("Refused", "/admin/dead-letters", "admin"),
)


def nav(principal: _Viewer | None, path: str) -> list[dict[str, Any]]:
    """The navigation links a principal may follow (none when nobody is logged in)."""
    if principal is None:
        return []
    return [
        {"label": label, "href": href, "active": path == href or path.startswith(href + "/")}
        for label, href, role in _NAV
        if principal.can(role)
    ]


def _clip(text: Any, n: int) -> str:
    value = str(text)
    return value if len(value) <= n else value[:n] + "…"


def system_alerts(config: WebConfig, store: DashboardStore) -> list[str]:
    """What every page must say about the central side itself: results not saved, nothing received.

    Args:
        config: the web config (its embedded ingest's ``ingest_snapshot``, if any).
        store: the database (the ingest workers' reports, for a ``serve`` process).

    Returns:
        Sentences, most serious first; empty when all is well.
    """
    if config.ingest_snapshot is not None:
        snap = config.ingest_snapshot()
        if snap.get("store_error"):
            return [
                f"Results are not being saved: {_clip(snap['store_error'], 300)}. {snap.get('held', 0)} messages are "
                "held back, not yet acknowledged to the broker, and saved as soon as the database takes writes again."
            ]
        if not snap.get("connected"):
            return [f"Not receiving from the broker: {_clip(snap.get('broker_error') or 'not connected', 300)}."]
        return []
    now = time.time()
    workers = store.workers()
    fresh = [w for w in workers if now - float(w["last_at"]) < WORKER_FRESH_S]
    out = [
        f"Results are not being saved by ingest worker {_clip(w['worker_id'], 80)} ({w['stats'].get('held', 0)} "
        "messages held back): the database does not take its writes; see that worker's log. Nothing is "
        "acknowledged to the broker before it is saved."
        for w in fresh
        if w["stats"].get("store_failing")
    ]
    if workers and not any(w["stats"].get("connected") for w in fresh):
        out.append("No ingest worker is receiving from the broker: new results are not arriving.")
    return out
