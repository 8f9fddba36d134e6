"""A real PostgreSQL 15 server for the central side's tests: Debian's binaries, a temporary cluster, a loopback port.

Loaded by the suite's conftest (``pytest_plugins``). PostgreSQL refuses to run as root, so when the tests run as
root (CI) the cluster belongs to the unprivileged ``postgres`` user and its programs run through ``runuser``.
Settings are PostgreSQL's defaults (``fsync``, ``synchronous_commit`` on: what users run) except where the test
environment needs otherwise: ``listen_addresses`` 127.0.0.1, a free port, the socket in the cluster's own folder.
Clients log in with a password (SCRAM-SHA-256), as a dashboard at a hospital would.

* ``postgres_server`` (session): the running server; ``PgServer.url(dbname)``.
* ``pg_url`` (function): a fresh, empty database for one test (``postgresql://edgemed:...@127.0.0.1:PORT/t_...``),
  dropped afterwards.

Every wait is bounded; the server is stopped (fast shutdown, then SIGKILL) at the end of the session.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from broker_fixtures import free_port

PG_BIN = Path(os.environ.get("EDGEMED_PG_BIN", "/usr/lib/postgresql/15/bin"))
PG_USER = "edgemed"
PG_PASSWORD = "edgemed-test-only"
_START_S = 60.0  # a cold start on a loaded 2-core machine


@dataclass
class PgServer:
    """A running test cluster."""

    port: int
    folder: Path
    process: subprocess.Popen[bytes]

    def url(self, dbname: str = "postgres") -> str:
        """A libpq URL (``postgresql://``) for ``dbname`` with the test user's password."""
        return f"postgresql://{PG_USER}:{PG_PASSWORD}@127.0.0.1:{self.port}/{dbname}"

    def execute(self, sql: str) -> None:
        """Run one statement on the ``postgres`` database, outside a transaction (CREATE/DROP DATABASE)."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql)  # type: ignore[arg-type]


def _as_owner(owner: str | None, argv: list[str]) -> list[str]:
    return ["runuser", "-u", owner, "--", *argv] if owner else argv


def _start(folder: Path) -> PgServer:
    if not (PG_BIN / "initdb").exists():
        pytest.fail(
            f"PostgreSQL 15 is not installed ({PG_BIN}/initdb is missing): sudo apt-get install -y postgresql "
            "(scripts/test installs it when it runs as root)"
        )
    owner = "postgres" if os.geteuid() == 0 else None
    data = folder / "data"
    folder.mkdir(parents=True, exist_ok=True)
    pwfile = folder / "pwfile"
    pwfile.write_text(PG_PASSWORD + "\n")
    if owner:
        entry = pwd.getpwnam(owner)
        for path in (folder, pwfile):
            os.chown(path, entry.pw_uid, entry.pw_gid)
        # The test's temporary folders above it must let the postgres user through (not list, only traverse).
        parent = folder.parent
        while parent != parent.parent:
            mode = parent.stat().st_mode
            if not mode & 0o001:
                os.chmod(parent, mode | 0o001)
            parent = parent.parent
    initdb = [
        str(PG_BIN / "initdb"),
        "-D",
        str(data),
        "-U",
        PG_USER,
        "--pwfile",
        str(pwfile),
        "--auth-host=scram-sha-256",
        "--auth-local=scram-sha-256",
        "--no-sync",  # initdb's own flush of the new cluster only; the running server keeps fsync on
        "-E",
        "UTF8",
        "--locale=C",
    ]
    subprocess.run(_as_owner(owner, initdb), check=True, capture_output=True, timeout=120)
    port = free_port()
    log = open(folder / "postgres.log", "ab")  # noqa: SIM115 - closed with the process, at the session's end
    argv = [
        str(PG_BIN / "postgres"),
        "-D",
        str(data),
        "-c",
        "listen_addresses=127.0.0.1",
        "-c",
        f"port={port}",
        "-c",
        f"unix_socket_directories={folder}",
    ]
    process = subprocess.Popen(_as_owner(owner, argv), stdout=log, stderr=subprocess.STDOUT)
    server = PgServer(port, folder, process)
    deadline = time.monotonic() + _START_S
    while True:
        ready = subprocess.run(
            [str(PG_BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(port), "-t", "2"], capture_output=True
        )
        if ready.returncode == 0:
            return server
        if process.poll() is not None or time.monotonic() > deadline:
            _stop(server)
            tail = (folder / "postgres.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"PostgreSQL did not start on 127.0.0.1:{port}:\n{tail}")
        time.sleep(0.2)


def _postmaster_pid(server: PgServer) -> int | None:
    try:
        return int((server.folder / "data" / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _stop(server: PgServer) -> None:
    if server.process.poll() is not None:
        return
    # The postmaster itself, not runuser (which does not pass SIGINT on): SIGINT is PostgreSQL's fast shutdown;
    # runuser exits when its child does.
    pid = _postmaster_pid(server)
    for sig in (signal.SIGINT, signal.SIGKILL):
        target = pid if pid is not None else server.process.pid
        with contextlib.suppress(ProcessLookupError):  # it ended on its own meanwhile
            os.kill(target, sig)
        try:
            server.process.wait(timeout=20)
            return
        except subprocess.TimeoutExpired:
            continue
    server.process.kill()
    server.process.wait(timeout=10)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PgServer]:
    """One PostgreSQL 15 cluster for the whole session (started on first use)."""
    # A folder of its own, not pytest's basetemp: pytest keeps only its three newest session folders, and another
    # session on the machine (a second checkout's tests) would delete this one's data directory under the server.
    folder = Path(tempfile.mkdtemp(prefix="edgemed-test-pg-"))
    server = _start(folder / "cluster")
    try:
        yield server
    finally:
        _stop(server)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def pg_url(postgres_server: PgServer) -> Iterator[str]:
    """A fresh database for one test; dropped (with whatever still holds it open) afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    postgres_server.execute(f'CREATE DATABASE "{name}"')
    try:
        yield postgres_server.url(name)
    finally:
        postgres_server.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
