"""The ledger of processed inputs: an interrupted folder or file run resumes after its last committed frame,
`watch:` reads each file once across restarts (also files that arrived while edgemed was down), and a completed
run, `--loop` and `--from-start` process the source again. Real `python -m edgemed run` processes, killed with
SIGKILL as a power cut would; the outbox (offline, so everything stays in it) is read to see what was kept."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from helpers import edgemed_run_command as _edgemed
from helpers import run_offline as _run

DATA = Path(__file__).resolve().parent.parent / "data"
REPO = DATA.parent
CINE = DATA / "dicom" / "examples_ybr_color.dcm"  # 30 frames


def _scans(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(np.load(DATA / "breastmnist_28.npz")["test_images"][:n]):
        cv2.imwrite(str(folder / f"img{i}.png"), image)
    return folder


def _results(device: Path) -> list[dict[str, Any]]:
    """Every frame result committed in the outbox (offline: nothing has left it), in production order."""
    if not (device / "outbox.sqlite3").exists():
        return []
    db = sqlite3.connect(f"file:{device / 'outbox.sqlite3'}?mode=ro", uri=True, timeout=10)
    try:
        rows = db.execute("SELECT payload FROM outbox WHERE topic LIKE '%/results' ORDER BY row_id").fetchall()
    except sqlite3.OperationalError:  # not created yet
        return []
    finally:
        db.close()
    return [json.loads(r[0]) for r in rows]


def _profile(tmp_path: Path, model: Path, source: str, **source_keys: object) -> Path:
    extra = "".join(f", {k}: {json.dumps(v)}" for k, v in source_keys.items())
    path = tmp_path / "device.yaml"
    path.write_text(
        f"profile: ledger-test\ndevice: {{id: d1, data_dir: '{tmp_path / 'device'}'}}\nmodel: {{path: '{model}'}}\n"
        f"source: {{uri: '{source}'{extra}}}\nprivacy: {{publish_source_names: true}}\nrun: {{print_results: false}}\n"
    )
    return path


def _kill_after(profile: Path, device: Path, n: int, *args: str) -> int:
    """Start a run, SIGKILL it once at least ``n`` results are committed; returns how many were committed."""
    proc = subprocess.Popen(_edgemed(profile, *args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while len(_results(device)) < n:
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the run did not commit results in time"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    return len(_results(device))


def test_an_interrupted_folder_run_resumes_after_its_last_committed_frame(int8_model: Path, tmp_path: Path) -> None:
    device = tmp_path / "device"
    profile = _profile(tmp_path, int8_model, str(_scans(tmp_path / "scans", 40)), fps_cap=25)
    committed = _kill_after(profile, device, 8)
    assert 8 <= committed < 40
    second = _run(profile)
    assert "resuming where the interrupted run on this data directory stopped" in second.stderr
    assert "img" not in second.stderr  # the log line names no file
    results = _results(device)
    # Every file exactly once over both runs, at its own position: nothing published twice with a new id.
    assert sorted(r["source"]["index"] for r in results) == list(range(40))
    assert [r["source"]["name"] for r in sorted(results, key=lambda r: r["source"]["index"])] == [
        f"img{i}.png" for i in range(40)
    ]
    assert len({r["result_id"] for r in results}) == 40
    # The run completed: the next one processes the folder again, on purpose, with new results.
    _run(profile)
    again = _results(device)[40:]
    assert sorted(r["source"]["index"] for r in again) == list(range(40))


def test_from_start_and_loop_process_an_interrupted_source_again(int8_model: Path, tmp_path: Path) -> None:
    device = tmp_path / "device"
    profile = _profile(tmp_path, int8_model, str(_scans(tmp_path / "scans", 30)), fps_cap=25)
    committed = _kill_after(profile, device, 5)
    _run(profile, "--from-start")
    assert sorted(r["source"]["index"] for r in _results(device)[committed:]) == list(range(30))
    committed = _kill_after(profile, device, len(_results(device)) + 5)
    _run(profile, "--loop", "2")
    looped = _results(device)[committed:]
    assert Counter(r["source"]["name"] for r in looped) == {f"img{i}.png": 2 for i in range(30)}
    # A looped run leaves nothing to resume from: the next plain run processes the folder once, from its start.
    before = len(_results(device))
    _run(profile)
    assert sorted(r["source"]["index"] for r in _results(device)[before:]) == list(range(30))


def test_a_cine_interrupted_mid_file_resumes_inside_it_with_the_same_frame_numbers(
    int8_model: Path, tmp_path: Path
) -> None:
    device = tmp_path / "device"
    profile = _profile(tmp_path, int8_model, str(CINE), fps_cap=15)
    committed = _kill_after(profile, device, 6)
    assert 6 <= committed < 30
    _run(profile)
    results = _results(device)
    assert sorted(r["source"]["index"] for r in results) == list(range(30))
    assert results[committed]["source"]["index"] == committed  # the first frame of the second run
    assert len({r["session_id"] for r in results}) == 1  # still the same study


def test_watch_reads_each_file_once_across_a_restart_including_files_that_arrived_while_down(
    int8_model: Path, tmp_path: Path
) -> None:
    folder = _scans(tmp_path / "export", 3)  # there before edgemed ever watched: not new, never read
    incoming = _scans(tmp_path / "incoming", 12)
    device = tmp_path / "device"
    profile = _profile(tmp_path, int8_model, f"watch:{folder}", watch_poll_s=0.05, watch_settle_s=0.1)

    def arrive(i: int) -> None:
        shutil.copy(incoming / f"img{i}.png", folder / f"new{i}.png")

    proc = subprocess.Popen(_edgemed(profile), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (device / "outbox.sqlite3").exists() or not _ledger_rows(device):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
            time.sleep(0.05)
        for i in range(4):
            arrive(i)
        while len(_results(device)) < 4:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # a power cut
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    for i in range(4, 9):
        arrive(i)  # while edgemed is down
    proc = subprocess.Popen(_edgemed(profile), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while len(_results(device)) < 9:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        for i in range(9, 12):
            arrive(i)
        while len(_results(device)) < 12:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)  # would anything be read twice?
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert "reading 5 files that arrived while edgemed was not running" in err
    names = Counter(r["source"]["name"] for r in _results(device))
    assert names == {f"new{i}.png": 1 for i in range(12)}


def _ledger_rows(device: Path) -> int:
    try:
        db = sqlite3.connect(f"file:{device / 'outbox.sqlite3'}?mode=ro", uri=True, timeout=10)
        try:
            return int(db.execute("SELECT COUNT(*) FROM sources").fetchone()[0])
        finally:
            db.close()
    except sqlite3.OperationalError:
        return 0


def test_an_unchanged_file_is_not_read_again_a_replaced_one_is(int8_model: Path, tmp_path: Path) -> None:
    device = tmp_path / "device"
    folder = _scans(tmp_path / "scans", 30)
    profile = _profile(tmp_path, int8_model, str(folder), fps_cap=25)
    committed = _kill_after(profile, device, 10)
    # While it was down: one done file copied over itself (new mtime, same bytes), one replaced by other pixels.
    os.utime(folder / "img0.png", ns=(1, 1))
    other = np.load(DATA / "breastmnist_28.npz")["test_images"][100]
    cv2.imwrite(str(folder / "img1.png"), other)
    _run(profile)
    results = _results(device)
    names = Counter(r["source"]["name"] for r in results)
    assert names["img0.png"] == 1  # same content: the hash says it is done
    assert names["img1.png"] == 2  # new content: a new result
    assert sorted(r["source"]["index"] for r in results[committed:]) == [1, *range(committed, 30)]


_CRASH = """
import os, sys
from pathlib import Path
from edgemed.outbox import Outbox, OutboxConfig
from edgemed.types import InputDone
ob = Outbox(Path(sys.argv[1]), OutboxConfig(commit_every=10, commit_interval_s=3600))
ob.start_source("/scans/cine.dcm", keep=False)
for i in range(25):
    seq = ob.next_seq()
    row = InputDone("cine.dcm", 1000, 5, "ab" * 32, i + 1, 30)
    ob.put(f"r{seq}", "t/results", b"{}", seq=seq, done=("/scans/cine.dcm", row))
os._exit(0)  # dies like a power cut: no flush, no close
"""


def test_the_ledger_is_written_in_the_same_transaction_as_the_results(tmp_path: Path) -> None:
    from edgemed.outbox import Outbox, OutboxConfig
    from edgemed.types import InputDone

    path = tmp_path / "outbox.sqlite3"
    subprocess.run([sys.executable, "-c", _CRASH, str(path)], check=True, cwd=REPO, timeout=60)
    with Outbox(path, OutboxConfig()) as ob:
        assert ob.pending_count() == 20  # two batches of 10 committed, the last 5 lost
        state, rows = ob.source_ledger("/scans/cine.dcm")
        assert state == "interrupted"
        assert rows == {"cine.dcm": InputDone("cine.dcm", 1000, 5, "ab" * 32, 20, 30)}  # exactly the kept ones


@pytest.mark.parametrize("commit_every", [1, 100])
def test_one_ledger_row_per_file_per_commit_whatever_the_batch(tmp_path: Path, commit_every: int) -> None:
    from edgemed.outbox import Outbox, OutboxConfig
    from edgemed.types import InputDone

    statements: list[str] = []
    # No commit on the clock: the batches are exactly commit_every results each.
    with Outbox(tmp_path / "o.sqlite3", OutboxConfig(commit_every=commit_every, commit_interval_s=3600)) as ob:
        ob.start_source("/s", keep=False)
        ob._db.set_trace_callback(statements.append)  # every statement SQLite runs, one per executemany row
        for i in range(300):
            row = InputDone(f"f{i // 30}.dcm", 10, 1, None, i % 30 + 1, 30)
            ob.put(f"r{i}", "t", b"{}", done=("/s", row))
        ob.end_source("/s")
        ob.flush()
        ob._db.set_trace_callback(None)
        state, rows = ob.source_ledger("/s")
    assert state == "complete"
    assert sorted(rows) == [f"f{i}.dcm" for i in range(10)] and all(r.finished for r in rows.values())
    per_commit: list[int] = [0]
    for sql in statements:
        if sql.strip().upper() == "COMMIT":
            per_commit.append(0)
        elif "inputs" in sql:
            per_commit[-1] += 1
    # Each commit writes one row per file among its results (30 frames a file), not one per frame.
    files = [len({i // 30 for i in range(start, start + commit_every)}) for start in range(0, 300, commit_every)]
    assert per_commit == [*files, 0, 0]  # nothing in end_source's commit, nor after it


def test_a_source_whose_ledger_rows_survived_without_its_sources_row_is_not_new(tmp_path: Path) -> None:
    """A recovery that reads ``inputs`` but not ``sources``: a ``watch:`` folder taken for new would mark the
    files present as seen, and those that arrived while edgemed was down would never be read."""
    from edgemed.outbox import Outbox
    from edgemed.types import InputDone

    path = tmp_path / "outbox.sqlite3"
    done = InputDone("a.png", 10, 1, "ab" * 32, 1, 1)
    with Outbox(path) as ob:
        ob.start_source("/watch", keep=True, add=[done])
        ob.start_source("/other", keep=True)
    with sqlite3.connect(path) as db:  # wreck the one page of the sources table
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        root = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'sources'").fetchone()[0]
    db.close()
    with open(path, "r+b") as fh:
        fh.seek((root - 1) * page_size)
        fh.write(b"\xff" * page_size)
    with Outbox(path) as ob:
        assert ob.recovery is not None and ob.recovery.inputs == 1
        assert ob.source_ledger("/watch") == ("interrupted", {"a.png": done})
        assert ob.source_ledger("/other") == ("new", {})  # no row of it was left anywhere
