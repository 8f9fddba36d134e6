"""``GET/POST /login``, ``POST /logout``, ``GET /api/me``: password logins, rate-limited and audited."""

from __future__ import annotations

import logging
import secrets as random
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from edgemed.dashboard.web import context, sessions
from edgemed.dashboard.web.security import LOGIN_COOKIE, login_csrf

log = logging.getLogger(__name__)

__all__ = ["first_admin_command", "routes"]

_MAX_NAME = 64
_MAX_PASSWORD = 1024


def first_admin_command(db: str) -> str:
    """The one command that creates the first admin of a dashboard database."""
    return f"edgemed dashboard users add NAME --db {db} --role admin"


def _safe_next(value: str | None) -> str:
    # Only a path on this site: "//evil.example" or "/\evil" would leave it.
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value or len(value) > 500:
        return "/queue"
    return value


def _login_page(request: Request, *, error: str | None = None, status: int = 200, name: str = "") -> Response:
    from edgemed.dashboard import users

    cfg = context.config(request)
    cookie_token = request.cookies.get(LOGIN_COOKIE) or random.token_urlsafe(24)
    first = users.user_count(context.store(request)) == 0
    values: dict[str, Any] = {
        "error": error,
        "name": name,
        "next": _safe_next(request.query_params.get("next") or None),
        "first_admin": first_admin_command(cfg.db_display) if first else None,
        "csrf_token": login_csrf(cfg.secrets.session_key, cookie_token),
    }
    response = context.render(request, "login.html", values, status)
    secure = "; Secure" if cfg.secure_cookies else ""
    response.headers.append(
        "Set-Cookie", f"{LOGIN_COOKIE}={cookie_token}; Path=/login; Max-Age=3600; HttpOnly; SameSite=Strict{secure}"
    )
    return response


def login_form(request: Request) -> Response:
    """``GET /login``: the form (or, with no users yet, the command that creates the first admin)."""
    if context.optional_principal(request) is not None:
        return RedirectResponse(_safe_next(request.query_params.get("next")), status_code=303)
    return _login_page(request)


async def login_submit(request: Request) -> Response:
    """``POST /login``: check the password (after the rate limit's wait), start a session, go to ``next``."""
    from starlette.concurrency import run_in_threadpool

    form = await request.form()
    name = form.get("name")
    password = form.get("password")
    target = form.get("next")
    await form.close()
    if not isinstance(name, str) or not isinstance(password, str):
        return _login_page(request, error="enter a user name and a password", status=400)
    target_path = _safe_next(target if isinstance(target, str) else None)
    return await run_in_threadpool(_login, request, name.strip()[: _MAX_NAME + 1], password, target_path)


def _login(request: Request, name: str, password: str, target: str) -> Response:
    from edgemed.dashboard import users

    db, cfg, now = context.store(request), context.config(request), time.time()
    address = context.client_address(request)
    wait = users.login_delay(db, name, address, now)
    if wait > 0:
        response = _login_page(
            request,
            error=f"too many failed logins: wait {int(wait + 0.999)} s before trying again",
            status=429,
            name=name,
        )
        response.headers["Retry-After"] = str(int(wait + 0.999))
        return response
    user = None
    if len(name) <= _MAX_NAME and len(password) <= _MAX_PASSWORD:
        user = users.verify_password(db, name, password)
    if user is None or user.disabled:
        users.record_failure(db, name, address, now)
        context.audit_event(request, None, "login_failed", target=name[:_MAX_NAME])
        return _login_page(request, error="wrong user name or password", status=401, name=name)
    users.clear_failures(db, name, now)
    token, session = sessions.create(
        db, user.name, address, now, idle_s=cfg.idle_timeout_s, absolute_s=cfg.absolute_timeout_s
    )
    principal = context.Principal(user.name, user.role, user.sites, session.csrf)
    context.audit_event(request, principal, "login", detail={"via": "password"})
    response = RedirectResponse(target, status_code=303)
    response.headers.append("Set-Cookie", sessions.cookie_header(sessions.sign(cfg.secrets.session_key, token), cfg))
    response.headers.append("Set-Cookie", sessions.clear_cookie_header(cfg, LOGIN_COOKIE, "/login"))
    return response


def logout(request: Request) -> Response:
    """``POST /logout``: end the session (audited) and go to the login page."""
    cfg = context.config(request)
    session = context.current_session(request)
    if session is not None:
        principal = context.optional_principal(request)
        sessions.revoke(context.store(request), session.token_sha256)
        context.audit_event(request, principal, "logout", target=session.user_name)
    response = RedirectResponse("/login", status_code=303)
    response.headers.append("Set-Cookie", sessions.clear_cookie_header(cfg))
    return response


def me(request: Request) -> Response:
    """``GET /api/me``: who is logged in (401 when nobody)."""
    principal = context.require(request)
    return context.json_response(
        {
            "name": principal.name,
            "role": principal.role,
            "sites": sorted(principal.sites) if principal.sites is not None else None,
            "via": principal.via,
            "csrf": principal.csrf,
        }
    )


def routes() -> list[BaseRoute]:
    """The login routes."""
    return [
        Route("/login", login_form, methods=["GET", "HEAD"]),
        Route("/login", login_submit, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/api/me", me, methods=["GET"]),
    ]
