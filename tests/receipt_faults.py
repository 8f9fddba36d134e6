"""The fault harness of issue 11: a real mosquitto with its defaults, the real dashboard and real devices, each in
its own process, and what the dashboard's store holds at the end, per ``(device_id, seq)``.

* ``Rig``: one broker (``defaults=True``: ``max_queued_messages`` 1000, ``autosave_interval`` 1800 s; persistence
  on in the rig's folder, or off), one ``DashboardProcess`` (``python -m edgemed dashboard``, consumer id and
  client id left at their defaults) and any number of ``DeviceProcess`` (``python -m edgemed run`` over real
  BreastMNIST images from data/, ``--loop`` to reach the count, a fresh data directory each, ``--quiet``).
* ``Rig.check()`` counts every device's ``seq`` in the store's ``results`` and ``studies`` tables (the store of
  record, read-only) against the ``seq`` counter the device committed, and the rows left in its outbox; it
  returns the ``Figures`` of the run (and appends them to ``$EDGEMED_FAULT_FIGURES`` when set).
* Deliveries to the dashboard are counted in the broker's log (``log_type all``: one line per PUBLISH it sends),
  so duplicates received = deliveries - stored, over every restart of either (for devices that send single
  results: the log does not say how many results a batch held).

Every wait is bounded; every process is started by the rig and killed by ``Rig.close()``. Only 127.0.0.1.

The faults themselves (kill, stop, pause, restart) are steps in ``fault_cases.py``; the counting is in
``fault_counts.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from broker_fixtures import Mosquitto
from fault_counts import DASHBOARD_CLIENT, deliveries, read_only, settled_lost, stored_count, stored_seqs

ROOT = Path(__file__).resolve().parent.parent
SITE = "faults"
IMAGES_PER_PASS = 24  # real BreastMNIST test images exported once per rig


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``predicate`` every 50 ms; raise AssertionError naming ``what`` when ``timeout_s`` passes first."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.05)


class _Process:
    """A child process with its output in a log file; stopped, paused and killed by PID."""

    def __init__(self, name: str, log: Path) -> None:
        self.name = name
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def _spawn(self, cmd: list[str]) -> None:
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} is already running"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        if self.running:
            assert self.proc is not None
            os.kill(self.proc.pid, sig)

    def wait(self, timeout_s: float) -> int:
        """Wait for the process to end; its exit code. Raises AssertionError (with its log) on timeout."""
        assert self.proc is not None, f"{self.name} was never started"
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} did not end within {timeout_s:.0f} s\n{self.tail()}") from None

    def kill(self) -> None:
        """SIGKILL (after SIGCONT, so that a paused process dies too) and reap."""
        if self.running:
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGCONT)
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no output)"


class DashboardProcess(_Process):
    """``python -m edgemed dashboard --broker URL --db DB --port 0`` with the default consumer and client ids."""

    def __init__(self, folder: Path, broker: Mosquitto) -> None:
        super().__init__("the dashboard", folder / "dashboard.log")
        self.broker = broker
        self.db = folder / "fleet.sqlite3"

    def start(self, timeout_s: float = 30.0) -> None:
        """Start it and wait until the broker acknowledged its subscription."""
        before = self.broker.log_count(f"Sending SUBACK to {DASHBOARD_CLIENT}")
        self._spawn([sys.executable, "-m", "edgemed", "dashboard", "--broker", self.broker.url, "--db", str(self.db)])
        self.wait_subscribed(before, timeout_s)

    def _spawn(self, cmd: list[str]) -> None:
        super()._spawn([*cmd, "--port", "0"])

    def wait_subscribed(self, before: int, timeout_s: float = 30.0) -> None:
        """Wait until the broker sent the dashboard one more SUBACK than ``before``."""

        def up() -> bool:
            if not self.running:
                raise AssertionError(f"the dashboard exited\n{self.tail()}")
            return self.broker.log_count(f"Sending SUBACK to {DASHBOARD_CLIENT}") > before

        wait_until(up, timeout_s, f"the dashboard to subscribe\n{self.broker.log_tail()}")

    def stop(self) -> None:
        """SIGTERM: a clean stop (it says offline, commits and acknowledges what it holds)."""
        self.signal(signal.SIGTERM)
        code = self.wait(30)
        assert code == 0, f"the dashboard exited {code} on SIGTERM\n{self.tail()}"


class DeviceProcess(_Process):
    """``python -m edgemed run --profile P --quiet`` over the rig's images, in a fresh data directory."""

    def __init__(
        self,
        folder: Path,
        *,
        broker: Mosquitto,
        model: Path,
        images: Path,
        device_id: str,
        results: int,
        consumer: str | None,
        fps_cap: float | None,
        receipt_timeout_s: float | None = None,
        batch: bool = False,
    ) -> None:
        folder.mkdir(parents=True)
        super().__init__(f"device {device_id}", folder / "device.log")
        self.device_id = device_id
        self.client_id = f"edgemed-{SITE}-{device_id}"
        self.data = folder / "data"
        self.profile = folder / "profile.yaml"
        loop = -(-results // IMAGES_PER_PASS)
        source = {"uri": str(images), "loop": loop, **({"fps_cap": fps_cap} if fps_cap else {})}
        body = {
            "profile": "fault-test",
            "device": {"id": device_id, "site": SITE, "data_dir": str(self.data)},
            "model": {"path": str(model)},
            "source": source,
            # The device's own reconnect back-off is kept short so that it is back before the dashboard.
            "mqtt": {"url": broker.url, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
            "health": {"interval_s": 2},
            "run": {"drain_timeout_s": 240},
        }
        if consumer is not None:
            body["delivery"] = {"consumer": consumer}
            if receipt_timeout_s is not None:
                body["delivery"]["receipt_timeout_s"] = receipt_timeout_s
        self.batch = batch
        if batch:
            body["publish"] = {"batch": {"enabled": True, "max_results": 100}}
        self.profile.write_text(json.dumps(body, indent=1))  # JSON is YAML

    def start(self) -> None:
        self._spawn([sys.executable, "-m", "edgemed", "run", "--profile", str(self.profile), "--quiet"])

    @property
    def outbox(self) -> Path:
        return self.data / "outbox.sqlite3"

    def committed(self) -> int:
        """The outbox's committed ``seq`` counter: seqs 0 .. committed-1 were handed to committed results."""
        if not self.outbox.exists():
            return 0
        with read_only(self.outbox) as con:
            return int(con.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()[0])

    def on_disk(self) -> int:
        """Results and study decisions still in the outbox (sent or not)."""
        with read_only(self.outbox) as con:
            return int(con.execute("SELECT count(*) FROM outbox").fetchone()[0])


@dataclass
class Figures:
    """What one run of a fault case shows (a row of the table in docs/delivery.md)."""

    case: str
    persistence: bool
    consumer: bool
    devices: int
    batching_devices: int
    results: int
    stored: int
    deliveries: int  # of single results, to the dashboard
    duplicates: int  # of single results, received by the dashboard
    lost: int
    left_on_disk: int
    broker_dropped: bool
    seconds: float

    def record(self) -> None:
        print(f"fault figures: {json.dumps(asdict(self))}")
        path = os.environ.get("EDGEMED_FAULT_FIGURES")
        if path:
            with open(path, "a") as out:
                out.write(json.dumps(asdict(self)) + "\n")


class Rig:
    """One broker with mosquitto's defaults (persistence on or off), the dashboard, and devices."""

    def __init__(self, folder: Path, factory: type[Mosquitto], *, persistence: bool, model: Path, images: Path) -> None:
        self.folder = folder
        self.persistence = persistence
        self.model = model
        self.images = images
        self.broker = factory(folder / "broker", persistence=persistence, defaults=True)
        self.dashboard = DashboardProcess(folder, self.broker)
        self.devices: list[DeviceProcess] = []
        self.started = time.monotonic()

    @property
    def mode(self) -> str:
        return "persistence on" if self.persistence else "persistence off"

    def device(
        self,
        device_id: str,
        results: int,
        *,
        consumer: str | None = "dashboard",
        fps_cap: float | None = None,
        receipt_timeout_s: float | None = None,
        batch: bool = False,
    ) -> DeviceProcess:
        """Add (not start) a device that produces about ``results`` results (the profile's defaults unless set)."""
        dev = DeviceProcess(
            self.folder / device_id,
            broker=self.broker,
            model=self.model,
            images=self.images,
            device_id=device_id,
            results=results,
            consumer=consumer,
            fps_cap=fps_cap,
            receipt_timeout_s=receipt_timeout_s,
            batch=batch,
        )
        self.devices.append(dev)
        return dev

    def start(self) -> None:
        """The broker, then the dashboard; with persistence on, a save once it is subscribed.

        The save stands for the broker's last periodic autosave before the fault: the dashboard's persistent
        session and its retained state are on the broker's disk, as they are on a broker that has been up for
        longer than one autosave interval.
        """
        self.broker.start()
        self.dashboard.start()
        self.started = time.monotonic()

    def save_after_connect(self) -> None:
        """Wait until every device is connected, then make the broker save (see ``start``)."""
        for dev in self.devices:
            wait_until(lambda d=dev: self.broker.log_count(f"as {d.client_id} ") > 0, 60, f"{dev.name} to connect")
        if self.persistence:
            self.broker.save_now()

    def broker_dropped(self) -> bool:
        """Whether the broker dropped messages for the dashboard (its queue limit, ``max_queued_messages``)."""
        return self.broker.log_count(f"Outgoing messages are being dropped for client {DASHBOARD_CLIENT}") > 0

    def stored(self, device: DeviceProcess | None = None) -> int:
        return stored_count(self.dashboard.db, device.device_id if device else None)

    def wait_stored(self, n: int, device: DeviceProcess | None = None, timeout_s: float = 120) -> None:
        what = f"{n} results of {device.name if device else 'the fleet'} stored ({self.mode})"
        wait_until(lambda: self.stored(device) >= n, timeout_s, what)

    def finish(self, timeout_s: float = 240) -> None:
        """Wait for every device to exit 0: every result receipted (or, without a consumer, acknowledged)."""
        for dev in self.devices:
            code = dev.wait(timeout_s)
            assert code == 0, f"{dev.name} exited {code} ({self.mode})\n{dev.tail()}"

    def settle(self, quiet_s: float = 3.0, timeout_s: float = 60) -> None:
        """Wait until the store stops growing for ``quiet_s`` (for runs whose devices do not wait for receipts)."""
        last, since = -1, time.monotonic()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() - since < quiet_s and time.monotonic() < deadline:
            now = self.stored()
            if now != last:
                last, since = now, time.monotonic()
            time.sleep(0.2)

    def figures(self, case: str, *, consumer: bool = True) -> Figures:
        """Count what the store holds per device against what each device committed."""
        held = stored_seqs(self.dashboard.db)
        sent = deliveries(self.broker.log_path)
        results = stored = lost = left = singles_stored = singles_sent = 0
        for dev in self.devices:
            counts = held.get(dev.device_id, Counter())
            committed = dev.committed()
            results += committed
            stored += sum(counts.values())
            lost += len(set(range(committed)) - set(counts))
            left += dev.on_disk()
            if not dev.batch:
                singles_stored += sum(counts.values())
                singles_sent += sent[dev.device_id]
        return Figures(
            case,
            self.persistence,
            consumer,
            len(self.devices),
            sum(d.batch for d in self.devices),
            results,
            stored,
            singles_sent,
            singles_sent - singles_stored,
            lost,
            left,
            self.broker_dropped(),
            round(time.monotonic() - self.started, 1),
        )

    def check(self, case: str) -> Figures:
        """Every ``seq`` of every device stored exactly once, none settled as lost, every outbox empty."""
        held = stored_seqs(self.dashboard.db)
        for dev in self.devices:
            committed = dev.committed()
            counts = held.get(dev.device_id, Counter())
            missing = sorted(set(range(committed)) - set(counts))
            twice = sorted(s for s, n in counts.items() if n > 1)
            extra = sorted(set(counts) - set(range(committed)))
            where = f"{dev.name} ({self.mode})"
            assert committed > 0, f"{where} committed nothing\n{dev.tail()}"
            assert not missing, f"{where}: {len(missing)} of {committed} seqs never stored, first {missing[:10]}"
            assert not twice, f"{where}: {len(twice)} seqs stored more than once, first {twice[:10]}"
            assert not extra, f"{where}: seqs stored that the device never committed: {extra[:10]}"
            assert dev.on_disk() == 0, f"{where}: {dev.on_disk()} results still in the outbox"
        assert settled_lost(self.dashboard.db) == 0, f"seqs settled as lost at a device ({self.mode})"
        figures = self.figures(case)
        figures.record()
        return figures

    def close(self) -> None:
        for dev in self.devices:
            dev.kill()
        self.dashboard.kill()
        self.broker.kill()
