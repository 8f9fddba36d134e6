"""The live stream (GET /api/stream) on a real uvicorn: an urgent result filed into the store reaches an SSE client
within 2 s (both engines); a user limited to site A never gets site B on it; logging out or being disabled ends
it; no stream without a login; at most MAX_STREAMS at once."""

from __future__ import annotations

import json
import queue
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from dashboard_helpers import HEALTH, make_result
from web_helpers import client, login, make_user, running_web, secrets_for

from edgemed.dashboard import users
from edgemed.dashboard.store import DashboardStore
from edgemed.dashboard.web import live

STATIC = Path(__file__).resolve().parent.parent / "edgemed" / "dashboard" / "web" / "static"


class Events:
    """An SSE client on its own thread: parsed events land in a queue; ``None`` marks the end of the stream."""

    def __init__(self, http: httpx.Client) -> None:
        self.queue: queue.Queue[tuple[str, dict[str, Any]] | None] = queue.Queue()
        self.all: list[tuple[str, dict[str, Any]]] = []
        self.status: int | None = None
        self._http = http
        self._opened = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._opened.wait(10), "the stream did not answer"

    def _run(self) -> None:
        try:
            timeout = httpx.Timeout(10.0, read=30.0)  # the keep-alive comes every 15 s
            with self._http.stream("GET", "/api/stream", timeout=timeout) as answer:
                self.status = answer.status_code
                self._opened.set()
                name, data = "message", ""
                for line in answer.iter_lines():
                    if line.startswith("event: "):
                        name = line[7:]
                    elif line.startswith("data: "):
                        data = line[6:]
                    elif line == "" and data:
                        self.queue.put((name, json.loads(data)))
                        name, data = "message", ""
        except (httpx.HTTPError, RuntimeError):
            pass  # the test closed the client, or the server went away: the end marker says so
        finally:
            self._opened.set()
            self.queue.put(None)

    def wait_for(self, match: Any, timeout_s: float) -> tuple[str, dict[str, Any]] | None:
        """The first event (name, data) for which ``match`` is true, within ``timeout_s``; None at the end."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching event in {timeout_s} s; got {self.all}")
            try:
                item = self.queue.get(timeout=left)
            except queue.Empty:
                continue
            if item is None:
                return None
            self.all.append(item)
            if match(*item):
                return item

    def ended(self, timeout_s: float) -> bool:
        """Whether the stream closes within ``timeout_s``."""
        self._thread.join(timeout_s)
        return not self._thread.is_alive()


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DashboardStore]:
    db = str(tmp_path / "fleet.sqlite3") if request.param == "sqlite" else str(request.getfixturevalue("pg_url"))
    opened = DashboardStore(db)
    yield opened
    opened.close()


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[DashboardStore]:
    opened = DashboardStore(tmp_path / "fleet.sqlite3")
    yield opened
    opened.close()


def test_an_urgent_result_reaches_the_stream_within_two_seconds(store: DashboardStore) -> None:
    make_user(store, "rita", "reviewer")
    with running_web(store) as base, login(base, "rita") as http:
        events = Events(http)
        assert events.status == 200
        assert events.wait_for(lambda name, _: name == "hello", 5) is not None
        urgent = make_result(level="urgent", seq=1)
        stored_at = time.monotonic()
        assert store.add_result(urgent)
        got = events.wait_for(lambda name, data: name == "result" and data["result_id"] == urgent["result_id"], 5)
        took = time.monotonic() - stored_at
        assert got is not None and took < 2.0, took
        assert got[1] == {"kind": "frame", "result_id": urgent["result_id"], "site": "clinic-a",
                          "device_id": "us-01", "level": "urgent"}  # fmt: skip
        assert "payload" not in json.dumps(events.all)


def test_a_site_a_user_never_gets_site_b_on_the_stream(sqlite_store: DashboardStore) -> None:
    store = sqlite_store
    make_user(store, "ana", "viewer", sites={"clinic-a"})
    make_user(store, "root", "admin")
    with running_web(store) as base, login(base, "ana") as ana, login(base, "root") as root:
        mine, everyone = Events(ana), Events(root)
        for stream in (mine, everyone):
            assert stream.wait_for(lambda name, _: name == "hello", 5) is not None
        b = make_result(site="clinic-b", device_id="us-09", level="urgent")
        store.add_result(b)
        store.set_health("clinic-b", "us-09", HEALTH)
        a = make_result(site="clinic-a", level="urgent")
        store.add_result(a)
        is_a = lambda name, data: data.get("result_id") == a["result_id"]  # noqa: E731
        assert everyone.wait_for(lambda name, data: data.get("result_id") == b["result_id"], 5) is not None
        assert everyone.wait_for(is_a, 5) is not None  # the stream carries B: the filter is what keeps it out
        assert mine.wait_for(is_a, 5) is not None
        time.sleep(live.POLL_S * 2)  # one more poll: anything of B would be in the queue by now
        while not mine.queue.empty():
            item = mine.queue.get()
            if item is not None:
                mine.all.append(item)
        assert mine.all and all(data.get("site", "clinic-a") == "clinic-a" for _, data in mine.all), mine.all
        assert "clinic-b" not in json.dumps(mine.all) and "us-09" not in json.dumps(mine.all)


def test_logging_out_or_being_disabled_ends_the_stream(sqlite_store: DashboardStore) -> None:
    store = sqlite_store
    make_user(store, "rita", "reviewer")
    make_user(store, "otto", "viewer")
    with running_web(store) as base, login(base, "rita") as rita, login(base, "otto") as otto:
        events = Events(rita)
        assert events.wait_for(lambda name, _: name == "hello", 5) is not None
        assert rita.post("/logout").status_code == 303
        ended = events.wait_for(lambda name, _: name == "end", live.RECHECK_S + 4)
        assert ended is not None and "log in again" in ended[1]["reason"]
        assert events.ended(5)
        assert rita.get("/api/stream").status_code == 401  # no new one either

        others = Events(otto)
        assert others.wait_for(lambda name, _: name == "hello", 5) is not None
        users.set_disabled(store, "otto", True, secrets=secrets_for(store), actor="cli:test", address=None)
        assert others.wait_for(lambda name, _: name == "end", live.RECHECK_S + 4) is not None
        assert others.ended(5)


def _raw_stream(base: str, http: httpx.Client) -> socket.socket:
    """A stream on a plain socket, read up to its ``hello``: closing the socket is a browser going away."""
    host, port = base.removeprefix("http://").split(":")
    cookies = "; ".join(f"{name}={value}" for name, value in http.cookies.items())
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(f"GET /api/stream HTTP/1.1\r\nHost: {host}:{port}\r\nCookie: {cookies}\r\n\r\n".encode())
    seen = b""
    while b"event: hello" not in seen:
        chunk = sock.recv(4096)
        assert chunk, seen
        seen += chunk
    assert seen.startswith(b"HTTP/1.1 200"), seen
    return sock


def test_no_stream_without_a_login_and_at_most_max_streams(
    sqlite_store: DashboardStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = sqlite_store
    make_user(store, "rita", "reviewer")
    monkeypatch.setattr(live, "MAX_STREAMS", 1)
    with running_web(store) as base:
        with client(base) as anonymous:
            answer = anonymous.get("/api/stream")
            assert answer.status_code == 401 and "error" in answer.json()
        with login(base, "rita") as http:
            held = _raw_stream(base, http)
            refused = http.get("/api/stream")
            assert refused.status_code == 503 and "at most 1" in refused.json()["error"]
            held.close()  # the browser went away: its slot is free again
            deadline = time.monotonic() + 10
            while True:
                try:
                    _raw_stream(base, http).close()
                    break
                except AssertionError:
                    assert time.monotonic() < deadline, "the closed stream's slot was never released"
                    time.sleep(0.2)


def test_live_js_is_csp_clean_and_refreshes_fragments() -> None:
    script = (STATIC / "live.js").read_text()
    for forbidden in ("eval(", "new Function", ".style", 'setAttribute("style', "innerHTML = html" + "+"):
        assert forbidden not in script
    assert 'new EventSource("/api/stream")' in script and "[data-fragment]" in script
    assert "MIN_INTERVAL_MS = 500" in script  # at most 2 fetches a second


def test_live_js_refreshes_the_page_in_chromium_and_goes_to_the_login_when_the_session_ends(
    sqlite_store: DashboardStore, tmp_path: Path
) -> None:
    from browser import CHROMIUM, headless_flags
    from playwright.sync_api import sync_playwright

    from edgemed.dashboard.web import sessions

    store = sqlite_store
    store.set_status("clinic-a", "us-01", {"state": "online", "model": "breast-cnn"})
    make_user(store, "rita", "reviewer")
    flags = [f for f in headless_flags(tmp_path) if not f.startswith(("--headless", "--user-data-dir"))]
    with running_web(store) as base, login(base, "rita") as http, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=flags)
        try:
            context = browser.new_context()
            context.add_cookies([{"name": k, "value": v, "url": base} for k, v in http.cookies.items()])
            page = context.new_page()
            console: list[str] = []
            page.on("console", lambda message: console.append(message.text))
            page.goto(f"{base}/fleet")
            page.wait_for_selector("[data-live-indicator].live", timeout=5000)
            assert page.inner_text("[data-live-indicator]") == "live"
            store.set_status("clinic-a", "us-77", {"state": "online", "model": "new-model"})
            stored_at = time.monotonic()
            while "us-77" not in page.inner_text("section[data-fragment]"):
                assert time.monotonic() - stored_at < 2.0, "the fleet table did not refresh within 2 s"
                time.sleep(0.05)
            assert page.url == f"{base}/fleet"  # refreshed in place, not reloaded
            assert not [line for line in console if "Content Security Policy" in line], console
            sessions.revoke_user(store, "rita")  # logged out elsewhere (or disabled)
            page.wait_for_url(f"{base}/login?next=%2Ffleet", timeout=15000)
        finally:
            browser.close()


def test_a_database_that_cannot_be_read_ends_the_stream_with_a_reason(
    sqlite_store: DashboardStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy.exc import OperationalError

    from edgemed.dashboard.live_changes import ChangeFeed

    store = sqlite_store
    make_user(store, "rita", "reviewer")
    with running_web(store) as base, login(base, "rita") as http:
        events = Events(http)
        assert events.wait_for(lambda name, _: name == "hello", 5) is not None

        def broken(self: ChangeFeed, store: DashboardStore) -> list[Any]:
            raise OperationalError("SELECT", {}, Exception("disk I/O error"))

        monkeypatch.setattr(ChangeFeed, "poll", broken)
        ended = events.wait_for(lambda name, _: name == "end", 5)
        assert ended is not None and "database is unavailable" in ended[1]["reason"]
        assert events.ended(5)
        monkeypatch.undo()
        again = Events(http)  # the poller starts again with the next stream
        assert again.wait_for(lambda name, _: name == "hello", 5) is not None
        urgent = make_result(level="urgent")
        store.add_result(urgent)
        assert again.wait_for(lambda name, data: data.get("result_id") == urgent["result_id"], 5) is not None
