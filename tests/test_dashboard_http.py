"""Item 30: half-open HTTP connections are timed out and the number of connection threads is bounded."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgemed.dashboard.store import DashboardStore
from edgemed.dashboard.web import DashboardServer, make_server


@pytest.fixture
def server(tmp_path: Path) -> Iterator[DashboardServer]:
    store = DashboardStore(tmp_path / "d.sqlite3")
    srv = make_server(store, port=0, request_timeout_s=1.0, max_connections=8)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(5)
    store.close()


def _idle_connections(srv: DashboardServer, n: int) -> list[socket.socket]:
    port = srv.server_address[1]
    return [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(n)]


def _closed_by_server(sock: socket.socket) -> bytes:
    """What the server sent before closing (b'' when it just closed); raises TimeoutError if it keeps it open."""
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def _summary_ok(srv: DashboardServer) -> bool:
    with urllib.request.urlopen(srv.url + "api/summary", timeout=5) as resp:
        return resp.status == 200 and "counts" in json.loads(resp.read())


def test_half_open_connections_are_closed_and_threads_are_bounded(server: DashboardServer) -> None:
    before = threading.active_count()
    socks = _idle_connections(server, 40)  # connect, then say nothing (a half-open or stalled client)
    try:
        deadline = time.monotonic() + 5
        while server.refused < 32 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert threading.active_count() - before <= 8  # one thread per served connection, at most 8
        # Beyond the limit a connection is answered 503 at once; within it, a silent one is closed after 1 s.
        started = time.monotonic()
        answers = [_closed_by_server(s) for s in socks]
        assert time.monotonic() - started < 4.0
        busy = [a for a in answers if a.startswith(b"HTTP/1.0 503")]
        assert len(busy) >= 32 and server.refused == len(busy)
        assert all(a == b"" or a.startswith((b"HTTP/1.0 503", b"HTTP/1.0 408")) for a in answers), answers
        assert _summary_ok(server)  # the slots are free again
        deadline = time.monotonic() + 5
        while threading.active_count() > before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert threading.active_count() <= before
    finally:
        for s in socks:
            s.close()


def test_a_client_that_sends_part_of_a_request_and_stalls_is_closed(server: DashboardServer) -> None:
    [sock] = _idle_connections(server, 1)
    try:
        sock.sendall(b"GET /api/summary HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # the headers never end
        started = time.monotonic()
        _closed_by_server(sock)
        assert time.monotonic() - started < 3.0
        assert _summary_ok(server)
    finally:
        sock.close()


def test_the_default_server_times_out_silent_connections(tmp_path: Path) -> None:
    store = DashboardStore(tmp_path / "d.sqlite3")
    srv = make_server(store, port=0)
    try:
        assert srv.request_timeout_s == 10.0 and srv.max_connections == 64
    finally:
        srv.server_close()
        store.close()
