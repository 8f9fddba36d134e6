"""The seq stream lives beside the seq counter: a new one exactly when seq starts again at 0 (edgemed.outbox.stream)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from edgemed import receipts
from edgemed.identity import load_or_create_secret
from edgemed.outbox import OUTBOX_FILENAME, Outbox
from edgemed.outbox.stream import STREAM_FILENAME, sequence_stream


def _produce(data_dir: Path, n: int) -> None:
    with Outbox(data_dir / OUTBOX_FILENAME) as outbox:
        for _ in range(n):
            seq = outbox.next_seq()
            outbox.put(f"{seq:032x}", "edgemed/s/d/results", b"{}", seq=seq)


def test_a_new_data_directory_gets_a_random_private_stream_that_stays(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    first = sequence_stream(data)
    assert re.fullmatch("[0-9a-f]{16}", first)
    assert os.stat(data / STREAM_FILENAME).st_mode & 0o777 == 0o600
    _produce(data, 3)
    assert sequence_stream(data) == first  # seq goes on: the same stream


def test_a_counter_that_starts_again_gets_a_new_stream_even_with_the_same_secret(tmp_path: Path) -> None:
    # The operator deletes the outbox and its seq mark but keeps device.secret (to keep the study pseudonyms):
    # seq starts at 0 again, so the consumer's retained receipt of the old numbering must not apply.
    data = tmp_path / "data"
    data.mkdir()
    secret = load_or_create_secret(data)
    old = sequence_stream(data)
    _produce(data, 5)
    for name in (OUTBOX_FILENAME, "outbox.seq", OUTBOX_FILENAME + "-wal", OUTBOX_FILENAME + "-shm"):
        (data / name).unlink(missing_ok=True)
    new = sequence_stream(data)
    assert new != old and load_or_create_secret(data) == secret
    with Outbox(data / OUTBOX_FILENAME) as outbox:
        assert outbox.next_seq() == 0


def test_an_outbox_kept_without_its_mark_keeps_its_stream(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    stream = sequence_stream(data)
    _produce(data, 2)
    (data / "outbox.seq").unlink()
    assert sequence_stream(data) == stream


def test_a_data_directory_from_before_the_file_keeps_the_stream_its_results_carried(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    _produce(data, 2)  # an outbox numbered before outbox.stream existed: its results carried the secret's stream
    (data / STREAM_FILENAME).unlink(missing_ok=True)
    assert sequence_stream(data) == receipts.stream_id(load_or_create_secret(data))
    (data / STREAM_FILENAME).write_text("garbled\n")
    assert sequence_stream(data) == receipts.stream_id(load_or_create_secret(data))
