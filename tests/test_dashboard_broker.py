"""A broker that refuses the dashboard: reported once, not twice per attempt for ever (item 19), in its own terms."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from broker_fixtures import Mosquitto, Pki
from dashboard_helpers import wait_until

from edgemed.dashboard.ingest import Ingest
from edgemed.dashboard.store import DashboardStore
from edgemed.publish.config import MqttConfig, TlsConfig


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


@pytest.mark.parametrize("refusal", ["untrusted CA", "no client certificate"])
def test_a_tls_refusal_names_the_dashboards_options(
    refusal: str, mosquitto_factory: type[Mosquitto], pki: Pki, tmp_path: Path
) -> None:
    # The dashboard has no profile: a fix that says "set mqtt.tls.ca_file" sends its operator looking for a key
    # that does not exist.
    if refusal == "untrusted CA":
        broker, ca, fix = mosquitto_factory(pki=pki).start(), pki.other_ca_cert, "set --ca-file to the CA"
    else:
        broker, ca = mosquitto_factory(pki=pki, require_client_cert=True).start(), pki.ca_cert
        fix = "set --cert-file and --key-file to one its CA signed"
    store = DashboardStore(tmp_path / "d.sqlite3")
    cfg = MqttConfig(url=broker.url, tls=TlsConfig(ca_file=ca), reconnect_min_s=0.1, reconnect_max_s=0.5)
    ingest = Ingest(cfg, store)
    ingest.start()
    try:
        assert wait_until(lambda: "TLS" in (ingest.snapshot()["broker_error"] or ""), 15), ingest.snapshot()
        message = ingest.snapshot()["broker_error"]
    finally:
        ingest.stop()
        store.close()
    assert fix in message and "mqtt.tls" not in message, message
