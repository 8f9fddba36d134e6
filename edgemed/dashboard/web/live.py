"""``GET /api/stream``: Server-Sent Events that tell an open page what changed, so it refreshes without reload.

One poller per process reads the database every ``POLL_S`` for what changed since its cursor
(``live_changes.ChangeFeed``: new results and study decisions, devices heard from, reviews acknowledged or
closed) and hands each stream the changes at the sites its user may see, so the database's load does not grow
with the number of open pages. Each change is one small event:

    event: result   data: {"kind": "frame"|"study", "result_id", "site", "device_id", "level"}
    event: device   data: {"site", "device_id"}
    event: review   data: {"result_id", "site", "state"}

never a payload: the page re-fetches its server-rendered fragments (``static/live.js``), whose reads are
site-filtered like every page. The first event is ``hello`` (after a reconnection the page then refreshes what it
shows: it may have missed changes meanwhile); a comment goes out every ``KEEPALIVE_S`` so that proxies keep the
connection open. The poller keeps no state that matters: any web process behind a load balancer serves any
stream, and a result stored by another process is seen as soon as it commits. An urgent result reaches the page
within a poll plus one fragment fetch (well under the 2 s the issue asks for).

Every ``RECHECK_S`` a stream checks its session again (logged out, expired, user disabled, role or sites
changed): then it sends ``end`` and closes, and the page's reconnection meets the login. A stream also closes
after ``MAX_STREAM_S`` (the browser reconnects by itself) or when it falls ``QUEUE_BATCHES`` polls behind, and a
process serves at most ``MAX_STREAMS`` at once (503 beyond: each holds a connection, and uvicorn's
``limit_concurrency`` must leave room for the pages). When the server stops (``WebServer.stop`` calls
``app.state.end_streams``), each stream ends at once rather than being cancelled after uvicorn's graceful time-out.

The endpoint is ``async`` (unlike the other routes): a stream waits most of its life, and a coroutine waits
without holding a worker thread; the database reads run in the thread pool.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Collection
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from edgemed.dashboard import users
from edgemed.dashboard.live_changes import Change, ChangeFeed
from edgemed.dashboard.store import DashboardStore
from edgemed.dashboard.web import context, sessions

log = logging.getLogger(__name__)

__all__ = ["KEEPALIVE_S", "MAX_STREAMS", "MAX_STREAM_S", "POLL_S", "RECHECK_S", "routes"]

#: Seconds between two polls of the database.
POLL_S = 0.5
#: Seconds without an event before a keep-alive comment.
KEEPALIVE_S = 15.0
#: Seconds between two checks of a stream's session.
RECHECK_S = 2.0
#: Longest life of one stream (seconds); the browser then reconnects by itself.
MAX_STREAM_S = 30 * 60.0
#: Streams one process serves at once.
MAX_STREAMS = 50
#: Polls' worth of changes a stream may have waiting; a stream further behind is ended (the page reconnects).
QUEUE_BATCHES = 100
#: What the browser waits before reconnecting (milliseconds, the stream's ``retry:``).
RETRY_MS = 2000

_ENDED = "end"  # what the poller puts in a stream's queue when the database cannot be read


class _Stream:
    """One open stream: the sites it may see, and the changes waiting for it."""

    def __init__(self, sites: Collection[str] | None) -> None:
        self.sites = None if sites is None else frozenset(sites)
        self.queue: asyncio.Queue[list[Change] | str] = asyncio.Queue(maxsize=QUEUE_BATCHES)
        self.behind = False

    def offer(self, changes: list[Change]) -> None:
        mine = changes if self.sites is None else [c for c in changes if c.data.get("site") in self.sites]
        if mine:
            try:
                self.queue.put_nowait(mine)
            except asyncio.QueueFull:
                self.behind = True


class _Hub:
    """The process's poller and its open streams (all on the server's event loop, but for ``take``)."""

    def __init__(self, store: DashboardStore) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._slots = 0
        self._streams: set[_Stream] = set()
        self._task: asyncio.Task[None] | None = None
        self._feed = ChangeFeed(None)
        self._starting = asyncio.Lock()
        #: Set when the server stops: every stream says ``end``.
        self.stopping = threading.Event()

    def take(self, limit: int) -> Callable[[], None] | None:
        """A slot for one more stream (None when ``limit`` are open); the returned function gives it back once."""
        with self._lock:
            if self._slots >= limit:
                return None
            self._slots += 1
        done = threading.Event()

        def release() -> None:
            with self._lock:
                if not done.is_set():
                    done.set()
                    self._slots -= 1

        return release

    async def join(self, stream: _Stream) -> None:
        """Start handing ``stream`` its changes (the poller starts with the first stream, from what is stored now)."""
        async with self._starting:  # two first streams at once start one poller
            if self._task is None or self._task.done():
                self._feed = ChangeFeed(None)
                await run_in_threadpool(self._feed.start, self._store)
                self._task = asyncio.get_running_loop().create_task(self._run())
            self._streams.add(stream)

    def leave(self, stream: _Stream) -> None:
        self._streams.discard(stream)

    def _end_all(self) -> None:
        for stream in list(self._streams):
            if stream.queue.full():
                stream.behind = True
            else:
                stream.queue.put_nowait(_ENDED)
        self._streams.clear()

    async def _run(self) -> None:
        while self._streams and not self.stopping.is_set():
            await asyncio.sleep(POLL_S)
            try:
                changes = await run_in_threadpool(self._feed.poll, self._store)
            except SQLAlchemyError as exc:
                log.warning("the live stream cannot read the dashboard database (%s); the pages will reconnect", exc)
                self._end_all()
                return
            except Exception:
                # A bug must not leave every page waiting on a poller that is gone: end the streams, say why.
                log.error("the live stream's poller failed; the pages will reconnect", exc_info=True)
                self._end_all()
                return
            for stream in list(self._streams):
                stream.offer(changes)


_hub_lock = threading.Lock()


def _hub(request: Request) -> _Hub:
    state = request.app.state
    with _hub_lock:
        hub = getattr(state, "live_hub", None)
        if hub is None:
            hub = state.live_hub = _Hub(context.store(request))
            state.end_streams = hub.stopping.set  # WebServer.stop() calls it
    result: _Hub = hub
    return result


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


def _why_end(hub: _Hub, stream: _Stream, started: float, now: float) -> str | None:
    if hub.stopping.is_set():
        return "the server is stopping; reconnecting"
    if stream.behind:
        return "this page fell behind; reconnecting"
    if now - started >= MAX_STREAM_S:
        return "reconnect"
    return None


async def _events(request: Request, principal: context.Principal, hub: _Hub, stream: _Stream) -> AsyncIterator[str]:
    yield f"retry: {RETRY_MS}\n\n" + _event("hello", {"user": principal.name})
    started = last_sent = last_check = time.monotonic()
    while True:
        try:
            batch: list[Change] | str | None = await asyncio.wait_for(stream.queue.get(), POLL_S)
        except asyncio.TimeoutError:
            batch = None
        now = time.monotonic()
        if batch == _ENDED:
            yield _event("end", {"reason": "the database is unavailable; reconnecting"})
            return
        why = _why_end(hub, stream, started, now)
        if why is None and now - last_check >= RECHECK_S:
            last_check = now
            if not await run_in_threadpool(_still_valid, request, principal):
                why = "the session ended: log in again"
        if why is not None:
            yield _event("end", {"reason": why})
            return
        if isinstance(batch, list):
            yield "".join(_event(c.event, c.data) for c in batch)
            last_sent = now
        elif now - last_sent >= KEEPALIVE_S:
            yield ": keep-alive\n\n"
            last_sent = now


async def _released(events: AsyncIterator[str], done: Callable[[], None]) -> AsyncIterator[str]:
    try:
        async for chunk in events:
            yield chunk
    finally:
        done()


async def stream(request: Request) -> Response:
    """``GET /api/stream``: the event stream of the logged-in user's sites (401 without a session, 503 when full)."""
    principal = await run_in_threadpool(context.require, request)
    hub = _hub(request)
    release = hub.take(MAX_STREAMS)
    if release is None:
        return context.json_response({"error": f"too many live streams open (at most {MAX_STREAMS}); try again"}, 503)
    mine = _Stream(principal.sites)

    def done() -> None:
        hub.leave(mine)
        release()

    try:
        await hub.join(mine)
    except BaseException:
        done()
        raise
    return StreamingResponse(
        _released(_events(request, principal, hub, mine), done),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},  # nginx: pass each event on at once
        background=BackgroundTask(done),  # also when the client went away mid-stream
    )


def routes() -> list[BaseRoute]:
    """This module's routes."""
    return [Route("/api/stream", stream, methods=["GET"])]
