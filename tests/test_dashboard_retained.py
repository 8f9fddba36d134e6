"""Retained messages are old news: a dashboard restart or reconnection never makes a device look "seen just now".

The broker sends every retained status again to each new subscription (each start of a new dashboard database,
a new client id, and on MQTT 3.1.1 every reconnection). Against a real mosquitto: a device silent for a month still
ages out after the dashboard restarts, its old status does not outrank its last heartbeat, a retained poison
message is kept as a dead letter once, and a new database still learns the retained statuses.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from broker_fixtures import Device, Mosquitto
from dashboard_helpers import HEALTH, wait_until

from edgemed.dashboard.ingest import Ingest
from edgemed.dashboard.store import DashboardStore
from edgemed.dashboard.validate import classify
from edgemed.publish.config import MqttConfig

MONTH_S = 30 * 86400.0
WEEK_S = 7 * 86400.0
OLD_STATUS = "edgemed/clinic-a/old/status"
GHOST_STATUS = "edgemed/clinic-a/ghost/status"
SENTINEL = "edgemed/clinic-a/live/health"


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _publish(device: Device, topic: str, payload: bytes, *, retain: bool) -> None:
    info = device.client.publish(topic, payload, qos=1, retain=retain)
    info.wait_for_publish(5)
    assert info.is_published()


def _run_until_sentinel(cfg: MqttConfig, store: DashboardStore, device: Device, beat: int) -> Ingest:
    """Start an ingest, and return it (stopped) once a heartbeat published after its subscription is stored.

    The broker sends the retained messages right after granting the subscription, so once a message published
    after that has been stored, everything retained has been handled.
    """
    ingest = Ingest(cfg, store)
    ingest.start()
    try:
        assert ingest.wait_subscribed(10)
        _publish(device, SENTINEL, json.dumps({**HEALTH, "frames": beat}).encode(), retain=False)

        def sentinel_stored() -> bool:
            rows = store._query("SELECT health FROM devices WHERE device_id = 'live'")
            return bool(rows) and json.loads(rows[0][0])["frames"] == beat

        assert wait_until(sentinel_stored, 10), ingest.snapshot()
    finally:
        ingest.stop()
    return ingest


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_device_silent_for_a_month_still_ages_out_after_the_dashboard_restarts(
    broker: Mosquitto, tmp_path: Path, protocol: str
) -> None:
    db = tmp_path / "fleet.sqlite3"
    cfg = MqttConfig(url=broker.url, protocol=protocol)
    device = Device(broker.port)
    store = DashboardStore(db)
    try:
        first = Ingest(cfg, store)
        first.start()
        assert first.wait_subscribed(10)
        status = {"state": "online", "at": _stamp(time.time()), "delegate": "cpu", "degraded": False}
        _publish(device, OLD_STATUS, json.dumps(status).encode(), retain=True)
        _publish(device, GHOST_STATUS, b"[[[[", retain=True)
        assert wait_until(lambda: store.dead_letter_counts() != {} and store.fleet() != [], 10), first.snapshot()
        first.stop()
        # A month passes: the device was decommissioned and never spoke again; its status stays retained.
        with store._lock, store._db:
            store._db.execute(
                "UPDATE devices SET last_seen = last_seen - ?, status_at = status_at - ? WHERE device_id = 'old'",
                (MONTH_S, MONTH_S),
            )
        before = store._query("SELECT last_seen, status_at FROM devices WHERE device_id = 'old'")[0]

        for beat in (1, 2):  # two restarts of the dashboard, same database and client id
            again = _run_until_sentinel(cfg, store, device, beat)
            after = store._query("SELECT last_seen, status_at FROM devices WHERE device_id = 'old'")[0]
            assert tuple(after) == tuple(before), "a retained status moved last_seen or status_at forward"
            listed = [d["device_id"] for d in store.fleet(expire_after_s=WEEK_S)]
            assert listed == ["live"] and store.device_counts(None, WEEK_S) == (1, 1)
            assert sum(store.dead_letter_counts().values()) == 1  # the retained poison, kept once
            if protocol == "5":
                # Retain handling 1: a resumed session's subscription brings no retained message again.
                assert again.snapshot()["received"] == 1, again.snapshot()
        assert store._query("SELECT count(*) FROM dead_letters")[0][0] == 1
    finally:
        device.close()
        store.close()


def test_a_new_database_still_gets_the_retained_statuses_once(broker: Mosquitto, tmp_path: Path) -> None:
    cfg = MqttConfig(url=broker.url, protocol="5")
    device = Device(broker.port)
    long_ago = time.time() - MONTH_S
    status = {"state": "offline", "reason": "stopped", "clean": True, "at": _stamp(long_ago)}
    _publish(device, OLD_STATUS, json.dumps(status).encode(), retain=True)  # before any dashboard listened
    try:
        for beat, name in enumerate(("first.sqlite3", "second.sqlite3"), start=1):
            # The second database sits behind the same client id, whose subscription the broker already holds:
            # retain handling 1 would never send it the retained status.
            store = DashboardStore(tmp_path / name)
            try:
                _run_until_sentinel(cfg, store, device, beat)
                rows = {d["device_id"]: d for d in store.fleet()}
                assert rows["old"]["state"] == "offline", (name, rows)
                # Dated by the device's own stamp, not by the dashboard's clock: a month-old status ages out.
                assert abs(rows["old"]["last_seen"] - int(long_ago)) <= 1
                assert [d["device_id"] for d in store.fleet(expire_after_s=WEEK_S)] == ["live"]
            finally:
                store.close()
    finally:
        device.close()


def _file(store: DashboardStore, topic: str, body: object, at: float, *, retained: bool) -> str:
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    return store.file([classify(topic, payload, retained=retained)], at)[0]


def test_an_old_retained_status_never_outranks_the_latest_heartbeat(tmp_path: Path) -> None:
    store = DashboardStore(tmp_path / "d.sqlite3")
    offline = {"state": "offline", "reason": "stopped", "clean": True, "pending": 5, "delegate": "edgetpu"}
    assert _file(store, "edgemed/clinic-a/us-01/status", offline, 100.0, retained=False) == "updated"
    assert _file(store, "edgemed/clinic-a/us-01/health", HEALTH, 200.0, retained=False) == "updated"
    # The dashboard reconnects at 300: the broker sends the retained status again.
    assert _file(store, "edgemed/clinic-a/us-01/status", offline, 300.0, retained=True) == "unchanged"
    row = store.fleet(now=400.0)[0]
    assert row["pending"] == 17 and row["delegate"] == "cpu" and row["last_seen"] == 200.0
    # A retained status that changed while nobody listened is kept, dated by its own stamp (never after now).
    changed = {**offline, "pending": 3, "at": "1970-01-01T00:04:10Z"}  # 250 s
    assert _file(store, "edgemed/clinic-a/us-01/status", changed, 300.0, retained=True) == "updated"
    row = store.fleet(now=400.0)[0]
    assert row["pending"] == 3 and row["last_seen"] == 200.0
    status_at = store._query("SELECT status_at FROM devices")[0][0]
    assert status_at == 250.0
    future = {**offline, "pending": 1, "at": "2999-01-01T00:00:00Z"}
    assert _file(store, "edgemed/clinic-a/us-01/status", future, 300.0, retained=True) == "updated"
    assert store._query("SELECT last_seen, status_at FROM devices")[0][:] == (200.0, 300.0)
    # A live message still moves last_seen, as before.
    assert _file(store, "edgemed/clinic-a/us-01/status", offline, 500.0, retained=False) == "updated"
    assert store.fleet(now=500.0)[0]["last_seen"] == 500.0
    store.close()


def test_a_retained_poison_message_is_kept_once_and_live_ones_each_time(tmp_path: Path) -> None:
    store = DashboardStore(tmp_path / "d.sqlite3")
    ingest = Ingest(MqttConfig(url="mqtt://127.0.0.1:1"), store)  # never started: handle() is what paho calls
    assert ingest.handle(GHOST_STATUS, b"[[[[", retained=True) == "rejected: payload is not JSON"
    for _ in range(3):  # three reconnections
        assert ingest.handle(GHOST_STATUS, b"[[[[", retained=True) == "unchanged"
    assert ingest.handle(OLD_STATUS, b"[[[[", retained=True).startswith("rejected: ")  # another topic
    for _ in range(2):  # a device that sends the same broken payload twice: both kept
        assert ingest.handle("edgemed/clinic-a/old/results", b"{x", retained=False).startswith("rejected: ")
    assert store.dead_letter_counts() == {"payload is not JSON": 4}
    assert store._query("SELECT count(*) FROM dead_letters")[0][0] == 4
    store.close()
