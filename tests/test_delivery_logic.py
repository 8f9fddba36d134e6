"""The delivery's logic through the in-memory publisher (``fakes.FakePublisher``): no broker, no paho.

A real outbox (SQLite in a temporary folder) on one side, the ``Publisher`` seam on the other: results go out in
order, at most ``max_inflight`` wait for an acknowledgement, only an acknowledgement removes one, a reconnection
sends nothing twice, a new client (protocol fall back) makes the delivery publish again what was not yet
acknowledged, the replay window is re-sent on each connection, and what the broker refused stays for the next run.
Every wait is bounded.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fakes import FakePublisher

from edgemed.outbox import Outbox, OutboxConfig
from edgemed.publish.delivery import Delivery

RESULTS = "edgemed/site/dev/results"


def _put(ob: Outbox, n: int) -> list[str]:
    rids = []
    for _ in range(n):
        seq, rid = ob.next_seq(), uuid.uuid4().hex
        ob.put(rid, RESULTS, json.dumps({"result_id": rid, "seq": seq}).encode(), seq=seq)
        rids.append(rid)
    return rids


def _ids(pub: FakePublisher, start: int = 0) -> list[str]:
    return [json.loads(s.payload)["result_id"] for s in pub.sent[start:]]


def _wait(predicate: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    ob = Outbox(tmp_path / "outbox.sqlite3", OutboxConfig(commit_every=1))
    yield ob
    ob.close()


def _delivery(outbox: Outbox, pub: FakePublisher, **kw: int) -> Delivery:
    delivery = Delivery(outbox, pub, **kw)
    delivery.start()
    return delivery


def test_results_go_out_in_order_and_leave_the_outbox_only_when_acknowledged(outbox: Outbox) -> None:
    pub = FakePublisher()
    delivery = _delivery(outbox, pub)
    try:
        rids = _put(outbox, 30)
        assert _wait(lambda: len(pub.sent) == 30)
        assert _ids(pub) == rids
        assert all((s.topic, s.qos, s.retain) == (RESULTS, 1, False) for s in pub.sent)
        time.sleep(0.1)
        assert outbox.pending_count() == 30  # published is not delivered
        pub.ack(10)
        assert _wait(lambda: outbox.pending_count() == 20)
        assert [i.result_id for i in outbox.pending(100)] == rids[10:]  # exactly the acknowledged ones left
        pub.ack()
        assert delivery.drain(5) == 0
        assert delivery.published_total == delivery.acked_total == 30 and len(pub.sent) == 30
    finally:
        delivery.stop()


def test_at_most_max_inflight_results_wait_for_an_acknowledgement(outbox: Outbox) -> None:
    pub = FakePublisher()
    rids = _put(outbox, 23)
    delivery = _delivery(outbox, pub, max_inflight=5)
    try:
        assert _wait(lambda: len(pub.sent) == 5)
        time.sleep(0.1)
        assert len(pub.sent) == 5  # the window is full: nothing more without an acknowledgement
        pub.ack(2)
        assert _wait(lambda: len(pub.sent) == 7)
        time.sleep(0.1)
        assert len(pub.sent) == 7 and pub.unacked() == 5
        for _ in range(50):  # bounded: 16 left, at least one acknowledged per round
            if outbox.pending_count() == 0:
                break
            assert pub.unacked() <= 5
            pub.ack(1)
            _wait(lambda: pub.unacked() == min(5, outbox.pending_count()), 1.0)
        assert delivery.drain(5) == 0
        assert _ids(pub) == rids  # each once, in order
    finally:
        delivery.stop()


def test_nothing_is_published_while_disconnected(outbox: Outbox) -> None:
    pub = FakePublisher(connected=False)
    rids = _put(outbox, 10)
    delivery = _delivery(outbox, pub)
    try:
        time.sleep(0.2)
        assert pub.sent == [] and delivery.drain(0.1) == 10
        pub.reconnect()
        assert _wait(lambda: len(pub.sent) == 10) and _ids(pub) == rids
        pub.ack()
        assert delivery.drain(5) == 0
    finally:
        delivery.stop()


def test_a_reconnection_sends_nothing_twice(outbox: Outbox) -> None:
    # Within one client, the client itself re-sends what was in flight (paho does): the delivery must not.
    pub = FakePublisher()
    _put(outbox, 10)
    delivery = _delivery(outbox, pub)
    try:
        assert _wait(lambda: len(pub.sent) == 10)
        pub.drop()
        time.sleep(0.1)
        pub.reconnect()
        _put(outbox, 2)
        assert _wait(lambda: len(pub.sent) == 12)
        time.sleep(0.1)
        assert len(pub.sent) == 12 and len(set(_ids(pub))) == 12
        pub.ack()
        assert delivery.drain(5) == 0
    finally:
        delivery.stop()


def test_a_new_client_gets_again_what_was_not_acknowledged_in_order(outbox: Outbox) -> None:
    pub = FakePublisher()
    rids = _put(outbox, 10)
    delivery = _delivery(outbox, pub)
    try:
        assert _wait(lambda: len(pub.sent) == 10)
        pub.ack(4)
        pub.new_client()  # a protocol fall back: the old client's memory is gone
        assert _wait(lambda: len(pub.sent) == 16)
        time.sleep(0.1)
        assert _ids(pub, 10) == rids[4:]  # the acknowledged four are not sent again
        pub.ack()
        assert delivery.drain(5) == 0 and delivery.acked_total == 10
    finally:
        delivery.stop()


def test_the_replay_window_is_sent_again_on_each_connection_untracked(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "outbox.sqlite3", OutboxConfig(commit_every=1, replay_window_s=30.0))
    pub = FakePublisher()
    delivery = _delivery(ob, pub)
    try:
        rids = _put(ob, 5)
        assert _wait(lambda: len(pub.sent) == 5)
        pub.ack()
        assert delivery.drain(5) == 0
        pub.drop()
        pub.reconnect()  # the broker may have lost what it acknowledged last: send it again
        assert _wait(lambda: len(pub.sent) == 10)
        assert _ids(pub, 5) == rids and all(s.on_ack is None for s in pub.sent[5:])
        assert delivery.replayed_total == 5 and ob.pending_count() == 0  # not put back in the queue
    finally:
        delivery.stop()
        ob.close()


def test_acknowledgements_from_another_thread_while_results_are_produced(outbox: Outbox) -> None:
    pub = FakePublisher()
    delivery = _delivery(outbox, pub, max_inflight=50)
    done = threading.Event()

    def broker() -> None:  # the network thread: PUBACKs in bursts, as they come off the socket
        while not done.is_set():
            pub.ack(7)
            time.sleep(0.001)

    acker = threading.Thread(target=broker, daemon=True)
    acker.start()
    try:
        rids = _put(outbox, 500)
        assert delivery.drain(20) == 0
        assert _ids(pub) == rids and delivery.acked_total == 500
    finally:
        done.set()
        acker.join(5)
        delivery.stop()


def test_messages_the_broker_refused_stay_in_the_outbox_for_the_next_run(tmp_path: Path) -> None:
    # A refused message (an MQTT 5 PUBACK with a failure code) never gets its acknowledgement callback.
    path = tmp_path / "outbox.sqlite3"
    ob = Outbox(path, OutboxConfig(commit_every=1))
    pub = FakePublisher()
    delivery = _delivery(ob, pub)
    rids = _put(ob, 3)
    try:
        assert _wait(lambda: len(pub.sent) == 3)
        assert delivery.drain(0.3) == 3
    finally:
        delivery.stop()
        ob.close()
    ob = Outbox(path, OutboxConfig(commit_every=1))
    again = FakePublisher()
    delivery = _delivery(ob, again)
    try:
        assert _wait(lambda: len(again.sent) == 3) and _ids(again) == rids
        again.ack()
        assert delivery.drain(5) == 0
    finally:
        delivery.stop()
        ob.close()
