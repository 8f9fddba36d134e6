"""The bundle's install.sh and systemd unit: template files rendered strictly, checked by the real tools.

What runs where:
- ``bash -n`` and ``sh -n`` (dash on Debian, the shell install.sh is run with) check the script everywhere;
  ``shellcheck`` also runs where it is installed (it is not on the CI image).
- The unit is parsed everywhere with configparser (strict: no duplicate sections or keys) and its keys are
  checked against what systemd needs and accepts; ``systemd-analyze verify`` also runs it where that command
  exists (it does on the CI image), and is shown to reject a broken unit first, so its silence means something.
"""

from __future__ import annotations

import ast
import configparser
import fnmatch
import shutil
import subprocess
from pathlib import Path

import pytest

from edgemed.bundle.build import _install_script, _unit
from edgemed.bundle.render import render

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "edgemed" / "bundle" / "templates"
NAME = "edgemed-probe-test-us-probe-07-breast-v1-20250101-120000"


def test_render_refuses_a_marker_without_value_and_a_value_without_marker() -> None:
    assert render("a=@A@ b=@B@ @LATER@", {"A": "1", "B": "2"}, filled_on_device=frozenset({"LATER"})) == (
        "a=1 b=2 @LATER@"
    )
    # Inserted text is not scanned again: a value holding a marker stays as given.
    assert render("@A@", {"A": "@B@"}) == "@B@"
    with pytest.raises(ValueError, match=r"no value for \['B'\]"):
        render("@A@ @B@", {"A": "1"})
    with pytest.raises(ValueError, match=r"no marker for \['C'\]"):
        render("@A@", {"A": "1", "C": "3"})
    # Shell's own @ forms ("$@", an e-mail address) are not markers.
    shell = 'for a in "$@"; do echo root@example.org; done'
    assert render(shell, {}) == shell


def test_install_script_passes_the_shell_syntax_checks(tmp_path: Path) -> None:
    script = tmp_path / "install.sh"
    script.write_text(_install_script(NAME, "/opt/edgemed"))
    text = script.read_text()
    assert f'NAME="{NAME}"' in text and 'PREFIX="${EDGEMED_PREFIX:-/opt/edgemed}"' in text
    # Only the sed line that fills the unit names @PREFIX@; no other marker is left in a script run as root.
    leftover = [line for line in text.splitlines() if "@" in line.replace('"$@"', "")]
    assert leftover == [
        '  sed "s|@PREFIX@|$PREFIX|g" "$PREFIX/current/edgemed.service" >/etc/systemd/system/edgemed.service'
    ]
    for shell in ("bash", "sh"):
        proc = subprocess.run([shell, "-n", str(script)], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, (shell, proc.stderr)
    broken = tmp_path / "broken.sh"
    broken.write_text(text.replace("esac\ndone", "done", 1))  # the same check on a broken copy must fail
    assert subprocess.run(["sh", "-n", str(broken)], capture_output=True, timeout=30).returncode != 0
    if shutil.which("shellcheck"):
        proc = subprocess.run(
            ["shellcheck", "--shell=sh", "--severity=error", str(script)], capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stdout


def _installed_unit(tmp_path: Path, profile: str = "probe-test", drain_s: float = 30.0) -> tuple[Path, Path]:
    """The unit as install.sh writes it: @PREFIX@ filled in, with the executable it names present."""
    prefix = tmp_path / "opt-edgemed"
    (prefix / "venv" / "bin").mkdir(parents=True)
    exe = prefix / "venv" / "bin" / "edgemed"
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    unit = tmp_path / "edgemed.service"
    unit.write_text(_unit(profile, drain_s).replace("@PREFIX@", str(prefix)))
    return unit, prefix


def test_unit_parses_and_holds_the_keys_systemd_needs(tmp_path: Path) -> None:
    unit, prefix = _installed_unit(tmp_path, profile="ward 5% east", drain_s=12.5)
    parser = configparser.ConfigParser(strict=True, interpolation=None, delimiters=("=",), comment_prefixes=("#",))
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(unit.read_text())
    assert parser.sections() == ["Unit", "Service", "Install"]
    service = parser["Service"]
    assert service["Type"] == "simple" and service["Restart"] == "on-failure"
    exec_start = service["ExecStart"].split()
    assert exec_start[0] == str(prefix / "venv" / "bin" / "edgemed") and Path(exec_start[0]).is_absolute()
    assert exec_start[1:] == ["run", "--profile", str(prefix / "current" / "profile.yaml")]
    assert service["TimeoutStopSec"] == "27" and service["RestartSec"].isdigit()
    assert service["RestartPreventExitStatus"] == "2 3 5 6"  # config, model, broker refusal, accelerator refused
    assert service["User"] == service["Group"] == "edgemed" and service["StateDirectoryMode"] == "0700"
    assert parser["Install"]["WantedBy"] == "multi-user.target"
    # systemd expands %-specifiers in Description: the profile's own % is written %%.
    assert parser["Unit"]["Description"] == "edgemed point-of-care inference (ward 5%% east)"
    assert "@" not in unit.read_text()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    unit, _ = _installed_unit(tmp_path)
    broken = tmp_path / "broken.service"
    broken.write_text(unit.read_text().replace("Restart=on-failure", "Restart=sometimes"))

    def verify(path: Path) -> list[str]:
        proc = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
        # It exits 0 even for keys it ignores as invalid: what it says about the file is the verdict.
        return [line for line in (proc.stdout + proc.stderr).splitlines() if path.name in line or proc.returncode]

    assert any("sometimes" in line for line in verify(broken))  # "Failed to parse service restart specifier"
    assert verify(unit) == []


def test_every_template_ships_as_package_data() -> None:
    # tomllib is Python 3.11+ and edgemed supports 3.10: read the list of pyproject.toml by hand.
    section = (ROOT / "pyproject.toml").read_text().split("[tool.setuptools.package-data]\n", 1)[1]
    listed = section.split("edgemed = ", 1)[1]
    patterns = ast.literal_eval(listed[: listed.index("]") + 1])
    templates = sorted(p.relative_to(ROOT / "edgemed").as_posix() for p in TEMPLATES.iterdir())
    assert templates == ["bundle/templates/edgemed.service.in", "bundle/templates/install.sh.in"]
    web = ROOT / "edgemed" / "dashboard" / "web"
    found = [p for d in ("templates", "static") for p in (web / d).iterdir()]
    pages = sorted(p.relative_to(ROOT / "edgemed").as_posix() for p in found)
    assert any(p.endswith(".html") for p in pages) and any(p.endswith(".js") for p in pages)
    shipped = templates + pages
    assert all(any(fnmatch.fnmatch(t, pattern) for pattern in patterns) for t in shipped), (shipped, patterns)
