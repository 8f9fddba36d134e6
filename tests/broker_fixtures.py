"""Real-mosquitto fixtures: brokers on free 127.0.0.1 ports, started/stopped by PID, and a subscriber.

Loaded by the suite's conftest (``pytest_plugins = ["broker_fixtures"]``). Every wait is bounded. Nothing here
talks to anything but the brokers it starts on the loopback interface.

* ``mosquitto_factory`` builds ``Mosquitto`` instances (plain, persistent, password file, TLS) and kills
  whatever is still running at teardown. ``defaults=True`` leaves every setting that decides what the broker keeps
  at mosquitto's own default, as users run it: ``max_queued_messages`` 1000, ``max_inflight_messages`` 20,
  ``autosave_interval`` 1800 s (with ``persistence``), persistent sessions that never expire.
* ``broker``: a CONFIGURED broker, not a default one: a plain listener with persistence, a 1 s autosave and no
  queue limit (``max_queued_messages 0``). Tests that need mosquitto as users run it ask for ``defaults=True``
  (``default_broker``); a test that needs the configured limits to hold says so (see test_delivery_faults.py).
* ``default_broker``: mosquitto with its defaults and persistence on (``persistence_location`` in the test's folder).
* ``pki``: a CA, a server certificate for 127.0.0.1/localhost, a client certificate, and an unrelated CA,
  made with the ``openssl`` command.
* ``Subscriber``: an independent paho client with a persistent session and a fixed client id that counts the
  unique ``result_id`` and ``seq`` values it receives.
* ``Device``: an independent paho publisher standing in for ``edgemed run`` on the wire (device ``us-01`` of site
  ``clinic-a``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Pki:
    """Files made by ``make_pki``."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca_cert: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(folder: Path) -> Pki:
    """Create a throw-away CA with a server certificate (SAN 127.0.0.1, localhost) and a client certificate.

    Args:
        folder: where the PEM files go.

    Returns:
        The paths.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for ca in ("ca", "otherca"):
        _openssl(
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{ca}.key",
            "-out",
            f"{ca}.crt",
            "-days",
            "2",
            "-subj",
            f"/CN=edgemed test {ca}",
            cwd=folder,
        )
    ext = folder / "server.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    for name, extfile in (("server", "server.ext"), ("client", None)):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN=edgemed test {name}",
            cwd=folder,
        )
        args = [
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.crt",
            "-days",
            "2",
        ]
        if extfile:
            args += ["-extfile", extfile]
        _openssl(*args, cwd=folder)
    return Pki(
        folder / "ca.crt",
        folder / "server.crt",
        folder / "server.key",
        folder / "client.crt",
        folder / "client.key",
        folder / "otherca.crt",
    )


class Mosquitto:
    """One mosquitto process on a fixed 127.0.0.1 port, with its own config, log and persistence folder."""

    def __init__(
        self,
        folder: Path,
        *,
        port: int | None = None,
        persistence: bool = True,
        autosave_s: int = 1,
        users: dict[str, str] | None = None,
        pki: Pki | None = None,
        require_client_cert: bool = False,
        acl: str | None = None,
        defaults: bool = False,
    ) -> None:
        """Args:
        folder: config, log and persistence file go here (a restart on the same folder reads the same file).
        port: a fixed port (a restart keeps it); a free one when omitted.
        persistence: ``persistence true`` with ``persistence_location`` in ``folder``.
        autosave_s: ``autosave_interval`` when persistence is on (ignored with ``defaults``: 1800 s).
        users, pki, require_client_cert, acl: password file, TLS listener, client certificates, ACL file.
        defaults: mosquitto's own limits (queue 1000, in-flight 20, autosave 1800 s, sessions never expire)
            instead of the suite's configured ones (no queue limit, 1 s autosave, sessions expire after 1 h).
        """
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = folder / "mosquitto.log"
        lines = []
        if os.geteuid() == 0:
            # mosquitto drops root to user "mosquitto", which could not read our files; stay root in tests.
            lines.append("user root")
        lines += [
            f"listener {self.port} 127.0.0.1",
            f"log_dest file {self.log_path}",
            "log_type all",  # logging decides nothing about delivery; the fault tests count deliveries in it
        ]
        if not defaults:
            lines += ["max_queued_messages 0", "max_inflight_messages 20", "persistent_client_expiration 1h"]
        if persistence:
            lines += ["persistence true", f"persistence_location {folder}/"]
            if not defaults:
                lines.append(f"autosave_interval {autosave_s}")
        if users:
            pwfile = folder / "passwd"
            pwfile.write_text("")
            for user, password in users.items():
                subprocess.run(
                    [MOSQUITTO_PASSWD, "-b", str(pwfile), user, password],
                    check=True,
                    capture_output=True,
                    timeout=30,
                )
            lines += ["allow_anonymous false", f"password_file {pwfile}"]
        else:
            lines.append("allow_anonymous true")
        if acl is not None:
            aclfile = folder / "acl"
            aclfile.write_text(acl)
            lines.append(f"acl_file {aclfile}")
        if pki:
            lines += [
                f"cafile {pki.ca_cert}",
                f"certfile {pki.server_cert}",
                f"keyfile {pki.server_key}",
                f"require_certificate {'true' if require_client_cert else 'false'}",
            ]
        self.conf = folder / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.tls = pki is not None
        self.persistence = persistence
        self.defaults = defaults

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout_s: float = 10.0) -> Mosquitto:
        """Start and wait until the port accepts connections."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"mosquitto exited at start ({self.proc.returncode}): {err}\n{self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on port {self.port} within {timeout_s} s\n{self.log_tail()}")

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (mosquitto saves its persistence file) and wait."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def kill(self) -> None:
        """SIGKILL: no chance to save anything since the last autosave."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(5)

    def restart(self, down_s: float = 0.0, timeout_s: float = 10.0) -> None:
        """SIGKILL, stay down ``down_s`` seconds, start again on the same port with the same config and
        persistence file (what it holds is what the last save wrote: with the defaults, nothing of the last
        30 minutes unless ``save_now`` ran)."""
        self.kill()
        time.sleep(down_s)
        self.start(timeout_s)

    def save_now(self, timeout_s: float = 10.0) -> None:
        """Make mosquitto write its persistence file now (SIGUSR1) and wait until it says it did.

        Stands for the last periodic autosave before a crash: with the default 1800 s interval a broker that has
        been up for a while saved its sessions and retained messages at most half an hour ago.

        Raises:
            RuntimeError: persistence is off, or no save was logged within ``timeout_s``.
        """
        if not self.persistence:
            raise RuntimeError("save_now needs a broker with persistence on")
        before = self._saves()
        os.kill(self.pid, signal.SIGUSR1)
        self._wait_for_save(before, timeout_s)

    def log_count(self, text: str) -> int:
        """How many times ``text`` occurs in the broker's log (over every start: the log is appended to)."""
        try:
            return self.log_path.read_text(errors="replace").count(text)
        except OSError:
            return 0

    def _saves(self) -> int:
        return self.log_count("Saving in-memory database")

    def _wait_for_save(self, before: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self._saves() <= before:
            if time.monotonic() > deadline:
                raise RuntimeError(f"mosquitto did not save within {timeout_s} s\n{self.log_tail()}")
            time.sleep(0.05)

    def wait_for_autosave(self, timeout_s: float = 10.0) -> None:
        """Wait until mosquitto writes its persistence file once more (sessions then survive a SIGKILL)."""
        self._wait_for_save(self._saves(), timeout_s)

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[type[Mosquitto]]:
    """Make brokers with ``mosquitto_factory(folder, **options)``; all are killed at teardown."""
    made: list[Mosquitto] = []

    class _Tracked(Mosquitto):
        def __init__(self, folder: Path | None = None, **kw: object) -> None:
            super().__init__(folder or tmp_path / f"broker{len(made)}", **kw)  # type: ignore[arg-type]
            made.append(self)

    yield _Tracked
    for b in made:
        b.kill()


@pytest.fixture
def broker(mosquitto_factory: type[Mosquitto]) -> Mosquitto:
    """A running plain broker with persistence, a 1 s autosave and no queue limit (configured, not the defaults)."""
    return mosquitto_factory().start()


@pytest.fixture
def default_broker(mosquitto_factory: type[Mosquitto]) -> Mosquitto:
    """A running plain broker with mosquitto's defaults and persistence on (default autosave, 1800 s)."""
    return mosquitto_factory(defaults=True).start()


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A throw-away CA, server and client certificates, and an unrelated CA."""
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is needed to make test certificates (apt-get install openssl)")
    return make_pki(tmp_path_factory.mktemp("pki"))


class Amqtt:
    """A pure-Python MQTT 3.1.1-only broker (amqtt) in a background thread: the protocol-fallback test's peer."""

    def __init__(self) -> None:
        import asyncio

        self.port = free_port()
        self._asyncio = asyncio
        self._loop = asyncio.new_event_loop()
        self._stopped: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="amqtt", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self._thread.is_alive():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"amqtt did not listen on port {self.port} (see the thread's traceback above)")

    def _run(self) -> None:
        from amqtt.broker import Broker

        async def main() -> None:
            self._stopped = self._asyncio.Event()
            config = {
                "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}},
                "auth": {"allow-anonymous": True, "plugins": ["auth_anonymous"]},
                "topic-check": {"enabled": False},
            }
            broker = Broker(config)
            await broker.start()
            await self._stopped.wait()
            await broker.shutdown()

        self._loop.run_until_complete(main())  # a start-up failure surfaces as the constructor's timeout

    def stop(self) -> None:
        if self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(10)


@pytest.fixture
def amqtt_broker() -> Iterator[Amqtt]:
    """A running MQTT 3.1.1-only broker on a free loopback port."""
    broker = Amqtt()
    yield broker
    broker.stop()


class Subscriber:
    """An independent consumer: fixed client id, persistent session, QoS 1, counts unique results."""

    def __init__(
        self,
        port: int,
        topic: str,
        *,
        client_id: str | None = None,
        tls_ca: Path | None = None,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.topic = topic
        self.result_ids: set[str] = set()
        self.seqs: set[int] = set()
        self.messages = 0
        self.retained: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"sub-{uuid.uuid4().hex[:8]}",
            protocol=paho.MQTTv311,
            clean_session=False,
        )
        self.client.reconnect_delay_set(0.1, 1)
        if tls_ca:
            self.client.tls_set(ca_certs=str(tls_ca))
        if username:
            self.client.username_pw_set(username, password)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.connect_async("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            self.close()
            raise RuntimeError(f"subscriber could not subscribe on port {port}")

    def _on_connect(self, client: object, userdata: object, flags: object, reason: object, props: object) -> None:
        self.client.subscribe(self.topic, qos=1)

    def _on_message(self, client: object, userdata: object, msg: object) -> None:
        payload = msg.payload  # type: ignore[attr-defined]
        with self._lock:
            self.messages += 1
            if msg.retain:  # type: ignore[attr-defined]
                self.retained[msg.topic] = payload  # type: ignore[attr-defined]
            try:
                body = json.loads(payload)
            except ValueError:
                return
            if isinstance(body, dict) and "result_id" in body:
                self.result_ids.add(body["result_id"])
                if "seq" in body:
                    self.seqs.add(int(body["seq"]))

    def unique(self) -> int:
        with self._lock:
            return len(self.result_ids)

    def wait_for(self, n: int, timeout_s: float) -> int:
        """Wait until ``n`` unique results arrived or the timeout passed; returns the count."""
        deadline = time.monotonic() + timeout_s
        while self.unique() < n and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.unique()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Device:
    """A paho publisher standing in for `edgemed run` on the wire (QoS 1, persistent session)."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as paho

        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id="edgemed-clinic-a-us-01",
            protocol=paho.MQTTv311,
            clean_session=False,
        )
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def send(self, kind: str, payload: bytes, retain: bool = False) -> None:
        info = self.client.publish(f"edgemed/clinic-a/us-01/{kind}", payload, qos=1, retain=retain)
        info.wait_for_publish(5)  # connected here, so this returns once the broker sent its PUBACK
        assert info.is_published()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
