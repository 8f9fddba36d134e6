"""The fleet-scale harness (issue 12): ingest workers and simulated devices as processes, and what the store holds.

* ``IngestWorker``: ``python -m edgemed dashboard ingest --db DB --broker URL --group NAME --client-id ID`` (or, with
  ``embedded=True``, the all-in-one ``python -m edgemed dashboard``), started, SIGKILLed and restarted by PID. It
  counts as up once its consumer state says ``online``: the ingest says so only after the broker granted its
  subscriptions, so nothing published after that can miss it.
* ``DeviceFleet``: simulated devices (``fleet_devices.py``: the device's own outbox, delivery, consumer and MQTT
  link, real ``edgemed.result/1`` envelopes) in a few processes.
* ``Watcher``: an independent MQTT 5 client that keeps the latest consumer state of every process and the latest
  receipt of every device (both retained).
* ``StoreCounts``: per ``(device_id, seq)``, how many rows the store of record holds, read with the database's own
  client (psycopg for PostgreSQL, sqlite3 read-only for a file), so the check does not go through the code it checks.

Every wait is bounded; every process is started here and killed by ``close()``. Only 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgemed.receipts import Receipt, parse_receipt

ROOT = Path(__file__).resolve().parent.parent
DEVICES_SCRIPT = Path(__file__).resolve().parent / "fleet_devices.py"


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.1) -> None:
    """Poll ``predicate``; raise AssertionError naming ``what`` when ``timeout_s`` passes first."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll_s)


class Watcher:
    """Latest consumer state per process and latest receipt per device, from an independent MQTT 5 client."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self._lock = threading.Lock()
        self.states: dict[str, str] = {}
        self.receipts: dict[tuple[str, str], bytes] = {}
        self._subscribed = threading.Event()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"watcher-{uuid.uuid4().hex[:8]}", protocol=paho.MQTTv5
        )
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(
            [("edgemed-consumer/+/+", 1), ("edgemed/+/+/receipts", 1)]
        )
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            self.close()
            raise RuntimeError(f"the watcher could not subscribe on port {port}")

    def _on_message(self, client: object, userdata: object, msg: Any) -> None:
        parts = msg.topic.split("/")
        with self._lock:
            if parts[0] == "edgemed-consumer":
                try:
                    body = json.loads(msg.payload) if msg.payload else {}
                except ValueError:
                    body = {}
                self.states[parts[2]] = body.get("state", "") if isinstance(body, dict) else ""
            elif len(parts) == 4 and parts[3] == "receipts":
                self.receipts[(parts[1], parts[2])] = msg.payload

    def state(self, process: str) -> str | None:
        with self._lock:
            return self.states.get(process)

    def receipt(self, site: str, device_id: str) -> Receipt | None:
        with self._lock:
            raw = self.receipts.get((site, device_id))
        return parse_receipt(raw) if raw else None

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class _Process:
    """A child process with its output in a log file; killed by PID."""

    def __init__(self, name: str, log: Path) -> None:
        self.name, self.log = name, log
        self.proc: subprocess.Popen[bytes] | None = None

    def _spawn(self, cmd: list[str]) -> None:
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} is already running"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL and reap: no clean stop, no last words but the broker's last will."""
        if self.running:
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no output)"


class IngestWorker(_Process):
    """One ingest worker of consumer ``dashboard`` (see the module docstring)."""

    def __init__(
        self,
        folder: Path,
        *,
        db: str,
        broker_url: str,
        client_id: str,
        group: str | None,
        watcher: Watcher,
        embedded: bool = False,
    ) -> None:
        super().__init__(f"ingest worker {client_id}", folder / f"{client_id}.log")
        self.db, self.broker_url, self.client_id, self.group = db, broker_url, client_id, group
        self.watcher, self.embedded = watcher, embedded

    def command(self) -> list[str]:
        if self.embedded:  # the all-in-one dashboard (ingest and page in one process, no --group)
            args = ["dashboard", "--broker", self.broker_url, "--db", self.db, "--port", "0"]
        else:
            args = ["dashboard", "ingest", "--db", self.db, "--broker", self.broker_url]
            if self.group is not None:
                args += ["--group", self.group]
        return [sys.executable, "-m", "edgemed", *args, "--client-id", self.client_id]

    def start(self, timeout_s: float = 60.0) -> None:
        """Start it and wait until its consumer state says ``online`` (its subscriptions are granted)."""
        before = self.watcher.state(self.client_id)
        if before == "online":  # a retained "online" of an earlier life would not mean anything
            raise AssertionError(f"{self.name} is said to be online before it started")
        self._spawn(self.command())

        def up() -> bool:
            if not self.running:
                raise AssertionError(f"{self.name} exited\n{self.tail()}")
            return self.watcher.state(self.client_id) == "online"

        wait_until(up, timeout_s, f"{self.name} to say online\n{self.tail()}")

    def kill(self) -> None:
        """SIGKILL; waits (bounded) for the broker's last will to say ``offline``."""
        super().kill()
        wait_until(lambda: self.watcher.state(self.client_id) == "offline", 30, f"the last will of {self.name}")

    def stop(self) -> None:
        """SIGTERM: a clean stop (commits and acknowledges what it holds, says offline)."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(30)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{self.name} did not stop within 30 s\n{self.tail()}") from None
            assert code == 0, f"{self.name} exited {code} on SIGTERM\n{self.tail()}"


@dataclass
class DeviceReport:
    """One simulated device at the end of its run (a line of ``fleet_devices.py``'s output)."""

    device_id: str
    stream: str
    committed: int
    left: int
    resent: int
    published: int


class DeviceFleet(_Process):
    """Simulated devices in ``processes`` processes, ``results`` each at ``rate`` results/s per device."""

    def __init__(
        self,
        folder: Path,
        *,
        broker_url: str,
        site: str,
        device_ids: list[str],
        results: int,
        rate: float,
        receipt_timeout_s: float,
        processes: int = 2,
    ) -> None:
        super().__init__("the devices", folder / "devices.log")
        self.folder, self.site = folder, site
        self.device_ids = device_ids
        groups = [device_ids[i::processes] for i in range(processes)]
        self.parts: list[tuple[subprocess.Popen[bytes] | None, Path, Path]] = []
        self._commands = []
        for n, ids in enumerate(groups):
            out, progress = folder / f"devices-{n}.out", folder / f"devices-{n}.progress"
            cmd = [sys.executable, str(DEVICES_SCRIPT), "--broker", broker_url, "--folder", str(folder / "devices")]
            cmd += ["--site", site, "--results", str(results), "--rate", str(rate)]
            cmd += ["--receipt-timeout", str(receipt_timeout_s), "--timeout", "90", "--progress", str(progress)]
            for device_id in ids:
                cmd += ["--device", device_id]
            self._commands.append((cmd, out, progress))

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        for cmd, out, progress in self._commands:
            with out.open("wb") as stdout, self.log.open("ab") as stderr:
                proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=stdout, stderr=stderr)
            self.parts.append((proc, out, progress))

    def committed(self) -> int:
        """Results the devices have produced so far (from their progress files)."""
        total = 0
        for _, _, progress in self.parts:
            with contextlib.suppress(FileNotFoundError):  # not written yet: nothing produced
                total += int(progress.read_text())
        return total

    def finish(self, timeout_s: float) -> list[DeviceReport]:
        """Wait for every device process to end; each must exit 0 (every outbox empty). Their reports."""
        reports: list[DeviceReport] = []
        deadline = time.monotonic() + timeout_s
        for proc, out, _ in self.parts:
            assert proc is not None
            try:
                code = proc.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"the devices did not finish within {timeout_s:.0f} s\n{self.tail()}") from None
            lines = [json.loads(line) for line in out.read_text().splitlines() if line.startswith("{")]
            assert code == 0, f"a device process exited {code}: {lines[-1:]}\n{self.tail()}"
            reports += [DeviceReport(**line) for line in lines if "device_id" in line]
        return reports

    def kill(self) -> None:
        for proc, _, _ in self.parts:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)


class StoreCounts:
    """Read-only counts of what the store of record holds, with the database's own client."""

    def __init__(self, db: str) -> None:
        self.db = db
        self.postgres = db.startswith("postgresql://")

    def _rows(self, sql: str) -> list[tuple[Any, ...]]:
        if self.postgres:
            import psycopg

            with psycopg.connect(self.db, connect_timeout=10) as conn:
                return list(conn.execute(sql))  # type: ignore[arg-type]
        path = self.db.removeprefix("sqlite:///")
        if not Path(path).exists():
            return []
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        try:
            return list(con.execute(sql))
        except sqlite3.OperationalError:  # the schema is not written yet
            return []
        finally:
            con.close()

    def stored(self) -> int:
        rows = self._rows("SELECT count(*) FROM results")
        return int(rows[0][0]) if rows else 0

    def per_seq(self) -> dict[str, Counter[int]]:
        """device_id -> how many rows hold each ``seq`` (result ids are unique; a seq twice is a second id)."""
        out: dict[str, Counter[int]] = {}
        for device_id, seq, n in self._rows("SELECT device_id, seq, count(*) FROM results GROUP BY device_id, seq"):
            out.setdefault(device_id, Counter())[int(seq)] = int(n)
        return out

    def dead_letters(self) -> int:
        rows = self._rows("SELECT count(*) FROM dead_letters")
        return int(rows[0][0]) if rows else 0

    def settled_lost(self) -> int:
        rows = self._rows("SELECT count(*) FROM settled WHERE how = 'lost'")
        return int(rows[0][0]) if rows else 0


def check_exactly_once(counts: StoreCounts, reports: list[DeviceReport], per_device: int) -> None:
    """Every device committed ``per_device`` results, each ``seq`` is stored once, nothing else, nothing left."""
    held = counts.per_seq()
    for rep in reports:
        seqs = held.get(rep.device_id, Counter())
        assert rep.committed == per_device, f"{rep.device_id} committed {rep.committed}, not {per_device}"
        missing = sorted(set(range(per_device)) - set(seqs))
        twice = sorted(s for s, n in seqs.items() if n > 1)
        extra = sorted(set(seqs) - set(range(per_device)))
        assert not missing, f"{rep.device_id}: {len(missing)} seqs never stored, first {missing[:10]}"
        assert not twice, f"{rep.device_id}: {len(twice)} seqs stored more than once, first {twice[:10]}"
        assert not extra, f"{rep.device_id}: seqs stored that it never committed: {extra[:10]}"
        assert rep.left == 0, f"{rep.device_id}: {rep.left} results still in its outbox"
    assert counts.stored() == per_device * len(reports)
    assert counts.dead_letters() == 0, "payloads refused as dead letters"
    assert counts.settled_lost() == 0, "seqs settled as lost at a device"


def check_receipts(watcher: Watcher, site: str, reports: list[DeviceReport], consumer: str = "dashboard") -> None:
    """Each device's retained receipt is of its own stream, by the consumer, and settles every seq it committed."""

    def all_in() -> bool:
        for rep in reports:
            got = watcher.receipt(site, rep.device_id)
            if got is None or got.state.through_seq != rep.committed - 1:
                return False
        return True

    # The devices already saw them (their outboxes are empty); the watcher's copy may trail by a receipt round.
    wait_until(all_in, 10, "every device's receipt to settle through its last seq")
    for rep in reports:
        got = watcher.receipt(site, rep.device_id)
        assert got is not None
        assert (got.consumer, got.stream, got.state.missing) == (consumer, rep.stream, ())
