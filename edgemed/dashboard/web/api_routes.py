"""The JSON API (ported from the old ``web.py``), limited to the principal's sites, and ``/metrics``.

GET /api/fleet?offset=O&limit=N      one row per device heard from recently, a page
GET /api/results?level=L&offset=O&limit=N   newest results, optionally of one triage level, a page
GET /api/summary                     level counts, urgent results nobody acknowledged, refused messages by
                                     reason, ingest counters
GET /api/dead-letters                admin: the newest refused messages (topic, reason, size; never the payload)
GET /metrics                         Prometheus text, no login, only to ``metrics_allow`` (never via a proxy)
"""

from __future__ import annotations

import time
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from edgemed.dashboard import metrics as prom
from edgemed.dashboard.web import api_queries, context

__all__ = ["routes"]

_PAGE = 1000


def fleet(request: Request) -> Response:
    """``GET /api/fleet``."""
    principal = context.require(request)
    db, cfg, now = context.store(request), context.config(request), time.time()
    offset = context.int_param(request, "offset", 0, maximum=10**9)
    limit = context.int_param(request, "limit", 100, maximum=_PAGE)
    expiry = cfg.device_expiry_s
    listed, hidden = api_queries.device_counts(db, principal.sites, now, expiry)
    devices = api_queries.fleet(db, principal.sites, now, expiry, offset=offset, limit=limit)
    return context.json_response(
        {"now": now, "total": listed, "hidden": hidden, "expire_after_s": expiry, "offset": offset, "devices": devices}
    )


def results(request: Request) -> Response:
    """``GET /api/results``."""
    principal = context.require(request)
    level = request.query_params.get("level") or None
    offset = context.int_param(request, "offset", 0, maximum=10**9)
    limit = context.int_param(request, "limit", 100, maximum=_PAGE)
    rows = api_queries.recent_results(context.store(request), principal.sites, level, limit=limit, offset=offset)
    return context.json_response({"now": time.time(), "level": level, "offset": offset, "results": rows})


def summary(request: Request) -> Response:
    """``GET /api/summary``: counts, urgent results waiting, dead letters by reason, the ingest."""
    principal = context.require(request)
    db, cfg = context.store(request), context.config(request)
    limit = context.int_param(request, "attention_limit", 50, maximum=_PAGE)
    waiting, total = api_queries.urgent_waiting(db, principal.sites, max(limit, 1))
    body: dict[str, Any] = {
        "now": time.time(),
        "counts": api_queries.level_counts(db, principal.sites),
        "attention": waiting[:limit],
        "attention_total": min(total, api_queries.TOTAL_CAP),
        # True when more than attention_total wait (the count stops there: see api_queries.urgent_waiting).
        "attention_total_capped": total > api_queries.TOTAL_CAP,
        "dead_letters": api_queries.dead_letter_counts(db, principal.sites),
        # The ingest's counters span every site: only for a principal who sees every site.
        "ingest": cfg.ingest_snapshot() if cfg.ingest_snapshot is not None and principal.sites is None else None,
        "workers": db.workers() if principal.sites is None else [],
    }
    return context.json_response(body)


def dead_letters(request: Request) -> Response:
    """``GET /api/dead-letters`` (admin): the newest refused messages, never their payload."""
    principal = context.require(request, "admin")
    limit = context.int_param(request, "limit", 50, maximum=_PAGE)
    rows = api_queries.dead_letters(context.store(request), principal.sites, limit)
    return context.json_response({"now": time.time(), "dead_letters": rows})


def dead_letters_page(request: Request) -> Response:
    """``GET /admin/dead-letters`` (admin): refused messages counted by reason, and the newest (no payload)."""
    principal = context.require(request, "admin")
    db = context.store(request)
    counts = api_queries.dead_letter_counts(db, principal.sites)
    values = {
        "counts": sorted(counts.items(), key=lambda item: (-item[1], item[0])),
        "total": sum(counts.values()),
        "newest": api_queries.dead_letters(db, principal.sites, 50),
    }
    return context.render(request, "dead_letters.html", values)


def metrics(request: Request) -> Response:
    """``GET /metrics``: Prometheus text to ``metrics_allow`` clients that did not come through a proxy."""
    cfg = context.config(request)
    peer = request.client.host if request.client is not None else ""
    allowed = prom.address_allowed(peer, cfg.metrics_allow)
    if cfg.metrics is None or not allowed or prom.proxied(request.headers):
        status = 404 if cfg.metrics is None and allowed else 403
        return Response(b"", status_code=status, media_type="text/plain")  # no detail for who may not read it
    return Response(prom.render(cfg.metrics), media_type=prom.CONTENT_TYPE)


def routes() -> list[BaseRoute]:
    """The API routes."""
    return [
        Route("/api/fleet", fleet, methods=["GET", "HEAD"]),
        Route("/api/results", results, methods=["GET", "HEAD"]),
        Route("/api/summary", summary, methods=["GET", "HEAD"]),
        Route("/api/dead-letters", dead_letters, methods=["GET", "HEAD"]),
        Route("/admin/dead-letters", dead_letters_page, methods=["GET", "HEAD"]),
        Route("/metrics", metrics, methods=["GET", "HEAD"]),
    ]
