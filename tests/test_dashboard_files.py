"""The dashboard database holds every result and the raw bytes of refused payloads: it is private (0600).

Created 0600 from the start (with its ``-wal`` and ``-shm``) under the usual umask 022, in a folder created 0700
when missing; a database an older dashboard left readable by others is made private, with a warning.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from dashboard_helpers import HEALTH, make_result

from edgemed.dashboard.store import DashboardStore


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)  # what a login shell or a systemd service usually has: new files 0644
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _sidecars(db: Path) -> list[Path]:
    return [db.with_name(db.name + suffix) for suffix in ("-wal", "-shm")]


@pytest.mark.usefixtures("umask_022")
def test_a_new_database_and_its_wal_files_are_readable_by_this_user_only(tmp_path: Path) -> None:
    db = tmp_path / "central" / "fleet.sqlite3"
    store = DashboardStore(db)
    try:
        store.add_result(make_result(seq=1))
        store.set_health("clinic-a", "us-01", HEALTH)
        for path in [db, *_sidecars(db)]:
            assert path.exists(), path
            assert _mode(path) == 0o600, (path, oct(_mode(path)))
        assert _mode(db.parent) == 0o700
    finally:
        store.close()


@pytest.mark.usefixtures("umask_022")
def test_a_database_left_readable_by_others_is_made_private_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "fleet.sqlite3"
    tmp_path.chmod(0o755)
    older = sqlite3.connect(db)  # as an older dashboard left it: 0644, with a write-ahead log beside it
    older.execute("PRAGMA journal_mode=WAL")
    older.execute("CREATE TABLE t (x)")
    older.execute("INSERT INTO t VALUES (1)")
    older.commit()
    try:
        assert _mode(db) == 0o644 and all(_mode(p) == 0o644 for p in _sidecars(db))
        caplog.set_level(logging.WARNING)
        store = DashboardStore(db)
        store.close()
    finally:
        older.close()
    assert _mode(db) == 0o600
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        f"the dashboard database file {db} was open to other users (mode 0644); making it private (0600)"
        in (warnings[0])
    )
    assert _mode(tmp_path) == 0o755  # an existing folder is the operator's choice: left as it is
