"""``GET/POST /login``, ``POST /logout``, ``GET /api/me``: password logins, rate-limited and audited.

The slow-down (``users.claim_attempt``) counts failures per user name and per address, so a guesser with many
addresses still gets about one try per 5 minutes at a name. Counted per name alone, that same guesser could keep a
real user out for ever with one wrong password every 5 minutes. So a browser that has logged in as a user before
carries ``KNOWN_COOKIE`` (signed, naming the user; it logs no one in): its attempts at that name are counted under
a key of their own (the name and the cookie's nonce) and its address, not under the name everyone else's failures
fill. A stolen one buys only its own slowed count.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets as random
import time
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from edgemed.dashboard.web import context, sessions
from edgemed.dashboard.web.security import LOGIN_COOKIE, login_csrf

if TYPE_CHECKING:
    from edgemed.dashboard.web.config import WebConfig

log = logging.getLogger(__name__)

__all__ = ["KNOWN_COOKIE", "first_admin_command", "routes"]

_MAX_NAME = 64
_MAX_PASSWORD = 1024
#: Set at each successful login: "this browser has logged in as NAME" (see the module docstring).
KNOWN_COOKIE = "edgemed_known"
_KNOWN_MAX_AGE_S = 90 * 86400
_KNOWN_LABEL = "known-browser:"


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


def _known_cookie(key: bytes, name: str, cfg: WebConfig) -> str:
    value = sessions.sign(key, f"{_KNOWN_LABEL}{name}~{random.token_urlsafe(12)}")
    secure = "; Secure" if cfg.secure_cookies else ""
    return f"{KNOWN_COOKIE}={value}; Path=/login; Max-Age={_KNOWN_MAX_AGE_S}; HttpOnly; SameSite=Strict{secure}"


def _slowdown_name(request: Request, key: bytes, name: str) -> str:
    """The name the slow-down counts this attempt under: a keyed digest of the typed name (what people type there
    is sometimes their password: ``login_failures`` must not keep it), and ``~NONCE`` from a browser known as it."""
    digest = hmac.new(key, b"login-name:" + name.encode("utf-8", "replace"), hashlib.sha256).hexdigest()[:32]
    counted = f"#{digest}"  # "#" and "~" are in no user name: no collision with a count kept under a plain name
    value = request.cookies.get(KNOWN_COOKIE)
    token = sessions.unsign(key, value) if value else None
    if token is None or not token.startswith(_KNOWN_LABEL):
        return counted
    who, _, nonce = token[len(_KNOWN_LABEL) :].rpartition("~")
    return f"{counted}~{nonce}" if who == name and nonce else counted


def _login(request: Request, name: str, password: str, target: str) -> Response:
    from edgemed.dashboard import users

    db, cfg, now = context.store(request), context.config(request), time.time()
    address = context.client_address(request)
    counted_as = _slowdown_name(request, cfg.secrets.session_key, name)
    # The wait is checked and this attempt counted in one transaction (under a lock on PostgreSQL): wrong passwords
    # sent at once, to one process or to several, are counted one after the other instead of all finding no wait.
    wait, attempt = users.claim_attempt(db, counted_as, address, now)
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
    if user is None or user.disabled:  # already counted by claim_attempt
        # The typed name only when it names a user: what people type there is sometimes their password.
        known = users.get_user(db, name) is not None
        detail = {} if known else {"user": "unknown"}
        context.audit_event(request, None, "login_failed", target=name if known else None, detail=detail)
        return _login_page(request, error="wrong user name or password", status=401, name=name)
    # Only the count this attempt was under: a login from a known browser leaves the guesser's count at the name.
    users.attempt_succeeded(db, counted_as, attempt, now)
    token, session = sessions.create(
        db, user.name, address, now, idle_s=cfg.idle_timeout_s, absolute_s=cfg.absolute_timeout_s
    )
    principal = context.Principal(user.name, user.role, user.sites, session.csrf)
    context.audit_event(request, principal, "login", detail={"via": "password"})
    response = RedirectResponse(target, status_code=303)
    response.headers.append("Set-Cookie", sessions.cookie_header(sessions.sign(cfg.secrets.session_key, token), cfg))
    response.headers.append("Set-Cookie", sessions.clear_cookie_header(cfg, LOGIN_COOKIE, "/login"))
    response.headers.append("Set-Cookie", _known_cookie(cfg.secrets.session_key, user.name, cfg))
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
