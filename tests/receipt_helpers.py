"""What the device-side receipt tests share: numbered results put into a real outbox, a bounded wait, and the
`outbox` fixture (loaded by the suite's conftest as a plugin; a test module that defines its own keeps it)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgemed.outbox import Outbox, OutboxConfig

SITE, DEV = "site", "dev"
RESULTS = f"edgemed/{SITE}/{DEV}/results"


def put_numbered(ob: Outbox, n: int, topic: str = RESULTS, pad: int = 0) -> list[bytes]:
    """Put ``n`` results ``{"result_id", "seq", "pad"}`` with the outbox's own seq; returns their payloads."""
    payloads = []
    for _ in range(n):
        seq, rid = ob.next_seq(), uuid.uuid4().hex
        payload = json.dumps({"result_id": rid, "seq": seq, "pad": "x" * pad}, separators=(",", ":")).encode()
        ob.put(rid, topic, payload, seq=seq)
        payloads.append(payload)
    return payloads


def wait_for(predicate: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    """Poll ``predicate`` every 5 ms for at most ``timeout_s``; True once it held."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    """A real outbox that commits every put (what a test puts is publishable at once)."""
    ob = Outbox(tmp_path / "outbox.sqlite3", OutboxConfig(commit_every=1))
    yield ob
    ob.close()
