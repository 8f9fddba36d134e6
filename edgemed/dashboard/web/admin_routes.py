"""``/admin/users`` and ``/admin/audit``: admins manage who may log in, and read and export the audit trail.

Every route needs the admin role (``context.require(request, "admin")``); the middleware has already checked the
CSRF token and ``Origin`` of each POST. A user change goes through ``users.py``, which writes its audit row in the
change's own transaction (actor: the admin, address: the client). Each form answers with a 303 back to the page
(so a reload does not post again) and a fixed confirmation chosen by ``done``; a refused change renders the page
again with the reason (400), never the password.

``/admin/audit`` lists rows newest first, 50 a page, filtered by action and actor; ``?verify=1`` checks the whole
chain (as ``edgemed dashboard audit verify`` does) and shows the first broken row. ``/admin/audit.csv`` streams the
rows of a period as CSV; the export is itself audited (``export_audit``) before the first row leaves.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import quote, urlencode

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from edgemed.dashboard import audit, users
from edgemed.dashboard.tables import ROLES
from edgemed.dashboard.web import context
from edgemed.errors import ConfigError

__all__ = ["AUDIT_PAGE_ROWS", "routes"]

#: Audit rows per page.
AUDIT_PAGE_ROWS = 50
_MAX_FIELD = 1024
_DONE = {
    "added": "{user} was added.",
    "disabled": "{user} was disabled; their sessions ended.",
    "enabled": "{user} was enabled.",
    "role": "{user}'s role was changed.",
    "password": "{user}'s password was changed; their sessions ended.",
    "unchanged": "{user} was in that state already.",
}


async def _form(request: Request) -> dict[str, str]:
    form = await request.form()
    try:
        return {k: v[: _MAX_FIELD + 1] for k, v in form.items() if isinstance(v, str)}
    finally:
        await form.close()


def _message(request: Request) -> str | None:
    done, user = request.query_params.get("done"), request.query_params.get("user", "")
    if done not in _DONE:
        return None
    try:
        users.check_name(user)
    except users.UserError:
        return None
    return _DONE[done].format(user=user)


def _users_page(
    request: Request, *, error: str | None = None, status: int = 200, form: dict[str, str] | None = None
) -> Response:
    context.require(request, "admin")
    values: dict[str, Any] = {
        "users": users.list_users(context.store(request)),
        "roles": ROLES,
        "error": error,
        "message": None if error else _message(request),
        "form": {k: v for k, v in (form or {}).items() if k in ("name", "role", "sites")},
        "min_password": users.MIN_PASSWORD_CHARS,
    }
    return context.render(request, "admin_users.html", values, status)


def users_page(request: Request) -> Response:
    """``GET /admin/users``: every user, with forms to add one and to change each."""
    return _users_page(request)


def _done(done: str, name: str) -> Response:
    return RedirectResponse(f"/admin/users?{urlencode({'done': done, 'user': name})}", status_code=303)


def _who(request: Request, principal: context.Principal) -> dict[str, Any]:
    return {"secrets": context.secrets(request), "actor": principal.name, "address": context.client_address(request)}


def _new_password(form: dict[str, str]) -> str:
    password, again = form.get("password", ""), form.get("password2", "")
    if password != again:
        raise users.UserError("the two passwords differ; nothing was changed")
    return password


def _add(request: Request, form: dict[str, str]) -> Response:
    principal = context.require(request, "admin")
    name = form.get("name", "").strip()
    sites_text = form.get("sites", "").strip()
    sites = sites_text.split(",") if sites_text else None
    try:
        password = None if form.get("sso") == "1" else _new_password(form)
        users.add_user(context.store(request), name, form.get("role", ""), sites, password, **_who(request, principal))
    except users.UserError as exc:
        return _users_page(request, error=str(exc), status=400, form=form)
    return _done("added", name)


_CHANGES = {"disable": "disabled", "enable": "enabled", "role": "role", "password": "password"}


def _change(request: Request, form: dict[str, str]) -> Response:
    principal = context.require(request, "admin")
    name, what = request.path_params["name"], _CHANGES.get(request.path_params["action"])
    if what is None:
        raise context.NotFound(f"no such user action: {request.path_params['action'][:40]!r}")
    db, who = context.store(request), _who(request, principal)
    try:
        users.check_name(name)
        if what == "password":
            users.set_password(db, name, _new_password(form), **who)
            done = "password"
        elif what == "role":
            done = "role" if users.set_role(db, name, form.get("role", ""), **who) else "unchanged"
        else:
            done = what if users.set_disabled(db, name, what == "disabled", **who) else "unchanged"
    except users.UserError as exc:
        return _users_page(request, error=str(exc), status=400)
    return _done(done, name)


async def add_user(request: Request) -> Response:
    """``POST /admin/users``: add a user (name, role, sites, password twice, or single sign-on only)."""
    form = await _form(request)
    return await run_in_threadpool(_add, request, form)


async def change_user(request: Request) -> Response:
    """``POST /admin/users/{name}/{disable|enable|role|password}``: change one user."""
    form = await _form(request)
    return await run_in_threadpool(_change, request, form)


# -- the audit trail ----------------------------------------------------------------------------------------------


def _filters(request: Request) -> dict[str, str | None]:
    action = request.query_params.get("action") or None
    if action is not None and action not in audit.ACTIONS:
        raise context.BadRequest(f"action must be one of {', '.join(audit.ACTIONS)}")
    actor = (request.query_params.get("actor") or "").strip()[:200] or None
    return {"action": action, "actor": actor}


def _page_link(filters: dict[str, str | None], offset: int, **extra: str) -> str:
    query = {k: v for k, v in filters.items() if v}
    if offset:
        query["offset"] = str(offset)
    query.update(extra)
    return "/admin/audit" + ("?" + urlencode(query) if query else "")


def audit_page(request: Request) -> Response:
    """``GET /admin/audit``: the audit trail, newest first, paged and filtered; ``?verify=1`` checks the chain."""
    context.require(request, "admin")
    db = context.store(request)
    filters = _filters(request)
    offset = context.int_param(request, "offset", 0, maximum=10**9)
    total = audit.count(db, action=filters["action"], actor=filters["actor"])
    found = audit.rows(db, limit=AUDIT_PAGE_ROWS, offset=offset, action=filters["action"], actor=filters["actor"])
    checked = None
    if request.query_params.get("verify") == "1":
        checked = audit.verify(db, context.secrets(request).audit_key)
    values: dict[str, Any] = {
        "rows": found,
        "total": total,
        "offset": offset,
        "filters": filters,
        "actions": audit.ACTIONS,
        "verified": checked,
        "newer": _page_link(filters, max(0, offset - AUDIT_PAGE_ROWS)) if offset else None,
        "older": _page_link(filters, offset + AUDIT_PAGE_ROWS) if offset + AUDIT_PAGE_ROWS < total else None,
        "verify_link": _page_link(filters, offset, verify="1"),
    }
    return context.render(request, "admin_audit.html", values)


def _time_param(request: Request, name: str) -> tuple[str | None, float | None]:
    from edgemed.dashboard.export import parse_since

    text = (request.query_params.get(name) or "").strip()
    if not text:
        return None, None
    try:
        return text[:40], parse_since(text[:40])
    except ConfigError as exc:
        raise context.BadRequest(f"{name} must be an ISO 8601 time such as 2026-11-01 or 2026-11-01T08:00:00Z") from exc


def audit_csv(request: Request) -> Response:
    """``GET /admin/audit.csv?since=&until=``: the rows of a period as CSV, oldest first (audited)."""
    principal = context.require(request, "admin")
    (since_text, since), (until_text, until) = _time_param(request, "since"), _time_param(request, "until")
    db = context.store(request)
    n = audit.count(db, since=since, until=until)
    context.audit_event(
        request, principal, "export_audit", detail={"since": since_text, "until": until_text, "rows": n, "via": "page"}
    )
    name = f"edgemed-audit-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.csv"
    return StreamingResponse(
        audit.csv_chunks(db, since, until),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{quote(name)}"'},
    )


def routes() -> list[BaseRoute]:
    """The admin routes."""
    return [
        Route("/admin/users", users_page, methods=["GET", "HEAD"]),
        Route("/admin/users", add_user, methods=["POST"]),
        Route("/admin/users/{name}/{action}", change_user, methods=["POST"]),
        Route("/admin/audit", audit_page, methods=["GET", "HEAD"]),
        Route("/admin/audit.csv", audit_csv, methods=["GET"]),
    ]
