"""`edgemed run` end to end: a real int8 model, real ultrasound images, a real mosquitto, an independent subscriber."""

from __future__ import annotations

import importlib.metadata
import json
import os
import time
from pathlib import Path

import cv2
import jsonschema
import numpy as np
import pytest
from broker_fixtures import Mosquitto
from helpers import Collector, run_edgemed

from edgemed.envelope import result_schema
from edgemed.inference import BackendConfig, make_backend
from edgemed.manifest import verify_model
from edgemed.runtime import Classifier

N_IMAGES = 24  # img0 .. img23: natural order differs from lexical order (img10 < img2 lexically)


@pytest.fixture
def ultrasound_folder(tmp_path: Path, data_dir: Path) -> Path:
    """Real BreastMNIST test images as PNG files, plus one corrupt file at the end of the natural order."""
    folder = tmp_path / "scans"
    folder.mkdir()
    images = np.load(data_dir / "breastmnist_28.npz")["test_images"][:N_IMAGES]
    for i, img in enumerate(images):
        cv2.imwrite(str(folder / f"img{i}.png"), img)
    (folder / f"img{N_IMAGES}.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated by a failing USB stick")
    return folder


def test_every_frame_gives_exactly_one_valid_result(
    int8_model: Path, ultrasound_folder: Path, broker: Mosquitto, tmp_path: Path
) -> None:
    collector = Collector(broker.port)
    try:
        proc = run_edgemed(
            "run",
            "--model",
            str(int8_model),
            "--source",
            str(ultrasound_folder),
            "--broker",
            broker.url,
            "--device-id",
            "us-01",
            "--site",
            "clinic_a",
            "--data-dir",
            str(tmp_path / "device"),
            "--health-interval",
            "0.2",
        )
        assert proc.returncode == 0, proc.stderr
        results = collector.wait_results(N_IMAGES + 1)
    finally:
        collector.close()

    # Exactly one result per frame, each valid against the published schema.
    assert len(results) == N_IMAGES + 1
    assert sorted(r["source"]["index"] for r in results) == list(range(N_IMAGES + 1))
    assert len({r["result_id"] for r in results}) == N_IMAGES + 1
    for r in results:
        jsonschema.validate(r, result_schema())
        assert r["device_id"] == "us-01" and r["site"] == "clinic_a" and r["source"]["kind"] == "folder"
        assert r["runtime"] == {
            "backend": "ai_edge_litert",
            "backend_version": importlib.metadata.version("ai-edge-litert"),
            "delegate": "cpu",
            "degraded": False,
            "edgemed": "0.1.0",
        }
        assert "img" not in json.dumps(r)  # no file name leaves the device
    # The corrupt file keeps its index and is reported, not dropped.
    bad = next(r for r in results if r["source"]["index"] == N_IMAGES)
    assert bad["triage"]["level"] == "error" and bad["prediction"] is None

    # Index i is the i-th file in natural order: compare with an in-process classification of that file.
    manifest, art = verify_model(int8_model)
    classifier = Classifier(make_backend(int8_model, BackendConfig(), manifest=manifest), manifest, art)
    by_index = {r["source"]["index"]: r for r in results}
    for i in range(N_IMAGES):
        img = cv2.imread(str(ultrasound_folder / f"img{i}.png"), cv2.IMREAD_GRAYSCALE)
        expected = classifier.scores(classifier.backend.invoke(classifier.preprocess(img)))
        got = by_index[i]["prediction"]
        if got is None:  # the quality gate refused it: then it must say why
            assert by_index[i]["triage"]["level"] == "recapture"
            continue
        assert got["label"] == expected.label
        assert got["probabilities"][expected.label] == pytest.approx(expected.confidence, abs=1e-5)
        assert set(got["probabilities"]) == set(manifest.labels)

    # A local copy of every result, and a per-device counter.
    lines = (tmp_path / "device" / "results.jsonl").read_text().splitlines()
    assert len(lines) == N_IMAGES + 1
    assert sorted(r["seq"] for r in results) == list(range(N_IMAGES + 1))


def test_status_and_health_are_published(
    int8_model: Path, ultrasound_folder: Path, broker: Mosquitto, tmp_path: Path
) -> None:
    collector = Collector(broker.port)
    try:
        proc = run_edgemed(
            "run",
            "--model",
            str(int8_model),
            "--source",
            str(ultrasound_folder),
            "--broker",
            broker.url,
            "--device-id",
            "us-02",
            "--data-dir",
            str(tmp_path / "d"),
            "--health-interval",
            "0.1",
            "--quiet",
        )
        assert proc.returncode == 0, proc.stderr
        collector.wait_results(N_IMAGES + 1)
        time.sleep(0.3)
        health = list(collector.by_topic.get("health", []))
    finally:
        collector.close()
    assert health, "no heartbeat received"
    last = health[-1]
    for key in ("uptime_s", "frames", "fps", "latency_ms", "delegate", "degraded", "pending", "disk_free_mb"):
        assert key in last
    assert last["delegate"] == "cpu" and last["degraded"] is False
    assert last["frames"] == N_IMAGES + 1 and last["pending"] == 0
    # The process's own load and memory, for a fleet team watching battery-powered or fanless devices.
    busy = [h["cpu_percent"] for h in health if h.get("cpu_percent") is not None]
    assert busy and all(0.0 <= c <= 100.0 * (os.cpu_count() or 1) + 50.0 for c in busy)
    assert 30.0 < last["peak_rss_mb"] < 400.0
    # The retained status ends as a clean "offline" published by the device itself.
    late = Collector(broker.port)
    try:
        deadline = time.monotonic() + 5
        while "edgemed/default/us-02/status" not in late.retained and time.monotonic() < deadline:
            time.sleep(0.05)
        assert late.retained["edgemed/default/us-02/status"]["state"] == "offline"
    finally:
        late.close()


def test_edgetpu_with_fallback_refused_exits_6(int8_model: Path, ultrasound_folder: Path, tmp_path: Path) -> None:
    proc = run_edgemed(
        "run",
        "--model",
        str(int8_model),
        "--source",
        str(ultrasound_folder),
        "--device-id",
        "us-03",
        "--data-dir",
        str(tmp_path / "d"),
        "--accelerator",
        "edgetpu",
        "--no-fallback",
    )
    assert proc.returncode == 6, proc.stderr
    assert "edgetpu delegate unavailable" in proc.stderr and "libedgetpu" in proc.stderr
    assert "Delegate.__del__" not in proc.stderr and "Exception ignored" not in proc.stderr


def test_edgetpu_with_fallback_allowed_runs_degraded(
    int8_model: Path, ultrasound_folder: Path, broker: Mosquitto, tmp_path: Path
) -> None:
    collector = Collector(broker.port)
    try:
        proc = run_edgemed(
            "run",
            "--model",
            str(int8_model),
            "--source",
            str(ultrasound_folder),
            "--broker",
            broker.url,
            "--device-id",
            "us-04",
            "--data-dir",
            str(tmp_path / "d"),
            "--accelerator",
            "edgetpu",
            "--allow-fallback",
            "--health-interval",
            "0.1",
            "--quiet",
        )
        assert proc.returncode == 0, proc.stderr
        results = collector.wait_results(N_IMAGES + 1)
        time.sleep(0.3)
        health = list(collector.by_topic.get("health", []))
    finally:
        collector.close()
    assert "Delegate.__del__" not in proc.stderr
    assert len(results) == N_IMAGES + 1
    assert all(r["runtime"]["delegate"] == "cpu" and r["runtime"]["degraded"] is True for r in results)
    assert health and health[-1]["delegate"] == "cpu" and health[-1]["degraded"] is True
    assert "libedgetpu" in (health[-1].get("degraded_reason") or "")
