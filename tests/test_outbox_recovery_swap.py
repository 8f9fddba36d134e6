"""A damaged outbox is recovered on a disk the backlog nearly filled, says how much to free when even that is
too little, and a crash at any moment of putting the recovered outbox in place is finished at the next start:
no stray write-ahead log is replayed into the new file, and no backlog is left behind in the moved file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgemed.outbox import Outbox

REPO = Path(__file__).resolve().parent.parent

_PRODUCE = """
import json, os, sys
from pathlib import Path
from edgemed.outbox import Outbox, OutboxConfig
ob = Outbox(Path(sys.argv[1]), OutboxConfig(commit_every=100, commit_interval_s=3600))
for _ in range(int(sys.argv[2])):
    seq = ob.next_seq()
    ob.put(f"r{seq}", "t/results", json.dumps({"seq": seq, "pad": "x" * 600}).encode(), seq=seq)
ob.flush()
if sys.argv[3] == "crash":
    os._exit(0)  # the write-ahead log is not folded into the database
ob.close()
"""


def _produce(path: Path, n: int, how: str) -> None:
    subprocess.run([sys.executable, "-c", _PRODUCE, str(path), str(n), how], check=True, cwd=REPO, timeout=120)


def _damaged_wal_outbox(folder: Path) -> Path:
    """1,265 results only in the write-ahead log (with its -shm), one frame of it damaged in the middle."""
    path = folder / "outbox.sqlite3"
    _produce(path, 1265, "crash")
    wal = folder / "outbox.sqlite3-wal"
    data = bytearray(wal.read_bytes())
    data[32 + 30 * (24 + 4096) + 24 + 100] ^= 0xFF
    wal.write_bytes(bytes(data))
    return path


# Runs the recovery in a child that dies (os._exit, as a power cut) just before its N-th rename, or just before the
# swap's marker is removed (N = 0).
_CRASH_AT = """
import os, sys
from pathlib import Path
from edgemed.outbox import Outbox
n, calls = int(sys.argv[2]), [0]
real_rename, real_unlink = os.rename, os.unlink
def rename(src, dst, *a, **k):
    calls[0] += 1
    if calls[0] == n:
        os._exit(0)
    return real_rename(src, dst, *a, **k)
def unlink(path, *a, **k):
    if n == 0 and str(path).endswith(".swap"):
        os._exit(0)
    return real_unlink(path, *a, **k)
os.rename, os.unlink = rename, unlink
Outbox(Path(sys.argv[1]))
os._exit(3)  # the crash point was never reached
"""


def _seqs(ob: Outbox) -> list[int]:
    return [json.loads(item.payload)["seq"] for item in ob.pending(10_000)]


@pytest.fixture(scope="module")
def damaged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int]]:
    """A damaged outbox, and what a recovery that is not interrupted makes of it."""
    folder = tmp_path_factory.mktemp("damaged")
    _damaged_wal_outbox(folder)
    reference = tmp_path_factory.mktemp("reference")
    for item in folder.iterdir():
        shutil.copy(item, reference / item.name)
    with Outbox(reference / "outbox.sqlite3") as ob:
        assert ob.recovery is not None
        seqs = _seqs(ob)
    assert len(seqs) >= 1255
    return folder, seqs


# Renames: 1 the swap's marker into place, 2 the damaged file aside, 3 its -wal, 4 its -shm, 5 the new file in.
@pytest.mark.parametrize("crash_before", [2, 3, 4, 5, 0])
def test_a_crash_while_the_recovered_outbox_is_put_in_place_is_finished_at_the_next_start(
    damaged: tuple[Path, list[int]], tmp_path: Path, crash_before: int
) -> None:
    source, seqs = damaged
    for item in source.iterdir():
        shutil.copy(item, tmp_path / item.name)
    path = tmp_path / "outbox.sqlite3"
    child = subprocess.run([sys.executable, "-c", _CRASH_AT, str(path), str(crash_before)], cwd=REPO, timeout=120)
    assert child.returncode == 0  # it died where it was meant to
    with Outbox(path) as ob:
        assert ob.recovery is not None and ob.moved_aside is not None
        assert _seqs(ob) == seqs  # everything recovered, nothing replayed from a stray log
        assert ob.next_seq() == 1265
        moved = ob.moved_aside
    assert moved.exists() and moved.with_name(moved.name + "-wal").exists()  # the damaged files, kept together
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["outbox.seq", "outbox.sqlite3", moved.name, moved.name + "-wal", moved.name + "-shm"])


def test_a_swap_whose_new_file_was_lost_is_undone_and_the_recovery_runs_again(
    damaged: tuple[Path, list[int]], tmp_path: Path
) -> None:
    source, seqs = damaged
    for item in source.iterdir():
        shutil.copy(item, tmp_path / item.name)
    path = tmp_path / "outbox.sqlite3"
    child = subprocess.run([sys.executable, "-c", _CRASH_AT, str(path), "5"], cwd=REPO, timeout=120)
    assert child.returncode == 0 and not path.exists()  # everything moved aside, the new file not yet in place
    for work in tmp_path.glob(".outbox.sqlite3.recovering-*"):
        shutil.rmtree(work)  # lost with its working folder
    with Outbox(path) as ob:
        assert ob.recovery is not None and _seqs(ob) == seqs and ob.next_seq() == 1265
    assert len(list(tmp_path.glob("outbox.sqlite3.corrupt-*"))) == 3  # one damaged file (with -wal, -shm)


_FULL_DISK = """
import json, os, subprocess, sys
from pathlib import Path
mnt, produce = Path(sys.argv[1]), sys.argv[2]
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mnt)], check=True)
path = mnt / "d" / "outbox.sqlite3"
subprocess.run([sys.executable, "-c", produce, str(path), "5000", "close"], check=True)
size = path.stat().st_size
with open(path, "r+b") as fh:
    fh.seek((size // 4096 // 2) * 4096)
    fh.write(b"\\xff" * 4096)
def fill(leave):
    (mnt / "fill").unlink(missing_ok=True)
    free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
    with open(mnt / "fill", "wb") as fh:
        fh.write(b"\\0" * max(0, free - leave))
def start():
    code = "import sys; from pathlib import Path; from edgemed.outbox import Outbox; Outbox(Path(sys.argv[1])).close()"
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    return {"rc": proc.returncode, "err": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""}
out = {"size": size}
damaged = path.read_bytes()
fill(int(size * 0.4))
out["too_little"] = start()
out["untouched"] = path.read_bytes() == damaged
out["left"] = sorted(p.name for p in path.parent.iterdir())
fill(int(size * 1.5))  # a full copy and the new file would need twice the file
out["enough"] = start()
print(json.dumps(out))
"""


def test_recovery_on_a_nearly_full_disk_needs_room_for_the_new_file_only_and_says_how_much(tmp_path: Path) -> None:
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], timeout=30).returncode:
        pytest.skip("needs unprivileged user and mount namespaces (unshare -rm) for a small real tmpfs")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        ["unshare", "-rm", sys.executable, "-c", _FULL_DISK, str(mnt), _PRODUCE],
        capture_output=True, text=True, timeout=300, env=env, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["size"] > 3 << 20
    too_little = out["too_little"]
    assert too_little["rc"] != 0, too_little
    assert "recovering it needs about" in too_little["err"] and "free at least" in too_little["err"], too_little
    assert "the damaged file is untouched" in too_little["err"]
    assert out["untouched"]
    assert not [name for name in out["left"] if "corrupt" in name or "recovering" in name], out["left"]
    assert out["enough"]["rc"] == 0, out["enough"]
