"""A full disk ends a run with exit 7 and the documented one-line message, also on a restart while the disk is
still full and on a first run into a full disk; nothing committed before is lost.

The disk is a real full file system: a small tmpfs mounted in a private user and mount namespace
(``unshare -rm``), so nothing outside this test sees it. Where unprivileged namespaces are not allowed, the same
scenario runs with the file-size limit (``ulimit -f``), under which no file can grow: the kernel refuses the
writes as a full disk would (EFBIG instead of ENOSPC).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

DATA = Path(__file__).resolve().parent.parent / "data"
ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r"""
set -u
OUT=$1; MODE=$2; MNT=$3; MODEL=$4; SRC=$5
run() {  # run NAME LIMIT ARGS...: edgemed's output and exit code kept in $OUT (through a pipe: no size limit)
    name=$1; limit=$2; shift 2
    ( if [ "$limit" != none ]; then ulimit -f "$limit"; fi
      exec "$PY" -m edgemed run --model "$MODEL" --source "$SRC" --device-id d1 --quiet "$@" ) 2>&1 \
        | cat >"$OUT/$name.err"
    echo "${PIPESTATUS[0]}" >"$OUT/$name.rc"
}
count() {  # results in the outbox
    "$PY" -c "import sqlite3, sys; db = sqlite3.connect(sys.argv[1])
print(db.execute('SELECT COUNT(*) FROM outbox').fetchone()[0])" "$1"
}
if [ "$MODE" = tmpfs ]; then
    mount -t tmpfs -o size=900k tmpfs "$MNT" || exit 99
    fill() { dd if=/dev/zero of="$MNT/fill" bs=1k 2>/dev/null; true; }
    room() { rm -f "$MNT/fill"; mount -o remount,size=8m "$MNT"; }
    FIRST=none; FULL=none
else
    fill() { true; }
    room() { true; }
    FIRST=400; FULL=0   # KiB a file may grow to
fi
run first "$FIRST" --data-dir "$MNT/dd" --loop 200
count "$MNT/dd/outbox.sqlite3" >"$OUT/first.count"
fill
run restart "$FULL" --data-dir "$MNT/dd"
run fresh "$FULL" --data-dir "$MNT/fresh"
ls -a "$MNT/fresh" >"$OUT/fresh.ls" 2>&1
stat -c '%n %s' "$MNT"/fresh/device.secret* >"$OUT/fresh.secret" 2>/dev/null
room
run after none --data-dir "$MNT/dd"
count "$MNT/dd/outbox.sqlite3" >"$OUT/after.count"
"""


def _namespaces_work() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.fixture(scope="module")
def full_disk(int8_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("diskfull")
    src = base / "scans"
    src.mkdir()
    for i, image in enumerate(np.load(DATA / "breastmnist_28.npz")["test_images"][:50]):
        cv2.imwrite(str(src / f"img{i}.png"), image)
    out, mnt = base / "out", base / "mnt"
    out.mkdir()
    mnt.mkdir()
    script = base / "scenario.sh"
    script.write_text(SCRIPT)
    mode = "tmpfs" if _namespaces_work() else "rlimit"
    cmd = ["bash", str(script), str(out), mode, str(mnt), str(int8_model), str(src)]
    if mode == "tmpfs":
        cmd = ["unshare", "-rm", *cmd]
    env = {"PY": sys.executable, "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    report = {p.name: p.read_text() for p in out.iterdir()}
    report["mode"] = mode
    return report


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def test_a_run_that_fills_the_disk_exits_7(full_disk: dict[str, str]) -> None:
    assert full_disk["first.rc"].strip() == "7", full_disk["first.err"]
    assert "Traceback" not in full_disk["first.err"]
    assert _last_line(full_disk["first.err"]).startswith("edgemed: error: cannot write the outbox")
    assert int(full_disk["first.count"]) > 0  # what was committed before the disk filled is kept


def test_a_restart_on_a_still_full_disk_exits_7_with_the_documented_message(full_disk: dict[str, str]) -> None:
    err = full_disk["restart.err"]
    assert full_disk["restart.rc"].strip() == "7", err
    assert "Traceback" not in err
    last = _last_line(err)
    assert last.startswith("edgemed: error: cannot ") and "free disk space" in last


def test_a_first_run_into_a_full_disk_exits_7_and_leaves_no_broken_secret(full_disk: dict[str, str]) -> None:
    err = full_disk["fresh.err"]
    assert full_disk["fresh.rc"].strip() == "7", err
    assert "Traceback" not in err and "free disk space" in _last_line(err)
    # No empty device.secret that the next run would call damaged: either none, or a whole 32-byte key.
    assert full_disk["fresh.secret"].strip() == "" or full_disk["fresh.secret"].split()[-1] == "32"


def test_with_room_again_the_next_run_keeps_everything_committed_before(full_disk: dict[str, str]) -> None:
    assert full_disk["after.rc"].strip() == "10", full_disk["after.err"]  # offline: all pending on disk
    assert int(full_disk["after.count"]) == int(full_disk["first.count"]) + 50
