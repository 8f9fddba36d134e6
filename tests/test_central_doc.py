"""docs/central.md's systemd units are real: systemd-analyze accepts them, and edgemed accepts their command lines.

The unit files and the environment file are taken out of the document (fenced blocks whose first line names the
file), so the document cannot drift from what is checked. ``systemd-analyze verify`` runs where it is installed (it
is on the CI image) and is first shown to reject a broken copy, so its silence means something. The ``ExecStart``
lines are expanded the way systemd would (``${VAR}`` from the environment file, ``%i``, ``%l``) and parsed by
edgemed's own command-line parser: an option renamed in the code fails here.
"""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from edgemed.cli import make_parser

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "central.md"
_BLOCK = re.compile(r"```ini\n# (/etc/\S+)[^\n]*\n(.*?)```", re.S)


def _files() -> dict[str, str]:
    return {Path(path).name: body for path, body in _BLOCK.findall(DOC.read_text())}


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=True, interpolation=None, delimiters=("=",), comment_prefixes=("#",))
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(_files()[name].replace("\\\n", " "))
    return parser


def _environment() -> dict[str, str]:
    lines = _files()["central.env"].splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def _exec_argv(name: str) -> list[str]:
    command = _unit(name)["Service"]["ExecStart"]
    env = _environment()
    command = re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], command)
    return shlex.split(command.replace("%i", "1").replace("%l", "central-01"))


def test_the_document_holds_the_two_units_and_the_environment_file() -> None:
    assert set(_files()) == {"central.env", "edgemed-ingest@.service", "edgemed-web.service"}
    ingest = _unit("edgemed-ingest@.service")
    assert ingest.sections() == ["Unit", "Service", "Install"]
    # Restarted 2 s after any exit and never given up on: a dead worker strands its share at the broker.
    assert (ingest["Service"]["Restart"], ingest["Service"]["RestartSec"]) == ("always", "2")
    assert ingest["Unit"]["StartLimitIntervalSec"] == "0"
    assert ingest["Service"]["User"] == "edgemed" and ingest["Service"]["KillSignal"] == "SIGTERM"


def test_the_units_command_lines_are_what_edgemed_accepts() -> None:
    ingest = _exec_argv("edgemed-ingest@.service")
    assert ingest[0] == "/opt/edgemed/venv/bin/edgemed"
    args = make_parser(ingest[1:]).parse_args(ingest[1:])
    assert (args.command, args.dashboard_action) == ("dashboard", "ingest")
    assert args.db.startswith("postgresql://") and args.group == "central" and args.client_id == "ingest-central-01-1"
    web = _exec_argv("edgemed-web.service")
    args = make_parser(web[1:]).parse_args(web[1:])
    assert (args.dashboard_action, args.host, args.port) == ("serve", "127.0.0.1", 8080)
    assert args.metrics_allow == ["127.0.0.0/8", "10.20.0.0/16"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_the_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    prefix = tmp_path / "opt-edgemed"
    (prefix / "venv" / "bin").mkdir(parents=True)
    exe = prefix / "venv" / "bin" / "edgemed"
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)

    def verify(name: str, text: str) -> list[str]:
        path = tmp_path / name
        path.write_text(text.replace("/opt/edgemed", str(prefix)))
        proc = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
        # It exits 0 even for keys it ignores as invalid: what it says about the file is the verdict.
        return [line for line in (proc.stdout + proc.stderr).splitlines() if name in line or proc.returncode]

    files = _files()
    broken = files["edgemed-web.service"].replace("Restart=always", "Restart=sometimes")
    assert any("sometimes" in line for line in verify("broken.service", broken))
    # The template is checked as the instance systemd would start (edgemed-ingest@1).
    assert verify("edgemed-ingest@1.service", files["edgemed-ingest@.service"]) == []
    assert verify("edgemed-web.service", files["edgemed-web.service"]) == []
