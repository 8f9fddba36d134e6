"""The dashboard's ingest under hostile and broken input: every payload is stored or kept as a dead letter.

Behaviour-level: ``Ingest.handle`` (what the network thread calls), the store's queries, and a real mosquitto with
its DEFAULT settings (max_inflight_messages 20, max_queued_messages 1000, no persistence), which is where an
unacknowledged message does its harm: once 20 wait for an acknowledgement the broker sends nothing more.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from broker_fixtures import Device, Mosquitto
from dashboard_helpers import HEALTH, dead_letters, export_images, make_result, make_study, wait_until
from web_helpers import login, make_user, running_web

from edgemed.dashboard.ingest import Ingest
from edgemed.dashboard.store import DashboardStore
from edgemed.publish.config import MqttConfig

TOPIC = "edgemed/clinic-a/us-01/results"
POISON = b"[" * 1000  # makes Python's JSON parser raise RecursionError


def default_mosquitto(factory: type[Mosquitto]) -> Mosquitto:
    """A mosquitto with nothing but a loopback listener: every other setting is the broker's default."""
    broker = factory()
    lines = ["user root"] if os.geteuid() == 0 else []  # mosquitto would drop root and then not read our files
    lines += [f"listener {broker.port} 127.0.0.1", "allow_anonymous true", f"log_dest file {broker.log_path}"]
    broker.conf.write_text("\n".join(lines) + "\n")
    return broker.start()


def _unusable_payloads() -> dict[str, tuple[str, bytes]]:
    """name -> (topic kind, payload): one of each kind of payload the dashboard cannot use."""
    good = make_result(seq=41)
    deep = {**make_result(seq=42), "quality": json.loads("[" * 40 + "]" * 40)}
    return {
        "not utf-8": ("results", b"\xff\xfe{}"),
        "not json": ("results", b"{truncated"),
        "too deep for the parser": ("results", POISON),
        "too deep for the page": ("results", json.dumps(deep).encode()),
        "too large": ("results", b'{"x": "' + b"a" * 300_000 + b'"}'),
        "schema-invalid": ("results", json.dumps({**good, "schema": "edgemed.result/9"}).encode()),
        "wrong type": ("results", json.dumps({**good, "triage": {"level": "urgent", "reason": 7}}).encode()),
        "lone surrogate": ("results", json.dumps({**good, "triage": {"level": "urgent", "reason": "\ud800"}}).encode()),
        "huge number": ("results", b'{"seq": ' + b"9" * 5000 + b"}"),
        "heartbeat wrong type": ("health", json.dumps({**HEALTH, "pending": "<b>17</b>"}).encode()),
        "study wrong type": (
            "studies",
            json.dumps({**make_study(), "triage": {"level": "urgent", "reason": "x", "frames": "9"}}).encode(),
        ),
    }


def test_every_unusable_payload_is_acknowledged_into_the_dead_letter_table(tmp_path: Path) -> None:
    db = tmp_path / "d.sqlite3"
    store = DashboardStore(db)
    ingest = Ingest(MqttConfig(url="mqtt://127.0.0.1:1"), store)  # never started: handle() is what paho calls
    cases = _unusable_payloads()
    outcomes = {}
    for name, (kind, payload) in cases.items():
        outcomes[name] = ingest.handle(f"edgemed/clinic-a/us-01/{kind}", payload)  # never raises on input
    assert all(o.startswith("rejected: ") for o in outcomes.values()), outcomes
    assert "nests deeper than 32 levels" in outcomes["too deep for the parser"]
    assert "nests deeper than 32 levels" in outcomes["too deep for the page"]
    assert "not JSON" in outcomes["not utf-8"] and "not JSON" in outcomes["not json"]
    assert "larger than 256 KB" in outcomes["too large"]
    assert "schema" in outcomes["schema-invalid"] and "triage.reason" in outcomes["wrong type"]
    assert "lone surrogate" in outcomes["lone surrogate"] and "digits" in outcomes["huge number"]
    assert "pending" in outcomes["heartbeat wrong type"] and "frames" in outcomes["study wrong type"]
    # Still working: the next good result goes in.
    assert ingest.handle(TOPIC, json.dumps(make_result(seq=50)).encode()) == "stored"
    store.close()

    rows = dead_letters(db)
    assert len(rows) == len(cases)
    for row, (name, (kind, payload)) in zip(rows, cases.items(), strict=True):  # rows in arrival order
        assert row["topic"] == f"edgemed/clinic-a/us-01/{kind}" and row["reason"] == outcomes[name][10:]
        assert (row["site"], row["device_id"]) == ("clinic-a", "us-01") and row["payload_bytes"] == len(payload)
        if name != "too large":
            assert bytes(row["payload"]) == payload, name  # the raw bytes, unaltered
    # What could be read of a refused result is kept with it (a receipt can name the refused seq).
    assert rows[list(cases).index("wrong type")]["seq"] == 41
    counts = DashboardStore(db).dead_letter_counts()
    assert sum(counts.values()) == len(cases) and counts[outcomes["too deep for the parser"][10:]] == 2


def test_poison_messages_never_stop_the_dashboard_on_a_default_mosquitto(
    mosquitto_factory: type[Mosquitto], tmp_path: Path, int8_model: Path, data_dir: Path
) -> None:
    broker = default_mosquitto(mosquitto_factory)
    db = tmp_path / "fleet.sqlite3"
    store = DashboardStore(db)
    cfg = MqttConfig(url=broker.url)
    ingest = Ingest(cfg, store)
    ingest.start()
    device = Device(broker.port)
    try:
        assert ingest.wait_subscribed(10), broker.log_tail()
        # More poison than the broker's in-flight window (20), and some of it retained where devices' statuses
        # live, so that every new subscriber (any client id) gets it again.
        for _ in range(25):
            device.send("results", POISON)
        device.send("status", POISON, retain=True)
        device.send("health", b'{"fps": NaN}')
        assert wait_until(lambda: store.dead_letter_counts().get("payload nests deeper than 32 levels", 0) == 26, 15), (
            ingest.snapshot(),
            broker.log_tail(),
        )
        # A real run after the poison: every one of its results reaches the dashboard.
        images = export_images(data_dir, tmp_path / "scans", 12)
        proc = subprocess.run(
            [
                *(sys.executable, "-m", "edgemed", "run", "--model", str(int8_model), "--source", str(images)),
                *("--broker", broker.url, "--device-id", "us-02", "--site", "clinic-a", "--quiet"),
                *("--data-dir", str(tmp_path / "device")),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        assert wait_until(lambda: store.result_count() == 12, 15), (store.result_count(), ingest.snapshot())
        ingest.stop()
        # A restart, and a second dashboard under a new client id: the retained poison comes again and is
        # acknowledged again; both go on receiving.
        second = Ingest(cfg.model_copy(update={"client_id": "edgemed-dashboard-2"}), DashboardStore(tmp_path / "2.db"))
        for dash in (ingest, second):
            dash.start()
        try:
            for dash in (ingest, second):
                assert dash.wait_subscribed(10)
            device.send("results", json.dumps(make_result(seq=500, level="urgent")).encode())
            assert wait_until(lambda: store.result_count() == 13 and second.store.result_count() == 1, 10), (
                ingest.snapshot(),
                second.snapshot(),
            )
            assert second.store.dead_letter_counts()["payload nests deeper than 32 levels"] == 1  # the retained one
        finally:
            second.stop()
            second.store.close()
    finally:
        device.close()
        ingest.stop()
        store.close()
    assert len(dead_letters(db)) >= 27
    assert "payload has a non-finite number (NaN or Infinity)" in DashboardStore(db).dead_letter_counts()


@pytest.mark.parametrize("kind", ["results", "status", "health"])
def test_an_unusable_payload_never_prevents_the_next_good_one(tmp_path: Path, kind: str) -> None:
    store = DashboardStore(tmp_path / "d.sqlite3")
    ingest = Ingest(MqttConfig(url="mqtt://127.0.0.1:1"), store)
    for _ in range(30):
        assert ingest.handle(f"edgemed/clinic-a/us-01/{kind}", POISON).startswith("rejected: ")
    assert ingest.handle(TOPIC, json.dumps(make_result(seq=1)).encode()) == "stored"
    assert store.result_count() == 1 and sum(store.dead_letter_counts().values()) == 30
    store.close()


def test_the_page_counts_refused_messages_by_reason(tmp_path: Path) -> None:
    store = DashboardStore(tmp_path / "d.sqlite3")
    ingest = Ingest(MqttConfig(url="mqtt://127.0.0.1:1"), store)
    for _ in range(3):
        ingest.handle(TOPIC, POISON)
    ingest.handle(TOPIC, b"{truncated")
    make_user(store, "ada", "admin")
    try:
        with running_web(store, ingest_snapshot=ingest.snapshot) as base, login(base, "ada") as http:
            listed = http.get("/api/dead-letters").json()["dead_letters"]
            assert [d["reason"] for d in listed] == ["payload is not JSON"] + [
                "payload nests deeper than 32 levels"
            ] * 3
            assert "payload" not in listed[0]  # hostile bytes stay in the database
            page = http.get("/admin/dead-letters").text
    finally:
        store.close()
    assert 'id="dead-count">(4)</span>' in page, page[-3000:]
    rows = re.findall(r'<tr class="dead-row"><td class="num">(\d+)</td><td class="reason">([^<]+)</td>', page)
    assert rows == [("3", "payload nests deeper than 32 levels"), ("1", "payload is not JSON")]


def _strict_json(body: bytes) -> Any:
    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    return json.loads(body, parse_constant=refuse)


@pytest.mark.parametrize("number", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
def test_non_finite_numbers_are_refused_at_ingest(tmp_path: Path, number: bytes) -> None:
    store = DashboardStore(tmp_path / "d.sqlite3")
    ingest = Ingest(MqttConfig(url="mqtt://127.0.0.1:1"), store)
    heartbeat = json.dumps({**HEALTH, "fps": 1.5}).encode().replace(b"1.5", number)
    outcome = ingest.handle("edgemed/clinic-a/us-01/health", heartbeat)
    assert outcome == "rejected: payload has a non-finite number (NaN or Infinity)"
    result = json.dumps(make_result(seq=3)).encode().replace(b'"total": 0.4', b'"total": ' + number)
    assert ingest.handle(TOPIC, result) == outcome
    assert store.fleet() == [] and store.result_count() == 0  # nothing of them stored, both kept as dead letters
    assert dead_letters(tmp_path / "d.sqlite3")[0]["payload"] == heartbeat
    store.close()


def test_a_nan_stored_by_an_older_dashboard_never_reaches_the_page(tmp_path: Path) -> None:
    db = tmp_path / "d.sqlite3"
    store = DashboardStore(db)
    store.set_status("clinic-a", "us-01", {"state": "online"})
    store.set_health("clinic-a", "us-01", HEALTH)
    with sqlite3.connect(db) as con:  # what an older dashboard wrote: json.dumps allows NaN by default
        con.execute("UPDATE devices SET health = ?", (json.dumps({**HEALTH, "fps": float("nan")}),))
    with pytest.raises(ValueError):
        store.set_health("clinic-a", "us-01", {**HEALTH, "fps": float("inf")})  # the store writes no NaN itself
    make_user(store, "ada", "admin")
    try:
        with running_web(store) as base, login(base, "ada") as http:
            fleet = _strict_json(http.get("/api/fleet").content)
            page = http.get("/fleet")
    finally:
        store.close()
    assert fleet["devices"][0]["fps"] is None and fleet["devices"][0]["pending"] == 17
    assert page.status_code == 200 and ">us-01</a>" in page.text and not re.search(r"\bnan\b", page.text, re.I)


def test_the_api_encoder_never_writes_non_finite_numbers() -> None:
    from edgemed.dashboard.web.context import encode_json

    value = {"a": [1.0, float("nan")], "b": {"c": float("-inf")}, "d": "NaN"}
    assert _strict_json(encode_json(value)) == {"a": [1.0, None], "b": {"c": None}, "d": "NaN"}


def test_a_payload_with_a_key_twice_is_a_dead_letter_not_the_last_reading(tmp_path: Path) -> None:
    # {"triage": {urgent...}, "triage": {routine...}}: Python's parser keeps the last, others the first; the
    # dashboard filed it as routine and its stored copy lost the urgent member.
    db = tmp_path / "d.sqlite3"
    store = DashboardStore(db)
    ingest = Ingest(MqttConfig(url="mqtt://127.0.0.1:1"), store)
    result = make_result(seq=7, level="routine")
    text = json.dumps(result)
    urgent = '"triage": {"level": "urgent", "reason": "malignant 0.91"}, '
    twice = text.replace('"triage": ', urgent + '"triage": ', 1).encode()
    assert json.loads(twice)["triage"]["level"] == "routine"  # what a plain parser makes of it
    nested = text.replace('"level": "routine"', '"level": "urgent", "level": "routine"').encode()
    for payload in (twice, nested):
        assert ingest.handle(TOPIC, payload) == "rejected: payload has an object with the same key twice"
    assert ingest.handle("edgemed/clinic-a/us-01/status", b'{"state": "online", "state": "offline"}').startswith(
        "rejected: payload has an object with the same key twice"
    )
    assert store.result_count() == 0 and store.fleet() == []
    rows = dead_letters(db)
    assert [bytes(r["payload"]) for r in rows[:2]] == [twice, nested]  # kept as sent
    assert rows[0]["seq"] is None  # nothing read from a payload that has two readings
    assert ingest.handle(TOPIC, text.encode()) == "stored"  # the same result without the second key
    store.close()
