"""The fleet view, the charts, one device's page and the drift API, limited to the principal's sites.

GET /fleet                          what runs where (model, version, sha256, edgemed, delegate, degraded),
                                    online/offline/silent, pending and awaiting receipt; drift per site and model
GET /fragments/fleet                the same tables alone (the live page re-fetches them on each event)
GET /charts?site=S&days=N           triage mix per site over time and results per hour (``result_hourly``)
GET /devices/{site}/{device_id}?hours=N   frame rate, latency p95, CPU and backlog over time (heartbeats)
GET /api/drift?site=S&days=N        the drift rows as JSON

A device at a site the principal may not see answers 404, as one that does not exist.
"""

from __future__ import annotations

import time
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from edgemed.dashboard import drift, fleet_data
from edgemed.dashboard.web import context, fleet_views

__all__ = ["routes"]

#: Longest period a page may ask for: a year (the hourly rows are kept that long).
_MAX_DAYS = 365
_MAX_HOURS = 24 * 365


def _sites(principal: context.Principal, site: str | None) -> frozenset[str] | None:
    """The sites to read: the one asked for (already checked) or all the principal may see."""
    return frozenset({site}) if site is not None else principal.sites


def _fleet_context(request: Request, principal: context.Principal) -> dict[str, Any]:
    db, cfg, now = context.store(request), context.config(request), time.time()
    devices = fleet_data.fleet_devices(db, principal.sites, now=now, expire_after_s=cfg.device_expiry_s)
    report = drift.drift_report(db, principal.sites, now=now)
    return {
        "devices": fleet_views.fleet_rows(devices),
        "drift": fleet_views.drift_rows(report),
        "drift_days": drift.DEFAULT_DAYS,
        "psi_threshold": drift.PSI_THRESHOLD,
        "min_results": drift.MIN_RESULTS,
        "flagged": sum(1 for d in report if d.flagged),
    }


def fleet_page(request: Request) -> Response:
    """``GET /fleet``."""
    principal = context.require(request)
    return context.render(request, "fleet.html", _fleet_context(request, principal))


def fleet_fragment(request: Request) -> Response:
    """``GET /fragments/fleet``."""
    principal = context.require(request)
    return context.render(request, "fleet_fragment.html", _fleet_context(request, principal))


def charts_page(request: Request) -> Response:
    """``GET /charts``."""
    principal = context.require(request)
    site = context.site_param(request, principal)
    days = max(1, context.int_param(request, "days", 2, maximum=_MAX_DAYS))
    now = time.time()
    since = now - days * 86400.0
    levels = fleet_data.hourly_levels(context.store(request), _sites(principal, site), since)
    seen = sorted({row["site"] for row in levels} | ({site} if site else set()))
    choices = sorted(principal.sites) if principal.sites is not None else seen
    return context.render(
        request,
        "charts.html",
        {
            "site": site,
            "days": days,
            "sites": choices,
            "day_choices": (1, 2, 7, 30, 90, 365),
            "triage": fleet_views.triage_charts(levels, since, now),
            "per_hour": fleet_views.results_per_hour_chart(levels, since, now),
        },
    )


def device_page(request: Request) -> Response:
    """``GET /devices/{site}/{device_id}``."""
    principal = context.require(request)
    site, device_id = request.path_params["site"], request.path_params["device_id"]
    missing = context.NotFound(f"no device {device_id[:64]!r} at site {site[:64]!r}")
    if not principal.sees(site):
        raise missing
    hours = max(1, context.int_param(request, "hours", 24, maximum=_MAX_HOURS))
    db, now = context.store(request), time.time()
    rows = fleet_data.fleet_devices(db, principal.sites, now=now, device=(site, device_id), limit=1)
    if not rows:
        raise missing
    span = hours * 3600.0
    series = fleet_data.device_series(db, site, device_id, span_s=span, now=now)
    return context.render(
        request,
        "device.html",
        {
            "device": fleet_views.fleet_rows(rows)[0],
            "hours": hours,
            "hour_choices": (1, 6, 24, 72, 168, 720),
            "raw": span <= fleet_data.RAW_SPAN_S,
            "charts": fleet_views.device_charts(series, device_id, now - span, now),
        },
    )


def drift_api(request: Request) -> Response:
    """``GET /api/drift``."""
    principal = context.require(request)
    site = context.site_param(request, principal)
    days = max(1, context.int_param(request, "days", int(drift.DEFAULT_DAYS), maximum=_MAX_DAYS))
    report = drift.drift_report(context.store(request), _sites(principal, site), days=float(days))
    return context.json_response(
        {"days": days, "threshold": drift.PSI_THRESHOLD, "min_results": drift.MIN_RESULTS,
         "rows": [d.as_dict() for d in report]}
    )  # fmt: skip


def routes() -> list[BaseRoute]:
    """This module's routes."""
    return [
        Route("/fleet", fleet_page, methods=["GET"]),
        Route("/fragments/fleet", fleet_fragment, methods=["GET"]),
        Route("/charts", charts_page, methods=["GET"]),
        Route("/devices/{site}/{device_id}", device_page, methods=["GET"]),
        Route("/api/drift", drift_api, methods=["GET"]),
    ]
