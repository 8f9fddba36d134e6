"""The middleware in front of every route: security headers, the ``Host`` check, the body limit, CSRF and ``Origin``.

- Every response carries the Content-Security-Policy ``CSP`` (no inline script or style anywhere: templates load
  ``/static`` files only), ``X-Content-Type-Options: nosniff``, ``Referrer-Policy: same-origin`` (no URL leaves
  the site; ``no-referrer`` would make the browser send ``Origin: null`` with its own form posts),
  ``X-Frame-Options: DENY``, ``Cache-Control: no-store`` (unless the route set its own) and, under TLS,
  ``Strict-Transport-Security``.
- On a loopback binding the ``Host`` header must name the loopback or a ``--public-origin``'s host: a DNS-rebinding
  page (``evil.example`` resolving to 127.0.0.1) cannot read the API. ``/metrics`` is exempt (a scraper names the
  server by whatever address it scrapes; it has its own allow-list).
- A body longer than ``max_body_bytes`` is refused (413) before it is read; one that has not all arrived within
  ``request_timeout_s`` is refused (408) and its connection closed.
- A request of any method but GET, HEAD and OPTIONS (POST, PUT, PATCH, DELETE, or whatever a route accepts) must
  carry the session's CSRF token (form field ``csrf`` or header ``X-CSRF-Token``) and, when the browser sends
  ``Origin``, come from the page's own origin or a ``--public-origin``; else 403 before any route runs. The login
  form, which has no session yet, carries a token derived from a pre-login cookie (``LOGIN_COOKIE``), so a
  cross-site page cannot log a victim into its account.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections.abc import MutableMapping
from typing import Any
from urllib.parse import urlsplit

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgemed.dashboard.store import DashboardStore
from edgemed.dashboard.web import sessions
from edgemed.dashboard.web.config import WebConfig
from edgemed.publish.config import is_loopback

log = logging.getLogger(__name__)

__all__ = ["CSP", "LOGIN_COOKIE", "SAFE_METHODS", "SecurityMiddleware", "login_csrf"]

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
#: The pre-login cookie: a random token; the login form's CSRF token is its HMAC (``login_csrf``).
LOGIN_COOKIE = "edgemed_login"
#: Every other method changes state as far as the checks go: a route some module registers for PURGE or PROPFIND
#: gets the CSRF and Origin checks too, without anyone remembering to add its method here.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_FORMS = ("application/x-www-form-urlencoded", "multipart/form-data")


def login_csrf(key: bytes, cookie_token: str) -> str:
    """The login form's CSRF token for a pre-login cookie token."""
    return hmac.new(key, b"login-csrf:" + cookie_token.encode(), hashlib.sha256).hexdigest()


def _same(expected: str, given: str) -> bool:
    # Bytes: compare_digest refuses a str that is not ASCII, and a header or field may hold anything.
    return hmac.compare_digest(expected.encode(), given.encode("utf-8", "replace"))


def _replay(body: bytes) -> Receive:
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


class SecurityMiddleware:
    """ASGI middleware applying the checks of the module docstring to every HTTP request."""

    def __init__(self, app: ASGIApp, store: DashboardStore, config: WebConfig) -> None:
        """Wrap ``app``.

        Args:
            app: the Starlette app.
            store: the dashboard database (sessions are looked up in it for the CSRF check).
            config: the web config.
        """
        self.app = app
        self.store = store
        self.config = config
        self.public_hosts = config.public_hosts
        self.public_origins = frozenset(config.public_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check the request, then pass it on with the response's headers added."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        state: MutableMapping[str, Any] = scope.setdefault("state", {})
        send = self._with_headers(send, state)
        if scope["path"] != "/metrics" and not self._host_ok(headers):
            await _refuse(send, 403, "this dashboard answers only to 127.0.0.1 or localhost (or a --public-origin)")
            return
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.config.max_body_bytes):
            await _refuse(send, 413, f"a request body may be at most {self.config.max_body_bytes} bytes")
            return
        if scope["method"] not in SAFE_METHODS:
            try:
                body = await self._read_body(receive)
            except TimeoutError:
                timeout = self.config.request_timeout_s
                await _refuse(send, 408, f"the request body did not arrive within {timeout:g} s", close=True)
                return
            if body is None:
                await _refuse(send, 413, f"a request body may be at most {self.config.max_body_bytes} bytes")
                return
            if not self._origin_ok(headers):
                await _refuse(
                    send,
                    403,
                    "cross-origin request refused; behind a reverse proxy, start the dashboard with "
                    "--public-origin https://PROXY-HOST",
                )
                return
            try:
                problem = await self._csrf_problem(scope, headers, body, state)
            except HTTPException as exc:  # a form body that cannot be parsed (a multipart without its boundary)
                await _refuse(send, 400, f"the form body cannot be read: {exc.detail}")
                return
            if problem is not None:
                await _refuse(send, 403, problem)
                return
            receive = _replay(body)
        await self.app(scope, receive, send)

    def _with_headers(self, send: Send, state: MutableMapping[str, Any]) -> Send:
        tls = self.config.tls

        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                out = MutableHeaders(scope=message)
                out["Content-Security-Policy"] = CSP
                out["X-Content-Type-Options"] = "nosniff"
                out["Referrer-Policy"] = "same-origin"
                out["X-Frame-Options"] = "DENY"
                if "cache-control" not in out:
                    out["Cache-Control"] = "no-store"
                if tls:
                    out["Strict-Transport-Security"] = "max-age=31536000"
                for cookie in state.get("edgemed_cookies", ()):
                    out.append("Set-Cookie", cookie)
            await send(message)

        return wrapped

    def _host_ok(self, headers: Headers) -> bool:
        if not self.config.loopback_only:
            return True
        host_header = (headers.get("host") or "").lower()
        if host_header in self.public_hosts:
            return True  # the reverse proxy's public name, passed on by the proxy
        try:
            host = urlsplit("//" + host_header).hostname or ""
        except ValueError:
            return False
        return is_loopback(host)

    def _origin_ok(self, headers: Headers) -> bool:
        origin = headers.get("origin")
        if origin is None:
            return True  # not from a browser page (curl, a script): the CSRF token still has to be right
        origin = origin.lower()
        host = (headers.get("host") or "").lower()
        # Under TLS the page is https: an http page of the same host is another origin (port 80, plain text). Without
        # TLS an https origin naming this Host is a TLS proxy in front that passes the Host on.
        own = (f"https://{host}",) if self.config.tls else (f"http://{host}", f"https://{host}")
        return origin in own or origin in self.public_origins

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body; None when it is over the limit. TimeoutError: not all there within ``request_timeout_s``.

        The server's own timer stops at the end of the request head: without this deadline a client sending a body
        a byte at a time would hold its connection (and one of ``limit_concurrency``'s slots) for ever.
        """
        async with asyncio.timeout(self.config.request_timeout_s):
            return await self._read_chunks(receive)

    async def _read_chunks(self, receive: Receive) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.config.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    async def _csrf_problem(
        self, scope: Scope, headers: Headers, body: bytes, state: MutableMapping[str, Any]
    ) -> str | None:
        """None when the request carries the right token, else why it is refused."""
        given = headers.get("x-csrf-token")
        if given is None and headers.get("content-type", "").split(";")[0].strip().lower() in _FORMS:
            form = await Request(scope, _replay(body)).form()
            value = form.get("csrf")
            given = value if isinstance(value, str) else None
            await form.close()
        request = Request(scope)
        key = self.config.secrets.session_key
        if scope["path"] == "/login":
            cookie = request.cookies.get(LOGIN_COOKIE)
            expected = login_csrf(key, cookie) if cookie else None
            if expected is None or given is None or not _same(expected, given):
                return "the login form expired or came from another site: reload the login page and try again"
            return None
        value = request.cookies.get(sessions.COOKIE)
        token = sessions.unsign(key, value) if value else None
        session = None
        if token is not None:
            session = await run_in_threadpool(
                sessions.lookup,
                self.store,
                token,
                time.time(),
                idle_s=self.config.idle_timeout_s,
                absolute_s=self.config.absolute_timeout_s,
            )
        state["edgemed_session"] = session
        if session is None:
            if scope["path"] == "/logout":
                return None  # logging out of a session that already ended: nothing to protect
            return "no session: log in on the dashboard page first"
        if given is None or not _same(session.csrf, given):
            return "missing or wrong CSRF token: send the page's form (field csrf) or the X-CSRF-Token header"
        return None


async def _refuse(send: Send, status: int, message: str, *, close: bool = False) -> None:
    from edgemed.dashboard.web.context import encode_json

    body = encode_json({"error": message})
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))  # the rest of the request never came: the connection is done
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
