"""The durable outbox and the data-directory lock, on real SQLite files (no broker needed)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from edgemed.errors import ConfigError, OutboxError, OutboxLockedError
from edgemed.lock import DataDirLock
from edgemed.outbox import Outbox, OutboxConfig, OutboxFullError
from edgemed.publish.config import MqttConfig, TlsConfig, parse_broker_url, read_password

REPO = Path(__file__).resolve().parents[1]


def _fill(ob: Outbox, n: int, start: int = 0) -> list[int]:
    return [ob.put(f"r{i}", "edgemed/s/d/results", f'{{"n":{i}}}'.encode()) for i in range(start, start + n)]


def test_results_come_back_in_order_and_leave_only_when_acked(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite3", OutboxConfig(commit_every=1)) as ob:
        rows = _fill(ob, 5)
        assert rows == sorted(rows)
        items = ob.pending(10)
        assert [i.result_id for i in items] == [f"r{i}" for i in range(5)]
        assert items[0].payload == b'{"n":0}' and items[0].topic == "edgemed/s/d/results"
        ob.ack(rows[1])
        ob.ack_many([rows[3], 999_999])  # an unknown id is ignored
        assert [i.result_id for i in ob.pending(10)] == ["r0", "r2", "r4"]
        assert [i.result_id for i in ob.pending(1, after_row=rows[2])] == ["r4"]
        assert ob.pending_count() == 3
        assert ob.acked_ids() == {"r1", "r3"}


def test_the_ack_log_keeps_the_newest_keep_acked_results_across_restarts(tmp_path: Path) -> None:
    cfg = OutboxConfig(commit_every=1, keep_acked=10)
    with Outbox(tmp_path / "o.sqlite3", cfg) as ob:
        ob.ack_many(_fill(ob, 30))
        ob.flush()
        assert ob.acked_ids() == {f"r{i}" for i in range(20, 30)}
    with Outbox(tmp_path / "o.sqlite3", cfg) as ob:  # row ids go on after a restart with an empty outbox
        assert ob.acked_ids() == {f"r{i}" for i in range(20, 30)}
        ob.ack_many(_fill(ob, 5, start=30))
        ob.flush()
        assert ob.acked_ids() == {f"r{i}" for i in range(25, 35)}


def test_replay_window_keeps_payloads_relative_to_the_latest_acknowledgement(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"
    cfg = OutboxConfig(commit_every=1, replay_window_s=0.5, keep_acked=2)

    def kept(ob: Outbox) -> list[str]:
        return [i.result_id for i in ob.replay_candidates()]

    with Outbox(path, cfg) as ob:
        rows = _fill(ob, 6)
        ob.ack_many(rows[:3])
        replay = ob.replay_candidates()
        assert [i.result_id for i in replay] == ["r0", "r1", "r2"]  # in production order, acknowledged only
        assert replay[0].payload == b'{"n":0}' and replay[0].topic == "edgemed/s/d/results"
        assert ob.pending_count() == 3  # replayable results are no longer pending
        # An outage (or a broker that died silently): no acknowledgement arrives, so nothing expires, however
        # long it lasts and however many results are produced meanwhile (more than keep_acked here).
        time.sleep(0.6)
        _fill(ob, 5, start=10)
        assert kept(ob) == ["r0", "r1", "r2"]
        # Re-sent on the reconnection and renewed: r1 stays a window longer than the others.
        ob.renew_replayed([rows[1]])
        time.sleep(0.3)
        ob.ack(rows[3])  # the latest acknowledgement: r0 and r2 are now more than a window older
        ob.flush()  # expiry happens at the commit (within commit_interval_s on a running device)
        assert kept(ob) == ["r1", "r3"]
        time.sleep(0.6)
        ob.ack(rows[4])
        ob.flush()
        assert kept(ob) == ["r4"]
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*) FROM acked WHERE payload IS NOT NULL").fetchone()[0] == 1
    with Outbox(path, cfg) as ob:  # a restart keeps what is kept: the first connection of the run re-sends it
        assert kept(ob) == ["r4"]
    with Outbox(path, OutboxConfig(commit_every=1)) as ob:  # replay turned off: kept payloads dropped, once
        assert ob.replay_candidates() == []
        ob.ack_many(_fill(ob, 2, start=20))
        ob.flush()
        assert ob.replay_candidates() == [] and "r20" in ob.acked_ids()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*) FROM acked WHERE payload IS NOT NULL").fetchone()[0] == 0


def test_an_outbox_written_before_replay_existed_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"
    with sqlite3.connect(path) as db:  # the layout of the first release
        db.executescript(
            "CREATE TABLE outbox (row_id INTEGER PRIMARY KEY AUTOINCREMENT, result_id TEXT NOT NULL, topic TEXT "
            "NOT NULL, payload BLOB NOT NULL, created_at REAL NOT NULL);"
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);"
            "CREATE TABLE acked (row_id INTEGER PRIMARY KEY, result_id TEXT NOT NULL, acked_at REAL NOT NULL);"
            "INSERT INTO meta VALUES ('schema', 1), ('seq', 7);"
            "INSERT INTO outbox(result_id, topic, payload, created_at) VALUES ('old', 't', x'7b7d', 1.0);"
            "INSERT INTO acked VALUES (0, 'older', 1.0);"
        )
    with Outbox(path, OutboxConfig(commit_every=1, replay_window_s=30.0)) as ob:
        assert [i.result_id for i in ob.pending(10)] == ["old"] and ob.next_seq() == 7
        ob.ack_many([i.row_id for i in ob.pending(10)])
        ob.flush()
        assert [i.result_id for i in ob.replay_candidates()] == ["old"]
        assert ob.acked_ids() == {"old", "older"}


def test_replay_window_needs_the_ack_log() -> None:
    with pytest.raises(ValidationError, match="replay_window_s needs the acknowledgement log"):
        OutboxConfig(replay_window_s=5.0, keep_acked=0)


def test_acknowledging_more_rows_than_one_statement_takes(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite3", OutboxConfig(commit_every=5000)) as ob:
        rows = _fill(ob, 1201)
        ob.flush()
        ob.ack_many([*rows[:1200], 10**9])
        assert ob.pending_count() == 1 and [i.result_id for i in ob.pending(10)] == ["r1200"]
        assert len(ob.acked_ids()) == 1200


def test_uncommitted_results_are_not_published_until_the_batch_commits(tmp_path: Path) -> None:
    cfg = OutboxConfig(commit_every=1000, commit_interval_s=0.2)
    with Outbox(tmp_path / "o.sqlite3", cfg) as ob:
        _fill(ob, 3)
        assert ob.pending(10) == []  # not durable yet, so not publishable
        assert ob.pending_count() == 3
        deadline = time.monotonic() + 5
        while not ob.pending(10) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(ob.pending(10)) == 3, "the committer thread did not commit within commit_interval_s"


def test_commit_every_commits_on_the_nth_put(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite3", OutboxConfig(commit_every=4, commit_interval_s=60)) as ob:
        _fill(ob, 3)
        assert ob.pending(10) == []
        _fill(ob, 1, start=3)
        assert len(ob.pending(10)) == 4


def test_pending_results_and_the_sequence_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "data" / "outbox.sqlite3"
    with Outbox(path) as ob:
        assert [ob.next_seq() for _ in range(3)] == [0, 1, 2]
        rows = _fill(ob, 3)
        ob.flush()
        ob.ack(rows[0])
    with Outbox(path) as ob:
        assert ob.next_seq() == 3
        assert [i.result_id for i in ob.pending(10)] == ["r1", "r2"]
        assert ob.oldest_pending_s() is not None and ob.oldest_pending_s() < 60


_CRASH = """
import os, sys
from pathlib import Path
from edgemed.outbox import Outbox, OutboxConfig
ob = Outbox(Path(sys.argv[1]), OutboxConfig(commit_every=10, commit_interval_s=3600))
for i in range(25):
    seq = ob.next_seq()
    ob.put(f"r{seq}", "t", str(seq).encode(), seq=seq)
os._exit(0)  # dies like a power cut: no flush, no close
"""


def test_a_crash_loses_only_the_uncommitted_tail_and_reuses_its_sequence_numbers(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    subprocess.run([sys.executable, "-c", _CRASH, str(path)], check=True, cwd=REPO, timeout=60)
    with Outbox(path) as ob:
        items = ob.pending(100)
        # Two batches of 10 were committed; the last 5 were never durable, so never published either.
        assert [i.result_id for i in items] == [f"r{i}" for i in range(20)]
        assert ob.next_seq() == 20


def test_block_policy_refuses_new_results_at_the_cap_and_keeps_the_old_ones(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite3", OutboxConfig(max_pending=3)) as ob:
        _fill(ob, 3)
        assert ob.is_full()
        with pytest.raises(OutboxFullError, match="holds 3 unacknowledged results"):
            ob.put("r3", "t", b"x")
        ob.flush()
        ob.ack(ob.pending(1)[0].row_id)
        assert not ob.is_full()
        ob.put("r3", "t", b"x")
        assert ob.pending_count() == 3


def test_age_cap_blocks_when_the_oldest_result_is_too_old(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite3", OutboxConfig(max_age_s=0.2)) as ob:
        _fill(ob, 1)
        assert not ob.is_full()
        time.sleep(0.3)
        assert ob.is_full()


def test_evict_oldest_deletes_only_the_oldest_and_counts_them(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with Outbox(tmp_path / "o.sqlite3", OutboxConfig(max_pending=3, on_full="evict_oldest")) as ob:
        _fill(ob, 5)
        ob.flush()
        assert not ob.is_full()  # evicting never blocks
        assert [i.result_id for i in ob.pending(10)] == ["r2", "r3", "r4"]
        assert ob.evicted_total == 2
    assert "evicted" in caplog.text


def test_producer_and_delivery_threads_can_share_the_outbox(tmp_path: Path) -> None:
    n = 3000
    acked: list[str] = []
    with Outbox(tmp_path / "o.sqlite3", OutboxConfig(commit_every=50, commit_interval_s=0.01)) as ob:
        done = threading.Event()

        def produce() -> None:
            _fill(ob, n)
            ob.flush()
            done.set()

        t = threading.Thread(target=produce)
        t.start()
        cursor = 0
        deadline = time.monotonic() + 30
        while (not done.is_set() or ob.pending_count()) and time.monotonic() < deadline:
            items = ob.pending(64, after_row=cursor)
            if items:
                cursor = items[-1].row_id
                ob.ack_many(i.row_id for i in items)
                acked.extend(i.result_id for i in items)
        t.join(10)
        assert acked == [f"r{i}" for i in range(n)]
        assert ob.pending_count() == 0


def test_a_full_disk_raises_outbox_error_and_stays_failed(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.sqlite3", OutboxConfig(commit_every=1))
    # SQLite reports "database or disk is full" past max_page_count: a stand-in for a full disk.
    ob._db.execute("PRAGMA max_page_count = 12")
    with pytest.raises(OutboxError, match="free disk space"):
        for i in range(10_000):
            ob.put(f"r{i}", "t", b"x" * 1000)
    with pytest.raises(OutboxError):
        ob.put("again", "t", b"x")  # no silent carrying on after lost results


def test_a_corrupt_header_is_moved_aside_and_a_new_outbox_started(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    path.write_bytes(b"this is not an sqlite file" * 100)
    original = path.read_bytes()
    with Outbox(path) as ob:
        assert ob.moved_aside is not None and ob.moved_aside.read_bytes() == original
        assert ob.pending_count() == 0
        ob.put("new", "t", b"x")


def test_a_corrupt_page_is_moved_aside_and_the_old_rows_stay_readable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "outbox.sqlite3"
    with Outbox(path) as ob:
        _fill(ob, 2000)
    page = 4096
    with open(path, "r+b") as f:  # wreck one b-tree page in the middle
        f.seek(page * 4)
        f.write(b"\xff" * page)
    with Outbox(path) as ob:
        assert ob.moved_aside is not None
        # What the damaged file still holds is recovered into the new outbox (tests/test_outbox_recovery.py).
        assert ob.recovery is not None and ob.pending_count() == ob.recovery.pending >= 1000
    assert "is corrupt" in caplog.text and str(ob.moved_aside) in caplog.text
    old = sqlite3.connect(ob.moved_aside)
    readable = 0
    for row_id in range(1, 2001):
        try:
            readable += old.execute("SELECT count(*) FROM outbox WHERE row_id = ?", (row_id,)).fetchone()[0]
        except sqlite3.DatabaseError:
            continue  # rows on the wrecked page are gone; the point is that the rest can be recovered
    old.close()
    assert readable >= 1000  # most (here usually all) of the 2,000 results can still be read back


def test_a_sequence_number_handed_out_but_never_committed_is_reused(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    with Outbox(path) as ob:
        seq = ob.next_seq()
        ob.put("r0", "t", b"0", seq=seq)
        assert ob.next_seq() == 1  # handed out, then the frame is dropped or the device dies before put()
        ob.flush()
    with Outbox(path) as ob:
        assert ob.next_seq() == 1  # no gap in what consumers see


_HOLD_LOCK = """
import sys, time
from pathlib import Path
from edgemed.lock import DataDirLock
with DataDirLock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_second_process_on_the_same_data_dir_is_refused_naming_the_owner(tmp_path: Path) -> None:
    data = tmp_path / "data"
    owner = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(data)], cwd=REPO, stdout=subprocess.PIPE)
    try:
        assert owner.stdout is not None and owner.stdout.readline().strip() == b"locked"
        with pytest.raises(OutboxLockedError, match=rf"in use by another edgemed process \(PID {owner.pid}\)"):
            DataDirLock(data).acquire()
        assert OutboxLockedError.exit_code == 2
        # SIGKILL releases the lock: a restart after a crash is never blocked by a stale lock file.
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(10)
        with DataDirLock(data) as lock:
            assert lock.held
            assert (data / ".lock").read_text().strip() == str(os.getpid())
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait(10)


def test_mqtt_config_rejects_unsafe_or_inconsistent_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="no password source"):
        MqttConfig(url="mqtts://broker.example:8883", username="dev")
    with pytest.raises(ValidationError, match="extra"):
        MqttConfig(url="mqtts://broker.example:8883", username="dev", password="inline")  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="use mqtts://"):
        MqttConfig(url="mqtt://127.0.0.1:1883", tls=TlsConfig(ca_file=tmp_path / "ca.crt"))
    with pytest.raises(ValidationError, match="go together"):
        TlsConfig(cert_file=tmp_path / "c.crt")
    with pytest.raises(ConfigError, match="must start with mqtt://"):
        parse_broker_url("http://broker:1883")
    with pytest.raises(ConfigError, match="contains credentials"):
        parse_broker_url("mqtt://user:pw@broker:1883")
    assert parse_broker_url("mqtts://broker.example").port == 8883
    assert parse_broker_url("mqtt://[::1]:1884").loopback

    monkeypatch.setenv("EDGEMED_TEST_PW", "s3cret")
    assert read_password(MqttConfig(url="mqtt://localhost", username="u", password_env="EDGEMED_TEST_PW")) == "s3cret"
    pw = tmp_path / "pw"
    pw.write_text("filepw\n")
    assert read_password(MqttConfig(url="mqtt://localhost", username="u", password_file=pw)) == "filepw"
    monkeypatch.delenv("EDGEMED_TEST_PW")
    with pytest.raises(ConfigError, match="EDGEMED_TEST_PW is not set"):
        read_password(MqttConfig(url="mqtt://localhost", username="u", password_env="EDGEMED_TEST_PW"))


def _open_files(name: str) -> int:
    fds = Path("/proc/self/fd")
    found = 0
    for fd in fds.iterdir():
        try:
            found += os.readlink(fd).endswith(name)
        except OSError:  # closed while listing (the listing's own descriptor)
            continue
    return found


def test_an_outbox_that_cannot_be_opened_keeps_no_file_open(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    path.mkdir()  # SQLite cannot open a folder: the open fails after the seq mark was opened
    for _ in range(3):
        with pytest.raises(OutboxError, match="cannot open the outbox"):
            Outbox(path)
    assert _open_files("outbox.seq") == 0


def test_the_open_data_directory_warning_is_given_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    device = tmp_path / "device"
    device.mkdir(mode=0o755)
    device.chmod(0o755)
    with DataDirLock(device), Outbox(device / "outbox.sqlite3"):  # as a run opens them
        pass
    assert caplog.text.count("is open to other users (mode 755)") == 1


def test_a_file_whose_mode_cannot_be_read_is_reported_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from edgemed.datadir import tighten

    target = tmp_path / "results.jsonl"
    target.write_text("")
    real_stat = Path.stat

    def stat(self: Path, **kwargs: object) -> os.stat_result:
        if self == target:  # as for a file under a folder this user may not search
            raise PermissionError(13, "Permission denied", str(self))
        return real_stat(self, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "stat", stat)
    tighten(target)
    assert f"cannot check whether {target} is private" in caplog.text


def test_a_frame_admitted_before_the_age_cap_is_crossed_is_kept(tmp_path: Path) -> None:
    """The runtime asks is_full() before each frame; the age cap can be crossed while the frame is classified.
    Refusing its result then would end the run (exit 7) instead of pausing before the next frame."""
    with Outbox(tmp_path / "o.sqlite3", OutboxConfig(max_age_s=0.2)) as ob:
        _fill(ob, 1)
        assert not ob.is_full()  # room: the next frame is taken
        time.sleep(0.3)  # ... and classified while the oldest result passes max_age_s
        health = threading.Thread(target=lambda: seen.append(ob.is_full()))  # the heartbeat asks meanwhile
        seen: list[bool] = []
        health.start()
        health.join(10)
        assert seen == [True]
        ob.put("result", "t", b"{}")
        ob.put("study decision", "t", b"{}")  # the same frame may close a study
        assert ob.is_full()  # the producer pauses here
        with pytest.raises(OutboxFullError):
            ob.put("not admitted", "t", b"{}")  # a put no is_full() admitted is refused at the cap, as before
        assert ob.pending_count() == 3


def test_admission_covers_one_frame_not_a_stream(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite3", OutboxConfig(max_pending=2)) as ob:
        _fill(ob, 1)
        assert not ob.is_full()
        _fill(ob, 4, start=1)  # what one frame may produce: kept past the cap
        with pytest.raises(OutboxFullError):
            ob.put("fifth", "t", b"{}")
        assert ob.pending_count() == 5
