"""The README's "First run against your own broker", run line by line on a copy of the repository.

What a new user does after ``scripts/demo``: start mosquitto on a loopback port with the README's tiny config,
watch with ``mosquitto_sub``, start ``edgemed dashboard``, export the BreastMNIST test images with the README's
one command, then ``edgemed doctor`` and ``edgemed run`` with ``firmware_configs/first-run.yaml``. The commands
are read from the README itself, so the README cannot drift from what is tested. The test changes only what a
test must: the two port numbers (free ones instead of 1884 and 8080), ``HOME`` (a temporary folder), and the
first line (``scripts/demo``, which would install a virtual environment and train for a minute) is replaced by
the demo's own ``train`` and ``convert`` commands, with fewer epochs, into the copy's ``demo-out/model/``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from broker_fixtures import free_port
from demo_model import demo_model_fixture  # noqa: F401  # the demo_model fixture
from web_helpers import PASSWORD, login

from edgemed.identity import clock_synced

ROOT = Path(__file__).resolve().parent.parent
HEADING = "## First run against your own broker"
DEMO_STEP = "scripts/demo && . .venv/bin/activate"
LONG_RUNNING = ("mosquitto ", "mosquitto_sub ", "edgemed dashboard ")
BROKER_PORT, HTTP_PORT = "1884", "8080"
RESULTS = 156  # BreastMNIST test split

pytestmark = pytest.mark.slow


def readme_steps() -> list[str]:
    """The command lines of the section's bash block (comment lines dropped, trailing comments kept)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index(HEADING) :]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block is not None, "the first-run section has no bash block"
    return [line for line in block.group(1).splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _without_comment(line: str) -> str:
    return line.split("  #", 1)[0].strip()


def _copy_repository(dest: Path) -> None:
    """The files a fresh clone has: tracked ones and new ones not ignored, as they are in this working tree."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout.split(b"\0")
    for name in filter(None, (n.decode() for n in listed)):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def _get_status(url: str) -> int:
    with urllib.request.urlopen(url, timeout=5) as response:  # a 127.0.0.1 URL the test built
        return int(response.status)


def _db_of(command: str, home: Path) -> str:
    """The ``--db`` of an ``edgemed dashboard`` command line, as the shell expands it with ``HOME=home``."""
    words = shlex.split(command)
    db = words[words.index("--db") + 1]
    return str(home / db[2:]) if db.startswith("~/") else db


def _wait(what: str, check: object, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():  # type: ignore[operator]
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _wait_until_ready(command: str, broker_port: str, http_port: str) -> None:
    """A long-running step is ready once it serves: the broker its port, the dashboard its subscription."""
    if command.startswith("mosquitto "):
        _wait("mosquitto", lambda: socket.create_connection(("127.0.0.1", int(broker_port)), 1).close() is None)
    elif command.startswith("edgemed dashboard"):
        # Serving; its subscription is checked once someone is logged in (the API answers 401 before).
        _wait("the dashboard", lambda: _get_status(f"http://127.0.0.1:{http_port}/login") == 200)


@pytest.fixture
def background() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in reversed(procs):  # the dashboard and mosquitto_sub before the broker
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def test_the_readme_first_run_works_line_by_line(
    demo_model: Path, tmp_path: Path, background: list[subprocess.Popen[str]]
) -> None:
    steps = readme_steps()
    assert _without_comment(steps[0]) == DEMO_STEP
    clone, home = tmp_path / "edgemed", tmp_path / "home"
    home.mkdir()
    _copy_repository(clone)
    model_dir = clone / "demo-out" / "model"
    shutil.copytree(demo_model, model_dir, ignore=shutil.ignore_patterns("keras", "DONE"))
    assert (model_dir / "breastmnist_28_reference_int8.tflite").is_file()  # where first-run.yaml looks

    broker_port, http_port = str(free_port()), str(free_port())
    profile = clone / "firmware_configs" / "first-run.yaml"
    profile.write_text(profile.read_text().replace(f"127.0.0.1:{BROKER_PORT}", f"127.0.0.1:{broker_port}"))
    venv_bin = str(Path(sys.executable).parent)  # `python` and `edgemed` of this environment, as after activate
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_DATA_HOME", "PYTHONPATH")}
    env.update(HOME=str(home), PATH=f"{venv_bin}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(clone))
    assert shutil.which("edgemed", path=env["PATH"]) is not None

    outputs: dict[str, subprocess.CompletedProcess[str]] = {}
    admin = ""
    dashboard_db = next(_db_of(line, home) for line in steps if line.startswith("edgemed dashboard --broker"))
    sub_out = tmp_path / "mosquitto_sub.out"
    for line in steps[1:]:
        command = _without_comment(line).replace(BROKER_PORT, broker_port).replace(HTTP_PORT, http_port)
        if command.startswith(LONG_RUNNING):
            with sub_out.open("a") as out:  # the child keeps its own copy of the descriptor
                stdout = out if command.startswith("mosquitto_sub") else subprocess.DEVNULL
                background.append(
                    subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=clone, env=env, stdout=stdout, text=True)
                )
            _wait_until_ready(command, broker_port, http_port)
            continue
        stdin = None
        if command.startswith("edgemed dashboard users add"):
            # The first admin, as the dashboard's login page says; the password typed twice at its prompt.
            if "--password-stdin" not in command:
                command += " --password-stdin"
            stdin = PASSWORD + "\n"
            admin = shlex.split(command)[4]
        proc = subprocess.run(
            ["bash", "-c", command], cwd=clone, env=env, input=stdin, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, f"{command}\n{proc.stdout}\n{proc.stderr}"
        outputs[shlex.split(command)[1] if command.startswith("edgemed ") else command] = proc

    # doctor: every row ok; an accelerator the profile does not use is n/a, and the clock is whatever this
    # machine's is (a VM without NTP says warn).
    doctor = outputs["doctor"].stdout.splitlines()
    marks = {line[6:24].strip(): line[:4].strip() for line in doctor}
    assert marks["delegate edgetpu"] == marks["delegate gpu"] == "n/a", doctor
    expected_clock = "warn" if clock_synced() is False else "ok"
    assert marks.pop("clock") == expected_clock
    rows = {k: v for k, v in marks.items() if not k.startswith(("delegate edgetpu", "delegate gpu"))}
    assert set(rows) >= {"interpreter", "profile", "model", "source", "broker", "data dir"}
    assert set(rows.values()) == {"ok"}, doctor

    for step in ("doctor", "run"):  # nothing on stderr but edgemed's own lines (no LiteRT or OpenCV notices)
        assert all(line.startswith("edgemed") for line in outputs[step].stderr.splitlines()), outputs[step].stderr
    run = outputs["run"]
    assert f"edgemed: {RESULTS} frames" in run.stderr and "pending 0" in run.stderr
    assert len(run.stdout.splitlines()) == RESULTS  # one line per image for the person at the device
    topic = "edgemed/my-laptop/first-run-01/results"
    _wait("mosquitto_sub", lambda: sub_out.read_text().count(f"{topic} ") >= RESULTS)
    seqs = {
        json.loads(line.split(" ", 1)[1])["seq"]
        for line in sub_out.read_text().splitlines()
        if line.startswith(f"{topic} ")
    }
    assert len(seqs) == RESULTS

    base = f"http://127.0.0.1:{http_port}"
    if not admin:  # the README leaves creating the first admin to the login page's hint: do as it says
        admin = "first-admin"
        add = ["edgemed", "dashboard", "users", "add", admin, "--db", dashboard_db, "--role", "admin"]
        proc = subprocess.run(
            [*add, "--password-stdin"], env=env, input=PASSWORD + "\n", capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stderr
    with login(base, admin, PASSWORD) as http:
        assert http.get("/api/summary").json()["ingest"]["subscribed"]

        def stored() -> int:
            return sum(http.get("/api/summary").json()["counts"]["results"].values())

        _wait("the dashboard", lambda: stored() == RESULTS)
        fleet = http.get("/api/fleet").json()["devices"]
        # doctor's broker check left a retained "doctor" device there before (issue 9 item 17): only the device shows
        assert [d["device_id"] for d in fleet] == ["first-run-01"]
        home = http.get("/")
        assert home.status_code == 303 and home.headers["location"] == "/queue"
        assert ">first-run-01</a>" in http.get("/fleet").text
