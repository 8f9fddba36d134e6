"""The screen's server on its own (edgemed.screen): Host/Origin/token checks, headers, SSE, push rate, client limit.

A real ``Screen`` on a loopback port, with typed results made here (no model): what is under test is the server
and the push loop. The runtime wiring is tests/test_screen_runtime.py; the page in a browser,
tests/test_screen_browser.py.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
from screen_client import EventStream, image, result

from edgemed.config import ScreenConfig
from edgemed.errors import ConfigError
from edgemed.screen import Screen, host_allowed
from edgemed.screen.events import sse
from edgemed.screen.security import SECURITY_HEADERS, origin_allowed
from edgemed.types import ClassMap, OodCheck

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
STATUS = {
    "connection": "none",
    "pending": 3,
    "awaiting_receipt": None,
    "delegate": "cpu",
    "degraded": False,
    "degraded_reason": None,
    "source_state": "open",
    "model": "breast",
    "model_version": "7",
}


@pytest.fixture
def screen() -> Iterator[Screen]:
    s = Screen(ScreenConfig(port=0, max_fps=30), status=lambda: dict(STATUS))
    s.start()
    try:
        yield s
    finally:
        s.close()


def request(
    port: int,
    method: str,
    path: str,
    *,
    host: str | None = None,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.putrequest(method, path, skip_host=True)
    conn.putheader("Host", host if host is not None else f"127.0.0.1:{port}")
    for name, value in (headers or {}).items():
        conn.putheader(name, value)
    conn.putheader("Content-Length", str(len(body)))
    conn.endheaders(body)
    response = conn.getresponse()
    response.read()
    conn.close()
    return response


def token_of(port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", "/")
    page = conn.getresponse().read().decode()
    conn.close()
    marker = '<meta name="edgemed-screen-token" content="'
    start = page.index(marker) + len(marker)
    return page[start : page.index('"', start)]


# -- Host, Origin, token ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "host", ["127.0.0.1:8780", "localhost:8780", "LOCALHOST:8780", "[::1]:8780", " localhost:8780 "]
)
def test_loopback_hosts_of_the_port_are_allowed(host: str) -> None:
    assert host_allowed(host, 8780)


@pytest.mark.parametrize(
    "host",
    [
        None,
        "",
        "127.0.0.1",
        "localhost",
        "127.0.0.1:8781",
        "evil.example:8780",
        "localhost.evil.example:8780",
        "127.0.0.1.nip.io:8780",
        "127.0.0.2:8780",
        "0.0.0.0:8780",
        "[::1]",
        "127.0.0.1:8780@evil.example",
        "user@127.0.0.1:8780",
    ],
)
def test_any_other_host_is_refused(host: str | None) -> None:
    assert not host_allowed(host, 8780)


def test_the_origin_must_be_absent_or_this_screens_own() -> None:
    assert origin_allowed(None, 8780)
    assert origin_allowed("http://127.0.0.1:8780", 8780) and origin_allowed("http://localhost:8780", 8780)
    for origin in ("null", "http://evil.example", "http://127.0.0.1:8781", "https://127.0.0.1:8780", "file://"):
        assert not origin_allowed(origin, 8780), origin


def test_a_foreign_host_gets_421_from_the_real_server_on_every_route(screen: Screen) -> None:
    for method, path in (("GET", "/"), ("GET", "/events"), ("GET", "/screen.js"), ("POST", "/occlusion")):
        response = request(screen.port, method, path, host=f"evil.example:{screen.port}")
        assert response.status == 421, (method, path)
    # A rebinding attack's request names the attacker's host; a request naming none is refused too.
    conn = http.client.HTTPConnection("127.0.0.1", screen.port, timeout=5)
    conn.putrequest("GET", "/", skip_host=True)
    conn.endheaders()
    assert conn.getresponse().status == 421
    conn.close()


def test_a_post_without_the_token_or_from_a_foreign_origin_is_refused(screen: Screen) -> None:
    port, token = screen.port, token_of(screen.port)
    assert len(token) >= 24
    assert request(port, "POST", "/occlusion").status == 403
    assert request(port, "POST", "/occlusion", headers={"X-Edgemed-Screen": "wrong"}).status == 403
    foreign = {"X-Edgemed-Screen": token, "Origin": "http://evil.example"}
    assert request(port, "POST", "/occlusion", headers=foreign).status == 403
    other_port = {"X-Edgemed-Screen": token, "Origin": f"http://127.0.0.1:{port + 1}"}
    assert request(port, "POST", "/occlusion", headers=other_port).status == 403
    # With the token and its own origin the request is heard: no classified frame yet -> 409.
    own = {"X-Edgemed-Screen": token, "Origin": f"http://127.0.0.1:{port}"}
    assert request(port, "POST", "/occlusion", headers=own).status == 409
    assert request(port, "POST", "/occlusion", headers=own, body=b'{"seq": "x"}').status == 400
    assert request(port, "POST", "/occlusion", headers=own, body=b"x" * 5000).status == 413


def test_every_route_and_status_carries_the_security_headers(screen: Screen) -> None:
    port, token = screen.port, token_of(screen.port)
    cases = [
        request(port, "GET", "/"),
        request(port, "GET", "/screen.css"),
        request(port, "GET", "/screen.js"),
        request(port, "GET", "/nope"),
        request(port, "GET", "/", host="evil.example"),
        request(port, "POST", "/occlusion"),
        request(port, "POST", "/occlusion", headers={"X-Edgemed-Screen": token}),
        request(port, "PUT", "/"),  # the base class's own 501
    ]
    stream = EventStream(port)
    try:
        cases.append(stream.response)  # type: ignore[arg-type]
        assert stream.response.getheader("Content-Type", "").startswith("text/event-stream")
    finally:
        stream.close()
    assert [r.status for r in cases] == [200, 200, 200, 404, 421, 403, 409, 501, 200]
    for response in cases:
        assert response.getheader("Content-Security-Policy") == CSP
        for name, value in SECURITY_HEADERS:
            assert response.getheader(name) == value, (response.status, name)
        assert response.getheader("Cache-Control") == "no-store"
        assert "Python" not in (response.getheader("Server") or "")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:  # the base class's own 431
        raw.sendall(b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(120)) + b"\r\n")
        answer = raw.recv(65536).decode("latin-1")
    assert answer.startswith("HTTP/1.1 431"), answer[:80]
    assert f"Content-Security-Policy: {CSP}\r\n" in answer and "Cache-Control: no-store\r\n" in answer


def test_the_page_has_no_inline_script_or_style_and_no_external_resource(screen: Screen) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", screen.port, timeout=5)
    conn.request("GET", "/")
    page = conn.getresponse().read().decode()
    conn.close()
    assert '<script src="/screen.js" defer></script>' in page and '<link rel="stylesheet" href="/screen.css">' in page
    assert page.count("<script") == 1 and "<style" not in page and " style=" not in page and "on" + "click" not in page
    assert "http://" not in page and "https://" not in page and "//" not in page.replace("<!doctype", "")
    for element_id in (
        "level",
        "reason",
        "action",
        "confidence",
        "quality",
        "recapture",
        "ood-warning",
        "study",
        "study-level",
        "study-reason",
        "study-frames",
        "connection",
        "pending",
        "model",
        "delegate",
        "frame",
        "map",
        "map-legend",
        "map-toggle",
        "occlusion-button",
        "hold-button",
    ):
        assert f'id="{element_id}"' in page, element_id
    assert '<body data-seq="">' in page and 'data-level="waiting"' in page


# -- events ----------------------------------------------------------------------------------------------------------
def test_events_are_sse_blocks_with_one_json_data_line(screen: Screen) -> None:
    stream = EventStream(screen.port)
    try:
        assert stream.next()[2] == [b"retry: 2000\n"]
        name, status, lines = stream.next()
        assert name == "status" and len(lines) == 2 and lines[0] == b"event: status\n"
        assert status is not None and status["pending"] == 3 and status["model"] == "breast"
        assert status["class_map"] == "off"  # no classifier: no map of any kind
        screen.show(result(5), image(1))
        frame = stream.until("frame")
    finally:
        stream.close()
    assert frame["seq"] == 5 and frame["level"] == "urgent" and frame["level_text"] == "URGENT"
    assert frame["action"] == "refer now" and frame["confidence"] == "malignant 93%"
    assert frame["quality"] == {"passed": True, "text": "Image quality: good"}
    assert frame["recapture"] is None and frame["ood_warning"] is None and frame["study"] is None
    assert frame["name"] is None  # file names are not shown unless the profile says always
    assert frame["map"] is None and (frame["width"], frame["height"]) == (128, 96)
    jpeg = base64.b64decode(frame["frame"].removeprefix("data:image/jpeg;base64,"))
    assert jpeg[:3] == b"\xff\xd8\xff"
    assert sse("x", {"a": "line\nbreak"}) == b'event: x\ndata: {"a":"line\\nbreak"}\n\n'


def test_a_status_change_is_pushed_within_a_fraction_of_a_second() -> None:
    state = dict(STATUS)
    s = Screen(ScreenConfig(port=0), status=lambda: dict(state))
    s.start()
    stream = EventStream(s.port)
    try:
        assert stream.until("status")["pending"] == 3
        state["pending"], state["connection"] = 4, "offline"
        t0 = time.monotonic()
        changed = stream.until("status", lambda d: d["pending"] == 4, timeout_s=5)
        took = time.monotonic() - t0
    finally:
        stream.close()
        s.close()
    assert changed["connection"] == "offline" and took < 0.8, took


def test_a_new_page_gets_the_current_frame_at_once(screen: Screen) -> None:
    first = EventStream(screen.port)
    try:
        screen.show(result(9), image(2))
        first.until("frame", lambda d: d["seq"] == 9)
    finally:
        first.close()
    second = EventStream(screen.port)
    try:
        assert second.until("frame", timeout_s=3)["seq"] == 9
    finally:
        second.close()


def test_the_push_rate_stays_at_most_max_fps_with_a_producer_at_200_fps() -> None:
    max_fps, seconds = 10.0, 2.0
    s = Screen(ScreenConfig(port=0, max_fps=max_fps), status=lambda: dict(STATUS))
    s.start()
    stream = EventStream(s.port)
    stop = threading.Event()
    produced = 0
    frame = image(3)

    def produce() -> None:
        nonlocal produced
        while not stop.is_set():
            s.show(result(produced), frame)
            produced += 1
            time.sleep(0.005)

    seqs: list[int] = []
    try:
        stream.until("status")
        producer = threading.Thread(target=produce)
        t0 = time.monotonic()
        producer.start()
        while time.monotonic() - t0 < seconds:
            name, data, _ = stream.next()
            if name == "frame" and data is not None:
                seqs.append(data["seq"])
        stop.set()
        producer.join(5)
    finally:
        stop.set()
        stream.close()
        s.close()
    # ~200 a second when the machine is idle; what matters is that it outruns the cap many times over.
    assert produced > 5 * max_fps * seconds, f"the producer made only {produced} results in {seconds} s"
    # One frame may be in flight when the window opens: at most max_fps * seconds + 1 pushed.
    assert 5 <= len(seqs) <= max_fps * seconds + 1, (len(seqs), produced)
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)  # only newer frames, each once
    assert max(seqs) > produced * 0.8  # the latest ones, not a backlog


def test_at_most_four_pages_at_once(screen: Screen) -> None:
    streams = [EventStream(screen.port) for _ in range(4)]
    try:
        assert [s.status for s in streams] == [200] * 4
        assert request(screen.port, "GET", "/events").status == 503
        streams.pop().close()
        deadline = time.monotonic() + 5
        while screen.hub.count() > 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        again = EventStream(screen.port)
        streams.append(again)
        assert again.status == 200
    finally:
        for s in streams:
            s.close()


def test_a_port_in_use_is_a_config_error_naming_it_and_the_flag() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        s = Screen(ScreenConfig(port=port), status=lambda: dict(STATUS))
        with pytest.raises(ConfigError, match=rf"screen port {port} is already in use.*--screen-port"):
            s.start()
        s.close()


def test_it_listens_on_the_loopback_only(screen: Screen) -> None:
    # No host option exists; the socket is bound to 127.0.0.1 whatever the profile says.
    assert screen._server is not None
    assert screen._server._server.server_address[0] == "127.0.0.1"
    assert screen.url == f"http://127.0.0.1:{screen.port}/"


def test_a_cam_map_goes_with_its_frame_and_legend() -> None:
    s = Screen(ScreenConfig(port=0), status=lambda: dict(STATUS), has_cam=True)
    s.start()
    stream = EventStream(s.port)
    try:
        cmap = ClassMap(np.arange(49, dtype=np.float32).reshape(7, 7) - 20, "malignant", "cam", 11)
        s.show(result(11), image(6, (28, 28)), None, cmap)
        frame = stream.until("frame")
        status = stream.until("status")
        time.sleep(0.1)  # past the push period
        flagged = OodCheck("energy", 9.0, 2.0, True, "manifest")
        s.show(result(12, "inconclusive", ood=flagged, extra={"basis": "ood"}), image(6, (28, 28)), None, cmap)
        unlike = stream.until("frame", lambda d: d["seq"] == 12)
    finally:
        stream.close()
        s.close()
    assert frame["map"].startswith("data:image/png;base64,") and frame["map_kind"] == "cam"
    assert frame["map_legend"] == (
        "Class activation map: regions that raised the score for malignant. Not an explanation of the decision."
    )
    assert status["class_map"] == "cam"
    # A frame unlike the training images gets no map: its scores are not evidence.
    assert unlike["map"] is None and unlike["map_legend"] is None and unlike["ood_warning"] is not None
    assert json.dumps(frame).count("MRN") == 0
