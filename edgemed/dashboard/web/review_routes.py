"""The review pages and API: the queue, a result, acknowledge and close, the review settings, the results export.

GET  /queue?site=S&offset=O            the queue page (per-site counts; escalated rows highlighted; buttons for
                                       reviewers only); its live region is ``/fragments/queue``
GET  /fragments/queue?site=S&offset=O  the queue's table alone (live.js swaps it in on an event)
GET  /api/queue?site=S&offset=O&limit=N  the same as JSON: ``{"counts", "rows", "offset", "limit"}``
GET  /results/{id}                     one result: what the device published, its review and escalation
POST /api/results/{id}/ack             reviewer: new -> acknowledged (form: 303 back to ``next``; JSON: the review)
POST /api/results/{id}/close           reviewer: acknowledged -> closed (``outcome``, optional ``note``)
GET  /admin/settings, POST             admin: ``escalate_after_min`` and ``webhook_url`` (audited)
GET  /export                           reviewer: the export form
GET  /export/results?since=&until=&site=&format=csv|jsonl   reviewer: the download, streamed, audited first

Everything is limited to the principal's sites: another site's result is "not found", another site's queue or
export is refused (403). A state-changing request needs its CSRF token (checked by the middleware).
"""

from __future__ import annotations

import math
import re
import time
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from edgemed.dashboard import results_export, review, review_settings
from edgemed.dashboard.tables import OUTCOMES
from edgemed.dashboard.web import context
from edgemed.dashboard.web.context import Principal
from edgemed.errors import ConfigError

__all__ = ["routes"]

PAGE = 50
_FORMS = ("application/x-www-form-urlencoded", "multipart/form-data")
_MAX_FIELD = 4000
_FILENAME_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _safe_next(value: Any, default: str) -> str:
    # Only a path on this site: "//evil.example" or "/\evil" would leave it.
    if not isinstance(value, str) or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return default
    return value[:500]


def _scope(request: Request, principal: Principal) -> frozenset[str] | None:
    """The sites a page shows: the ``site`` parameter (checked against the principal), else all theirs."""
    site = context.site_param(request, principal)
    return frozenset({site}) if site is not None else principal.sites


def _queue_values(request: Request, principal: Principal) -> dict[str, Any]:
    db = context.store(request)
    sites = _scope(request, principal)
    offset = context.int_param(request, "offset", 0, maximum=100_000)
    site = request.query_params.get("site") or None
    return {
        "rows": review.queue(db, sites, limit=PAGE, offset=offset),
        "counts": review.queue_count(db, principal.sites),
        "site": site,
        "offset": offset,
        "page": PAGE,
        "can_review": principal.can("reviewer"),
        "outcomes": OUTCOMES,
        "query": f"?site={site}" if site else "",
    }


def queue_page(request: Request) -> Response:
    """``GET /queue``."""
    principal = context.require(request)
    return context.render(request, "queue.html", _queue_values(request, principal))


def queue_fragment(request: Request) -> Response:
    """``GET /fragments/queue``."""
    principal = context.require(request)
    return context.render(request, "queue_fragment.html", _queue_values(request, principal))


def queue_api(request: Request) -> Response:
    """``GET /api/queue``."""
    principal = context.require(request)
    db = context.store(request)
    offset = context.int_param(request, "offset", 0, maximum=100_000)
    limit = context.int_param(request, "limit", PAGE, maximum=review.MAX_PAGE)
    if limit < 1:
        raise context.BadRequest(f"limit must be a whole number from 1 to {review.MAX_PAGE}")
    rows = review.queue(db, _scope(request, principal), limit=limit, offset=offset)
    counts = review.queue_count(db, principal.sites)
    return context.json_response({"now": time.time(), "counts": counts, "rows": rows, "offset": offset, "limit": limit})


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """A published envelope as (dotted key, value) pairs, in the order the device sent them."""
    if isinstance(value, dict):
        out: list[tuple[str, Any]] = []
        for key, inner in value.items():
            out.extend(_flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, float) and not math.isfinite(value):
        return [(prefix, None)]
    return [(prefix, value)]


def _ood_of(payload: Any) -> dict[str, Any] | None:
    """The out-of-distribution check a result carries, as the page shows it; None for a result without one (a
    study decision, an unclassified frame, a device or model from before the check) or with the check off."""
    ood = payload.get("ood") if isinstance(payload, dict) else None
    if not isinstance(ood, dict) or ood.get("method") == "none":
        return None
    score, threshold = (ood.get(k) for k in ("score", "threshold"))
    shown = [f"{v:.2f}" if isinstance(v, int | float) and not isinstance(v, bool) else None for v in (score, threshold)]
    if shown[1] is None:
        return None  # no threshold to compare with: the table below shows what was sent
    return {
        "flagged": ood.get("flagged") is True,
        "method": ood.get("method"),
        # A device records a score that is not a finite number (a float model's overflow) as null, and flags it.
        "score": shown[0] or "not a finite number",
        "threshold": shown[1],
        "source": "the device profile" if ood.get("source") == "profile" else "the conversion",
    }


def result_page(request: Request) -> Response:
    """``GET /results/{id}``: what the device published (as text), the review and the escalation."""
    import json

    principal = context.require(request)
    result_id = request.path_params["result_id"]
    try:
        found = review.item(context.store(request), result_id, principal.sites)
    except review.ReviewNotFound as exc:
        raise context.NotFound(str(exc)) from exc
    try:
        payload = json.loads(found["payload"])
        published = _flatten(payload)
    except ValueError:
        payload, published = None, []  # kept by an older dashboard as something that is not JSON: the columns show
    values = {
        "item": found,
        "ood": _ood_of(payload),
        "row": found["row"],
        "published": published,
        "review": found["review"],
        "escalation": found["escalation"],
        "can_review": principal.can("reviewer"),
        "outcomes": OUTCOMES,
        "max_note": review.MAX_NOTE_CHARS,
    }
    return context.render(request, "result.html", values)


async def _fields(request: Request) -> tuple[dict[str, Any], bool]:
    """The request's fields and whether it came from a form (else JSON)."""
    kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if kind in _FORMS:
        form = await request.form()
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        await form.close()
        return fields, True
    body = await request.body()
    if not body:
        return {}, False
    import json

    try:
        value = json.loads(body)
    except ValueError as exc:
        raise context.BadRequest("the body is not JSON; send a form or a JSON object") from exc
    if not isinstance(value, dict):
        raise context.BadRequest("the body must be a JSON object")
    return value, False


def _answer(request: Request, fields: dict[str, Any], form: bool, done: dict[str, Any], result_id: str) -> Response:
    if form:
        target = _safe_next(fields.get("next"), f"/results/{result_id}")
        return RedirectResponse(target, status_code=303)
    return context.json_response({"review": done})


def _review_error(request: Request, exc: review.ReviewError, form: bool) -> Response:
    if form:  # a person sent a form: a page that says why, with the way back
        return context.render(request, "error.html", {"status": exc.status, "message": str(exc)}, exc.status)
    return context.json_response({"error": str(exc)}, exc.status)


def _act(request: Request, fields: dict[str, Any], form: bool, action: str) -> Response:
    principal = context.require(request, "reviewer")
    result_id = str(request.path_params["result_id"])
    db, keys, address = context.store(request), context.secrets(request), context.client_address(request)
    try:
        if action == "ack":
            done = review.acknowledge(db, result_id, principal.name, address, keys, sites=principal.sites)
        else:
            note = fields.get("note")
            outcome = fields.get("outcome")
            if not isinstance(outcome, str) or (note is not None and not isinstance(note, str)):
                raise review.ReviewInvalid(f"give an outcome ({', '.join(OUTCOMES)}) and, if you like, a text note")
            done = review.close(
                db, result_id, outcome, note[:_MAX_FIELD] if note else None, principal.name, address, keys,
                sites=principal.sites,
            )  # fmt: skip
    except review.ReviewError as exc:
        return _review_error(request, exc, form)
    return _answer(request, fields, form, done, result_id)


async def acknowledge(request: Request) -> Response:
    """``POST /api/results/{id}/ack``."""
    fields, form = await _fields(request)
    return await run_in_threadpool(_act, request, fields, form, "ack")


async def close(request: Request) -> Response:
    """``POST /api/results/{id}/close``."""
    fields, form = await _fields(request)
    return await run_in_threadpool(_act, request, fields, form, "close")


# -- settings ------------------------------------------------------------------------------------------------------


def _settings_page(request: Request, *, error: str | None = None, saved: bool = False, status: int = 200) -> Response:
    current = review_settings.load(context.store(request))
    values = {"settings": current, "error": error, "saved": saved, "maximum": review_settings.MAX_ESCALATE_AFTER_MIN}
    return context.render(request, "settings.html", values, status)


def settings_form(request: Request) -> Response:
    """``GET /admin/settings``."""
    context.require(request, "admin")
    return _settings_page(request, saved=request.query_params.get("saved") == "1")


def _save_settings(request: Request, fields: dict[str, Any]) -> Response:
    principal = context.require(request, "admin")
    try:
        review_settings.save(
            context.store(request),
            context.secrets(request),
            actor=principal.name,
            address=context.client_address(request),
            escalate_after_min=str(fields.get("escalate_after_min", ""))[:20],
            webhook_url=str(fields.get("webhook_url") or "")[:_MAX_FIELD],
        )
    except ConfigError as exc:
        return _settings_page(request, error=str(exc), status=400)
    return RedirectResponse("/admin/settings?saved=1", status_code=303)


async def settings_submit(request: Request) -> Response:
    """``POST /admin/settings``."""
    fields, _ = await _fields(request)
    return await run_in_threadpool(_save_settings, request, fields)


# -- export --------------------------------------------------------------------------------------------------------


def _known_sites(request: Request, principal: Principal) -> list[str]:
    if principal.sites is not None:
        return sorted(principal.sites)
    return [str(r[0]) for r in context.store(request)._query("SELECT DISTINCT site FROM devices ORDER BY site")]


def export_form(request: Request) -> Response:
    """``GET /export``."""
    principal = context.require(request, "reviewer")
    today = time.strftime("%Y-%m-%d", time.gmtime())
    since = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 7 * 86400))
    values = {
        "sites": _known_sites(request, principal),
        "today": today,
        "since": since,
        "formats": results_export.FORMATS,
    }
    return context.render(request, "export.html", values)


def _period(request: Request) -> tuple[float, float]:
    def bound(name: str, default: float) -> float:
        text = request.query_params.get(name)
        if not text:
            return default
        at = results_export.parse_time(text[:40], name)
        # A date alone as the end means that whole day (the form asks "to", inclusive).
        return at + 86400.0 if name == "until" and len(text.strip()) == 10 else at

    now = time.time()
    until = bound("until", now)
    return bound("since", until - 86400.0), until


def export_results(request: Request) -> Response:
    """``GET /export/results``: the download, audited (period, site, format, rows) before it starts."""
    principal = context.require(request, "reviewer")
    site = context.site_param(request, principal)
    fmt = request.query_params.get("format") or "csv"
    since, until = _period(request)
    sites = frozenset({site}) if site is not None else principal.sites
    db = context.store(request)
    chunks = results_export.export_results(db, fmt, since=since, until=until, sites=sites)  # checks fmt and period
    n = results_export.count_rows(db, since=since, until=until, sites=sites)
    since_text, until_text = results_export.iso(since) or "", results_export.iso(until) or ""
    detail: dict[str, Any] = {
        "since": since_text,
        "until": until_text,
        "format": fmt,
        "rows": n,
        "sites": None if sites is None else sorted(sites),
    }
    context.audit_event(request, principal, "export_results", site=site, detail=detail)
    name = "-".join(
        _FILENAME_UNSAFE.sub("_", part) for part in ("edgemed-results", site or "all", since_text[:10], until_text[:10])
    )
    media = "text/csv; charset=utf-8" if fmt == "csv" else "application/x-ndjson; charset=utf-8"
    headers = {"Content-Disposition": f'attachment; filename="{name[:150]}.{fmt}"', "Cache-Control": "no-store"}
    return StreamingResponse(chunks, media_type=media, headers=headers)


def routes() -> list[BaseRoute]:
    """The review routes (see the module docstring)."""
    return [
        Route("/queue", queue_page, methods=["GET", "HEAD"]),
        Route("/fragments/queue", queue_fragment, methods=["GET", "HEAD"]),
        Route("/api/queue", queue_api, methods=["GET", "HEAD"]),
        Route("/results/{result_id}", result_page, methods=["GET", "HEAD"]),
        Route("/api/results/{result_id}/ack", acknowledge, methods=["POST"]),
        Route("/api/results/{result_id}/close", close, methods=["POST"]),
        Route("/admin/settings", settings_form, methods=["GET", "HEAD"]),
        Route("/admin/settings", settings_submit, methods=["POST"]),
        Route("/export", export_form, methods=["GET", "HEAD"]),
        Route("/export/results", export_results, methods=["GET"]),  # HEAD too would audit an export never sent
    ]
