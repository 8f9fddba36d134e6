"""The screen's server under requests no browser of the device sends: raw HTTP on a socket, bounded waits.

Duplicate or absolute-form hosts, bodies left unread (a second request smuggled in one), chunked bodies, a flood of
idle connections, clients that never speak, and what is left open, running or held in memory after ``close``.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from screen_client import EventStream, image, result
from test_screen_runtime import _breast_test_images, _post, _profile

from edgemed.config import ScreenConfig
from edgemed.runtime import Device
from edgemed.screen import Screen, server
from edgemed.types import ClassMap, Frame, TriageResult

STATUS = {"connection": "none", "pending": 0, "delegate": "cpu", "degraded": False, "source_state": "open"}


@pytest.fixture
def screen() -> Iterator[Screen]:
    s = Screen(ScreenConfig(port=0, max_fps=30), status=lambda: dict(STATUS))
    s.start()
    try:
        yield s
    finally:
        s.close()


def _raw(port: int, data: bytes, timeout_s: float = 5.0) -> bytes:
    """Send ``data`` and read until the server closes the connection (or ``timeout_s`` passes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(data)
        chunks = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def _statuses(answer: bytes) -> list[int]:
    return [int(line.split()[1]) for line in answer.split(b"\r\n") if line.startswith(b"HTTP/1.")]


def test_a_second_host_an_absolute_uri_or_http_1_0_without_host_is_misdirected(screen: Screen) -> None:
    port = screen.port
    own = f"Host: 127.0.0.1:{port}\r\n".encode()
    twice = b"GET / HTTP/1.1\r\n" + own + b"Host: evil.example\r\nConnection: close\r\n\r\n"
    assert _statuses(_raw(port, twice)) == [421]
    absolute = b"GET http://evil.example/ HTTP/1.1\r\n" + own + b"Connection: close\r\n\r\n"
    assert _statuses(_raw(port, absolute)) == [421]
    absolute_own = f"GET http://127.0.0.1:{port}/events HTTP/1.1\r\n".encode() + own + b"Connection: close\r\n\r\n"
    assert _statuses(_raw(port, absolute_own)) == [421]
    assert _statuses(_raw(port, b"GET / HTTP/1.0\r\n\r\n")) == [421]
    assert _statuses(_raw(port, b"GET / HTTP/1.0\r\n" + own + b"\r\n")) == [200]


def test_a_body_the_server_does_not_read_ends_the_connection(screen: Screen) -> None:
    port = screen.port
    smuggled = f"GET /screen.js HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    first = f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {len(smuggled)}\r\n\r\n".encode()
    answer = _raw(port, first + smuggled)
    assert _statuses(answer) == [200] and b"Connection: close" in answer  # the body is not a second request
    # A refused POST's body is not read either.
    refused = f"POST /occlusion HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {len(smuggled)}\r\n\r\n"
    assert _statuses(_raw(port, refused.encode() + smuggled)) == [403]
    chunked = (
        (
            f"POST /occlusion HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Edgemed-Screen: {screen.token}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n"
        ).encode()
        + b"5\r\nhello\r\n0\r\n\r\n"
        + smuggled
    )
    assert _statuses(_raw(port, chunked)) == [411]


def test_another_site_cannot_take_a_page_slot(screen: Screen) -> None:
    port = screen.port
    base = f"GET /events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n".encode()
    for header in (b"Origin: http://evil.example\r\n", b"Sec-Fetch-Site: cross-site\r\n", b"Origin: null\r\n"):
        assert _statuses(_raw(port, base + header + b"\r\n")) == [403], header
    assert screen.hub.count() == 0
    own = f"GET /screen.js HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n".encode()
    assert _statuses(_raw(port, own + b"Sec-Fetch-Site: same-origin\r\n\r\n")) == [200]
    assert _statuses(_raw(port, own + f"Origin: http://localhost:{port}\r\n\r\n".encode())) == [200]


def test_head_of_the_event_stream_takes_no_page_slot(screen: Screen) -> None:
    head = f"HEAD /events HTTP/1.1\r\nHost: 127.0.0.1:{screen.port}\r\nConnection: close\r\n\r\n".encode()
    assert _statuses(_raw(screen.port, head)) == [405]
    assert screen.hub.count() == 0


def test_idle_connections_are_bounded_and_a_new_one_beyond_is_closed(screen: Screen) -> None:
    assert screen._server is not None
    idle = [socket.create_connection(("127.0.0.1", screen.port), timeout=5) for _ in range(server.MAX_CONNECTIONS)]
    try:
        deadline = time.monotonic() + 5
        while screen._server.open_connections() < server.MAX_CONNECTIONS and time.monotonic() < deadline:
            time.sleep(0.02)
        assert screen._server.open_connections() == server.MAX_CONNECTIONS
        with socket.create_connection(("127.0.0.1", screen.port), timeout=3) as extra:
            assert extra.recv(1024) == b""  # closed at once, not left waiting on a thread of its own
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 5
    while screen._server.open_connections() > 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    ok = f"GET /screen.css HTTP/1.1\r\nHost: 127.0.0.1:{screen.port}\r\nConnection: close\r\n\r\n".encode()
    assert _statuses(_raw(screen.port, ok)) == [200]


def test_a_client_that_never_speaks_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    # By default within seconds (the stdlib's default is never); shortened here to keep the test quick.
    assert server._Handler.timeout == server.SOCKET_TIMEOUT_S and 0 < server.SOCKET_TIMEOUT_S <= 30
    monkeypatch.setattr(server._Handler, "timeout", 0.5)
    s = Screen(ScreenConfig(port=0), status=lambda: dict(STATUS))
    s.start()
    try:
        with socket.create_connection(("127.0.0.1", s.port), timeout=5) as sock:
            started = time.monotonic()
            assert sock.recv(1024) == b""
            assert time.monotonic() - started < 3
    finally:
        s.close()


def test_close_ends_every_connection_and_keeps_no_frame() -> None:
    s = Screen(ScreenConfig(port=0, max_fps=30), status=lambda: dict(STATUS), has_cam=True)
    s.start()
    srv = s._server
    assert srv is not None
    stream = EventStream(s.port)
    keep_alive = socket.create_connection(("127.0.0.1", s.port), timeout=5)
    keep_alive.sendall(f"GET /screen.css HTTP/1.1\r\nHost: 127.0.0.1:{s.port}\r\n\r\n".encode())
    assert keep_alive.recv(65536).startswith(b"HTTP/1.1 200")
    try:
        cmap = ClassMap(np.ones((7, 7), np.float32), "malignant", "cam", 3)
        s.show(result(3), image(1, (28, 28)), None, cmap)
        stream.until("frame")
        # With a CAM no occlusion can be asked for: no shown frame is kept past its push.
        assert not s._recent
        started = time.monotonic()
        s.close()
        assert time.monotonic() - started < 5
        keep_alive.settimeout(3)
        # The rest of the style sheet, then the end: the idle keep-alive connection was shut, not left open (a
        # timeout here would be a socket the server forgot).
        while keep_alive.recv(65536):
            pass
        assert srv.open_connections() == 0
        assert s._last_frame is None and s._latest is None and not s._recent
        s.show(result(4), image(1, (28, 28)))
        assert s._latest is None  # a result handed over after close is not kept either
    finally:
        keep_alive.close()
        stream.close()
        s.close()


def test_an_occlusion_map_stops_before_its_next_invoke_when_the_screen_closes(tmp_path: Path, int8_model: Path) -> None:
    with Device(_profile(tmp_path, model={"path": str(int8_model)}, triage={})) as device:
        assert device.screen is not None and device.screen.screen is not None
        screen: Screen = device.screen.screen
        stream = EventStream(screen.port)  # a page: frames are pushed (and kept for an occlusion map)
        result_ = device.process(Frame(index=0, source_kind="folder", image=_breast_test_images(1)[0]))
        stream.until("frame", lambda d: d["seq"] == result_.seq)
        backend = device.classifier.backend
        calls: list[float] = []
        real_invoke = backend.invoke

        def counting(x: np.ndarray) -> np.ndarray:
            calls.append(time.monotonic())
            return real_invoke(x)

        backend.invoke = counting  # type: ignore[method-assign]
        closer = threading.Thread(target=screen.close)
        with device.invoke_lock:  # the runtime thread mid-invoke: the worker waits for the lock
            assert _post(screen.port, screen.token, result_.seq)[0] == 202
            closer.start()
            deadline = time.monotonic() + 5
            while not screen._stopping.is_set() and time.monotonic() < deadline:
                time.sleep(0.01)
        closer.join(15)
        assert not closer.is_alive()
        stream.close()
        assert calls == []  # the worker never invoked the model once the screen was closing
        assert screen._occluder is None and not screen._recent
        backend.invoke = real_invoke  # type: ignore[method-assign]


@pytest.mark.parametrize("viewport", [(800, 480), (700, 480), (660, 400)])
def test_the_longest_level_word_never_clips(tmp_path: Path, viewport: tuple[int, int]) -> None:
    from browser import PipeBrowser  # headless Chromium: only this test of the file needs it

    s = Screen(ScreenConfig(port=0), status=lambda: dict(STATUS))
    s.start()
    browser = None
    try:
        browser = PipeBrowser(tmp_path, s.url, viewport=viewport, record=True)
        deadline = time.monotonic() + 20
        fit = None
        while time.monotonic() < deadline:
            s.show(result(1, "inconclusive", reason="recapture or refer"), image(2, (28, 28)))
            fit = browser.evaluate(
                "(() => { const t = document.getElementById('level-text'), l = document.getElementById('level');"
                " if (!t || t.textContent !== 'INCONCLUSIVE') return null;"
                " const r = t.getBoundingClientRect(), b = l.getBoundingClientRect();"
                " return {scroll: t.scrollWidth, client: t.clientWidth, right: r.right, box: b.right,"
                " size: parseFloat(getComputedStyle(l).fontSize)}; })()"
            )
            if fit is not None:
                break
            time.sleep(0.2)
        assert fit is not None, "the page never showed the inconclusive frame"
        assert fit["scroll"] <= fit["client"] + 1 and fit["right"] <= fit["box"], fit  # the whole word shows
        assert fit["size"] >= 18, fit  # still large type, not shrunk to nothing
        # No broker configured: the chip's words alone, no mark before them that reads as a stray dash.
        mark = browser.evaluate("getComputedStyle(document.getElementById('connection'), '::before').content")
        assert mark in ("none", "normal", ""), mark
        # A study whose reason is cut still says what to do, in full and in view.
        long_reason = "only 0 of 30 frames were usable, 3 are needed (" + "30 did not look right, " * 8 + ")"
        study = TriageResult("recapture", long_reason + ": record the study again", {"frames": 30, "valid_frames": 0})
        s.show(result(2, "inconclusive", reason="recapture or refer"), image(2, (28, 28)), study)
        deadline = time.monotonic() + 10
        action = None
        while time.monotonic() < deadline and not action:
            action = browser.evaluate(
                "(() => { const e = document.getElementById('study-action'); if (!e || e.closest('[hidden]'))"
                " return null; const r = e.getBoundingClientRect();"
                " return r.bottom <= window.innerHeight && r.height > 0 ? e.textContent : null; })()"
            )
            time.sleep(0.1)
        assert action == "record the study again", action
    finally:
        if browser is not None:
            browser.close()
        s.close()
