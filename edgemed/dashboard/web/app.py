"""``create_app``: the Starlette app of the dashboard, from the route modules of ``ROUTE_MODULES``."""

from __future__ import annotations

import importlib
import logging
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from edgemed.dashboard.store import DashboardStore
from edgemed.dashboard.web import context, templating
from edgemed.dashboard.web.config import WebConfig
from edgemed.dashboard.web.security import SecurityMiddleware
from edgemed.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["ROUTE_MODULES", "STATIC", "create_app", "error_response", "wants_json"]

#: Each module exposes ``routes() -> list[BaseRoute]``; its owner adds its line here.
ROUTE_MODULES: tuple[str, ...] = (
    "edgemed.dashboard.web.auth_routes",
    "edgemed.dashboard.web.api_routes",
    "edgemed.dashboard.web.admin_routes",
    "edgemed.dashboard.web.live",
    "edgemed.dashboard.web.fleet_routes",
    "edgemed.dashboard.web.review_routes",
)
STATIC = Path(__file__).parent / "static"


def wants_json(request: Request) -> bool:
    """Whether errors on this path are answered as JSON (the API, fragments, metrics) rather than a page."""
    path = request.url.path
    return path.startswith(("/api/", "/fragments/")) or path == "/metrics"


def error_response(request: Request, status: int, message: str) -> Response:
    """An error: ``{"error": message}`` under ``/api/`` and ``/fragments/``, else ``error.html``."""
    if wants_json(request):
        return context.json_response({"error": message}, status)
    return context.render(request, "error.html", {"status": status, "message": message}, status)


def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, context.HttpError)
    if isinstance(exc, context.Unauthenticated) and not wants_json(request):
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)
    return error_response(request, exc.status, exc.message)


def _starlette_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return error_response(request, 404, f"no such page: {request.url.path[:100]}")
    return error_response(request, exc.status_code, str(exc.detail))


def _config_error(request: Request, exc: Exception) -> Response:
    return error_response(request, 400, str(exc))


def _server_error(request: Request, exc: Exception) -> Response:
    log.error("error while answering %s %s", request.method, request.url.path, exc_info=exc)
    message = "internal error; the server log has the details"
    if wants_json(request):
        return context.json_response({"error": message}, 500)
    # Rendered without asking the database who is logged in: it may be what failed.
    values: dict[str, Any] = {"request": request, "principal": None, "csrf_token": "", "now": time.time()}
    values.update(nav=[], alerts=[])
    page = templating.ENV.get_template("error.html").render(status=500, message=message, **values)
    return HTMLResponse(page, status_code=500)


def _home(request: Request) -> Response:
    return RedirectResponse("/queue", status_code=303)


def create_app(store: DashboardStore, config: WebConfig) -> Starlette:
    """The dashboard's ASGI app.

    Args:
        store: the dashboard database.
        config: how to serve.

    Returns:
        The app (serve it with ``WebServer``).

    Raises:
        ImportError: a module of ``ROUTE_MODULES`` is missing.
    """
    routes: list[BaseRoute] = [Route("/", _home, methods=["GET", "HEAD"])]
    for name in ROUTE_MODULES:
        routes.extend(importlib.import_module(name).routes())
    routes.append(Mount("/static", StaticFiles(directory=STATIC), name="static"))
    handlers: dict[Any, Any] = {
        context.HttpError: _http_error,
        HTTPException: _starlette_error,
        ConfigError: _config_error,
        Exception: _server_error,
    }
    app = Starlette(
        routes=routes,
        exception_handlers=handlers,
        middleware=[Middleware(SecurityMiddleware, store=store, config=config)],
    )
    app.state.store = store
    app.state.config = config
    app.state.sso_warned = threading.Event()  # the ignored sign-on header is logged once per process
    app.state.sso_repeated_warned = threading.Event()  # so is a sign-on header given more than once
    return app
