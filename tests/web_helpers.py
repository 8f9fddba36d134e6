"""Helpers every web test shares: a real uvicorn on 127.0.0.1 serving a store, users, and logged-in clients.

    with running_web(store) as base:                       # "http://127.0.0.1:PORT" (no trailing slash)
        make_user(store, "rita", "reviewer", sites={"clinic-a"})
        client = login(base, "rita")                       # httpx.Client, cookie jar set, base_url = base
        client.get("/api/me")                              # logged in
        client.post("/api/results/ID/ack")                 # X-CSRF-Token added for every POST/PUT/PATCH/DELETE
        client.csrf                                        # the token, for a form field

Test modules import these from here, never from one another.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from httpx._client import ClientState

from edgemed.dashboard import users
from edgemed.dashboard.secrets import Secrets, default_secret_path, load_secrets
from edgemed.dashboard.store import DashboardStore
from edgemed.dashboard.web.app import create_app
from edgemed.dashboard.web.config import WebConfig
from edgemed.dashboard.web.server import WebServer

#: The password ``make_user`` gives unless told otherwise (tests only: the product has no default password).
PASSWORD = "correct horse battery staple"

_pg_secrets: dict[str, Secrets] = {}
_CSRF_INPUT = re.compile(r'name="csrf" value="([^"]+)"')


def secrets_for(store: DashboardStore) -> Secrets:
    """The store's secrets: ``<db>.key`` beside an SQLite file (as the CLI does), a temporary file for PostgreSQL.

    ``make_user`` (whose audit rows are chained with them) and ``running_web`` use the same keys.
    """
    path = store.database.path
    if path is not None:
        key_path = default_secret_path(path)
        assert key_path is not None
        return load_secrets(key_path, create=True)
    url = store.database.display
    if url not in _pg_secrets:
        _pg_secrets[url] = load_secrets(Path(tempfile.mkdtemp()) / "dashboard.key", create=True)
    return _pg_secrets[url]


@contextlib.contextmanager
def running_web(store: DashboardStore, **config: Any) -> Iterator[str]:
    """Serve ``store`` on a real uvicorn at 127.0.0.1 on a free port; yields ``http://127.0.0.1:PORT``.

    Args:
        store: the dashboard database.
        **config: ``WebConfig`` fields (``secrets`` defaults to ``secrets_for(store)``, ``port`` to 0).
    """
    config.setdefault("secrets", secrets_for(store))
    config.setdefault("host", "127.0.0.1")
    config.setdefault("port", 0)
    cfg = WebConfig(**config)
    server = WebServer(create_app(store, cfg), cfg)
    server.start()
    try:
        yield server.url.rstrip("/")
    finally:
        server.stop()


def make_user(
    store: DashboardStore,
    name: str,
    role: str,
    sites: set[str] | frozenset[str] | None = None,
    password: str = PASSWORD,
) -> str:
    """Add a user through ``users.add_user`` (audited as ``cli:test``); returns the password."""
    users.add_user(store, name, role, sites, password, secrets=secrets_for(store), actor="cli:test", address=None)
    return password


class WebClient(httpx.Client):
    """An httpx client that may be used in a ``with`` block after its first request (``login`` makes some)."""

    #: The session's CSRF token ("" until logged in); ``login`` adds it to unsafe requests by itself.
    csrf: str = ""

    def __enter__(self) -> WebClient:
        if self._state is ClientState.UNOPENED:  # a request opens it too; httpx refuses to open it twice
            super().__enter__()
        return self


def client(base_url: str, **kwargs: Any) -> WebClient:
    """An httpx client of ``base_url`` that follows no redirects (a test sees each 303)."""
    kwargs.setdefault("timeout", 10.0)
    return WebClient(base_url=base_url, follow_redirects=False, **kwargs)


def login_csrf(http: httpx.Client) -> str:
    """GET /login (setting the pre-login cookie) and return the form's CSRF token."""
    page = http.get("/login")
    found = _CSRF_INPUT.search(page.text)
    assert found is not None, page.text[:500]
    return found.group(1)


def login(base_url: str, name: str, password: str = PASSWORD, **kwargs: Any) -> WebClient:
    """Log in through the login form; the client's unsafe requests then carry ``X-CSRF-Token`` by themselves.

    Returns:
        An ``httpx.Client`` with the session cookie, ``base_url`` set and a ``csrf`` attribute.

    Raises:
        AssertionError: the login did not succeed (the response is in the message).
    """
    http = client(base_url, **kwargs)
    token = login_csrf(http)
    answer = http.post("/login", data={"name": name, "password": password, "csrf": token, "next": "/queue"})
    assert answer.status_code == 303, (answer.status_code, answer.text[:500])
    me = http.get("/api/me")
    assert me.status_code == 200, me.text
    csrf = me.json()["csrf"]

    def add_token(request: httpx.Request) -> None:
        if request.method in ("POST", "PUT", "PATCH", "DELETE") and "x-csrf-token" not in request.headers:
            request.headers["X-CSRF-Token"] = csrf

    http.event_hooks["request"].append(add_token)
    http.csrf = csrf
    return http


def browser_logged_in(tmp_path: Path, base_url: str, name: str, path: str, password: str = PASSWORD) -> Any:
    """Headless Chromium (``browser.PipeBrowser``) that logged in through the login form and shows ``path``.

    Returns:
        The browser (``close()`` it).
    """
    import json
    from urllib.parse import quote

    from browser import WAIT_FOR_JS, PipeBrowser

    browser = PipeBrowser(tmp_path, f"{base_url}/login?next={quote(path, safe='')}")
    try:
        assert browser.evaluate(WAIT_FOR_JS % "document.querySelector('input[name=password]') !== null")
        browser.evaluate(
            f"document.querySelector('input[name=name]').value = {json.dumps(name)}; "
            f"document.querySelector('input[name=password]').value = {json.dumps(password)}; "
            "document.querySelector('form[action=\"/login\"]').submit(); true"
        )
        target = json.dumps(path.split("?")[0])
        ready = f"location.pathname === {target} && document.readyState === 'complete'"
        deadline = time.monotonic() + 15
        while True:
            try:
                if browser.evaluate(ready):
                    break
            except AssertionError as exc:  # the page navigated while being asked: ask the next one
                if "navigated" not in str(exc) and "context" not in str(exc).lower():
                    raise
            assert time.monotonic() < deadline, "the login did not lead to " + path
            time.sleep(0.05)
    except BaseException:
        browser.close()
        raise
    return browser
