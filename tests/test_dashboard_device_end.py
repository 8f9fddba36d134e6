"""Item 18: how a device's run ended, and what it left on disk, as the dashboard shows it.

A real `edgemed run` (with one fault injected) against a real mosquitto, with the real dashboard ingest subscribed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from broker_fixtures import Mosquitto
from dashboard_helpers import HEALTH, export_images, wait_until
from web_helpers import login, make_user, running_web

from edgemed.dashboard.ingest import Ingest
from edgemed.dashboard.store import DashboardStore
from edgemed.outbox import Outbox
from edgemed.publish.config import MqttConfig

# `edgemed run` with one fault injected at a seam: processing the sixth frame raises, as an unforeseen bug would.
CRASHING_RUN = """
import sys
from edgemed import runtime
from edgemed.cli import main

original = runtime.Device.process
frames = []


def process(self, frame, capture_ms=0.0):
    frames.append(frame.index)
    if len(frames) == 6:
        raise RuntimeError("simulated fault while processing a frame")
    return original(self, frame, capture_ms)


runtime.Device.process = process
sys.exit(main(sys.argv[1:]))
"""


def test_a_crashed_run_shows_as_such_with_what_it_left_pending(
    broker: Mosquitto, tmp_path: Path, int8_model: Path, data_dir: Path
) -> None:
    store = DashboardStore(tmp_path / "fleet.sqlite3")
    ingest = Ingest(MqttConfig(url=broker.url), store)
    ingest.start()
    try:
        assert ingest.wait_subscribed(10), broker.log_tail()
        images = export_images(data_dir, tmp_path / "scans", 12)
        proc = subprocess.run(
            [
                *(sys.executable, "-c", CRASHING_RUN, "run", "--model", str(int8_model), "--source", str(images)),
                *("--broker", broker.url, "--device-id", "us-07", "--site", "clinic", "--quiet"),
                *("--data-dir", str(tmp_path / "device")),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 1 and "simulated fault" in proc.stderr, proc.stderr

        def row() -> dict[str, Any]:
            rows = store.fleet()
            return rows[0] if rows else {}

        assert wait_until(lambda: row().get("state") == "offline", 10), (row(), ingest.snapshot())
        device = row()
        assert device["ended_abnormally"] is True
        assert device["offline_reason"] == "ended with an error (RuntimeError)"  # the class, never the message
        with Outbox(tmp_path / "device" / "outbox.sqlite3") as ob:
            left = ob.pending_count()
        # What the run left on disk, from its offline status; a number even for a run shorter than one heartbeat
        # interval (the first heartbeat goes out once connected).
        assert isinstance(device["pending"], int) and device["pending"] >= left
        assert isinstance(device["frames"], int)
        make_user(store, "ada", "admin")
        with running_web(store, ingest_snapshot=ingest.snapshot) as base, login(base, "ada") as http:
            [shown] = http.get("/api/fleet").json()["devices"]
            page = http.get("/fleet").text
    finally:
        ingest.stop()
        store.close()
    assert shown["offline_reason"] == "ended with an error (RuntimeError)" and shown["ended_abnormally"] is True
    assert shown["pending"] == device["pending"] and shown["state"] == "offline"
    # The fleet view says so on the device's row, with what it left pending.
    row = page.split(">us-07</a>")[1].split("</tr>")[0]
    assert 'title="ended with an error (RuntimeError)">ended abnormally</span>' in row, row
    assert f'<td class="num">{device["pending"]}</td>' in row and ">stopped<" not in row


def test_pending_comes_from_the_newest_report_and_a_lost_connection_is_not_a_clean_stop(tmp_path: Path) -> None:
    store = DashboardStore(tmp_path / "d.sqlite3")
    store.set_status("clinic", "us-08", {"state": "online"}, 100.0)
    store.set_health("clinic", "us-08", {**HEALTH, "pending": 17}, 105.0)
    # Killed: the broker publishes the last will, which knows nothing of the backlog.
    store.set_status("clinic", "us-08", {"state": "offline", "reason": "connection lost", "clean": False}, 110.0)
    [killed] = store.fleet(now=111.0)
    assert killed["pending"] == 17 and killed["ended_abnormally"] is True
    # Restarted and stopped cleanly: its offline status says what it left.
    store.set_status("clinic", "us-08", {"state": "online"}, 120.0)
    store.set_status("clinic", "us-08", {"state": "offline", "reason": "stopped", "clean": True, "pending": 3}, 130.0)
    [stopped] = store.fleet(now=131.0)
    assert stopped["pending"] == 3 and stopped["ended_abnormally"] is False
    store.close()
