"""The central dashboard: SQLite store, MQTT ingest against a real mosquitto, JSON API, and a real browser."""

from __future__ import annotations

import argparse
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from broker_fixtures import Amqtt, Device, Mosquitto
from dashboard_helpers import HEALTH, fill_the_disk, free_the_disk, make_result, make_study, wait_until
from web_helpers import browser_logged_in, client, login, make_user, running_web

from edgemed.dashboard import add_arguments, review, run, serve
from edgemed.dashboard.ingest import Ingest
from edgemed.dashboard.secrets import load_secrets
from edgemed.dashboard.store import DashboardStore
from edgemed.envelope import result_schema
from edgemed.errors import ConfigError
from edgemed.publish.config import MqttConfig

XSS_REASON = '<img src=x onerror="document.title=\'pwned\'"><script>document.title="pwned2"</script>'


def test_sample_payloads_follow_the_real_schema() -> None:
    jsonschema.validate(make_result(level="urgent", reason="malignant 0.91"), result_schema())


# -- store ---------------------------------------------------------------------------------------------------------


def test_store_keeps_a_duplicate_result_once(tmp_path: Path) -> None:
    store = DashboardStore(tmp_path / "d.sqlite3")
    result = make_result()
    assert store.add_result(result) is True
    assert store.add_result(dict(result)) is False
    assert store.result_count() == 1
    store.close()
    # The journal mode is a property of the file: an external reader (backup) can read while we write.
    reopened = DashboardStore(tmp_path / "d.sqlite3")
    assert reopened._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert reopened.add_result(result) is False
    assert reopened.result_count() == 1


def test_store_fleet_counts_and_acknowledgement(tmp_path: Path) -> None:
    store = DashboardStore(tmp_path / "d.sqlite3")
    store.set_status("clinic-a", "us-01", {"state": "online", "delegate": "edgetpu", "degraded": False}, 100.0)
    store.set_health("clinic-a", "us-01", HEALTH, 110.0)  # newer than the status: its delegate wins
    store.set_status("clinic-b", "xr-02", {"state": "offline", "reason": "connection lost"}, 105.0)
    urgent = make_result(level="urgent", reason="malignant 0.91", seq=1)
    store.add_result(urgent, 111.0)
    store.add_result(make_result(level="routine", seq=2), 112.0)
    named = make_result(seq=3)
    named["source"]["name"] = "patient-smith.png"  # a device that opted in to publishing file names
    store.add_result(named, 113.0)
    study = make_study()
    store.add_study(study, 114.0)

    fleet = {d["device_id"]: d for d in store.fleet(now=120.0)}
    assert fleet["us-01"]["state"] == "online"
    assert fleet["us-01"]["delegate"] == "cpu" and fleet["us-01"]["degraded"] is True
    assert fleet["us-01"]["pending"] == 17 and fleet["us-01"]["p95_ms"] == 8.9 and fleet["us-01"]["fps"] == 7.5
    assert fleet["us-01"]["last_seen_s_ago"] == 6.0 and fleet["us-01"]["silent"] is False
    assert fleet["us-01"]["cpu_percent"] == 37.5 and fleet["us-01"]["peak_rss_mb"] == 104.2
    assert fleet["us-01"]["cpu_temp_c"] is None and fleet["xr-02"]["cpu_percent"] is None
    # Load figures come from devices: anything but a number is dropped, not passed to the page.
    store.set_health("clinic-a", "us-01", {**HEALTH, "cpu_percent": "<img src=x>", "cpu_temp_c": True}, 115.0)
    odd = {d["device_id"]: d for d in store.fleet(now=120.0)}["us-01"]
    assert odd["cpu_percent"] is None and odd["cpu_temp_c"] is None and odd["peak_rss_mb"] == 104.2
    assert {d["device_id"]: d["silent"] for d in store.fleet(now=500.0)} == {"us-01": True, "xr-02": False}
    assert fleet["xr-02"]["state"] == "offline" and fleet["xr-02"]["offline_reason"] == "connection lost"
    assert fleet["xr-02"]["pending"] is None

    counts = store.level_counts()
    assert counts["results"]["urgent"] == 1 and counts["results"]["routine"] == 2 and counts["results"]["error"] == 0
    assert counts["studies"]["urgent"] == 1
    assert [r["result_id"] for r in store.recent_results("urgent")] == [urgent["result_id"]]
    with pytest.raises(ConfigError, match="unknown triage level"):
        store.recent_results("bogus")

    waiting = store.unacknowledged_urgent()
    assert [(w["kind"], w["result_id"]) for w in waiting] == [
        ("frame", urgent["result_id"]),
        ("study", study["result_id"]),
    ]
    secrets = load_secrets(tmp_path / "d.key", create=True)
    review.acknowledge(store, urgent["result_id"], "ab", "127.0.0.1", secrets, 116.0)
    with pytest.raises(review.ReviewConflict, match="already acknowledged by ab"):
        review.acknowledge(store, urgent["result_id"], "cd", "127.0.0.1", secrets)
    with pytest.raises(review.ReviewNotFound):
        review.acknowledge(store, uuid.uuid4().hex, "ab", "127.0.0.1", secrets)
    assert [w["result_id"] for w in store.unacknowledged_urgent()] == [study["result_id"]]
    assert store.recent_results("urgent")[0]["acked_by"] == "ab"
    # File names never reach the dashboard's database.
    assert b"patient-smith" not in (tmp_path / "d.sqlite3").read_bytes() + (tmp_path / "d.sqlite3-wal").read_bytes()


def test_ingest_rejects_malformed_messages_without_crashing(tmp_path: Path) -> None:
    store = DashboardStore(tmp_path / "d.sqlite3")
    ingest = Ingest(MqttConfig(url="mqtt://127.0.0.1:1"), store)  # never started: handle() is called directly
    good = make_result()
    topic = "edgemed/clinic-a/us-01/results"
    assert ingest.handle(topic, json.dumps(good).encode()) == "stored"
    assert ingest.handle(topic, json.dumps(good).encode()) == "duplicate"
    cases = {
        b"{not json": "not JSON",
        b"\xff\xfe": "not JSON",
        b"[1, 2]": "not a JSON object",
        json.dumps({**make_result(), "schema": "other/9"}).encode(): "schema",
        json.dumps(make_result(device_id="us-99")).encode(): "differ from the topic",
        json.dumps({**make_result(), "triage": {"level": "panic", "reason": "x"}}).encode(): "triage.level",
        json.dumps({**make_result(), "seq": -1}).encode(): "seq",
        json.dumps({**make_result(), "seq": 2**64}).encode(): "seq",
    }
    for payload, reason in cases.items():
        outcome = ingest.handle(topic, payload)
        assert outcome.startswith("rejected: ") and reason in outcome, (payload, outcome)
    assert ingest.handle("edgemed/clinic-a/<img onerror=x>/status", b'{"state":"online"}').startswith("rejected: site")
    assert ingest.handle("edgemed/clinic-a/us-01/other", b"{}").startswith("rejected: topic")
    assert ingest.handle("edgemed/clinic-a/us-01/status", b"") == "ignored"
    assert ingest.handle("edgemed/clinic-a/us-01/status", b'{"state": 3}').startswith("rejected: status")
    assert ingest.handle("edgemed/clinic-a/us-01/studies", json.dumps(make_study()).encode()) == "stored"
    # Optional fields of the wrong type are dropped, not fatal: the row still goes in.
    odd = {**make_result(), "session_id": {"x": 1}, "runtime": {"delegate": [1], "degraded": "yes"}}
    assert ingest.handle(topic, json.dumps(odd).encode()) == "stored"
    stats = ingest.snapshot()
    assert stats["stored"] == 3 and stats["duplicates"] == 1 and stats["rejected"] == len(cases) + 3
    assert store.result_count() == 2


# -- ingest against a real broker --------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_ingest_gets_results_published_while_it_was_down(broker: Mosquitto, tmp_path: Path, protocol: str) -> None:
    db = tmp_path / "fleet.sqlite3"
    cfg = MqttConfig(url=broker.url, protocol=protocol)
    store = DashboardStore(db)
    first = Ingest(cfg, store)
    first.start()
    device = Device(broker.port)
    try:
        assert first.wait_subscribed(10), broker.log_tail()
        r1 = make_result(seq=0)
        device.send("status", json.dumps({"state": "online", "delegate": "cpu", "degraded": False}).encode(), True)
        device.send("results", json.dumps(r1).encode())
        device.send("results", json.dumps(r1).encode())  # at-least-once redelivery of the same result
        assert wait_until(lambda: first.snapshot()["duplicates"] == 1, 10), first.snapshot()
        first.stop()
        store.close()

        # Dashboard down: the broker queues these for its persistent session.
        later = [make_result(seq=i, level="urgent" if i == 2 else "routine", reason=f"r{i}") for i in (1, 2, 3)]
        for r in later:
            device.send("results", json.dumps(r).encode())
        device.send("results", b"{truncated")
        device.send("studies", json.dumps({**make_study(), "schema": "edgemed.study/0"}).encode())
        device.send("results", json.dumps(later[0]).encode())  # and a duplicate queued while down
        device.send("health", json.dumps(HEALTH).encode())

        store = DashboardStore(db)
        second = Ingest(cfg, store)  # same fixed client id: resumes the session
        second.start()
        try:
            assert wait_until(lambda: store.result_count() == 4 and second.snapshot()["received"] >= 6, 10), (
                store.result_count(),
                second.snapshot(),
                broker.log_tail(),
            )
            stats = second.snapshot()
            assert stats["rejected"] == 2 and stats["duplicates"] == 1 and stats["stored"] == 3
            assert stats["connected"] is True
            assert {r["seq"] for r in store.recent_results()} == {0, 1, 2, 3}
            device_row = store.fleet()[0]
            assert device_row["state"] == "online" and device_row["pending"] == 17
        finally:
            second.stop()
    finally:
        device.close()
        first.stop()
        store.close()


def test_ingest_falls_back_to_311_for_a_broker_without_mqtt5(amqtt_broker: Amqtt, tmp_path: Path) -> None:
    # amqtt speaks only MQTT 3.1.1 and leaves an MQTT 5 CONNECT unanswered: "auto" must not hang on it.
    store = DashboardStore(tmp_path / "fleet.sqlite3")
    ingest = Ingest(MqttConfig(url=f"mqtt://127.0.0.1:{amqtt_broker.port}", connect_timeout_s=1.0), store)
    ingest.start()
    device = None
    try:
        assert ingest.wait_subscribed(20), ingest.snapshot()
        device = Device(amqtt_broker.port)
        device.send("results", json.dumps(make_result(seq=5)).encode())
        assert wait_until(lambda: store.result_count() == 1, 10), ingest.snapshot()
        assert ingest.snapshot()["connected"] is True
        # A restart probes MQTT 5 again (the broker may have been merely unwell) and falls back again.
        ingest.stop()
        ingest.start()
        assert ingest.wait_subscribed(20) and wait_until(lambda: ingest.snapshot()["connected"], 10)
        device.send("results", json.dumps(make_result(seq=6)).encode())
        assert wait_until(lambda: store.result_count() == 2, 10), ingest.snapshot()
    finally:
        if device is not None:
            device.close()
        ingest.stop()
        store.close()


def test_ingest_falls_back_after_one_unanswered_connect_with_the_default_timeout(
    amqtt_broker: Amqtt, tmp_path: Path
) -> None:
    # As the dashboard always did: one MQTT 5 CONNECT left unanswered for connect_timeout_s is enough; waiting for
    # a second would keep the page empty for twice as long and a back-off on every start.
    store = DashboardStore(tmp_path / "fleet.sqlite3")
    cfg = MqttConfig(url=f"mqtt://127.0.0.1:{amqtt_broker.port}")  # the default connect_timeout_s
    ingest = Ingest(cfg, store)
    started = time.monotonic()
    ingest.start()
    try:
        assert ingest.wait_subscribed(cfg.connect_timeout_s + 2.0), ingest.snapshot()
        assert ingest.link.protocol == "3.1.1" and ingest.link.epoch == 1
        assert time.monotonic() - started < cfg.connect_timeout_s + 2.0
    finally:
        ingest.stop()
        store.close()


def test_a_fall_back_that_arrives_after_stop_starts_nothing(amqtt_broker: Amqtt, tmp_path: Path) -> None:
    # A fall back decided just before stop() must not reconnect a client nobody will stop. Fall backs are decided
    # on the link's supervisor thread, after an attempt ends and only if no stop() came meanwhile; stop() joins it.
    store = DashboardStore(tmp_path / "fleet.sqlite3")
    ingest = Ingest(MqttConfig(url=f"mqtt://127.0.0.1:{amqtt_broker.port}", connect_timeout_s=30.0), store)
    ingest.start()
    supervisor, client = ingest.link._thread, ingest.link._client
    assert supervisor is not None
    ingest.stop()  # while the MQTT 5 CONNECT is still unanswered
    assert ingest.link._client is client and ingest.link.epoch == 0 and ingest.link.protocol == "5"
    assert not supervisor.is_alive()
    store.close()


def test_ingest_with_auto_protocol_stays_on_mqtt5_when_the_broker_speaks_it(broker: Mosquitto, tmp_path: Path) -> None:
    store = DashboardStore(tmp_path / "fleet.sqlite3")
    ingest = Ingest(MqttConfig(url=broker.url, protocol="auto"), store)
    ingest.start()
    try:
        assert ingest.wait_subscribed(10), broker.log_tail()
        assert ingest.link.protocol == "5" and ingest.link.epoch == 0  # no fall back
    finally:
        ingest.stop()
        store.close()


# -- web API -------------------------------------------------------------------------------------------------------


@pytest.fixture
def populated(tmp_path: Path) -> DashboardStore:
    store = DashboardStore(tmp_path / "web.sqlite3")
    store.set_status("clinic-a", "us-01", {"state": "online", "delegate": "cpu", "degraded": True})
    store.set_health("clinic-a", "us-01", HEALTH)
    store.set_status("clinic-b", "xr-02", {"state": "offline", "reason": "connection lost"})
    store.set_status("clinic-c", "rpi-03", {"state": "online"}, time.time() - 600)  # online, then nothing
    store.add_result(make_result(level="urgent", reason=XSS_REASON, seq=5, label="<b>malignant</b>"))
    store.add_result(make_result(level="routine", reason="benign 0.82", seq=6))
    store.add_result(
        make_result(level="recapture", reason="image too blurred", seq=7, device_id="xr-02", site="clinic-b")
    )
    return store


INGEST = {"connected": True, "broker_error": None, "received": 3, "stored": 3, "duplicates": 0, "rejected": 0}


@pytest.fixture
def web(populated: DashboardStore) -> Iterator[str]:
    make_user(populated, "ada", "admin")
    with running_web(populated, ingest_snapshot=lambda: INGEST) as base:
        yield base
    populated.close()


def test_web_api(web: str, populated: DashboardStore) -> None:
    with login(web, "ada") as http:
        devices = http.get("/api/fleet").json()["devices"]
        assert [d["device_id"] for d in devices] == ["us-01", "xr-02", "rpi-03"]
        assert devices[0]["degraded"] is True and devices[0]["pending"] == 17
        urgent = http.get("/api/results?level=urgent").json()["results"]
        assert len(urgent) == 1 and urgent[0]["reason"] == XSS_REASON  # the API hands text on unchanged
        assert http.get("/api/results?level=bogus").status_code == 400
        assert http.get("/api/results?limit=abc").status_code == 400
        summary = http.get("/api/summary").json()
        assert summary["counts"]["results"]["urgent"] == 1 and summary["counts"]["results"]["recapture"] == 1
        assert [a["result_id"] for a in summary["attention"]] == [urgent[0]["result_id"]]
        assert summary["ingest"]["connected"] is True
        # A DNS-rebinding Host and a cross-site POST are refused (the CSRF and Origin rules: test_web_security).
        assert http.get("/api/summary", headers={"Host": "evil.example"}).status_code == 403
        assert http.post("/logout", headers={"Origin": "http://evil.example"}).status_code == 403
        assert http.get("/nope").status_code == 404
        assert http.get("/api/nope").json()["error"].startswith("no such page")


def test_browser_renders_the_fleet_and_hostile_device_text_as_text(
    web: str, populated: DashboardStore, tmp_path: Path
) -> None:
    populated.set_status("clinic-a", "us-01", {"state": "online", "degraded": True, "model": XSS_REASON})
    browser = browser_logged_in(tmp_path, web, "ada", "/fleet")
    try:
        text = browser.evaluate("document.querySelector('table.fleet').innerText")
        assert "us-01" in text and "xr-02" in text and "rpi-03" in text
        assert "degraded" in text and "silent" in text
        # The hostile model name is shown as text: no element made of it, nothing of it ran.
        assert '<img src=x onerror="document.title' in text
        assert browser.evaluate("document.title") == "Fleet · edgemed dashboard"
        assert browser.evaluate("document.querySelectorAll('img').length") == 0
        assert browser.evaluate("[...document.scripts].every((s) => new URL(s.src).pathname.startsWith('/static/'))")
    finally:
        browser.close()


def test_browser_acknowledge_button_records_the_review_and_hostile_text_never_runs(
    web: str, populated: DashboardStore, tmp_path: Path
) -> None:
    browser = browser_logged_in(tmp_path, web, "ada", "/queue")
    try:
        row = browser.evaluate("document.querySelector('tr.urgent[data-result-id]')?.innerText")
        assert XSS_REASON in row and "<b>malignant</b>" in row  # as text, markup and all
        assert browser.evaluate("document.title") == "Review queue · edgemed dashboard"
        assert browser.evaluate("document.querySelectorAll('img, b').length") == 0
        assert browser.evaluate("[...document.scripts].every((s) => new URL(s.src).pathname.startsWith('/static/'))")
        browser.evaluate("document.querySelector('tr.urgent button[type=submit]').click(); true")

        def state() -> tuple[str, str | None]:
            [waiting] = [r for r in review.queue(populated, None) if r["level"] == "urgent"]
            return waiting["state"], waiting["acked_by"]

        assert wait_until(lambda: state() == ("acknowledged", "ada"), 10), state()
    finally:
        browser.close()


def test_serve_runs_ingest_and_web_until_stopped_and_ingests_before_anyone_logs_in(
    broker: Mosquitto, tmp_path: Path
) -> None:
    db = tmp_path / "s.sqlite3"
    stop = threading.Event()
    urls: list[str] = []
    outcome: list[int] = []
    thread = threading.Thread(
        target=lambda: outcome.append(serve(broker.url, db=db, port=0, stop=stop, on_ready=urls.append)),
        daemon=True,
    )
    thread.start()
    assert wait_until(lambda: bool(urls), 10)
    base = urls[0].rstrip("/")
    device = Device(broker.port)
    store = DashboardStore(db)
    try:
        with client(base) as anonymous:
            assert anonymous.get("/api/summary").status_code == 401  # no users yet: the API answers 401...
            assert "users add NAME --db" in anonymous.get("/login").text
        result = make_result(level="urgent", reason="malignant 0.93")
        device.send("results", json.dumps(result).encode())
        assert wait_until(lambda: store.result_count() == 1, 10)  # ...and the ingest stores all the same
        make_user(store, "ada", "admin")  # the first admin, created while it runs
        with login(base, "ada") as http:
            summary = http.get("/api/summary").json()
            assert summary["ingest"]["subscribed"] and summary["ingest"]["stored"] == 1
            assert [a["result_id"] for a in summary["attention"]] == [result["result_id"]]
    finally:
        store.close()
        device.close()
        stop.set()
        thread.join(10)
    assert outcome == [0] and not thread.is_alive()


def test_cli_arguments_and_bad_settings(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--broker", "http://x", "--db", str(tmp_path / "x.sqlite3")])
    with pytest.raises(ConfigError, match="mqtt://"):
        run(args)
    args = parser.parse_args(
        ["--broker", "mqtt://127.0.0.1:1883", "--db", str(tmp_path / "x.sqlite3"), "--username", "ops"]
    )
    with pytest.raises(ConfigError, match="password"):
        run(args)
    args = parser.parse_args(
        ["--broker", "mqtt://127.0.0.1:1883", "--db", str(tmp_path / "x.sqlite3"), "--port", "70000"]
    )
    with pytest.raises(ConfigError, match="--port"):
        run(args)


def test_a_message_the_store_failed_to_keep_is_redelivered(broker: Mosquitto, tmp_path: Path) -> None:
    store = DashboardStore(tmp_path / "f.sqlite3")
    first = Ingest(MqttConfig(url=broker.url), store)
    fillers = fill_the_disk(store)
    first.start()
    device = Device(broker.port)
    try:
        assert first.wait_subscribed(10)
        result = make_result(level="urgent", reason="malignant 0.95")
        device.send("results", json.dumps(result).encode())
        assert wait_until(lambda: first.snapshot()["received"] == 1, 10)
        first.stop()  # the message was never acknowledged to the broker
        free_the_disk(store)
        assert store.result_count() == fillers
        second = Ingest(MqttConfig(url=broker.url), store)
        second.start()
        try:
            assert wait_until(lambda: store.result_count() == fillers + 1, 10), (second.snapshot(), broker.log_tail())
        finally:
            second.stop()
    finally:
        device.close()
        first.stop()
        store.close()


def test_ingest_over_tls_with_a_password_and_a_refusal_shown_not_raised(
    mosquitto_factory: type[Mosquitto], pki: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tls_broker = mosquitto_factory(users={"dash": "s3cret"}, pki=pki).start()
    store = DashboardStore(tmp_path / "t.sqlite3")
    monkeypatch.setenv("DASH_PW", "s3cret")
    good = MqttConfig(url=tls_broker.url, username="dash", password_env="DASH_PW", tls={"ca_file": pki.ca_cert})
    ingest = Ingest(good, store)
    ingest.start()
    try:
        assert ingest.wait_subscribed(10), tls_broker.log_tail()
    finally:
        ingest.stop()
    monkeypatch.setenv("DASH_PW", "wrong")
    refused = Ingest(good.model_copy(update={"client_id": "dash-2"}), store)
    refused.start()
    try:
        assert wait_until(lambda: refused.snapshot()["broker_error"] is not None, 10)
        error = refused.snapshot()["broker_error"]
        assert "refused" in error and "password" in error and refused.snapshot()["connected"] is False
    finally:
        refused.stop()
        store.close()
