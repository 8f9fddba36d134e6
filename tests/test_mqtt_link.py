"""The MQTT link and the delivery drain against a real mosquitto on a loopback port."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from broker_fixtures import Amqtt, Mosquitto, Subscriber, free_port

from edgemed.errors import BrokerRefusedError
from edgemed.outbox import Outbox, OutboxConfig
from edgemed.publish.config import MqttConfig
from edgemed.publish.delivery import Delivery, flush
from edgemed.publish.mqtt import MqttLink
from edgemed.publish.policy import Attempt

REPO = Path(__file__).resolve().parents[1]
RESULTS = "edgemed/site/dev/results"
STATUS = "edgemed/site/dev/status"


def _cfg(url: str, **kw: object) -> MqttConfig:
    return MqttConfig(url=url, reconnect_min_s=0.1, reconnect_max_s=0.5, **kw)  # type: ignore[arg-type]


def _put(ob: Outbox, n: int) -> None:
    for _ in range(n):
        seq = ob.next_seq()
        rid = uuid.uuid4().hex
        ob.put(rid, RESULTS, json.dumps({"result_id": rid, "seq": seq}).encode())


def _retained(port: int, topic: str, timeout_s: float = 10.0) -> dict[str, object]:
    # A retained message arrives flagged as retained only on subscribing: a subscriber that came before the
    # publisher's status reached the broker gets it live, unflagged. So subscribe again until it is retained.
    deadline = time.monotonic() + timeout_s
    while True:
        sub = Subscriber(port, topic)
        try:
            wait_until = min(deadline, time.monotonic() + 1.0)
            while topic not in sub.retained and time.monotonic() < wait_until:
                time.sleep(0.05)
            if topic in sub.retained:
                return json.loads(sub.retained[topic])  # type: ignore[no-any-return]
        finally:
            sub.close()
        assert time.monotonic() < deadline, f"no retained message on {topic}"


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_results_are_delivered_in_order_and_acked_only_on_puback(
    broker: Mosquitto, tmp_path: Path, protocol: str
) -> None:
    sub = Subscriber(broker.port, RESULTS)
    ob = Outbox(tmp_path / "outbox.sqlite3")
    link = MqttLink(_cfg(broker.url, protocol=protocol), status_topic=STATUS, client_id="edgemed-dev")
    delivery = Delivery(ob, link)
    try:
        link.start()
        delivery.start()
        assert link.wait_connected(10)
        _put(ob, 500)
        assert delivery.drain(20) == 0
        assert sub.wait_for(500, 10) == 500
        assert sub.seqs == set(range(500))
        assert delivery.acked_total == 500 and ob.pending_count() == 0
        assert _retained(broker.port, STATUS)["state"] == "online"
    finally:
        delivery.stop()
        link.stop(5)
        ob.close()
        sub.close()
    status = _retained(broker.port, STATUS)
    assert (status["state"], status["reason"]) == ("offline", "stopped")
    assert status["clean"] is True


def test_an_unreachable_broker_is_not_an_error_and_results_wait_on_disk(
    mosquitto_factory: type[Mosquitto], tmp_path: Path
) -> None:
    port = free_port()
    ob = Outbox(tmp_path / "outbox.sqlite3")
    link = MqttLink(_cfg(f"mqtt://127.0.0.1:{port}"), status_topic=STATUS, client_id="edgemed-dev")
    delivery = Delivery(ob, link)
    try:
        link.start()
        delivery.start()
        _put(ob, 50)
        time.sleep(0.5)
        link.check()  # offline is normal: no exception
        assert not link.connected
        assert delivery.drain(0.2) == 50
        broker = mosquitto_factory(port=port).start()
        sub = Subscriber(broker.port, RESULTS)
        try:
            assert delivery.drain(20) == 0
            assert sub.wait_for(50, 10) == 50
        finally:
            sub.close()
    finally:
        delivery.stop()
        link.stop(2)
        ob.close()


def test_plaintext_to_a_remote_host_is_refused_before_any_socket_is_opened(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    opened: list[object] = []

    class NoSocket(socket.socket):
        def __init__(self, *args: object, **kw: object) -> None:
            opened.append(args)
            raise AssertionError("a socket was opened")

    monkeypatch.setattr(socket, "socket", NoSocket)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: opened.append(a))
    with pytest.raises(BrokerRefusedError, match=r"refusing plaintext MQTT to 192\.0\.2\.1:1883.*mqtts://"):
        MqttLink(MqttConfig(url="mqtt://192.0.2.1:1883"), status_topic=STATUS, client_id="edgemed-dev")
    # Allowed explicitly, the link can be built (it is never started here: TEST-NET must not be contacted).
    MqttLink(
        MqttConfig(url="mqtt://192.0.2.1:1883", allow_plaintext_remote=True),
        status_topic=STATUS,
        client_id="edgemed-dev",
    )
    assert opened == []
    assert BrokerRefusedError.exit_code == 5


_DEVICE = """
import sys, time
from edgemed.publish.config import MqttConfig
from edgemed.publish.mqtt import MqttLink
link = MqttLink(MqttConfig(url=sys.argv[1]), status_topic=sys.argv[2], client_id="edgemed-lastwill")
link.start()
assert link.wait_connected(10)
print("online", flush=True)
time.sleep(60)
"""


def test_a_killed_device_leaves_a_retained_offline_status(broker: Mosquitto) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _DEVICE, broker.url, STATUS], cwd=REPO, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"online"
        assert _retained(broker.port, STATUS)["state"] == "online"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 10
        status = _retained(broker.port, STATUS)
        while status["state"] != "offline" and time.monotonic() < deadline:
            time.sleep(0.1)
            status = _retained(broker.port, STATUS)
        assert status["state"] == "offline" and status["reason"] == "connection lost"
        assert status["clean"] is False  # the will: the device never said it stopped
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_a_run_that_ended_with_an_error_says_so_in_its_offline_status(broker: Mosquitto) -> None:
    link = MqttLink(_cfg(broker.url), status_topic=STATUS, client_id="edgemed-crash")
    link.start()
    assert link.wait_connected(10)
    link.stop(5, abnormal="RuntimeError", extra={"pending": 7})
    status = _retained(broker.port, STATUS)
    assert status["state"] == "offline" and status["clean"] is False and status["pending"] == 7
    assert status["reason"] == "ended with an error (RuntimeError)"


def test_flush_sends_what_is_pending_and_reports_what_is_left(broker: Mosquitto, tmp_path: Path) -> None:
    data = tmp_path / "data"
    with Outbox(data / "outbox.sqlite3") as ob:
        _put(ob, 200)
    sub = Subscriber(broker.port, RESULTS)
    try:
        assert flush(data, _cfg(f"mqtt://127.0.0.1:{free_port()}"), timeout_s=0.5) == 200  # nobody listening
        assert flush(data, _cfg(broker.url), timeout_s=20) == 0
        assert sub.wait_for(200, 10) == 200
        assert flush(data, _cfg(broker.url), timeout_s=1) == 0  # nothing left: returns at once
    finally:
        sub.close()


def test_delivery_keeps_at_most_max_inflight_unacknowledged(broker: Mosquitto, tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "outbox.sqlite3", OutboxConfig(commit_every=1))
    link = MqttLink(_cfg(broker.url), status_topic=None, client_id="edgemed-window")
    delivery = Delivery(ob, link, max_inflight=5)
    try:
        _put(ob, 40)
        link.start()
        assert link.wait_connected(10)
        delivery.start()
        peak = 0
        deadline = time.monotonic() + 20
        while ob.pending_count() and time.monotonic() < deadline:
            peak = max(peak, delivery.published_total - delivery.acked_total)
            time.sleep(0.001)
        assert ob.pending_count() == 0
        assert 1 <= peak <= 5
    finally:
        delivery.stop()
        link.stop(2)
        ob.close()


def test_auto_protocol_falls_back_to_311_for_a_broker_without_mqtt5(amqtt_broker: Amqtt, tmp_path: Path) -> None:
    # amqtt speaks only MQTT 3.1.1 and drops an MQTT 5 CONNECT without answering.
    ob = Outbox(tmp_path / "outbox.sqlite3")
    cfg = _cfg(f"mqtt://127.0.0.1:{amqtt_broker.port}", connect_timeout_s=1.0)
    link = MqttLink(cfg, status_topic=STATUS, client_id="edgemed-fallback")
    delivery = Delivery(ob, link)
    try:
        link.start()
        delivery.start()
        _put(ob, 20)
        assert link.wait_connected(20), "no MQTT 3.1.1 connection after the fallback"
        assert link.epoch == 1  # one fallback, and the delivery replays from the outbox on the new client
        assert delivery.drain(10) == 0
        link.check()
    finally:
        delivery.stop()
        link.stop(2)
        ob.close()


def test_a_restarted_device_resends_its_replay_window_when_it_connects(broker: Mosquitto, tmp_path: Path) -> None:
    # A power cut can take the clinic's broker down with the device: what the broker acknowledged just before
    # may be gone. The next run of the device re-sends what its outbox still keeps, once connected.
    cfg = OutboxConfig(commit_every=1, replay_window_s=30.0)
    with Outbox(tmp_path / "outbox.sqlite3", cfg) as ob:  # the previous run: 5 results, all acknowledged
        _put(ob, 5)
        ob.ack_many([i.row_id for i in ob.pending(10)])
        ob.flush()
        before = {i.result_id for i in ob.replay_candidates()}
    assert len(before) == 5
    sub = Subscriber(broker.port, RESULTS)
    ob = Outbox(tmp_path / "outbox.sqlite3", cfg)
    link = MqttLink(_cfg(broker.url), status_topic=None, client_id="edgemed-replay")
    delivery = Delivery(ob, link)
    try:
        link.start()
        delivery.start()
        assert sub.wait_for(5, 10) == 5, "the kept results were not re-sent"
        assert sub.result_ids == before and delivery.replayed_total == 5
        assert ob.pending_count() == 0  # re-sent from the acknowledgement log, never put back in the queue
    finally:
        delivery.stop()
        link.stop(2)
        ob.close()
        sub.close()


def test_a_publish_the_broker_refuses_is_reported_and_the_result_kept(
    mosquitto_factory: type[Mosquitto], tmp_path: Path
) -> None:
    # Anonymous clients may read but not write: mosquitto answers an MQTT 5 PUBLISH with PUBACK "Not authorized".
    broker = mosquitto_factory(acl="topic read edgemed/#\n").start()
    ob = Outbox(tmp_path / "outbox.sqlite3")
    link = MqttLink(_cfg(broker.url), status_topic=None, client_id="edgemed-acl")
    delivery = Delivery(ob, link)
    try:
        link.start()
        delivery.start()
        _put(ob, 3)
        # Bounded wait for the refusal (connect, publish, PUBACK): a loaded CI machine can take over a second.
        deadline = time.monotonic() + 15
        with pytest.raises(BrokerRefusedError, match=r"refused a message .*Not authorized; allow this client"):
            while time.monotonic() < deadline:
                assert delivery.drain(0.2) == 3  # never acknowledged, so never removed
                link.check()
    finally:
        delivery.stop()
        link.stop(2)
        ob.close()
    with Outbox(tmp_path / "outbox.sqlite3") as ob:
        assert ob.pending_count() == 3


@pytest.mark.parametrize(
    ("attempts", "refused"),
    [(["eof", "eof"], True), (["eof", "refused", "refused", "eof"], False), (["eof", "online", "eof"], False)],
)
def test_only_two_tls_eofs_in_a_row_count_as_a_refusal(attempts: list[str], refused: bool) -> None:
    # Logic test at the connection seam: each attempt's outcome is scripted; nothing is sent anywhere.
    cfg = MqttConfig(url=f"mqtts://127.0.0.1:{free_port()}", reconnect_min_s=0.01, reconnect_max_s=0.02)
    link = MqttLink(cfg, status_topic=None, client_id="edgemed-eof-logic")
    script = list(attempts)

    def fake_connect_once(stop: threading.Event) -> Attempt:  # what the paho callbacks would record for each attempt
        step = script.pop(0) if script else "refused"
        if step == "refused":
            return Attempt(error=ConnectionRefusedError(111, "Connection refused"))
        if step == "eof":
            return Attempt(tls_eof=True)  # paho's "failed to receive ... EOF" before any CONNACK
        return Attempt(connack=True, online=True)

    link._connect_once = fake_connect_once  # type: ignore[method-assign]
    link.start()
    deadline = time.monotonic() + 5
    while script and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    link._stop.set()
    assert not script, "the scripted attempts did not all run"
    if refused:
        with pytest.raises(BrokerRefusedError, match="closed TLS twice before answering CONNECT"):
            link.check()
    else:
        link.check()


def _supervisors() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "edgemed-mqtt" and t.is_alive()}


def test_a_restart_after_a_stop_that_timed_out_runs_one_supervisor() -> None:
    # A port that accepts TCP (the kernel's backlog) and never speaks TLS: the supervisor sits in paho's TLS
    # handshake for connect_timeout_s, longer than stop() waits for it.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        before = _supervisors()
        link = MqttLink(
            MqttConfig(url=f"mqtts://127.0.0.1:{port}", connect_timeout_s=2.0),
            status_topic=None,
            client_id="edgemed-restart",
        )
        try:
            link.start()
            time.sleep(0.3)  # inside the handshake now
            link.stop(timeout_s=0.3)
            assert len(_supervisors() - before) == 1, "the blocked supervisor is still ending"
            link.start()  # waits for the old supervisor (bounded by its handshake's time limit)
            assert len(_supervisors() - before) == 1
            time.sleep(0.5)
            assert len(_supervisors() - before) == 1
        finally:
            link.stop(timeout_s=0.3)
            for thread in _supervisors() - before:
                thread.join(10)
        assert _supervisors() - before == set()
