"""The audit trail and its key: an HMAC chain that `audit verify` checks, on an SQLite file and a real PostgreSQL 15.

Someone who can write the database edits a row's detail or actor, deletes a row in the middle, or recomputes the
chain with another key (with plain SQL or the driver, as they would): `verify` names the first broken row and the
CLI exits 1. Two processes appending at once keep one chain in id order. The key file is 0600, tightened (or
refused) when open to others, created once when two processes start together, never one of the database's files
and never written into the database.
"""

from __future__ import annotations

import csv
import io
import logging
import multiprocessing
import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgemed.cli import main
from edgemed.dashboard import audit
from edgemed.dashboard.secrets import Secrets, default_secret_path, load_secrets, resolve_secret_path
from edgemed.dashboard.store import DashboardStore
from edgemed.errors import ConfigError

T0 = 1_790_000_000.0


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "fleet.sqlite3")
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    return tmp_path / "dashboard.key"


@pytest.fixture
def store(db: str) -> Iterator[DashboardStore]:
    s = DashboardStore(db)
    yield s
    s.close()


def sql(db: str, statement: str) -> None:
    """Change the database behind the dashboard's back, with the driver itself (what a tamperer would do)."""
    if "://" in db:
        import psycopg

        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute(statement)  # type: ignore[arg-type]
    else:
        with sqlite3.connect(db) as conn:
            conn.execute(statement)
        conn.close()


def fill(store: DashboardStore, secrets: Secrets, n: int = 5) -> None:
    for i in range(n):
        audit.record(
            store, secrets, actor=f"user{i % 2}", address="10.0.0.7", action="acknowledged", target=f"r{i}",
            site="clinic-a", detail={"i": i}, at=T0 + i,
        )  # fmt: skip


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(["dashboard", *argv])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


# -- the chain --------------------------------------------------------------------------------------------------


def test_an_intact_chain_holds_and_rows_page_newest_first(store: DashboardStore, key_file: Path) -> None:
    secrets = load_secrets(key_file, create=True)
    assert audit.verify(store, secrets.audit_key) == audit.VerifyResult(True, 0)
    fill(store, secrets, 5)
    assert audit.verify(store, secrets.audit_key) == audit.VerifyResult(True, 5)
    newest = audit.rows(store, limit=2)
    assert [r["id"] for r in newest] == [5, 4]
    assert [r["id"] for r in audit.rows(store, limit=2, offset=2)] == [3, 2]
    assert [r["id"] for r in audit.rows(store, actor="user1")] == [4, 2]
    assert audit.count(store, since=T0 + 1, until=T0 + 3) == 2
    assert audit.count(store, action="login") == 0


def test_append_refuses_unknown_actions_and_a_rolled_back_row_leaves_the_chain_whole(
    store: DashboardStore, key_file: Path
) -> None:
    secrets = load_secrets(key_file, create=True)
    fill(store, secrets, 2)
    with pytest.raises(ValueError, match="unknown audit action 'acknowledge'"):
        audit.record(store, secrets, actor="a", action="acknowledge")
    with pytest.raises(ValueError, match="finite"):
        audit.record(store, secrets, actor="a", action="login", at=float("nan"))
    with pytest.raises(RuntimeError), store._transaction() as conn:
        audit.append(conn, secrets.audit_key, at=T0, actor="a", address=None, action="login")
        raise RuntimeError("the change this row records failed")
    assert audit.record(store, secrets, actor="a", action="logout") == 3
    assert audit.verify(store, secrets.audit_key) == audit.VerifyResult(True, 3)


@pytest.mark.parametrize(
    ("statement", "broken", "why"),
    [
        ("UPDATE audit SET detail = '{\"i\":99}' WHERE id = 3", 3, "edited"),
        ("UPDATE audit SET actor = 'someone.else' WHERE id = 2", 2, "edited"),
        ("DELETE FROM audit WHERE id = 3", 4, "row 3 is missing"),
        ("DELETE FROM audit WHERE id IN (2, 3)", 4, "rows 2 to 3 are missing"),
        (
            "UPDATE audit SET id = id + 100 WHERE id = 5",
            105,
            "rows 5 to 104 are missing before it (deleted, or this row",
        ),
    ],
)
def test_an_edited_or_deleted_row_is_named(
    db: str, key_file: Path, capsys: pytest.CaptureFixture[str], statement: str, broken: int, why: str
) -> None:
    secrets = load_secrets(key_file, create=True)
    store = DashboardStore(db)
    fill(store, secrets, 5)
    store.close()
    assert cli(capsys, "audit", "verify", "--db", db, "--secret-file", str(key_file)) == (
        0,
        "audit chain holds: 5 rows\n",
    )
    sql(db, statement)
    store = DashboardStore(db)
    try:
        result = audit.verify(store, secrets.audit_key)
    finally:
        store.close()
    assert not result.ok and result.broken_id == broken and why in (result.reason or "")
    code, out = cli(capsys, "audit", "verify", "--db", db, "--secret-file", str(key_file))
    assert code == 1
    assert f"audit chain broken at row {broken} (" in out and "acknowledged" in out, out
    assert audit.iso_time(result.broken_at or 0) in out


def test_a_chain_recomputed_with_another_key_fails_at_its_first_row(
    db: str, tmp_path: Path, key_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secrets = load_secrets(key_file, create=True)
    store = DashboardStore(db)
    try:
        fill(store, secrets, 4)
        # The tamperer rewrites row 2 and, without the key, chains every row again with a key of their own.
        forged = load_secrets(tmp_path / "forged.key", create=True)
        with store._transaction() as conn:
            old = [dict(r._mapping) for r in conn.execute(audit.audit.select().order_by(audit.audit.c.id))]
            conn.execute(audit.audit.delete())
            for row in old:
                audit.append(
                    conn, forged.audit_key, at=row["at"], actor="mallory" if row["id"] == 2 else row["actor"],
                    address=row["address"], action=row["action"], target=row["target"], site=row["site"],
                )  # fmt: skip
        assert audit.verify(store, forged.audit_key).ok  # a chain that holds, but under the wrong key
        result = audit.verify(store, secrets.audit_key)
        assert (result.ok, result.broken_id, result.rows) == (False, 1, 0)
        assert "another key" in (result.reason or "")
    finally:
        store.close()
    code, out = cli(capsys, "audit", "verify", "--db", db, "--secret-file", str(key_file))
    assert code == 1 and "broken at row 1 (" in out and "--secret-file" in out


def _append_many(db: str, key_file: str, worker: int, n: int) -> None:
    store = DashboardStore(db)
    try:
        secrets = load_secrets(Path(key_file), create=True)
        for i in range(n):
            audit.record(store, secrets, actor=f"worker{worker}", action="login", detail={"i": i})
    finally:
        store.close()


def test_two_processes_appending_at_once_keep_one_chain_in_id_order(db: str, key_file: Path) -> None:
    DashboardStore(db).close()  # the schema first
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(db, str(key_file), w, 40)) for w in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    store = DashboardStore(db)
    try:
        secrets = load_secrets(key_file, create=False)
        assert audit.verify(store, secrets.audit_key) == audit.VerifyResult(True, 80)
        found = audit.rows(store, limit=100)
        assert [r["id"] for r in found] == list(range(80, 0, -1))
        for worker in (0, 1):  # each process's rows in the order it appended them
            mine = [r["detail"] for r in reversed(found) if r["actor"] == f"worker{worker}"]
            assert mine == [f'{{"i":{i}}}' for i in range(40)]
    finally:
        store.close()


def test_csv_export_is_streamed_escaped_and_itself_audited(
    db: str, key_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secrets = load_secrets(key_file, create=True)
    store = DashboardStore(db)
    try:
        fill(store, secrets, 3)
        audit.record(store, secrets, actor='=HYPERLINK("x")', action="login_failed", at=T0 + 10)
        buf = io.StringIO()
        assert audit.write_csv(store, buf, since=T0 + 1) == 3
    finally:
        store.close()
    table = list(csv.reader(io.StringIO(buf.getvalue())))
    assert table[0] == list(audit.CSV_COLUMNS)
    assert [r[0] for r in table[1:]] == ["2", "3", "4"]
    assert table[1][1] == audit.iso_time(T0 + 1) and table[1][1].endswith("Z")
    assert table[1][7] == '{"i":1}'
    assert table[3][2] == '\'=HYPERLINK("x")'  # a spreadsheet shows it as text
    code, out = cli(
        capsys, "audit", "export", "--db", db, "--secret-file", str(key_file), "--until", "2026-09-21T14:13:22Z"
    )
    assert code == 0
    assert out.splitlines()[0] == ",".join(audit.CSV_COLUMNS) and "exported 2 audit rows" in out
    store = DashboardStore(db)
    try:
        last = audit.rows(store, limit=1)[0]
        assert last["action"] == "export_audit" and last["actor"].startswith("cli:")
        assert '"rows":2' in last["detail"] and audit.verify(store, secrets.audit_key).ok
    finally:
        store.close()


def test_a_cli_export_is_audited_before_its_first_row_leaves(db: str, key_file: Path) -> None:
    import argparse
    import errno

    from edgemed.dashboard.audit_cli import run_audit

    class DiskFull(io.StringIO):
        def write(self, text: str) -> int:
            if self.tell() > 0:  # the header went out, then the disk filled up
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(text)

    secrets = load_secrets(key_file, create=True)
    store = DashboardStore(db)
    try:
        fill(store, secrets, 3)
    finally:
        store.close()
    args = argparse.Namespace(audit_action="export", db=db, secret_file=key_file, since=None, until=None)
    with pytest.raises(OSError, match="No space left"):
        run_audit(args, out=DiskFull())
    store = DashboardStore(db)
    try:
        last = audit.rows(store, limit=1)[0]
        assert last["action"] == "export_audit" and last["actor"].startswith("cli:")
        assert '"rows":3' in last["detail"] and audit.verify(store, secrets.audit_key).ok
    finally:
        store.close()


def test_verify_without_the_key_file_says_which_flag(
    tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    db = str(tmp_path / "fleet.sqlite3")
    DashboardStore(db).close()
    code, out = cli(capsys, "audit", "verify", "--db", db)
    assert code == 2 and "fleet.sqlite3.key does not exist" in out and "--secret-file" in out
    code, out = cli(capsys, "audit", "verify", "--db", pg_url)
    assert code == 2 and "pass --secret-file FILE" in out
    code, out = cli(capsys, "audit", "verify", "--db", str(tmp_path / "nothing.sqlite3"))
    assert code == 2 and "no dashboard database" in out


def test_help_texts_give_examples(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["audit"], ["audit", "verify"], ["audit", "export"]):
        with pytest.raises(SystemExit):
            main(["dashboard", *argv, "--help"])
        out = capsys.readouterr().out
        assert "examples:" in out or "example:" in out
        assert "edgemed dashboard audit " in out


# -- the key file -----------------------------------------------------------------------------------------------


def test_the_key_file_is_private_random_and_never_shown(key_file: Path) -> None:
    secrets = load_secrets(key_file, create=True)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    text = key_file.read_text()
    assert len(text.strip()) == 64 and int(text, 16) >= 0
    assert secrets.audit_key != secrets.session_key and len(secrets.audit_key) == 32
    assert bytes.fromhex(text.strip()) not in (secrets.audit_key, secrets.session_key)  # derived, not the file
    assert load_secrets(key_file, create=False) == secrets  # the same file, the same keys
    shown = repr(secrets)
    assert secrets.audit_key.hex() not in shown and str(secrets.audit_key) not in shown and "dashboard.key" in shown


def test_a_key_file_open_to_others_is_tightened_or_refused(
    key_file: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = load_secrets(key_file, create=True)
    os.chmod(key_file, 0o644)
    with caplog.at_level(logging.WARNING, logger="edgemed.dashboard.secrets"):
        assert load_secrets(key_file, create=False) == first
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert "open to other users (mode 0644)" in caplog.text and key_file.read_text().strip() not in caplog.text
    os.chmod(key_file, 0o640)

    def not_ours(path: object, mode: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "chmod", not_ours)  # as for a file another user owns
    with pytest.raises(ConfigError, match=r"cannot be made private .* chmod 600"):
        load_secrets(key_file, create=False)


def test_a_malformed_or_missing_key_file_is_a_clear_error(key_file: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_secrets(key_file, create=False)
    key_file.write_text("not hex\n")
    os.chmod(key_file, 0o600)
    with pytest.raises(ConfigError, match="does not hold 64 hex digits; restore it"):
        load_secrets(key_file, create=True)


def _load(path: str, queue: multiprocessing.Queue[str]) -> None:
    queue.put(load_secrets(Path(path), create=True).audit_key.hex())


def test_two_processes_creating_the_key_at_once_agree(key_file: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_load, args=(str(key_file), queue)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    keys = {queue.get(timeout=5) for _ in procs}
    assert keys == {load_secrets(key_file, create=False).audit_key.hex()}
    assert sorted(os.listdir(key_file.parent)) == ["dashboard.key"]  # no temporary file left behind


def test_the_key_is_never_inside_the_database(tmp_path: Path, pg_url: str) -> None:
    db = tmp_path / "fleet.sqlite3"
    assert default_secret_path(str(db)) == tmp_path / "fleet.sqlite3.key"
    assert default_secret_path(f"sqlite:///{db}") == tmp_path / "fleet.sqlite3.key"
    assert default_secret_path(pg_url) is None
    for inside in ("fleet.sqlite3", "fleet.sqlite3-wal", "fleet.sqlite3-journal"):
        with pytest.raises(ConfigError, match="is the dashboard database itself"):
            resolve_secret_path(str(db), tmp_path / inside)
    store = DashboardStore(db)
    try:
        secrets = audit.open_secrets(store, resolve_secret_path(str(db), None))
        fill(store, secrets, 3)
    finally:
        store.close()
    master = (tmp_path / "fleet.sqlite3.key").read_text().strip()
    everything = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("fleet.sqlite3") and
                          p.suffix != ".key")  # fmt: skip
    for secret in (master.encode(), bytes.fromhex(master), secrets.audit_key, secrets.audit_key.hex().encode()):
        assert secret not in everything


def test_a_lost_key_file_is_not_replaced_while_the_trail_has_rows(tmp_path: Path) -> None:
    db = tmp_path / "fleet.sqlite3"
    store = DashboardStore(db)
    try:
        secrets = audit.open_secrets(store, tmp_path / "fleet.sqlite3.key")
        fill(store, secrets, 2)
        (tmp_path / "fleet.sqlite3.key").unlink()
        with pytest.raises(ConfigError, match="missing, but the audit trail holds 2 rows"):
            audit.open_secrets(store, tmp_path / "fleet.sqlite3.key")
        assert not (tmp_path / "fleet.sqlite3.key").exists()
    finally:
        store.close()
