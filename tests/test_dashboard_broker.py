"""Item 19: a broker that refuses the dashboard is reported once, not twice per attempt for ever."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from broker_fixtures import Mosquitto
from dashboard_helpers import wait_until

from edgemed.dashboard.ingest import Ingest
from edgemed.dashboard.store import DashboardStore
from edgemed.publish.config import MqttConfig


def test_a_wrong_password_is_reported_once_and_not_as_a_lost_connection(
    mosquitto_factory: type[Mosquitto],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.DEBUG, logger="edgemed.dashboard.ingest")
    broker = mosquitto_factory(users={"dash": "right"}).start()
    monkeypatch.setenv("DASH_PW", "wrong")
    store = DashboardStore(tmp_path / "d.sqlite3")
    cfg = MqttConfig(url=broker.url, username="dash", password_env="DASH_PW", reconnect_min_s=1, reconnect_max_s=1)
    ingest = Ingest(cfg, store)
    ingest.start()

    def refusals() -> int:
        return broker.log_path.read_text().count("not authorised")

    try:
        assert wait_until(lambda: refusals() >= 3, 15), broker.log_tail()  # three attempts, each refused
        snapshot = ingest.snapshot()
    finally:
        ingest.stop()
        store.close()
    assert "refused the dashboard (Not authorized)" in snapshot["broker_error"] and not snapshot["connected"]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(errors) == 1, errors
    assert "check the user name 'dash', the password it reads (env DASH_PW)" in errors[0]
    assert "retrying every 1 s or less" in errors[0]


def test_a_connection_lost_after_it_was_accepted_is_still_reported(
    mosquitto_factory: type[Mosquitto], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broker = mosquitto_factory().start()
    store = DashboardStore(tmp_path / "d.sqlite3")
    ingest = Ingest(MqttConfig(url=broker.url), store)
    ingest.start()
    try:
        assert ingest.wait_subscribed(10)
        broker.kill()
        assert wait_until(lambda: any("lost the connection" in r.getMessage() for r in caplog.records), 10)
    finally:
        ingest.stop()
        store.close()
