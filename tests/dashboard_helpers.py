"""Helpers the dashboard tests share: sample payloads as devices publish them, a bounded wait, headless Chromium,
a full disk for the store, the dead-letter table, and real images exported for a real run.

Test modules import these from here, never from one another (a test module is not a library).
"""

from __future__ import annotations

import sqlite3
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from browser import CHROMIUM, headless_flags

from edgemed.dashboard.store import DashboardStore


def make_result(
    *,
    device_id: str = "us-01",
    site: str = "clinic-a",
    seq: int = 0,
    level: str = "routine",
    reason: str = "ok",
    label: str = "benign",
) -> dict[str, Any]:
    """A result envelope as a device publishes it (checked against the real schema in the tests below)."""
    return {
        "schema": "edgemed.result/1",
        "result_id": uuid.uuid4().hex,
        "seq": seq,
        "device_id": device_id,
        "site": site,
        "created_at": "2026-11-25T10:00:00Z",
        "clock_synced": True,
        "session_id": None,
        "model": {"name": "breast-cnn", "version": "1", "sha256": "a" * 64, "target": "cpu"},
        "preprocess_sha256": "b" * 64,
        "runtime": {"backend": "ai_edge_litert", "delegate": "cpu", "degraded": False, "edgemed": "0.1.0"},
        "source": {"kind": "folder", "index": seq},
        "quality": None,
        "prediction": {"label": label, "index": 0, "probabilities": {"benign": 0.7, "malignant": 0.3}},
        "triage": {"level": level, "reason": reason},
        "latency_ms": {"preprocess": 0.1, "inference": 0.2, "total": 0.4},
    }


def make_study(*, device_id: str = "us-01", site: str = "clinic-a", level: str = "urgent") -> dict[str, Any]:
    return {
        "schema": "edgemed.study/1",
        "result_id": uuid.uuid4().hex,
        "seq": 99,
        "device_id": device_id,
        "site": site,
        "created_at": "2026-11-25T10:00:05Z",
        "clock_synced": True,
        "session_id": "c" * 32,
        "model": {"name": "breast-cnn", "version": "1", "sha256": "a" * 64},
        "source_kind": "video",
        "first_seq": 90,
        "last_seq": 98,
        "triage": {
            "level": level,
            "reason": "3 of 9 frames urgent",
            "frames": 9,
            "valid_frames": 9,
            "rule": "any_urgent",
            "counts": {"urgent": 3, "routine": 6},
        },
    }


HEALTH = {
    "schema": "edgemed.health/1",
    "uptime_s": 12.0,
    "frames": 40,
    "errors": 0,
    "recaptures": 1,
    "fps": 7.5,
    "latency_ms": {"p50": 3.2, "p95": 8.9},
    "delegate": "cpu",
    "degraded": True,
    "degraded_reason": "edgetpu absent; CPU fallback allowed",
    "pending": 17,
    "oldest_pending_s": 125.0,
    "outbox_full": False,
    "disk_free_mb": 900.0,
    "cpu_temp_c": None,
    "cpu_percent": 37.5,
    "peak_rss_mb": 104.2,
    "source_state": "reading",
    "connected": True,
}


def wait_until(predicate: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def chromium(tmp_path: Path, url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    if not Path(CHROMIUM).exists():
        pytest.fail("headless Chromium is needed for the browser test: apt-get install -y chromium")
    flags = [*headless_flags(tmp_path / "chromium-profile"), "--virtual-time-budget=3000"]
    return subprocess.run([CHROMIUM, *flags, *extra, url], capture_output=True, text=True, timeout=60)


def fill_the_disk(store: DashboardStore) -> int:
    """Make the store's disk full: the file may not grow and its pages are filled with results; returns their number.

    SQLite reports "database or disk is full" past ``max_page_count``, as it does for a full disk.
    """
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages + 4}")
    for n in range(1000):
        try:
            store.add_result(make_result(seq=10_000 + n, device_id="filler"))
        except sqlite3.OperationalError as exc:
            assert "full" in str(exc)
            return n
    raise AssertionError("the database did not fill up")


def free_the_disk(store: DashboardStore) -> None:
    store._db.execute("PRAGMA max_page_count = 1073741823")


def dead_letters(db: Path) -> list[dict[str, Any]]:
    with sqlite3.connect(db) as con:
        con.row_factory = sqlite3.Row
        return [dict(r) for r in con.execute("SELECT * FROM dead_letters ORDER BY id")]


def export_images(data_dir: Path, folder: Path, n: int) -> Path:
    folder.mkdir()
    for i, img in enumerate(np.load(data_dir / "breastmnist_28.npz")["test_images"][:n]):
        cv2.imwrite(str(folder / f"img{i}.png"), img)
    return folder
