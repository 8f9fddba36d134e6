"""The central side at fleet scale (issue 12), end to end on real parts: PostgreSQL 15, mosquitto, processes.

* Two ingest workers (``edgemed dashboard ingest --db postgresql://... --group fleet``) on a mosquitto with its
  defaults share 20 simulated devices x 500 results through the MQTT 5 shared subscription: every result is stored
  exactly once (counted per ``(device_id, seq)`` in PostgreSQL with psycopg, not through the store's code), each
  device's outbox empties (a result leaves it only on a receipt) and each device's retained receipt settles
  through seq 499 of its own stream; each worker took a share of the stream.
* The same with one worker SIGKILLed mid-stream and left dead: the broker keeps dealing the dead worker's persistent
  session its share (mosquitto 2.0 skips no offline member of a share group) and holds what it had in flight;
  the devices send again what no receipt covers, the surviving worker stores it, and nothing is lost or stored
  twice. The dead worker is then started again on its session, which brings the stranded copies: still once.
* A database made by the dashboard before issue 12 (``fixtures/dashboard-i11.sqlite3.gz``, written by commit
  c2867b7's own code: see ``fixtures/make_old_dashboard_db.py``) is opened by a new ingest worker, upgraded in
  place, and keeps every row: ``edgemed dashboard export`` prints the old export line for line, then the new
  results after it.

Simulated devices: ``fleet_devices.py`` (the device's own Outbox, Delivery, Consumer and MqttLink; envelopes from
``edgemed.envelope``). Harness: ``fleet_rig.py``. Every wait is bounded; every process is killed at the end.
"""

from __future__ import annotations

import gzip
import json
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from broker_fixtures import Mosquitto
from fault_counts import deliveries
from fleet_rig import (
    ROOT,
    DeviceFleet,
    IngestWorker,
    StoreCounts,
    Watcher,
    check_exactly_once,
    check_receipts,
    wait_until,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SITE = "fleet"
DEVICES = [f"dev-{n:02d}" for n in range(20)]
PER_DEVICE = 500


@pytest.fixture
def watcher(default_broker: Mosquitto) -> Iterator[Watcher]:
    w = Watcher(default_broker.port)
    yield w
    w.close()


class Fleet:
    """Two workers of group ``fleet`` on one database, and the devices; everything killed by ``close``."""

    def __init__(self, folder: Path, broker: Mosquitto, watcher: Watcher, db: str, *, receipt_timeout_s: float):
        self.broker, self.watcher, self.db = broker, watcher, db
        self.workers = [
            IngestWorker(folder, db=db, broker_url=broker.url, client_id=f"fleet-{n}", group="fleet", watcher=watcher)
            for n in ("a", "b")
        ]
        self.devices = DeviceFleet(
            folder,
            broker_url=broker.url,
            site=SITE,
            device_ids=DEVICES,
            results=PER_DEVICE,
            rate=100.0,  # 2,000 results/s for the fleet, 5 s of stream
            receipt_timeout_s=receipt_timeout_s,
        )
        self.counts = StoreCounts(db)

    def start(self) -> None:
        for worker in self.workers:
            worker.start()
        self.devices.start()

    def delivered_to(self, worker: IngestWorker) -> int:
        """Results the broker sent to one worker (its log: one line per PUBLISH it sends)."""
        return sum(deliveries(self.broker.log_path, worker.client_id).values())

    def close(self) -> None:
        self.devices.kill()
        for worker in self.workers:
            if worker.running:
                worker.kill()


def test_two_workers_share_the_fleet_and_store_every_result_once(
    tmp_path: Path, default_broker: Mosquitto, watcher: Watcher, pg_url: str
) -> None:
    fleet = Fleet(tmp_path, default_broker, watcher, pg_url, receipt_timeout_s=10.0)
    try:
        fleet.start()
        reports = fleet.devices.finish(timeout_s=100)
        check_exactly_once(fleet.counts, reports, PER_DEVICE)
        check_receipts(watcher, SITE, reports)
        total = PER_DEVICE * len(DEVICES)
        shares = [fleet.delivered_to(w) for w in fleet.workers]
        # A shared subscription deals each message to one member: neither worker saw the whole stream, both a part.
        assert all(0.2 * total < s < 0.8 * total for s in shares), f"deliveries per worker {shares} of {total}"
        # Statuses are subscribed plainly by every worker and stored idempotently: one row per device.
        devices = fleet.counts._rows("SELECT device_id, status FROM devices")
        assert sorted(d for d, _ in devices) == DEVICES and all(status for _, status in devices)
        print(f"fleet figures: deliveries per worker {shares}, sent again {sum(r.resent for r in reports)}")
    finally:
        fleet.close()


@pytest.mark.parametrize("restarted_after_s", [2.0, None], ids=["restarted-2s-later", "left-dead"])
def test_a_worker_killed_mid_stream_loses_nothing_and_stores_nothing_twice(
    tmp_path: Path, default_broker: Mosquitto, watcher: Watcher, pg_url: str, restarted_after_s: float | None
) -> None:
    # Restarted 2 s later (systemd's RestartSec in docs/central.md): its session brings what the broker kept for it.
    # Left dead: only the devices' re-sends recover its share. A seq missing below a stored one is sent again a
    # second after its PUBACK, and a copy sent again waits receipt_timeout_s before the next try; half of each
    # round goes to the dead session again, so recovery takes a few timeouts (1 s here; the default is 60 s).
    fleet = Fleet(tmp_path, default_broker, watcher, pg_url, receipt_timeout_s=1.0)
    victim = fleet.workers[1]
    try:
        fleet.start()
        total = PER_DEVICE * len(DEVICES)
        wait_until(lambda: fleet.counts.stored() >= total // 4, 60, "a quarter of the stream stored", poll_s=0.05)
        killed_at = fleet.counts.stored()
        victim.kill()  # SIGKILL: whatever it held uncommitted was never acknowledged to the broker
        assert killed_at < total // 2, f"the stream was nearly over ({killed_at} of {total}) when the worker died"
        stranded = fleet.delivered_to(victim)
        if restarted_after_s is not None:
            time.sleep(restarted_after_s)
            victim.start()
        reports = fleet.devices.finish(timeout_s=100)
        check_exactly_once(fleet.counts, reports, PER_DEVICE)
        check_receipts(watcher, SITE, reports)
        resent = sum(r.resent for r in reports)
        if restarted_after_s is None:
            assert resent > 0, "nothing was sent again: the dead worker's share never reached it?"
            # Back on its session at last, the worker gets what the broker kept for it: copies, dropped.
            victim.start()
        wait_until(lambda: fleet.delivered_to(victim) > stranded, 30, "the restarted worker to get its queue")
        time.sleep(2.0)  # its queue (at most mosquitto's 1,000 messages) is filed within a second or two
        check_exactly_once(fleet.counts, reports, PER_DEVICE)
        print(
            f"fleet figures: killed after {killed_at} of {total} stored, sent again {resent}, "
            f"delivered to the restarted worker {fleet.delivered_to(victim) - stranded}"
        )
    finally:
        fleet.close()


def _export(db: Path) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "edgemed", "dashboard", "export", "--db", str(db), "--format", "jsonl"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_an_old_sqlite_dashboard_database_keeps_its_rows_through_the_upgrade(
    tmp_path: Path, default_broker: Mosquitto, watcher: Watcher
) -> None:
    db = tmp_path / "fleet.sqlite3"
    with gzip.open(FIXTURES / "dashboard-i11.sqlite3.gz") as src, db.open("wb") as dst:
        shutil.copyfileobj(src, dst)
    db.chmod(0o600)
    old_counts = json.loads((FIXTURES / "dashboard-i11.counts.json").read_text())
    old_export = gzip.decompress((FIXTURES / "dashboard-i11.export.jsonl.gz").read_bytes()).decode().splitlines()
    assert len(old_export) == old_counts["results"] + old_counts["studies"] == 132
    with sqlite3.connect(db) as con:  # made before Alembic: no version table
        assert "alembic_version" not in {r[0] for r in con.execute("SELECT name FROM sqlite_master")}
    worker = IngestWorker(
        tmp_path, db=str(db), broker_url=default_broker.url, client_id="upgrader", group="fleet", watcher=watcher
    )
    devices = DeviceFleet(
        tmp_path,
        broker_url=default_broker.url,
        site="new-clinic",
        device_ids=["new-0"],
        results=20,
        rate=200.0,
        receipt_timeout_s=10.0,
        processes=1,
    )
    try:
        worker.start()  # opens the old file: upgraded in place, under the migration lock
        devices.start()
        reports = devices.finish(timeout_s=60)
        assert [r.left for r in reports] == [0]
        worker.stop()
    finally:
        devices.kill()
        worker.kill()
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert "alembic_version" in tables
        assert con.execute("SELECT count(*) FROM alembic_version").fetchone() == (1,)
        for table in ("dead_letters", "dead_letter_counts", "studies"):
            (n,) = con.execute(f"SELECT count(*) FROM {table}").fetchone()  # the table names above
            assert n == old_counts[table], f"{table}: {n} rows after the upgrade, {old_counts[table]} before"
        # The old page's acknowledgements are acknowledged reviews now (revision 0004 drops the acks table).
        assert "acks" not in tables
        (n,) = con.execute("SELECT count(*) FROM reviews WHERE state = 'acknowledged'").fetchone()
        assert n == old_counts["acks"], f"reviews: {n} after the upgrade, {old_counts['acks']} acks before"
        assert con.execute("SELECT count(*) FROM results").fetchone() == (old_counts["results"] + 20,)
        assert con.execute("SELECT count(*) FROM devices").fetchone() == (old_counts["devices"] + 1,)
        # What the old dashboard settled still counts for receipts: 120 results and 12 study decisions.
        (settled,) = con.execute("SELECT count(*) FROM settled WHERE site = 'old-clinic'").fetchone()
        assert settled == old_counts["settled"]
    lines = _export(db)
    # Oldest first by reception: the old rows exactly as the old dashboard exported them, then the 20 new ones.
    assert lines[: len(old_export)] == old_export
    new = [json.loads(line) for line in lines[len(old_export) :]]
    assert sorted(r["seq"] for r in new) == list(range(20)) and {r["device_id"] for r in new} == {"new-0"}
