"""The API every route module uses: who is asking, what they may see, and how to answer.

An endpoint is a plain sync function ``def endpoint(request: Request) -> Response`` (Starlette runs it in its
thread pool, the store being synchronous). It starts with ``principal = require(request, "reviewer")`` (or the
default "viewer"), reads through ``store(request)`` filtered by ``principal.sees(site)`` / ``site_param``, and
answers with ``render(request, "page.html", {...})`` or ``json_response(value)``. Errors are raised, not returned:
``Unauthenticated`` (a page goes to the login, ``/api/`` and ``/fragments/`` answer 401 JSON), ``Forbidden`` (403),
``BadRequest`` (400), ``NotFound`` (404), ``Conflict`` (409); the app turns each into JSON under ``/api/`` and
``/fragments/`` and into ``error.html`` elsewhere. CSRF and ``Origin`` are checked by the middleware before any
state-changing endpoint runs: a form only needs ``<input type="hidden" name="csrf" value="{{ csrf_token }}">``
and a script the header ``X-CSRF-Token``.

Templates get ``principal`` (None when nobody is logged in), ``csrf_token``, ``now`` (epoch seconds), ``nav``
(the links this principal may follow: dicts ``label``, ``href``, ``active``), ``alerts`` (the system's own
trouble: results not saved, nothing received) and the filters ``utc`` (epoch -> ``2026-12-01 21:14:05 UTC``),
``ago`` (epoch -> ``5 min ago``) and ``clip(n=300)`` (a long device string cut for a cell, saying so).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from edgemed.dashboard.metrics import address_allowed
from edgemed.dashboard.web import sessions, templating
from edgemed.dashboard.web.config import WebConfig
from edgemed.dashboard.web.errors import BadRequest, Conflict, Forbidden, HttpError, NotFound, Unauthenticated
from edgemed.dashboard.web.security import SAFE_METHODS

if TYPE_CHECKING:
    from edgemed.dashboard.secrets import Secrets
    from edgemed.dashboard.store import DashboardStore

log = logging.getLogger(__name__)

__all__ = [
    "ROLES",
    "BadRequest",
    "Conflict",
    "Forbidden",
    "HttpError",
    "NotFound",
    "Principal",
    "Unauthenticated",
    "audit_event",
    "client_address",
    "config",
    "encode_json",
    "int_param",
    "json_response",
    "optional_principal",
    "render",
    "require",
    "secrets",
    "site_param",
    "store",
]

#: Each role can do what the roles before it can.
ROLES = ("viewer", "reviewer", "admin")


@dataclass(frozen=True)
class Principal:
    """The person behind a request, as the database says now.

    Attributes:
        name: the user name.
        role: "viewer", "reviewer" or "admin".
        sites: the sites they may see; None = every site.
        csrf: their session's CSRF token (forms carry it as ``csrf``, scripts as ``X-CSRF-Token``).
        via: "password" (logged in on the login page) or "proxy" (single sign-on from a trusted proxy).
    """

    name: str
    role: str
    sites: frozenset[str] | None
    csrf: str
    via: str = "password"

    def can(self, role: str) -> bool:
        """Whether this principal has ``role`` or a stronger one (admin ⊇ reviewer ⊇ viewer)."""
        return role in ROLES and self.role in ROLES and ROLES.index(self.role) >= ROLES.index(role)

    def sees(self, site: str) -> bool:
        """Whether this principal may see ``site``."""
        return self.sites is None or site in self.sites


# -- the app's state -----------------------------------------------------------------------------------------------


def store(request: Request) -> DashboardStore:
    """The dashboard database of this app."""
    value: DashboardStore = request.app.state.store
    return value


def config(request: Request) -> WebConfig:
    """The app's ``WebConfig``."""
    value: WebConfig = request.app.state.config
    return value


def secrets(request: Request) -> Secrets:
    """The deployment's keys (``config(request).secrets``)."""
    return config(request).secrets


def client_address(request: Request) -> str:
    """The client's address: the peer, or the ``X-Forwarded-For`` client when the peer is a trusted proxy.

    Only the last ``X-Forwarded-For`` entry is believed (the one the trusted proxy appended); anything the client
    itself wrote before it could be invented. The last entry of the last header line: a proxy may add a line of
    its own after the client's (HAProxy's ``option forwardfor``) instead of extending the client's line.
    """
    peer = request.client.host if request.client is not None else ""
    trusted = config(request).trusted_proxies
    if trusted and address_allowed(peer, trusted):
        lines = request.headers.getlist("x-forwarded-for")
        forwarded = lines[-1].rsplit(",", 1)[-1].strip() if lines else ""
        try:
            return str(ipaddress.ip_address(forwarded))
        except ValueError:
            return peer
    return peer


# -- who is asking -------------------------------------------------------------------------------------------------

_NOBODY = object()


def current_session(request: Request, now: float | None = None) -> sessions.Session | None:
    """The request's live session from its cookie (cached on the request; the middleware may have set it)."""
    state = request.scope.setdefault("state", {})
    if "edgemed_session" in state:
        cached: sessions.Session | None = state["edgemed_session"]
        return cached
    cfg = config(request)
    value = request.cookies.get(sessions.COOKIE)
    token = sessions.unsign(cfg.secrets.session_key, value) if value else None
    found = None
    if token is not None:
        found = sessions.lookup(
            store(request),
            token,
            time.time() if now is None else now,
            idle_s=cfg.idle_timeout_s,
            absolute_s=cfg.absolute_timeout_s,
        )
    if value and found is None:
        # Ended, revoked or forged: tell the browser to drop it instead of sending it with every request.
        state.setdefault("edgemed_cookies", []).append(sessions.clear_cookie_header(cfg))
    state["edgemed_session"] = found
    return found


def _proxy_user(request: Request) -> str | None:
    """The name a trusted proxy signs on; None: no sign-on here; "": nobody (the header is there but not usable)."""
    cfg = config(request)
    if cfg.proxy_user_header is None:
        return None
    given = request.headers.getlist(cfg.proxy_user_header)
    if not any(given):
        return None
    name = given[0]
    peer = request.client.host if request.client is not None else ""
    if not address_allowed(peer, cfg.trusted_proxies):
        warned: threading.Event = request.app.state.sso_warned
        if not warned.is_set():
            warned.set()
            log.warning(
                "a request from %s carries the single sign-on header %s but %s is not a --trusted-proxy: the header "
                "is ignored (logged once)",
                peer,
                cfg.proxy_user_header,
                peer,
            )
        return None
    if len(given) > 1:
        # A proxy that adds its line beside the client's instead of replacing it: which is the proxy's cannot be
        # told, and the first may be the client's own choice of user.
        repeated: threading.Event = request.app.state.sso_repeated_warned
        if not repeated.is_set():
            repeated.set()
            log.warning(
                "a request from the trusted proxy %s carries the single sign-on header %s %d times: nobody is "
                "signed on; make the proxy replace the header, not add one (logged once)",
                peer,
                cfg.proxy_user_header,
                len(given),
            )
        return ""
    return name.strip()


def _sign_on(request: Request, name: str, session: sessions.Session | None, now: float) -> Principal | None:
    """The principal a trusted proxy names: that user or nobody (never the browser's other session)."""
    from edgemed.dashboard import users

    cfg, db = config(request), store(request)
    user = users.get_user(db, name)
    if user is None or user.disabled:
        return None
    if session is not None and session.user_name == user.name:
        sessions.touch(db, session, now)
        return Principal(user.name, user.role, user.sites, session.csrf, "proxy")
    if request.method not in SAFE_METHODS:
        return None  # the CSRF token was checked against another user's session, not this one's
    # A session of its own, so that its forms carry a CSRF token like everyone's; audited once per session.
    token, session = sessions.create(
        db, user.name, client_address(request), now, idle_s=cfg.idle_timeout_s, absolute_s=cfg.absolute_timeout_s
    )
    state = request.scope["state"]
    state["edgemed_session"] = session
    state.setdefault("edgemed_cookies", []).append(
        sessions.cookie_header(sessions.sign(cfg.secrets.session_key, token), cfg)
    )
    principal = Principal(user.name, user.role, user.sites, session.csrf, "proxy")
    audit_event(request, principal, "login", detail={"via": "proxy"})
    return principal


def _resolve(request: Request) -> Principal | None:
    from edgemed.dashboard import users

    db, now = store(request), time.time()
    session = current_session(request, now)
    proxied = _proxy_user(request)
    if proxied is not None:
        return _sign_on(request, proxied, session, now)
    if session is None:
        return None
    user = users.get_user(db, session.user_name)
    if user is None or user.disabled:
        sessions.revoke(db, session.token_sha256)
        return None
    sessions.touch(db, session, now)
    return Principal(user.name, user.role, user.sites, session.csrf, "password")


def optional_principal(request: Request) -> Principal | None:
    """The logged-in principal, or None (no error); resolved once per request."""
    state = request.scope.setdefault("state", {})
    cached = state.get("edgemed_principal", _NOBODY)
    if cached is _NOBODY:
        cached = _resolve(request)
        state["edgemed_principal"] = cached
    principal: Principal | None = cached
    return principal


def require(request: Request, role: str = "viewer") -> Principal:
    """The logged-in, enabled user behind the request, with at least ``role``.

    The user is read from the database on every request: a disabled user or a changed role takes effect at once.

    Args:
        request: the request.
        role: "viewer", "reviewer" or "admin".

    Returns:
        The principal.

    Raises:
        Unauthenticated: nobody is logged in, the session expired, or the user was disabled.
        Forbidden: the user's role is weaker than ``role``.
    """
    principal = optional_principal(request)
    if principal is None:
        raise Unauthenticated("log in first (the session ended or there is none)")
    if not principal.can(role):
        raise Forbidden(f"this needs the {role} role; {principal.name} is a {principal.role}")
    return principal


# -- parameters ----------------------------------------------------------------------------------------------------


def int_param(request: Request, name: str, default: int, *, maximum: int) -> int:
    """A whole-number query parameter between 0 and ``maximum``, ``default`` when absent.

    Raises:
        BadRequest: not a whole number, or above ``maximum``.
    """
    text = request.query_params.get(name)
    if text is None or text == "":
        return default
    if not text.isdigit() or len(text) > 9 or int(text) > maximum:
        raise BadRequest(f"{name} must be a whole number from 0 to {maximum}, not {text[:20]!r}")
    return int(text)


def site_param(request: Request, principal: Principal) -> str | None:
    """The ``site`` query parameter (None when absent), which the principal must be allowed to see.

    Raises:
        BadRequest: longer than a site can be.
        Forbidden: a site outside the principal's sites.
    """
    site = request.query_params.get("site") or None
    if site is None:
        return None
    if len(site) > 128:
        raise BadRequest("site is longer than any site id (128 characters)")
    if not principal.sees(site):
        raise Forbidden(f"{principal.name} may not see site {site!r}")
    return site


# -- answers -------------------------------------------------------------------------------------------------------


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def encode_json(value: Any) -> bytes:
    """The API's JSON: always valid JSON, with any NaN or Infinity replaced by null.

    The ingest refuses non-finite numbers and the store never returns one; this is the last line, because one
    ``NaN`` in ``/api/fleet`` once made the page's ``JSON.parse`` fail and blanked the dashboard for everyone.

    Args:
        value: what to send.

    Returns:
        Compact UTF-8 JSON.
    """
    try:
        text = json.dumps(value, separators=(",", ":"), allow_nan=False)
    except ValueError:
        log.warning("a non-finite number reached the dashboard's API; it is sent as null")
        text = json.dumps(_finite(value), separators=(",", ":"), allow_nan=False)
    return text.encode()


def json_response(value: Any, status: int = 200) -> Response:
    """A JSON answer (``encode_json``: NaN and Infinity become null)."""
    return Response(encode_json(value), status_code=status, media_type="application/json")


def render(request: Request, template: str, context: dict[str, Any], status: int = 200) -> HTMLResponse:
    """Render a template of ``web/templates/`` (autoescaped) into an HTML response.

    Args:
        request: the request (its principal, CSRF token and path reach the template).
        template: the file name, e.g. ``"queue.html"``.
        context: the template's variables; they win over the common ones.
        status: the HTTP status.

    Returns:
        The response.
    """
    principal = optional_principal(request)
    common: dict[str, Any] = {
        "request": request,
        "principal": principal,
        "csrf_token": principal.csrf if principal is not None else "",
        "now": time.time(),
        "nav": templating.nav(principal, request.url.path),
        "alerts": templating.system_alerts(config(request), store(request)) if principal is not None else [],
    }
    common.update(context)
    return HTMLResponse(templating.ENV.get_template(template).render(common), status_code=status)


def audit_event(
    request: Request,
    principal: Principal | None,
    action: str,
    *,
    target: str | None = None,
    site: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    """Append a row to the audit trail, in its own transaction (``audit.record``).

    For an action whose row must commit with the change itself, call ``audit.append(conn, ...)`` inside the
    store's transaction instead.

    Args:
        request: the request (its client address is recorded).
        principal: who did it; None: nobody logged in (a failed login): the actor is ``-``.
        action: one of the audit actions (``login``, ``login_failed``, ...).
        target: what it was done to (a result id, a user name).
        site: the site concerned.
        detail: more, as JSON.
    """
    from edgemed.dashboard import audit

    audit.record(
        store(request),
        secrets(request),
        at=time.time(),
        actor=principal.name if principal is not None else "-",
        address=client_address(request),
        action=action,
        target=target,
        site=site,
        detail=detail or {},
    )
