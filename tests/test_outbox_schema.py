"""The outbox's schema 2 (``seq`` and ``sent_at``): an older file is upgraded in place when it is opened, and the
recovery of a damaged file carries the new columns (recovered rows start unsent)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from edgemed.outbox import Outbox, OutboxConfig

RESULTS = "edgemed/s/d/results"

_SCHEMA_1 = """
CREATE TABLE outbox (row_id INTEGER PRIMARY KEY AUTOINCREMENT, result_id TEXT NOT NULL, topic TEXT NOT NULL,
    payload BLOB NOT NULL, created_at REAL NOT NULL);
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE acked (row_id INTEGER PRIMARY KEY, result_id TEXT NOT NULL, acked_at REAL NOT NULL);
INSERT INTO meta(key, value) VALUES ('schema', 1), ('seq', 5);
"""


def _old_outbox(path: Path) -> None:
    db = sqlite3.connect(path)
    db.executescript(_SCHEMA_1)
    rows = [(f"r{i}", RESULTS, json.dumps({"result_id": f"r{i}", "seq": i}).encode(), 1.0 + i) for i in range(5)]
    rows.append(("odd", RESULTS, b"not json", 9.0))
    db.executemany("INSERT INTO outbox(result_id, topic, payload, created_at) VALUES (?, ?, ?, ?)", rows)
    db.commit()
    db.close()


def _columns(path: Path) -> list[tuple[int | None, float | None]]:
    with sqlite3.connect(path) as db:
        return list(db.execute("SELECT seq, sent_at FROM outbox ORDER BY row_id"))


def test_an_outbox_of_schema_1_is_upgraded_in_place_with_seq_from_its_payloads(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    _old_outbox(path)
    with Outbox(path, OutboxConfig(commit_every=1)) as ob:
        assert ob.pending_count() == 6 and ob.unsent_count() == 6 and ob.awaiting_count() == 0
        assert [i.seq for i in ob.pending(10)] == [0, 1, 2, 3, 4, None]
        assert ob.next_seq() == 5  # the counter is kept
        ob.mark_sent([i.row_id for i in ob.pending(10)])
        assert ob.awaiting_count() == 5 and ob.pending_count() == 5  # the row without a seq left at PUBACK
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0] == 2
        assert {str(r[1]) for r in db.execute("PRAGMA table_info(acked)")} >= {"topic", "payload"}
        indexes = [str(r[0]) for r in db.execute("SELECT sql FROM sqlite_master WHERE type = 'index'") if r[0]]
        assert any("outbox(seq)" in sql for sql in indexes)
        plan = " ".join(str(r[-1]) for r in db.execute("EXPLAIN QUERY PLAN DELETE FROM outbox WHERE seq <= 3"))
        assert "outbox_by_seq" in plan  # releasing by receipt does not scan the table
    with Outbox(path) as ob:  # opened again: nothing to upgrade, the receipt state is kept
        assert ob.awaiting_count() == 5 and ob.unsent_count() == 0


def _damage_middle(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as fh:  # a bad sector in the middle of the file
        fh.seek((size // 4096 // 2) * 4096)
        fh.write(b"\xff" * 4096)


def test_a_recovered_outbox_keeps_seq_and_its_rows_start_unsent(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    with Outbox(path, OutboxConfig(commit_every=1000)) as ob:
        for _ in range(300):
            seq = ob.next_seq()
            ob.put(f"r{seq}", RESULTS, json.dumps({"seq": seq, "pad": "x" * 900}).encode(), seq=seq)
        ob.put("lost-1", "edgemed/s/d/lost", b'{"schema":"edgemed.lost/1"}')  # a row without seq
        ob.flush()
        ob.mark_sent([i.row_id for i in ob.pending(150)])  # the first half awaits its receipt
        assert ob.awaiting_count() == 150
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    _damage_middle(path)
    with Outbox(path) as ob:
        assert ob.recovery is not None and ob.recovery.pending > 100
        assert ob.awaiting_count() == 0 and ob.unsent_count() == ob.pending_count() == ob.recovery.pending
        items = ob.pending(1000)
    for item in items:
        expected = json.loads(item.payload).get("seq")
        assert item.seq == expected  # None for the row without one
    assert all(sent_at is None for _, sent_at in _columns(path))


def test_a_damaged_outbox_of_schema_1_is_recovered_with_seq_read_from_its_payloads(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(_SCHEMA_1)
    rows = [(f"r{i}", RESULTS, json.dumps({"seq": i, "pad": "x" * 900}).encode(), 1.0) for i in range(300)]
    db.executemany("INSERT INTO outbox(result_id, topic, payload, created_at) VALUES (?, ?, ?, ?)", rows)
    db.execute("UPDATE meta SET value = 300 WHERE key = 'seq'")
    db.commit()
    db.close()
    _damage_middle(path)
    with Outbox(path) as ob:
        assert ob.recovery is not None and ob.recovery.pending > 100
        items = ob.pending(1000)
        assert ob.next_seq() == 300
    assert items and all(i.seq == json.loads(i.payload)["seq"] for i in items)
