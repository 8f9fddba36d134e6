"""TLS and authentication against a real mosquitto with a CA, certificates and a password file we make."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
from broker_fixtures import Mosquitto, Pki, Subscriber

from edgemed.errors import BrokerRefusedError
from edgemed.outbox import Outbox
from edgemed.publish.config import MqttConfig, TlsConfig
from edgemed.publish.delivery import Delivery
from edgemed.publish.mqtt import MqttLink

RESULTS = "edgemed/site/dev/results"
USER, PASSWORD = "device", "right-password"


@pytest.fixture
def tls_broker(mosquitto_factory: type[Mosquitto], pki: Pki) -> Mosquitto:
    return mosquitto_factory(pki=pki, users={USER: PASSWORD, "dashboard": "dash-pw"}).start()


def _cfg(
    broker: Mosquitto, ca: Path, monkeypatch: pytest.MonkeyPatch, password: str = PASSWORD, **tls: Path
) -> MqttConfig:
    monkeypatch.setenv("EDGEMED_TEST_BROKER_PW", password)
    return MqttConfig(
        url=broker.url,
        username=USER,
        password_env="EDGEMED_TEST_BROKER_PW",
        tls=TlsConfig(ca_file=ca, **tls),
        reconnect_min_s=0.1,
        reconnect_max_s=0.5,
    )


def _wait_refused(link: MqttLink, timeout_s: float = 10.0) -> BrokerRefusedError:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            link.check()
        except BrokerRefusedError as exc:
            return exc
        time.sleep(0.05)
    raise AssertionError("the link did not report a refusal")


def _deliver(cfg: MqttConfig, broker: Mosquitto, pki: Pki, tmp_path: Path, n: int = 100) -> None:
    sub = Subscriber(broker.port, RESULTS, tls_ca=pki.ca_cert, username="dashboard", password="dash-pw")
    ob = Outbox(tmp_path / "outbox.sqlite3")
    link = MqttLink(cfg, status_topic="edgemed/site/dev/status", client_id="edgemed-tls")
    delivery = Delivery(ob, link)
    try:
        link.start()
        delivery.start()
        for seq in range(n):
            rid = uuid.uuid4().hex
            ob.put(rid, RESULTS, json.dumps({"result_id": rid, "seq": seq}).encode())
        assert delivery.drain(20) == 0
        link.check()
        assert sub.wait_for(n, 10) == n
    finally:
        delivery.stop()
        link.stop(2)
        ob.close()
        sub.close()


def test_right_ca_and_password_deliver(
    tls_broker: Mosquitto, pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert tls_broker.url.startswith("mqtts://127.0.0.1:")
    _deliver(_cfg(tls_broker, pki.ca_cert, monkeypatch), tls_broker, pki, tmp_path)


def test_a_client_certificate_is_presented_when_configured(
    mosquitto_factory: type[Mosquitto], pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = mosquitto_factory(
        pki=pki, users={USER: PASSWORD, "dashboard": "dash-pw"}, require_client_cert=True
    ).start()
    cfg = _cfg(broker, pki.ca_cert, monkeypatch, cert_file=pki.client_cert, key_file=pki.client_key)
    # The subscriber has no client certificate, so it cannot connect here; check the PUBACKs instead.
    ob = Outbox(tmp_path / "outbox.sqlite3")
    link = MqttLink(cfg, status_topic=None, client_id="edgemed-tls-cert")
    delivery = Delivery(ob, link)
    try:
        link.start()
        delivery.start()
        ob.put(uuid.uuid4().hex, RESULTS, b"{}")
        assert delivery.drain(20) == 0
        link.check()
    finally:
        delivery.stop()
        link.stop(2)
        ob.close()


def test_an_untrusted_broker_certificate_is_refused_with_the_fix(
    tls_broker: Mosquitto, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    link = MqttLink(_cfg(tls_broker, pki.other_ca_cert, monkeypatch), status_topic=None, client_id="edgemed-ca")
    try:
        link.start()
        exc = _wait_refused(link)
    finally:
        link.stop(2)
    message = str(exc)
    assert "\n" not in message
    assert f"TLS: the certificate of broker {tls_broker.url} is not trusted" in message
    assert "set mqtt.tls.ca_file to the CA that signed the broker's certificate" in message
    assert not link.connected


def test_a_wrong_password_is_refused_with_the_fix(
    tls_broker: Mosquitto, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _cfg(tls_broker, pki.ca_cert, monkeypatch, password="wrong-password")
    link = MqttLink(cfg, status_topic=None, client_id="edgemed-pw")
    try:
        link.start()
        exc = _wait_refused(link)
    finally:
        link.stop(2)
    message = str(exc)
    assert "\n" not in message and "wrong-password" not in message
    assert f"refused the connection of client 'edgemed-pw' as user '{USER}': Not authorized" in message
    assert "check mqtt.username and the password it reads (env EDGEMED_TEST_BROKER_PW)" in message


def test_a_missing_client_certificate_is_refused_with_the_fix(
    mosquitto_factory: type[Mosquitto], pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = mosquitto_factory(pki=pki, users={USER: PASSWORD}, require_client_cert=True).start()
    link = MqttLink(_cfg(broker, pki.ca_cert, monkeypatch), status_topic=None, client_id="edgemed-nocert")
    try:
        link.start()
        exc = _wait_refused(link)
    finally:
        link.stop(2)
    assert f"TLS: broker {broker.url} rejected the connection" in str(exc)
    assert "set mqtt.tls.cert_file and mqtt.tls.key_file" in str(exc)
