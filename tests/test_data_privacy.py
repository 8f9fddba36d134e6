"""The data directory is private (folder 0700, every file 0600), and the nurse's printout writes file names only
to a terminal unless the profile says otherwise (under systemd stdout is the journal)."""

from __future__ import annotations

import os
import pty
import select
import stat
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from edgemed.outbox import Outbox

DATA = Path(__file__).resolve().parent.parent / "data"


def _scans(folder: Path, n: int = 4) -> Path:
    folder.mkdir()
    for i, image in enumerate(np.load(DATA / "breastmnist_28.npz")["test_images"][:n]):
        cv2.imwrite(str(folder / f"MRN12345_img{i}.png"), image)
    return folder


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _edgemed(*args: str) -> list[str]:
    # umask 022, as on a stock system: files that are not created private on purpose end up 0644.
    return [
        sys.executable,
        "-c",
        "import os, sys; os.umask(0o022); from edgemed.cli import main; sys.exit(main())",
        *args,
    ]


def _run(
    model: Path, source: Path, device: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    cmd = _edgemed(
        "run", "--model", str(model), "--source", str(source), "--device-id", "d1", "--data-dir", str(device), *extra
    )
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


def test_every_file_of_the_data_directory_is_created_0600_in_a_0700_folder(int8_model: Path, tmp_path: Path) -> None:
    device = tmp_path / "device"
    proc = _run(int8_model, _scans(tmp_path / "scans"), device, "--quiet")
    assert proc.returncode == 10, proc.stderr
    assert _mode(device) == 0o700
    files = sorted(p.name for p in device.iterdir())
    assert {"outbox.sqlite3", "results.jsonl", "device.secret", ".lock"} <= set(files)
    for path in device.iterdir():
        assert _mode(path) == 0o600, (path.name, oct(_mode(path)))


def test_sqlite_side_files_are_private_while_the_outbox_is_open(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        with Outbox(tmp_path / "d" / "outbox.sqlite3") as ob:
            ob.put("r0", "t", b"{}")
            ob.flush()
            side = [tmp_path / "d" / f"outbox.sqlite3{s}" for s in ("", "-wal", "-shm")]
            assert all(p.exists() and _mode(p) == 0o600 for p in side), [oct(_mode(p)) for p in side]
        assert _mode(tmp_path / "d") == 0o700
    finally:
        os.umask(old)


def test_files_left_readable_by_an_older_version_are_made_private(int8_model: Path, tmp_path: Path) -> None:
    device = tmp_path / "device"
    device.mkdir(mode=0o700)
    for name in ("results.jsonl", ".lock"):
        (device / name).write_text("")
        (device / name).chmod(0o644)
    with Outbox(device / "outbox.sqlite3"):
        pass
    (device / "outbox.sqlite3").chmod(0o644)
    proc = _run(int8_model, _scans(tmp_path / "scans"), device, "--quiet")
    assert proc.returncode == 10, proc.stderr
    for path in device.iterdir():
        assert _mode(path) == 0o600, (path.name, oct(_mode(path)))


def _profile(tmp_path: Path, model: Path, source: Path, names: str | None) -> Path:
    privacy = f"privacy: {{print_source_names: {names}}}\n" if names else ""
    path = tmp_path / f"p-{names}.yaml"
    path.write_text(
        f"profile: t\ndevice: {{id: d1, data_dir: '{tmp_path / 'device'}'}}\nmodel: {{path: '{model}'}}\n"
        f"source: {{uri: '{source}'}}\n{privacy}"
    )
    return path


def _on_a_terminal(cmd: list[str]) -> str:
    """Run ``cmd`` with stdout on a pseudo-terminal, as a nurse at the device sees it; returns what it printed."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, stdout=slave, stderr=subprocess.DEVNULL)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the child closed its end
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    proc.wait(30)
    os.close(master)
    return out.decode(errors="replace")


def test_the_printout_shows_file_names_only_on_a_terminal_unless_the_profile_says(
    int8_model: Path, tmp_path: Path
) -> None:
    scans = _scans(tmp_path / "scans")
    auto = _profile(tmp_path, int8_model, scans, None)
    # As a systemd service: stdout is the journal (not a terminal), and systemd sets these.
    env = {**os.environ, "INVOCATION_ID": "0" * 32, "JOURNAL_STREAM": "8:12345"}
    service = subprocess.run(
        _edgemed("run", "--profile", str(auto)), capture_output=True, text=True, timeout=120, env=env
    )
    assert service.returncode == 10, service.stderr
    lines = service.stdout.splitlines()
    assert len(lines) == 4 and all(line.startswith("#") for line in lines)
    assert "MRN12345" not in service.stdout + service.stderr
    # A person at the device's terminal sees which file each line is about.
    terminal = _on_a_terminal(_edgemed("run", "--profile", str(auto)))
    assert terminal.count("MRN12345_img") == 4, terminal
    # The profile decides explicitly, either way.
    always = subprocess.run(
        _edgemed("run", "--profile", str(_profile(tmp_path, int8_model, scans, "always"))),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert always.stdout.count("MRN12345_img") == 4
    never = _on_a_terminal(_edgemed("run", "--profile", str(_profile(tmp_path, int8_model, scans, "never"))))
    assert "MRN12345" not in never and never.count("#") >= 4
