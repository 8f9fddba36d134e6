"""Edges of the dashboard's receipts found in review: liveness of the receipt thread, seqs that must not settle,
republishing after a reconnection, and export arguments.

Real SQLite store through the ingest's own filing path (``Ingest.handle``); the broker tests use a real mosquitto.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dashboard_helpers import make_result, make_study

from edgemed.dashboard.ingest import Ingest
from edgemed.dashboard.receipt_sender import ReceiptSender
from edgemed.dashboard.settlement import stream_progress
from edgemed.dashboard.store import DashboardStore
from edgemed.envelope import encode
from edgemed.publish.config import MqttConfig
from edgemed.receipts import Progress, parse_receipt

SITE, DEVICE = "clinic-a", "us-01"
STREAM = "0123456789abcdef"


def topic(kind: str, device_id: str = DEVICE) -> str:
    return f"edgemed/{SITE}/{device_id}/{kind}"


def wire(seq: int, device_id: str = DEVICE, **kw: Any) -> bytes:
    return encode({**make_result(seq=seq, device_id=device_id, **kw), "stream": STREAM})


@pytest.fixture
def ingest(tmp_path: Path) -> Iterator[Ingest]:
    store = DashboardStore(tmp_path / "d.sqlite3")
    yield Ingest(MqttConfig(url="mqtt://127.0.0.1:1"), store)  # never started: handle() files directly
    store.close()


def progress_of(ingest: Ingest, device_id: str = DEVICE) -> Progress:
    # A connection of its own, as the receipt thread's: from the store's engine (stream_progress takes SQLAlchemy's).
    with ingest.store.database.connect() as db:
        return stream_progress(db, (SITE, device_id, STREAM))


def wait_for(check: Any, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return bool(check())


# -- the receipt thread survives a failing publish ---------------------------------------------------------------


def test_a_publish_that_raises_does_not_end_the_receipt_thread(ingest: Ingest) -> None:
    sent: list[bytes] = []
    lock = threading.Lock()
    failures = [RuntimeError("the client is gone")]

    def publish(topic_name: str, payload: bytes) -> None:
        with lock:
            if failures:
                raise failures.pop()
            sent.append(payload)

    sender = ReceiptSender(ingest.store.path, publish, "dashboard", min_interval_s=0.0)
    ingest.receipts = sender
    sender.start()
    try:
        ingest.handle(topic("results"), wire(0))
        # The failed receipt is tried again on its own, and later commits still get theirs.
        assert wait_for(lambda: len(sent) >= 1), "the receipt thread stopped after one failed publish"
        ingest.handle(topic("results"), wire(1))
        assert wait_for(lambda: sent and parse_receipt(sent[-1]).state == Progress(1, (), 1))
    finally:
        sender.stop()


# -- a result dropped as a duplicate settles only the seq its stored copy holds ----------------------------------


@pytest.mark.parametrize("kind", ["results", "studies"])
def test_a_reused_result_id_with_another_seq_does_not_settle_that_seq(ingest: Ingest, kind: str) -> None:
    make = make_result if kind == "results" else make_study
    first = {**make(), "seq": 0, "stream": STREAM}
    assert ingest.handle(topic(kind), encode(first)) == "stored"
    # The same result_id again, but for seq 5 (a device bug, or anyone who can publish on this topic): the store
    # keeps the first row, so seq 5 is not stored and must not be receipted as if it were.
    reused = {**make(), "seq": 5, "stream": STREAM, "result_id": first["result_id"]}
    outcome = ingest.handle(topic(kind), encode(reused))
    assert outcome.startswith("rejected: ") and "result_id" in outcome, outcome
    how = dict(ingest.store._query("SELECT seq, how FROM settled ORDER BY seq"))
    assert how == {0: "stored", 5: "rejected"}  # refused (counted on the page), never "stored"
    # The real duplicate (same seq, same stream) still counts as a duplicate and settles nothing new.
    assert ingest.handle(topic(kind), encode(first)) == "duplicate"


# -- a broker restarted without persistence gets the receipts and the consumer state again ------------------------


def test_receipts_and_online_come_back_after_a_broker_restart_without_persistence(
    mosquitto_factory: Any, tmp_path: Path
) -> None:
    from broker_fixtures import Device
    from dashboard_helpers import wait_until
    from test_dashboard_receipts_broker import Watcher

    broker = mosquitto_factory(tmp_path / "broker", persistence=False).start()
    receipts, state = topic("receipts"), "edgemed-consumer/dashboard/dash-1"
    store = DashboardStore(tmp_path / "d.sqlite3")
    ingest = Ingest(MqttConfig(url=broker.url), store, client_id="dash-1")
    device = Device(broker.port)
    try:
        ingest.start()
        assert ingest.wait_subscribed(15)
        for seq in range(3):
            device.send("results", wire(seq))
        watcher = Watcher(broker.port, receipts)
        try:
            assert wait_until(lambda: _receipt_body(watcher, receipts, 2) is not None, 15), watcher.messages
        finally:
            watcher.close()
        device.close()
        broker.kill()  # the retained receipt and the retained "online" were only in the broker's memory
        broker.start()
        assert wait_until(lambda: ingest.link.connections >= 2 and ingest.wait_subscribed(0.1), 30)
        # No new commit: the dashboard itself sends the receipts of what it stored recently, and "online" again.
        late = Watcher(broker.port, receipts, state)
        try:
            assert wait_until(lambda: _receipt_body(late, receipts, 2) is not None, 15), late.messages
            online = late.last(state)
            assert online is not None and online["state"] == "online"
        finally:
            late.close()
    finally:
        device.close()
        ingest.stop()
        store.close()


def _receipt_body(watcher: Any, name: str, through: int) -> dict[str, Any] | None:
    body = watcher.last(name)
    if body is None or body.get("through_seq") != through:
        return None
    return dict(body)


def test_republish_sends_the_receipts_of_recent_streams_only(ingest: Ingest, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgemed.dashboard import receipt_sender
    from edgemed.dashboard.validate import classify

    now = time.time()
    for device_id, at in (("us-old", now - 2 * 86400), ("us-01", now - 60), ("us-02", now - 10)):
        ingest.store.file([classify(topic("results", device_id), wire(0, device_id))], received_at=at)
    sent: list[str] = []
    sender = ReceiptSender(ingest.store.path, lambda name, payload: sent.append(name), "dashboard")
    monkeypatch.setattr(receipt_sender, "REPUBLISH_MAX_STREAMS", 1)
    sender.start()
    try:
        sender.republish()
        assert wait_for(lambda: len(sent) >= 1)
        time.sleep(0.3)  # nothing more comes
        assert sent == [topic("receipts", "us-02")]  # the most recent; us-01 is beyond the bound, us-old too old
        monkeypatch.setattr(receipt_sender, "REPUBLISH_MAX_STREAMS", 10)
        sender.republish()
        assert wait_for(lambda: len(sent) >= 3)
        time.sleep(0.3)
        assert sorted(sent[1:]) == [topic("receipts", "us-01"), topic("receipts", "us-02")]
    finally:
        sender.stop()


# -- export ---------------------------------------------------------------------------------------------------------


def test_an_empty_since_is_an_error_not_everything(ingest: Ingest, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    from edgemed.cli import main

    ingest.handle(topic("results"), wire(0))
    # `--since "$FROM"` with FROM unset in a script: exporting every result instead would be a silent surprise.
    code = main(["dashboard", "export", "--db", str(ingest.store.path), "--since", ""])
    out, err = capsysbinary.readouterr()
    assert (code, out) == (2, b"") and b"--since '' is not an ISO 8601 time" in err
