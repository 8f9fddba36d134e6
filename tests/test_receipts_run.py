"""A device run with a consumer of record, through the in-memory publisher (``tests/device_fakes.py``): the run
exits 0 only once every result was receipted, 10 with the results on disk and the reason said when the consumer
is offline or does not receipt; envelopes carry the stream; heartbeats say what waits for what."""

from __future__ import annotations

import io
import json
import logging
import sqlite3
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from device_fakes import BRIGHT, DARK, AcknowledgingPublisher, BrightnessBackend, ListSource, fake_model, noise

from edgemed import receipts
from edgemed.config import DeviceProfile
from edgemed.envelope import result_schema
from edgemed.identity import load_or_create_secret
from edgemed.publish.publisher import AckCallback
from edgemed.runtime import Device
from edgemed.types import Frame

TRIAGE = {"rules": {"malignant": {"level": "urgent", "min_probability": 0.5}, "benign": {"level": "no_finding"}}}


def _profile(data_dir: Path, **sections: Any) -> DeviceProfile:
    raw = {
        "profile": "receipts-test",
        "device": {"id": "dev-01", "site": "ward", "data_dir": str(data_dir)},
        "triage": TRIAGE,
        "health": {"interval_s": 3600},
        "run": {"drain_timeout_s": 1.0, "print_results": False},
        **sections,
    }
    return DeviceProfile.model_validate(raw)


def _frames(n: int) -> list[Frame]:
    return [Frame(image=noise(*(BRIGHT if i % 2 else DARK), seed=i), index=i, source_kind="video") for i in range(n)]


class Dashboard(AcknowledgingPublisher):
    """A broker that acknowledges at once, with a stand-in consumer behind it: online from the first connection
    (unless told otherwise) and, when ``receipting``, a receipt after every result it receives."""

    def __init__(self, *, online: bool = True, receipting: bool = True) -> None:
        super().__init__()
        self.online, self.receipting = online, receipting
        self.stored: set[int] = set()

    def start(self) -> None:
        if self.online:
            self.consumer_state("dashboard", "online")

    def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, on_ack: AckCallback | None = None
    ) -> None:
        super().publish(topic, payload, qos, retain, on_ack)
        kind = topic.rsplit("/", 1)[1]
        if not self.receipting or kind not in ("results", "studies", "batches"):
            return
        body = json.loads(payload)
        for envelope in body["results"] if kind == "batches" else [body]:
            self.stored.add(envelope["seq"])
            stream = envelope["stream"]
        state = receipts.progress(-1, receipts.to_ranges(self.stored))
        self.receipt("ward", "dev-01", stream, state.through_seq, state.missing, state.max_seq)


def _run(tmp_path: Path, link: Dashboard, n: int = 6, **sections: Any) -> tuple[Device, Any, list[dict[str, Any]]]:
    profile = _profile(tmp_path / "data", **sections)
    device = Device(
        profile, out=io.StringIO(), model=fake_model(), backend=BrightnessBackend(), source=ListSource(_frames(n)),
        publisher=link,
    )  # fmt: skip
    with device:
        summary = device.run()
        health = json.loads(link.on("health")[-1])
    return device, summary, [health]


CONSUMER = {"delivery": {"consumer": "dashboard"}}


def test_a_run_exits_0_once_every_result_was_receipted(tmp_path: Path) -> None:
    link = Dashboard()
    device, summary, (health,) = _run(tmp_path, link, **CONSUMER)
    assert summary.exit_code == 0 and summary.pending == 0 and summary.backlog is None
    assert link.stored == set(range(7))  # six results and the study decision
    with sqlite3.connect(device.data_dir / "outbox.sqlite3") as db:
        assert db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 0
    stream = receipts.stream_id(load_or_create_secret(tmp_path / "data"))
    for payload in link.on("results"):
        envelope = json.loads(payload)
        jsonschema.validate(envelope, result_schema())
        keys = list(envelope)
        assert envelope["stream"] == stream and keys[keys.index("device_id") + 1] == "stream"
    assert json.loads(link.on("studies")[0])["stream"] == stream
    assert {"pending", "awaiting_receipt", "oldest_pending_s", "oldest_awaiting_s"} <= set(health)
    assert health["consumer_online"] is True and health["awaiting_receipt"] == 0


def test_a_run_whose_consumer_is_offline_exits_10_with_its_results_on_disk(tmp_path: Path) -> None:
    link = Dashboard(online=False)
    _, summary, (health,) = _run(tmp_path, link, **CONSUMER)
    assert summary.exit_code == 10 and summary.pending == 7
    assert link.on("results") == [] and link.on("studies") == []  # held while the consumer is offline
    assert summary.backlog == (
        "7 results not yet acknowledged by the broker (held while the consumer is offline); consumer dashboard offline"
    )
    assert health["consumer_online"] is False and health["pending"] == 7 and health["oldest_pending_s"] is not None
    assert link.on("health")  # heartbeats go on


def test_a_run_whose_consumer_does_not_receipt_says_what_awaits_its_receipt(tmp_path: Path) -> None:
    link = Dashboard(receipting=False)
    _, summary, (health,) = _run(tmp_path, link, **CONSUMER)
    assert summary.exit_code == 10 and summary.pending == 7
    assert summary.backlog == "7 results sent, awaiting the dashboard's receipt"
    assert health["awaiting_receipt"] == 7 and health["pending"] == 0 and health["oldest_awaiting_s"] is not None


def test_a_run_with_batches_and_a_consumer_is_receipted(tmp_path: Path) -> None:
    link = Dashboard()
    _, summary, _ = _run(tmp_path, link, n=20, **CONSUMER, publish={"batch": {"enabled": True, "max_results": 8}})
    assert summary.exit_code == 0 and link.stored == set(range(21))
    assert link.on("results") == [] and link.on("batches")
    assert all(len(json.loads(b)["results"]) <= 8 for b in link.on("batches"))


def test_without_a_consumer_nothing_is_subscribed_and_a_puback_releases(tmp_path: Path) -> None:
    link = Dashboard(online=False, receipting=False)
    _, summary, (health,) = _run(tmp_path, link)
    assert summary.exit_code == 0 and link.subscriptions == ()
    assert "consumer_online" not in health and health["awaiting_receipt"] == 0


def test_the_replay_window_is_ignored_with_one_warning_when_a_consumer_is_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    link = Dashboard()
    with caplog.at_level(logging.WARNING):
        device, summary, _ = _run(tmp_path, link, **CONSUMER, outbox={"replay_window_s": 30})
    assert summary.exit_code == 0
    assert caplog.text.count("outbox.replay_window_s (30 s) is ignored") == 1
    assert device.outbox.cfg.replay_window_s == 0
