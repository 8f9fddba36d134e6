"""The device's retained status carries its model's version and drift reference (from the manifest), through a
real mosquitto, with the real int8 model our converter built."""

from __future__ import annotations

import json
import time
from pathlib import Path

from broker_fixtures import Mosquitto, Subscriber
from device_fakes import BrightnessBackend, fake_model

from edgemed.config import DeviceProfile
from edgemed.dashboard.drift import drift_report
from edgemed.dashboard.store import DashboardStore
from edgemed.dashboard.validate import classify
from edgemed.manifest import find_manifest, load_manifest
from edgemed.runtime import Device

STATUS = "edgemed/ward/status-01/status"


def _profile(data_dir: Path, broker: Mosquitto, **model: str) -> DeviceProfile:
    return DeviceProfile.model_validate(
        {
            "profile": "status-test",
            "device": {"id": "status-01", "site": "ward", "data_dir": str(data_dir)},
            "model": model,
            "mqtt": {"url": broker.url, "reconnect_min_s": 0.1, "reconnect_max_s": 0.5},
            "health": {"interval_s": 3600},
        }
    )


def _retained_status(broker: Mosquitto, timeout_s: float = 10.0) -> dict[str, object]:
    sub = Subscriber(broker.port, STATUS)
    try:
        deadline = time.monotonic() + timeout_s
        while STATUS not in sub.retained and time.monotonic() < deadline:
            time.sleep(0.05)
        assert STATUS in sub.retained, broker.log_tail()
        return json.loads(sub.retained[STATUS])  # type: ignore[no-any-return]
    finally:
        sub.close()


def test_the_online_status_names_the_model_version_and_its_reference(
    broker: Mosquitto, tmp_path: Path, int8_model: Path
) -> None:
    manifest = load_manifest(find_manifest(int8_model))
    assert manifest.reference is not None
    with Device(_profile(tmp_path, broker, path=str(int8_model))) as device:
        assert device.link is not None and device.link.wait_connected(10)
        status = _retained_status(broker)
    assert status["state"] == "online" and status["model"] == manifest.name
    assert status["model_version"] == manifest.version
    assert status["reference"] == manifest.reference.model_dump(mode="json")
    assert status["model_sha256"] == manifest.artifact(int8_model.name).sha256
    # The dashboard's ingest accepts that status as it is, and its drift view reads the reference from it.
    filing = classify(STATUS, json.dumps(status).encode(), retained=True)
    assert filing.kind == "status", filing.reason
    store = DashboardStore(tmp_path / "fleet.sqlite3")
    try:
        assert store.file([filing]) == ["updated"]
        (row,) = drift_report(store, None)
        assert (row.site, row.model, row.status) == ("ward", manifest.name, "too_few")
        assert row.reference == manifest.reference
    finally:
        store.close()


def test_a_manifest_without_a_reference_publishes_none(broker: Mosquitto, tmp_path: Path) -> None:
    with Device(_profile(tmp_path, broker), model=fake_model(), backend=BrightnessBackend()) as device:
        assert device.link is not None and device.link.wait_connected(10)
        status = _retained_status(broker)
    assert status["model_version"] == "1" and "reference" not in status
