"""Users of the dashboard on an SQLite file and a real PostgreSQL 15: argon2id hashes, rules, the slow-down, the CLI.

A wrong password fails and repeated failures are slowed, per user name and per address; there is no default
password; the stored hash is argon2id; disabling takes effect at once (and ends sessions); every change is audited
in its own transaction; `users add --password-stdin` works and the password is never echoed, logged or stored.
"""

from __future__ import annotations

import inspect
import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from argon2 import PasswordHasher

from edgemed.cli import main
from edgemed.dashboard import audit, users
from edgemed.dashboard.secrets import Secrets, load_secrets
from edgemed.dashboard.store import DashboardStore
from edgemed.dashboard.tables import login_failures, web_sessions
from edgemed.dashboard.tables import users as users_table
from edgemed.dashboard.users_cli import read_password
from edgemed.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "correct horse battery staple"
T0 = 1_790_000_000.0


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "fleet.sqlite3")
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def store(db: str) -> Iterator[DashboardStore]:
    s = DashboardStore(db)
    yield s
    s.close()


@pytest.fixture
def secrets(tmp_path: Path) -> Secrets:
    return load_secrets(tmp_path / "dashboard.key", create=True)


def add(store: DashboardStore, secrets: Secrets, name: str, role: str = "reviewer", **kw: object) -> users.UserRecord:
    password = kw.pop("password", PASSWORD)
    sites = kw.pop("sites", None)
    return users.add_user(
        store,
        name,
        role,
        sites,
        password,
        secrets=secrets,
        actor="admin1",
        address="10.0.0.5",  # type: ignore[arg-type]
    )


def stored_hash(store: DashboardStore, name: str) -> str | None:
    with store._read() as conn:
        return conn.execute(sa.select(users_table.c.password_hash).where(users_table.c.name == name)).scalar_one()


def actions(store: DashboardStore) -> list[tuple[str, str | None]]:
    return [(r["action"], r["target"]) for r in reversed(audit.rows(store, limit=1000))]


# -- passwords ----------------------------------------------------------------------------------------------------


def test_the_password_is_kept_as_an_argon2id_hash_and_a_wrong_one_fails(
    store: DashboardStore, secrets: Secrets
) -> None:
    record = add(store, secrets, "nurse.k", sites=["clinic-b", "clinic-a"])
    assert record == users.UserRecord("nurse.k", "reviewer", frozenset({"clinic-a", "clinic-b"}), False, True)
    hashed = stored_hash(store, "nurse.k") or ""
    assert hashed.startswith("$argon2id$v=19$") and PASSWORD not in hashed
    assert users.verify_password(store, "nurse.k", PASSWORD) == record
    for wrong in ("correct horse battery stapl", PASSWORD.upper(), "", "nurse.k"):
        assert users.verify_password(store, "nurse.k", wrong) is None
    assert users.verify_password(store, "nobody", PASSWORD) is None
    assert users.verify_password(store, "<script>", PASSWORD) is None


def test_there_is_no_default_password(store: DashboardStore, secrets: Secrets, tmp_path: Path) -> None:
    # The API has no default for it: a caller must say which password (or None: single sign-on only).
    assert inspect.signature(users.add_user).parameters["password"].default is inspect.Parameter.empty
    assert users.user_count(store) == 0
    sso = add(store, secrets, "sso.only", password=None)
    assert not sso.has_password and stored_hash(store, "sso.only") is None
    for guess in ("", "admin", "password", "changeme", "sso.only", "edgemed", "123456789012"):
        assert users.verify_password(store, "sso.only", guess) is None
    # The CLI never invents one: without --password-stdin and without a terminal it refuses to go on.
    proc = subprocess.run(
        [sys.executable, "-m", "edgemed", "dashboard", "users", "add", "first", "--db", str(tmp_path / "x.sqlite3"),
         "--role", "admin"],
        input=b"", capture_output=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)},
        start_new_session=True,  # no controlling terminal, as under a script or cron
    )  # fmt: skip
    assert proc.returncode == 2 and b"--password-stdin" in proc.stderr, proc.stderr
    check = DashboardStore(tmp_path / "x.sqlite3")
    try:
        assert users.user_count(check) == 0
    finally:
        check.close()


@pytest.mark.parametrize(
    ("name", "password", "message"),
    [
        ("", PASSWORD, "user name '' is not allowed"),
        ("a b", PASSWORD, "is not allowed: use 1-64 letters"),
        ("x" * 65, PASSWORD, "is not allowed"),
        ("cli:root", PASSWORD, "is not allowed"),
        ("<b>", PASSWORD, "is not allowed"),
        ("ok.name", "short pw", "at least 12 characters"),
        ("ok.name", "x" * 1025, "at most 1024"),
        ("Long.Name.Here", "long.name.here", "must not be the user name"),
    ],
)
def test_name_and_password_rules(tmp_path: Path, secrets: Secrets, name: str, password: str, message: str) -> None:
    store = DashboardStore(tmp_path / "f.sqlite3")
    try:
        with pytest.raises(users.UserError, match=message) as err:
            add(store, secrets, name, password=password)
        assert password not in str(err.value) or len(password) < 3
        assert users.user_count(store) == 0 and audit.count(store) == 0
    finally:
        store.close()


def test_roles_and_sites_are_checked(tmp_path: Path, secrets: Secrets) -> None:
    store = DashboardStore(tmp_path / "f.sqlite3")
    try:
        with pytest.raises(users.UserError, match="role 'root' is not one of viewer, reviewer, admin"):
            add(store, secrets, "a.b", role="root")
        with pytest.raises(users.UserError, match="limited to no site would see nothing"):
            add(store, secrets, "a.b", sites=[" ", ""])
        with pytest.raises(users.UserError, match="is not a site id"):
            add(store, secrets, "a.b", sites=["clinic a"])
        with pytest.raises(TypeError, match="not one string"):
            add(store, secrets, "a.b", sites="clinic-a")
        add(store, secrets, "a.b")
        with pytest.raises(users.UserError, match="exists already"):
            add(store, secrets, "a.b")
    finally:
        store.close()


def test_an_admin_is_never_limited_to_sites(store: DashboardStore, secrets: Secrets) -> None:
    # A site-limited admin could add an unlimited user and log in as them: the limit would protect nothing.
    with pytest.raises(users.UserError, match="cannot be an admin limited to sites"):
        add(store, secrets, "boss.a", role="admin", sites=["clinic-a"])
    assert users.get_user(store, "boss.a") is None
    add(store, secrets, "nurse.a", role="reviewer", sites=["clinic-a"])
    with pytest.raises(users.UserError, match="cannot be an admin limited to sites"):
        users.set_role(store, "nurse.a", "admin", secrets=secrets, actor="admin1", address=None)
    record = users.get_user(store, "nurse.a")
    assert record is not None and record.role == "reviewer" and record.sites == frozenset({"clinic-a"})
    assert ("role_changed", "nurse.a") not in actions(store)
    assert add(store, secrets, "boss.b", role="admin").sites is None


def test_an_old_hash_is_replaced_after_a_successful_login(store: DashboardStore, secrets: Secrets) -> None:
    add(store, secrets, "old.hash")
    weak = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1).hash(PASSWORD)
    with store._transaction() as conn:
        conn.execute(sa.update(users_table).where(users_table.c.name == "old.hash").values(password_hash=weak))
    assert users.verify_password(store, "old.hash", PASSWORD) is not None
    renewed = stored_hash(store, "old.hash") or ""
    assert renewed != weak and not PasswordHasher().check_needs_rehash(renewed)
    assert users.verify_password(store, "old.hash", PASSWORD) is not None


def test_an_unknown_name_costs_as_much_as_a_wrong_password(tmp_path: Path, secrets: Secrets) -> None:
    store = DashboardStore(tmp_path / "f.sqlite3")
    try:
        add(store, secrets, "known")
        users.verify_password(store, "nobody", "warm up the dummy hash")

        def best(name: str) -> float:
            times = []
            for _ in range(3):
                start = time.perf_counter()
                assert users.verify_password(store, name, "not the password") is None
                times.append(time.perf_counter() - start)
            return min(times)

        known, unknown = best("known"), best("nobody")
        assert unknown > 0.5 * known, (known, unknown)  # both run one argon2 verification (tens of ms)
    finally:
        store.close()


# -- changes, audited --------------------------------------------------------------------------------------------


def session_count(store: DashboardStore, name: str) -> int:
    with store._read() as conn:
        stmt = sa.select(sa.func.count()).where(web_sessions.c.user_name == name)
        return int(conn.execute(stmt).scalar_one())


def open_session(store: DashboardStore, name: str) -> None:
    with store._transaction() as conn:
        token = os.urandom(8).hex()
        conn.execute(
            sa.insert(web_sessions),
            {"token_sha256": token, "user_name": name, "csrf": "x", "created_at": T0, "last_at": T0},
        )


def test_disable_takes_effect_at_once_and_every_change_is_audited(store: DashboardStore, secrets: Secrets) -> None:
    who = {"secrets": secrets, "actor": "admin1", "address": "10.0.0.5"}
    add(store, secrets, "boss", role="admin")
    add(store, secrets, "nurse.k")
    open_session(store, "nurse.k")
    assert users.set_disabled(store, "nurse.k", True, **who)  # type: ignore[arg-type]
    assert users.verify_password(store, "nurse.k", PASSWORD) is None  # the right password no longer logs in
    assert users.get_user(store, "nurse.k") == users.UserRecord("nurse.k", "reviewer", None, True, True)
    assert session_count(store, "nurse.k") == 0
    assert not users.set_disabled(store, "nurse.k", True, **who)  # type: ignore[arg-type]
    assert users.set_disabled(store, "nurse.k", False, **who)  # type: ignore[arg-type]
    assert users.verify_password(store, "nurse.k", PASSWORD) is not None
    open_session(store, "nurse.k")
    users.set_password(store, "nurse.k", "a brand new passphrase", **who)  # type: ignore[arg-type]
    assert users.verify_password(store, "nurse.k", PASSWORD) is None
    assert users.verify_password(store, "nurse.k", "a brand new passphrase") is not None
    assert session_count(store, "nurse.k") == 0
    assert users.set_role(store, "nurse.k", "viewer", **who)  # type: ignore[arg-type]
    assert not users.set_role(store, "nurse.k", "viewer", **who)  # type: ignore[arg-type]
    assert actions(store) == [
        ("user_added", "boss"),
        ("user_added", "nurse.k"),
        ("user_disabled", "nurse.k"),
        ("user_enabled", "nurse.k"),
        ("password_changed", "nurse.k"),
        ("role_changed", "nurse.k"),
    ]
    last = audit.rows(store, limit=1)[0]
    assert (last["actor"], last["address"], last["detail"]) == (
        "admin1",
        "10.0.0.5",
        '{"from":"reviewer","to":"viewer"}',
    )
    assert audit.verify(store, secrets.audit_key).ok
    everything = " ".join(str(r) for r in audit.rows(store, limit=100))
    assert PASSWORD not in everything and "brand new" not in everything and "$argon2" not in everything
    listed = users.list_users(store)
    assert [(u["name"], u["role"], u["disabled"], u["has_password"]) for u in listed] == [
        ("boss", "admin", False, True),
        ("nurse.k", "viewer", False, True),
    ]
    assert "password_hash" not in listed[0]


def test_the_last_admin_stays(store: DashboardStore, secrets: Secrets) -> None:
    who = {"secrets": secrets, "actor": "admin1", "address": None}
    add(store, secrets, "boss", role="admin")
    with pytest.raises(users.UserError, match="last enabled admin"):
        users.set_disabled(store, "boss", True, **who)  # type: ignore[arg-type]
    with pytest.raises(users.UserError, match="last enabled admin"):
        users.set_role(store, "boss", "viewer", **who)  # type: ignore[arg-type]
    add(store, secrets, "deputy", role="admin")
    assert users.set_role(store, "boss", "viewer", **who)  # type: ignore[arg-type]
    with pytest.raises(users.UserError, match="no user 'ghost'"):
        users.set_disabled(store, "ghost", True, **who)  # type: ignore[arg-type]


def test_a_change_and_its_audit_row_commit_together(store: DashboardStore, secrets: Secrets) -> None:
    with pytest.raises(ValueError, match="actor"):
        users.add_user(store, "nurse.k", "viewer", None, PASSWORD, secrets=secrets, actor="", address=None)
    assert users.get_user(store, "nurse.k") is None and audit.count(store) == 0


# -- the slow-down ------------------------------------------------------------------------------------------------


def test_a_failed_login_names_only_an_existing_user(store: DashboardStore, secrets: Secrets) -> None:
    add(store, secrets, "nurse.k")
    key = secrets.audit_key
    assert users.failed_login_subject(store, "nurse.k", key) == ("nurse.k", {})
    # A password typed into the name field must not reach the trail: no target, a keyed fingerprint only.
    target, detail = users.failed_login_subject(store, PASSWORD, key)
    assert target is None and set(detail) == {"unknown_name"}
    mark = detail["unknown_name"]
    assert len(mark) == 16 and PASSWORD not in mark and "correct" not in mark
    assert users.failed_login_subject(store, PASSWORD, key) == (None, {"unknown_name": mark})  # repeats show
    assert users.failed_login_subject(store, "nurse.x", key)[1]["unknown_name"] != mark
    assert users.failed_login_subject(store, PASSWORD, b"k" * 32)[1]["unknown_name"] != mark  # keyed


def test_attempts_sent_at_once_pass_the_slow_down_no_more_than_the_free_ones(db: str, store: DashboardStore) -> None:
    import threading

    from edgemed.dashboard import slowdown

    # One store each, as several serve processes behind a load balancer have.
    stores = [DashboardStore(db) for _ in range(12)]
    start = threading.Barrier(len(stores))
    waits: list[float] = []

    def attempt(mine: DashboardStore) -> None:
        start.wait(10)
        waits.append(slowdown.claim_attempt(mine, "nurse.k", "10.0.0.9", T0)[0])

    threads = [threading.Thread(target=attempt, args=(s,)) for s in stores]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        for s in stores:
            s.close()
    assert len(waits) == 12 and waits.count(0.0) == slowdown.FREE_FAILURES + 1
    assert users.login_delay(store, "nurse.k", "10.0.0.9", T0) == pytest.approx(1.0)
    # A right password takes its attempt back: colleagues behind one address never slow each other down.
    for i in range(10):
        wait, ids = slowdown.claim_attempt(store, f"colleague{i}", "10.0.0.7", T0 + i)
        assert wait == 0.0 and len(ids) == 2
        slowdown.attempt_succeeded(store, f"colleague{i}", ids, T0 + i)
    assert users.login_delay(store, "someone", "10.0.0.7", T0 + 10) == 0.0
    with store._read() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(login_failures)).scalar_one() == 8  # nurse.k's


def test_a_password_typed_as_the_name_is_not_kept_by_the_slow_down(store: DashboardStore) -> None:
    users.record_failure(store, PASSWORD, "10.0.0.9", T0)
    with store._read() as conn:
        keys = [str(k) for k in conn.execute(sa.select(login_failures.c.key)).scalars()]
    assert len(keys) == 2 and not any("horse" in k for k in keys), keys
    assert users.login_delay(store, PASSWORD, None, T0) == 0.0  # still counted under its digest
    for i in range(4):
        users.record_failure(store, PASSWORD, None, T0 + i)
    assert users.login_delay(store, PASSWORD, None, T0 + 3) > 0
    users.clear_failures(store, PASSWORD, T0 + 4)
    assert users.login_delay(store, PASSWORD, None, T0 + 4) == 0.0


def test_repeated_failures_are_slowed_per_user_and_per_address(store: DashboardStore) -> None:
    delay = users.login_delay
    for i in range(3):
        assert delay(store, "nurse.k", "10.0.0.9", T0 + i) == 0.0
        users.record_failure(store, "nurse.k", "10.0.0.9", T0 + i)
    assert delay(store, "nurse.k", "10.0.0.9", T0 + 3) == 0.0  # three are free
    users.record_failure(store, "nurse.k", "10.0.0.9", T0 + 3)
    assert delay(store, "nurse.k", "10.0.0.9", T0 + 3) == pytest.approx(1.0)
    assert delay(store, "nurse.k", "10.0.0.9", T0 + 3.5) == pytest.approx(0.5)
    users.record_failure(store, "nurse.k", "10.0.0.9", T0 + 4)
    assert delay(store, "nurse.k", "10.0.0.9", T0 + 4) == pytest.approx(2.0)
    # Per user name: another address guessing the same user waits too; per address: so does another name.
    assert delay(store, "nurse.k", "10.9.9.9", T0 + 4) == pytest.approx(2.0)
    assert delay(store, "someone.else", "10.0.0.9", T0 + 4) == pytest.approx(2.0)
    assert delay(store, "someone.else", "10.9.9.9", T0 + 4) == 0.0
    for i in range(5, 20):
        users.record_failure(store, "nurse.k", "10.0.0.9", T0 + i)
    assert delay(store, "nurse.k", "10.0.0.9", T0 + 19) == users.MAX_DELAY_S  # doubling, capped at 5 minutes
    # A success clears the user name's count, not the address's.
    users.clear_failures(store, "nurse.k", T0 + 20)
    assert delay(store, "nurse.k", None, T0 + 20) == 0.0
    assert delay(store, "nurse.k", "10.0.0.9", T0 + 20) == pytest.approx(users.MAX_DELAY_S - 1)
    # Failures older than 15 minutes no longer count, and are forgotten at the next failure.
    later = T0 + 19 + users.FAILURE_WINDOW_S + 1
    assert delay(store, "other", "10.0.0.9", later) == 0.0
    users.record_failure(store, "other", "10.0.0.9", later)
    with store._read() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(login_failures)).scalar_one() == 2


# -- the command line ---------------------------------------------------------------------------------------------


def test_cli_password_stdin_is_never_echoed_logged_or_stored(db: str, tmp_path: Path) -> None:
    key = tmp_path / "cli.key"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    base = [sys.executable, "-m", "edgemed", "--log-level", "DEBUG", "dashboard", "users"]
    common = ["--db", db, "--secret-file", str(key)]
    proc = subprocess.run(
        [*base, "add", "first.admin", *common, "--role", "admin", "--password-stdin"],
        input=(PASSWORD + "\n").encode(), capture_output=True, timeout=60, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert b"added first.admin (admin, every site)" in proc.stdout
    proc2 = subprocess.run(
        [*base, "passwd", "first.admin", *common, "--password-stdin"],
        input=b"another long passphrase\r\n", capture_output=True, timeout=60, env=env,
    )  # fmt: skip
    assert proc2.returncode == 0, proc2.stderr
    for out in (proc.stdout, proc.stderr, proc2.stdout, proc2.stderr):
        assert PASSWORD.encode() not in out and b"another long passphrase" not in out
    store = DashboardStore(db)
    try:
        assert users.verify_password(store, "first.admin", "another long passphrase") is not None
        secrets = load_secrets(key, create=False)
        assert audit.verify(store, secrets.audit_key) == audit.VerifyResult(True, 2)
        rows = audit.rows(store)
        assert {r["actor"] for r in rows} == {f"cli:{__import__('pwd').getpwuid(os.geteuid()).pw_name}"}
        assert PASSWORD not in str(rows)
    finally:
        store.close()
    if "://" not in db:
        kept = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
        assert PASSWORD.encode() not in kept and b"another long passphrase" not in kept


def test_cli_changes_list_and_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    db = str(tmp_path / "fleet.sqlite3")

    def run(*argv: str, stdin: str = "") -> tuple[int, str]:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        code = main(["dashboard", "users", *argv])
        captured = capsys.readouterr()
        return code, captured.out + captured.err

    assert run("list", "--db", db) == (
        0,
        "no users yet; add the first admin: edgemed dashboard users add NAME --db DB --role admin\n",
    )
    assert run("add", "boss", "--db", db, "--role", "admin", "--password-stdin", stdin=PASSWORD + "\n")[0] == 0
    code, out = run(
        "add",
        "nurse.k",
        "--db",
        db,
        "--role",
        "reviewer",
        "--sites",
        "clinic-a,clinic-b",
        "--password-stdin",
        stdin=PASSWORD + "\n",
    )
    assert code == 0 and "sites clinic-a, clinic-b" in out
    assert run("disable", "nurse.k", "--db", db) == (0, "nurse.k disabled\n")
    assert run("disable", "nurse.k", "--db", db) == (0, "nurse.k was disabled already\n")
    assert run("role", "nurse.k", "--role", "viewer", "--db", db) == (0, "nurse.k is now viewer\n")
    code, out = run("list", "--db", db)
    assert out.splitlines()[1:] == [
        "boss     admin   every site         enabled   password",
        "nurse.k  viewer  clinic-a,clinic-b  disabled  password",
    ]
    assert run("enable", "nurse.k", "--db", db) == (0, "nurse.k enabled\n")
    code, out = run("add", "x", "--db", db, "--role", "viewer", "--password-stdin", stdin="short\n")
    assert code == 2 and "at least 12 characters" in out and "short" not in out.replace("too short", "")
    code, out = run("passwd", "ghost", "--db", db, "--password-stdin", stdin=PASSWORD + "\n")
    assert code == 2 and "no user 'ghost'" in out
    code, out = run("disable", "boss", "--db", db)
    assert code == 2 and "last enabled admin" in out
    code, out = run("add", "a.b", "--db", db, "--role", "viewer", "--password-stdin", stdin="\n")
    assert code == 2 and "--password-stdin read no password" in out
    code, out = run("list")
    assert code == 2 and "needs an action and --db" in out


def test_cli_asks_twice_without_echo() -> None:
    answers = iter([PASSWORD, PASSWORD])
    assert read_password("nurse.k", from_stdin=False, ask=lambda prompt: next(answers)) == PASSWORD
    answers = iter([PASSWORD, PASSWORD + "!"])
    with pytest.raises(ConfigError, match="the two passwords differ; nothing was changed"):
        read_password("nurse.k", from_stdin=False, ask=lambda prompt: next(answers))


def test_cli_on_postgresql_needs_the_secret_file(
    pg_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(PASSWORD + "\n"))
    assert main(["dashboard", "users", "add", "boss", "--db", pg_url, "--role", "admin", "--password-stdin"]) == 2
    err = capsys.readouterr().err
    assert "pass --secret-file FILE" in err and "edgemed-test-only" not in err


def test_cli_help_texts_give_examples(capsys: pytest.CaptureFixture[str]) -> None:
    for action in ("", "add", "disable", "enable", "passwd", "role", "list"):
        with pytest.raises(SystemExit):
            main(["dashboard", "users", *([action] if action else []), "--help"])
        out = capsys.readouterr().out
        assert "examples:" in out and "edgemed dashboard users " in out, action
    with pytest.raises(SystemExit):
        main(["dashboard", "--help"])
    out = capsys.readouterr().out
    assert "users" in out and "audit" in out
