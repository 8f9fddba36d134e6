"""``GET /api/stream``: Server-Sent Events that tell an open page what changed, so it refreshes without reload.

The stream polls the database every ``POLL_S`` for what changed since its own cursor (``live_changes.ChangeFeed``:
new results and study decisions, devices heard from, reviews acknowledged or closed), only at the sites the user
may see, and sends one small event per change:

    event: result   data: {"kind": "frame"|"study", "result_id", "site", "device_id", "level"}
    event: device   data: {"site", "device_id"}
    event: review   data: {"result_id", "site", "state"}

never a payload: the page re-fetches its server-rendered fragments (``static/live.js``), whose reads are
site-filtered like every page. The first event is ``hello`` (the page then refreshes everything it shows: it may
have missed changes while it reconnected); a comment goes out every ``KEEPALIVE_S`` so that proxies keep the
connection open. Polling keeps no state in the process: any web process behind a load balancer serves any stream,
and a result stored by another process is seen as soon as it commits. An urgent result stored reaches the page
within a poll plus one fragment fetch (well under the 2 s the issue asks for).

Every ``RECHECK_S`` the stream checks the session again (logged out, expired, user disabled, role or sites
changed): then it sends ``end`` and closes, and the page's reconnection meets the login. A stream also closes
after ``MAX_STREAM_S`` (the browser reconnects by itself), and a process serves at most ``MAX_STREAMS`` at once
(503 beyond: each holds a connection, and uvicorn's ``limit_concurrency`` must leave room for the pages). When
the server stops (``WebServer.stop`` calls ``app.state.end_streams``), each stream ends at its next poll rather
than being cancelled after uvicorn's graceful time-out.

The endpoint is ``async`` (unlike the other routes): a stream waits most of its life, and an async generator
waits without holding a worker thread; the database reads run in the thread pool.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
from sqlalchemy.exc import SQLAlchemyError
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from edgemed.dashboard import users
from edgemed.dashboard.live_changes import Change, ChangeFeed
from edgemed.dashboard.web import context, sessions

log = logging.getLogger(__name__)

__all__ = ["KEEPALIVE_S", "MAX_STREAMS", "MAX_STREAM_S", "POLL_S", "RECHECK_S", "routes"]

#: Seconds between two polls of the database.
POLL_S = 0.5
#: Seconds without an event before a keep-alive comment.
KEEPALIVE_S = 15.0
#: Seconds between two checks of the session.
RECHECK_S = 2.0
#: Longest life of one stream (seconds); the browser then reconnects by itself.
MAX_STREAM_S = 30 * 60.0
#: Streams one process serves at once.
MAX_STREAMS = 50
#: What the browser waits before reconnecting (milliseconds, the stream's ``retry:``).
RETRY_MS = 2000


class _Slots:
    """How many streams this app serves now (per process: each process has its own connections)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.open = 0
        #: Set when the server stops: each stream says ``end`` at its next poll (instead of being cut off).
        self.stopping = threading.Event()

    def take(self, limit: int) -> Callable[[], None] | None:
        with self._lock:
            if self.open >= limit:
                return None
            self.open += 1
        done = threading.Event()

        def release() -> None:
            with self._lock:
                if not done.is_set():
                    done.set()
                    self.open -= 1

        return release


_slots_lock = threading.Lock()


def _slots(request: Request) -> _Slots:
    state = request.app.state
    with _slots_lock:
        slots = getattr(state, "live_slots", None)
        if slots is None:
            slots = state.live_slots = _Slots()
            state.end_streams = slots.stopping.set  # WebServer.stop() calls it
    return slots


def open_streams(request: Request) -> int:
    """How many event streams this process serves now."""
    return _slots(request).open


def _event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {context.encode_json(data).decode()}\n\n"


def _still_valid(request: Request, principal: context.Principal) -> bool:
    """The session behind the stream is still live and the user still what it was when the stream began."""
    cfg, db = context.config(request), context.store(request)
    user = users.get_user(db, principal.name)
    if user is None or user.disabled or user.role != principal.role or user.sites != principal.sites:
        return False
    value = request.cookies.get(sessions.COOKIE)
    token = sessions.unsign(cfg.secrets.session_key, value) if value else None
    if token is None:
        return principal.via == "proxy"  # single sign-on without a cookie: the proxy vouched for the user
    session = sessions.lookup(db, token, time.time(), idle_s=cfg.idle_timeout_s, absolute_s=cfg.absolute_timeout_s)
    return session is not None and session.user_name == principal.name


async def _events(request: Request, principal: context.Principal, feed: ChangeFeed) -> AsyncIterator[str]:
    db, stopping = context.store(request), _slots(request).stopping
    yield f"retry: {RETRY_MS}\n\n" + _event("hello", {"user": principal.name})
    started = last_sent = last_check = time.monotonic()
    while True:
        await anyio.sleep(POLL_S)
        now = time.monotonic()
        if stopping.is_set():
            yield _event("end", {"reason": "the server is stopping; reconnecting"})
            return
        if now - last_check >= RECHECK_S:
            last_check = now
            if not await run_in_threadpool(_still_valid, request, principal):
                yield _event("end", {"reason": "the session ended: log in again"})
                return
        if now - started >= MAX_STREAM_S:
            yield _event("end", {"reason": "reconnect"})
            return
        try:
            changes: list[Change] = await run_in_threadpool(feed.poll, db)
        except SQLAlchemyError as exc:
            log.warning("the live stream cannot read the dashboard database (%s); the page will reconnect", exc)
            yield _event("end", {"reason": "the database is unavailable; reconnecting"})
            return
        if changes:
            yield "".join(_event(c.event, c.data) for c in changes)
            last_sent = now
        elif now - last_sent >= KEEPALIVE_S:
            yield ": keep-alive\n\n"
            last_sent = now


async def _released(events: AsyncIterator[str], release: Callable[[], None]) -> AsyncIterator[str]:
    try:
        async for chunk in events:
            yield chunk
    finally:
        release()


async def stream(request: Request) -> Response:
    """``GET /api/stream``: the event stream of the logged-in user's sites (401 without a session, 503 when full)."""
    principal = await run_in_threadpool(context.require, request)
    release = _slots(request).take(MAX_STREAMS)
    if release is None:
        return context.json_response({"error": f"too many live streams open (at most {MAX_STREAMS}); try again"}, 503)
    try:
        feed = ChangeFeed(principal.sites)
        await run_in_threadpool(feed.start, context.store(request))
    except BaseException:
        release()
        raise
    return StreamingResponse(
        _released(_events(request, principal, feed), release),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},  # nginx: pass each event on at once
        background=BackgroundTask(release),  # also when the client went away mid-stream
    )


def routes() -> list[BaseRoute]:
    """This module's routes."""
    return [Route("/api/stream", stream, methods=["GET"])]
