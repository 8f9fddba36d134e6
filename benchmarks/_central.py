"""Parts of the central-side benchmarks: a temporary PostgreSQL 15, ingest workers, a pre-built batch stream.

* ``Postgres``: a throw-away cluster from Debian's binaries (``/usr/lib/postgresql/15/bin``) on a free 127.0.0.1
  port, PostgreSQL's own defaults (``fsync``, ``synchronous_commit`` on, 100 connections, 128 MB shared buffers);
  run as the ``postgres`` user through ``runuser`` when the benchmark runs as root (PostgreSQL refuses root).
* ``Worker``: ``python -m edgemed dashboard ingest`` as a child process, in a process group of its own; its session
  at the broker is removed when it ends, so the next configuration's stream is not also dealt to it.
* ``batch_stream``: ``edgemed.batch/1`` messages of real ``edgemed.result/1`` envelopes (``edgemed.envelope``),
  each device on its own ``seq`` stream, encoded before the clock starts.
* ``cpu_s``: CPU seconds of a process (and, for PostgreSQL, of every backend under the postmaster) from /proc.

Every server listens on 127.0.0.1 only and is stopped by its own process id; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import Mosquitto

ROOT = Path(__file__).resolve().parent.parent
PG_BIN = Path(os.environ.get("EDGEMED_PG_BIN", "/usr/lib/postgresql/15/bin"))
PG_USER, PG_PASSWORD = "edgemed", "edgemed-bench-only"
_TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system, every thread) process ``pid`` has used; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (PostgreSQL's backends and helpers under its postmaster)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue  # ended while we looked
    return out


class Postgres:
    """A temporary PostgreSQL 15 cluster (see the module docstring); ``with Postgres() as pg: pg.url("db")``."""

    def __init__(self) -> None:
        if not (PG_BIN / "initdb").exists():
            raise SystemExit(f"PostgreSQL 15 is not installed ({PG_BIN}/initdb): sudo apt-get install -y postgresql")
        self.folder = Path(tempfile.mkdtemp(prefix="edgemed-bench-pg-"))
        self.owner = "postgres" if os.geteuid() == 0 else None
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def _as_owner(self, argv: list[str]) -> list[str]:
        return ["runuser", "-u", self.owner, "--", *argv] if self.owner else argv

    def __enter__(self) -> Postgres:
        from _common import free_port

        data, pwfile = self.folder / "data", self.folder / "pwfile"
        pwfile.write_text(PG_PASSWORD + "\n")
        if self.owner:
            entry = pwd.getpwnam(self.owner)
            for path in (self.folder, pwfile):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        initdb = [str(PG_BIN / "initdb"), "-D", str(data), "-U", PG_USER, "--pwfile", str(pwfile)]
        initdb += ["--auth-host=scram-sha-256", "--auth-local=scram-sha-256", "--no-sync", "-E", "UTF8", "--locale=C"]
        subprocess.run(self._as_owner(initdb), check=True, capture_output=True, timeout=120)
        self.port = free_port()
        argv = [str(PG_BIN / "postgres"), "-D", str(data), "-c", "listen_addresses=127.0.0.1"]
        argv += ["-c", f"port={self.port}", "-c", f"unix_socket_directories={self.folder}"]
        self.log = (self.folder / "postgres.log").open("ab")
        self.proc = subprocess.Popen(self._as_owner(argv), stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ready = [str(PG_BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-t", "2"]
            if subprocess.run(ready, capture_output=True).returncode == 0:
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        self.__exit__()
        raise SystemExit("PostgreSQL did not start within 60 s")

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{PG_USER}:{PG_PASSWORD}@127.0.0.1:{self.port}/{dbname}"

    def execute(self, sql: str) -> None:
        """One statement on the ``postgres`` database, outside a transaction (CREATE/DROP DATABASE)."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql)  # type: ignore[arg-type]

    @property
    def postmaster(self) -> int:
        """The postmaster's pid (under ``runuser`` when run as root)."""
        assert self.proc is not None
        if self.owner:
            kids = children(self.proc.pid)
            return kids[0] if kids else self.proc.pid
        return self.proc.pid

    def cpu_s(self) -> float:
        """CPU seconds of the postmaster and every process under it right now (ended backends are not counted)."""
        top = self.postmaster
        return cpu_s(top) + sum(cpu_s(p) for p in children(top))

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # SIGINT is PostgreSQL's fast shutdown. It goes to the postmaster itself: runuser passes SIGTERM on
            # but ignores SIGINT, and killing runuser would leave the postmaster running.
            os.kill(self.postmaster, signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.folder, ignore_errors=True)


class Worker:
    """One ``edgemed dashboard ingest`` process (consumer ``dashboard``), optionally under the thread profiler."""

    def __init__(self, *, db: str, broker_url: str, client_id: str, group: str | None, log: Path, profile: Path | None):
        self.client_id, self.broker_url = client_id, broker_url
        args = ["dashboard", "ingest", "--db", db, "--broker", broker_url, "--client-id", client_id]
        if group is not None:
            args += ["--group", group]
        if profile is not None:
            cmd = [sys.executable, str(Path(__file__).with_name("_profiled.py")), str(profile), *args]
        else:
            cmd = [sys.executable, "-m", "edgemed", *args]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        self._log = log.open("ab")
        # A session of its own: Ctrl-C on the benchmark does not reach it before the benchmark stops it in order.
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=self._log, env=env, start_new_session=True)
        self.log = log

    def alive(self) -> bool:
        return self.proc.poll() is None

    def cpu_s(self) -> float:
        return cpu_s(self.proc.pid)

    def stop(self) -> None:
        """SIGTERM (a clean stop: commits what it holds, says offline), SIGKILL after 30 s; then its session goes."""
        stop_group(self.proc)
        self._log.close()
        forget_session(self.broker_url, self.client_id)


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to a child's process group (a clean stop), SIGKILL when it is still there after 30 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def forget_session(broker_url: str, client_id: str) -> None:
    """Remove ``client_id``'s persistent session (and its shared-subscription membership) and its retained state.

    A stopped worker's session otherwise stays in its share group, and mosquitto keeps dealing it messages.
    """
    import paho.mqtt.client as paho
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    port = int(broker_url.rsplit(":", 1)[1])
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 0
    client.connect("127.0.0.1", port, clean_start=True, properties=props)
    client.loop_start()
    client.publish(f"edgemed-consumer/dashboard/{client_id}", b"", qos=1, retain=True).wait_for_publish(5)
    client.disconnect()
    client.loop_stop()


def batch_stream(devices: int, results: int, batch: int) -> list[tuple[str, bytes, int]]:
    """``results`` results of ``devices`` devices in ``edgemed.batch/1`` messages of ``batch`` each.

    Returns:
        ``(topic, payload, results in it)`` per message, the devices taking turns; device ``k``'s ``j``-th message
        holds its seqs ``j*batch .. j*batch + batch - 1``.
    """
    from edgemed.envelope import EnvelopeContext, build_result
    from edgemed.types import Frame, Prediction, QualityReport, TriageResult

    per_device = results // devices
    site = "bench"
    contexts = [
        EnvelopeContext(
            device_id=f"dev-{k:03d}",
            site=site,
            model={"name": "breast_cnn", "version": "1.0.0", "sha256": "0" * 64, "target": "int8"},
            preprocess_sha256="1" * 64,
            backend="ai_edge_litert",
            delegate="cpu",
            degraded=False,
            stream=secrets.token_hex(8),
        )
        for k in range(devices)
    ]
    out = []
    now = time.time()
    for j in range(per_device // batch):
        for ctx in contexts:
            elements = []
            for seq in range(j * batch, (j + 1) * batch):
                malignant = seq % 7 == 0
                p = (0.2, 0.8) if malignant else (0.9, 0.1)
                elements.append(
                    build_result(
                        ctx,
                        frame=Frame(index=seq, source_kind="folder"),
                        seq=seq,
                        created_at=now,
                        clock_synced=True,
                        session_id=None,
                        quality=QualityReport(True, 120.0, 0.5, 0.001),
                        prediction=Prediction(("normal_benign", "malignant"), p),
                        triage=TriageResult("urgent" if malignant else "routine", f"malignant probability {p[1]:.2f}"),
                        latency_ms={"preprocess": 0.3, "inference": 4.2, "total": 5.1},
                    )
                )
            body = {"schema": "edgemed.batch/1", "site": site, "device_id": ctx.device_id, "results": elements}
            payload = json.dumps(body, separators=(",", ":")).encode()
            out.append((f"edgemed/{site}/{ctx.device_id}/batches", payload, batch))
    return out


class Broker(Mosquitto):
    """mosquitto with its defaults (in-flight 20, queue 1,000 messages per client, no persistence) on 127.0.0.1."""

    def __init__(self) -> None:
        super().__init__(defaults=True)
