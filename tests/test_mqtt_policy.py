"""The MQTT core's decisions without a broker: refusal classification and wording, the reconnect and protocol fall
back policy, a refusal shown exactly once, and the arguments the link rejects at once."""

from __future__ import annotations

import ast
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from edgemed.dashboard.ingest import describe_dashboard_refusal
from edgemed.errors import BrokerRefusedError
from edgemed.publish.config import MqttConfig, TlsConfig
from edgemed.publish.mqtt import MqttLink
from edgemed.publish.policy import (
    Attempt,
    ReconnectPolicy,
    RefusalState,
    ReportedRefusal,
    connack_refusal,
    describe_device_refusal,
)
from edgemed.publish.publisher import Subscription
from edgemed.publish.tls import TlsSettingNames

URL = "mqtt://127.0.0.1:1883"
REPO = Path(__file__).resolve().parents[1]


def _cfg(**kw: object) -> MqttConfig:
    return MqttConfig(url=URL, reconnect_min_s=0.5, reconnect_max_s=4.0, **kw)  # type: ignore[arg-type]


def test_only_settings_problems_are_refusals_and_each_owner_words_them_in_its_own_terms() -> None:
    cfg = _cfg(username="dash", password_env="DASH_PW")
    assert connack_refusal("Server unavailable", cfg, "c") is None  # retried, not a configuration error
    assert connack_refusal("Quota exceeded", cfg, "c") is None
    refusal = connack_refusal("Not authorized", cfg, "edgemed-x")
    assert refusal is not None and refusal.kind == "credentials" and refusal.password_source == "env DASH_PW"
    assert describe_device_refusal(refusal) == (
        f"broker {URL} refused the connection of client 'edgemed-x' as user 'dash': Not authorized; "
        "check mqtt.username and the password it reads (env DASH_PW)"
    )
    assert describe_dashboard_refusal(refusal) == (
        f"broker {URL} refused the dashboard (Not authorized); check the user name 'dash', the password it reads "
        "(env DASH_PW) and the client id"
    )
    anonymous = connack_refusal("Client identifier not valid", _cfg(), "bad id")
    assert anonymous is not None and anonymous.kind == "client_id"
    assert describe_device_refusal(anonymous).endswith(
        "without a user name: Client identifier not valid; set mqtt.client_id to an id the broker accepts"
    )
    assert describe_dashboard_refusal(anonymous).endswith("pass a --client-id the broker accepts")
    for text in (describe_device_refusal(anonymous), describe_dashboard_refusal(anonymous)):
        assert "None" not in text


def test_the_delay_doubles_to_its_cap_stays_there_while_refused_and_resets_after_a_connection() -> None:
    policy = ReconnectPolicy(_cfg())
    down = Attempt(error=ConnectionRefusedError(111, "Connection refused"))
    steps = [policy.after(down, refused=False, may_fall_back=True) for _ in range(5)]
    assert [s.delay_s for s in steps] == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert [s.report for s in steps] == ["unreachable", None, None, None, None]  # said once per outage
    lost = policy.after(Attempt(connack=True, online=True), refused=False, may_fall_back=True)
    assert (lost.report, lost.delay_s) == ("lost", 0.5)  # a connection that was up: back to the shortest delay
    assert policy.after(down, refused=False, may_fall_back=True).delay_s == 1.0
    assert policy.after(down, refused=True, may_fall_back=True).delay_s == 4.0  # a refusal does not fix itself
    assert policy.after(down, refused=True, may_fall_back=True).delay_s == 4.0


def test_mqtt5_falls_back_when_refused_or_twice_unanswered_and_only_with_protocol_auto() -> None:
    refused_v5 = Attempt(connack=True, protocol_refused="Unsupported protocol version")
    assert ReconnectPolicy(_cfg()).after(refused_v5, refused=False, may_fall_back=True).fall_back == (
        "the broker refused MQTT 5 (Unsupported protocol version)"
    )
    assert ReconnectPolicy(_cfg()).after(refused_v5, refused=False, may_fall_back=False).fall_back is None
    policy = ReconnectPolicy(_cfg())
    silent = Attempt()  # connected, then closed (or timed out) without any CONNACK
    assert policy.after(silent, refused=False, may_fall_back=True).fall_back is None  # once may be a blip
    assert policy.after(silent, refused=False, may_fall_back=True).fall_back == (
        "the broker closed two MQTT 5 connections without a CONNACK"
    )
    assert policy.after(silent, refused=False, may_fall_back=True).fall_back is None  # counting starts again
    held = ReconnectPolicy(_cfg())
    for _ in range(3):  # a refused client is not a protocol problem
        assert held.after(silent, refused=True, may_fall_back=True).fall_back is None


def test_one_connect_unanswered_at_the_deadline_is_enough_for_an_owner_that_asks_for_it() -> None:
    unanswered = Attempt(unanswered=True)  # the connection stayed up, no CONNACK within connect_timeout_s
    closed = Attempt()  # closed without a CONNACK: may be a blip, two are needed either way
    dashboard = ReconnectPolicy(_cfg(), unanswered_to_fall_back=1)
    assert dashboard.after(closed, refused=False, may_fall_back=True).fall_back is None
    assert dashboard.after(closed, refused=False, may_fall_back=True).fall_back == (
        "the broker closed two MQTT 5 connections without a CONNACK"
    )

    def first(refused: bool, may_fall_back: bool) -> str | None:
        policy = ReconnectPolicy(_cfg(), unanswered_to_fall_back=1)
        return policy.after(unanswered, refused=refused, may_fall_back=may_fall_back).fall_back

    assert first(refused=False, may_fall_back=True) == "the broker did not answer an MQTT 5 CONNECT within 5 s"
    assert first(refused=False, may_fall_back=False) is None  # protocol 5, or on 3.1.1 already
    assert first(refused=True, may_fall_back=True) is None  # a refused client is not a protocol problem
    device = ReconnectPolicy(_cfg())  # the device waits for a second one, as it always did
    assert device.after(unanswered, refused=False, may_fall_back=True).fall_back is None
    assert device.after(unanswered, refused=False, may_fall_back=True).fall_back is not None
    with pytest.raises(ValueError, match="unanswered_to_fall_back must be 1 or more"):
        ReconnectPolicy(_cfg(), unanswered_to_fall_back=0)


def test_tls_refusals_name_the_owners_settings() -> None:
    options = TlsSettingNames("--ca-file", "--cert-file and --key-file")
    failed = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    failed.reason = "WRONG_VERSION_NUMBER"  # as the ssl module sets it on a real handshake failure
    for attempt in (Attempt(error=failed), Attempt(tls_alert="TLSV13_ALERT_CERTIFICATE_REQUIRED")):
        theirs = ReconnectPolicy(_cfg(), tls_names=options).after(attempt, refused=False, may_fall_back=True)
        ours = ReconnectPolicy(_cfg()).after(attempt, refused=False, may_fall_back=True)
        assert theirs.refusal is not None and "set --cert-file and --key-file" in theirs.refusal
        assert "mqtt.tls" not in theirs.refusal
        assert ours.refusal is not None and "set mqtt.tls.cert_file and mqtt.tls.key_file" in ours.refusal


def test_tls_endings_before_the_connack_are_refusals_unless_a_client_certificate_is_set() -> None:
    assert "rejected the connection (SSLV3_ALERT_CERTIFICATE_REQUIRED)" in (
        ReconnectPolicy(_cfg())
        .after(Attempt(tls_alert="SSLV3_ALERT_CERTIFICATE_REQUIRED"), refused=False, may_fall_back=True)
        .refusal
        or ""
    )
    eof = Attempt(tls_eof=True)
    policy = ReconnectPolicy(_cfg())
    assert policy.after(eof, refused=False, may_fall_back=True).refusal is None
    assert "closed TLS twice before answering CONNECT" in (
        policy.after(eof, refused=False, may_fall_back=True).refusal or ""
    )
    cert = MqttConfig(
        url="mqtts://127.0.0.1:8883",
        tls=TlsConfig(cert_file="c.pem", key_file="k.pem"),  # type: ignore[arg-type]
    )
    with_cert = ReconnectPolicy(cert)
    assert all(with_cert.after(eof, refused=False, may_fall_back=True).refusal is None for _ in range(3))


def test_a_refusal_is_raised_to_a_caller_that_asks_or_logged_once_when_nobody_does() -> None:
    asked = RefusalState(grace_s=1.0)
    assert asked.set("broker refused us", 100.0, retry_s=30.0)
    assert not asked.set("broker refused us", 100.5)  # the same refusal again is not news
    with pytest.raises(BrokerRefusedError) as raised:
        asked.check()
    assert not isinstance(raised.value, ReportedRefusal)
    assert asked.take_log_line(200.0) is None  # raised to the caller, who prints it: not logged as well

    unasked = RefusalState(grace_s=1.0)
    unasked.set("broker refused us", 100.0, retry_s=30.0)
    assert unasked.due_in(100.25) == 0.75 and unasked.take_log_line(100.5) is None
    assert unasked.take_log_line(101.0) == "broker refused us; retrying every 30 s or less"
    assert unasked.take_log_line(102.0) is None  # once
    with pytest.raises(ReportedRefusal):  # the command line does not print it a second time
        unasked.check()
    unasked.clear()
    unasked.check()
    unasked.set("a message was refused", 300.0)
    assert unasked.take_log_line(302.0) == "a message was refused"  # no retry to speak of


def test_bad_link_arguments_are_rejected_at_once_with_what_to_do() -> None:
    with pytest.raises(ValueError, match="need on_message"):
        MqttLink(_cfg(), status_topic=None, client_id="c", subscriptions=[Subscription("edgemed/+/+/receipts")])
    with pytest.raises(ValueError, match="need on_message"):
        MqttLink(_cfg(), status_topic=None, client_id="c", manual_ack=True)
    with pytest.raises(ValueError, match="QoS must be 0 or 1"):
        Subscription("edgemed/#", qos=2)
    with pytest.raises(ValueError, match="needs a topic filter"):
        Subscription("")
    assert Subscription("$share/ingest/edgemed/+/+/results").topic_filter == "$share/ingest/edgemed/+/+/results"


def test_publish_mqtt_is_the_only_module_of_edgemed_that_imports_paho() -> None:
    importers = set()
    for path in (REPO / "edgemed").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(name == "paho" or name.startswith("paho.") for name in names):
                importers.add(path.relative_to(REPO).as_posix())
    assert importers == {"edgemed/publish/mqtt.py"}
    # The delivery logic and the dashboard's writer load without paho: only the link needs it.
    code = "import sys, edgemed.publish.delivery, edgemed.dashboard.writer; print('paho' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("LocalHost", True),
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("localhost.", False),  # fully qualified: resolved through DNS, which can point anywhere
        ("LOCALHOST.", False),
        ("localhost.example.org", False),
        ("127.0.0.1.nip.io", False),
        ("127.1", False),  # not an IP literal Python reads; the resolver's reading of it is not ours to trust
        ("10.0.0.1", False),
        ("broker", False),
    ],
)
def test_only_ip_literals_and_exactly_localhost_count_as_this_machine(host: str, loopback: bool) -> None:
    from edgemed.config import override_broker
    from edgemed.publish.config import is_loopback
    from edgemed.publish.policy import require_safe_transport

    # Judged from the text alone: nothing here connects or looks a name up.
    assert is_loopback(host) is loopback
    url = f"mqtt://{'[::1]' if host == '::1' else host}:1883"
    if loopback:
        require_safe_transport(MqttConfig(url=url))
        section, warning = override_broker({"url": "mqtts://broker:8883", "tls": {}}, url)
        assert "tls" not in section and warning is not None and "this machine" in warning
    else:
        with pytest.raises(BrokerRefusedError, match="plaintext"):
            require_safe_transport(MqttConfig(url=url))  # the plaintext rule
        with pytest.raises(BrokerRefusedError, match="plaintext to another machine"):
            override_broker({"url": "mqtts://broker:8883", "tls": {}}, url)  # the TLS-drop rule
