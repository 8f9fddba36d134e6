"""``edgemed dashboard users``: add, disable, enable, re-password, re-role and list the people who may log in.

Each change is audited with actor ``cli:<os user>`` (the account that ran the command). A password is asked twice
on the terminal without echo, or read as one line from standard input with ``--password-stdin``; it is never an
argument (it would be in the shell history and in ``ps``), never printed, never logged.
"""

from __future__ import annotations

import argparse
import getpass
import os
import socket
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from edgemed.errors import ConfigError

if TYPE_CHECKING:
    from edgemed.dashboard.secrets import Secrets
    from edgemed.dashboard.store import DashboardStore

__all__ = ["USERS_DESCRIPTION", "add_users_arguments", "cli_actor", "read_password", "run_users"]

USERS_DESCRIPTION = """\
Manage who may log in to the dashboard page. Roles: viewer (reads), reviewer (also acknowledges and closes
results), admin (also manages users and settings). --sites limits a user to some sites: they see nothing else.
There is no default password: every password is typed here (twice, not echoed) or piped in with
--password-stdin, at least 12 characters and not the user name. Every change is written to the audit trail as
cli:<your OS user>; disabling a user or changing their password ends their open sessions.

The audit trail's key is kept in a file beside an SQLite database (DB.key, 0600, created on first use); with
PostgreSQL pass --secret-file FILE, the same file every `serve` process uses.

examples:
  edgemed dashboard users add a.smith --db fleet.sqlite3 --role admin               (the first admin; asks twice)
  edgemed dashboard users add nurse.k --db fleet.sqlite3 --role reviewer --sites clinic-a,clinic-b
  printf '%s\\n' "$NEW_PASSWORD" | edgemed dashboard users passwd nurse.k --db fleet.sqlite3 --password-stdin
  edgemed dashboard users role nurse.k --role viewer --db fleet.sqlite3
  edgemed dashboard users disable nurse.k --db fleet.sqlite3
  edgemed dashboard users list --db postgresql://edgemed@db.example.org/fleet --secret-file /etc/edgemed/dash.key
"""

_ACTIONS = {
    "add": "add a user (asks for the password twice, or --password-stdin)",
    "disable": "stop a user from logging in (ends their sessions)",
    "enable": "let a disabled user log in again",
    "passwd": "set a user's password (ends their sessions)",
    "role": "change a user's role",
    "list": "list the users, their roles, sites and state",
}


_EXAMPLES = {
    "add": "  edgemed dashboard users add a.smith --db fleet.sqlite3 --role admin\n"
    "  printf '%s\\n' \"$PW\" | edgemed dashboard users add nurse.k --db fleet.sqlite3 --role reviewer "
    "--sites clinic-a --password-stdin",
    "disable": "  edgemed dashboard users disable nurse.k --db fleet.sqlite3",
    "enable": "  edgemed dashboard users enable nurse.k --db fleet.sqlite3",
    "passwd": "  edgemed dashboard users passwd nurse.k --db fleet.sqlite3          (asks twice, not echoed)",
    "role": "  edgemed dashboard users role nurse.k --role viewer --db fleet.sqlite3",
    "list": "  edgemed dashboard users list --db fleet.sqlite3",
}


def add_db_arguments(p: argparse.ArgumentParser) -> None:
    """``--db`` and ``--secret-file`` of the ``users`` and ``audit`` sub-commands.

    SUPPRESS: a ``--db`` given to ``edgemed dashboard`` before the sub-command is kept.
    """
    p.add_argument(
        "--db", default=argparse.SUPPRESS, metavar="DB", help="required: the dashboard database (file or URL)"
    )
    p.add_argument(
        "--secret-file",
        type=Path,
        default=argparse.SUPPRESS,
        metavar="FILE",
        help="the key file of the audit trail (default: DB.key beside an SQLite file; required with PostgreSQL)",
    )


def add_users_arguments(p: argparse.ArgumentParser) -> None:
    """The sub-commands and options of ``edgemed dashboard users``.

    Args:
        p: the ``users`` parser.
    """
    sub = p.add_subparsers(dest="users_action", metavar="{" + ",".join(_ACTIONS) + "}")
    parsers = {
        name: sub.add_parser(
            name,
            help=helptext,
            description=helptext[0].upper() + helptext[1:] + ".",
            epilog="examples:\n" + _EXAMPLES[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        for name, helptext in _ACTIONS.items()
    }
    for name, q in parsers.items():
        if name != "list":
            q.add_argument("name", metavar="NAME", help="the login name: 1-64 letters, digits, '.', '_', '@' or '-'")
        add_db_arguments(q)
    for name in ("add", "role"):
        parsers[name].add_argument(
            "--role", required=True, choices=["viewer", "reviewer", "admin"], help="what the user may do"
        )
    parsers["add"].add_argument(
        "--sites",
        default=None,
        metavar="A,B",
        help="limit the user to these sites (comma-separated site ids); default: every site",
    )
    for name in ("add", "passwd"):
        parsers[name].add_argument(
            "--password-stdin",
            action="store_true",
            help="read the password as one line from standard input (for scripts) instead of asking twice",
        )


def cli_actor() -> str:
    """``cli:<os user>``: who ran the command, as the audit trail names them."""
    try:
        import pwd

        user = pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):
        user = f"uid{os.geteuid()}"
    return f"cli:{user}"


def read_password(
    name: str, *, from_stdin: bool, stdin: TextIO | None = None, ask: Callable[[str], str] = getpass.getpass
) -> str:
    """The new password: one line of standard input, or typed twice on the terminal without echo.

    Args:
        name: the user it is for (the prompt names them; the password must not be the name).
        from_stdin: ``--password-stdin``.
        stdin: where ``--password-stdin`` reads from (standard input when None).
        ask: the no-echo prompt (``getpass.getpass``).

    Returns:
        The password (checked by ``users.check_password``).

    Raises:
        ConfigError: nothing on standard input, no terminal to ask on, the two entries differ, or a password the
            rules refuse.
    """
    from edgemed.dashboard.users import UserError, check_password

    if from_stdin:
        line = (stdin or sys.stdin).readline()
        if not line.strip():
            raise ConfigError("--password-stdin read no password: pipe one line in, e.g. printf '%s\\n' \"$PW\" | ...")
        password = line.rstrip("\r\n")
    else:
        with warnings.catch_warnings():
            # getpass falls back to reading (and echoing) standard input when there is no terminal: refuse that.
            warnings.simplefilter("error", getpass.GetPassWarning)
            try:
                password = ask(f"new password for {name}: ")
                again = ask(f"the same password for {name} again: ")
            except (getpass.GetPassWarning, EOFError) as exc:
                raise ConfigError(
                    "no terminal to ask for the password without echoing it: pipe it in with --password-stdin"
                ) from exc
        if password != again:
            raise ConfigError("the two passwords differ; nothing was changed")
    try:
        check_password(name, password)
    except UserError as exc:
        raise ConfigError(str(exc)) from exc
    return password


def _sites(text: str | None) -> list[str] | None:
    return None if text is None else text.split(",")


def _list(store: DashboardStore, out: TextIO) -> None:
    from edgemed.dashboard.users import list_users

    found = list_users(store)
    if not found:
        print("no users yet; add the first admin: edgemed dashboard users add NAME --db DB --role admin", file=out)
        return
    rows = [("NAME", "ROLE", "SITES", "STATE", "LOGIN")]
    for u in found:
        sites = "every site" if u["sites"] is None else ",".join(u["sites"])
        state = "disabled" if u["disabled"] else "enabled"
        rows.append((u["name"], u["role"], sites, state, "password" if u["has_password"] else "single sign-on only"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r[:4], widths, strict=True)) + "  " + r[4], file=out)


def _change(store: DashboardStore, secrets: Secrets, args: argparse.Namespace, out: TextIO) -> None:
    from edgemed.dashboard import users

    actor, address = cli_actor(), socket.gethostname()[:200] or None
    action, name = args.users_action, args.name
    if action == "add":
        users.check_name(name)  # before asking for a password
        password = read_password(name, from_stdin=args.password_stdin)
        record = users.add_user(
            store, name, args.role, _sites(args.sites), password, secrets=secrets, actor=actor, address=address
        )
        where = "every site" if record.sites is None else "sites " + ", ".join(sorted(record.sites))
        print(f"added {name} ({record.role}, {where}); they log in on the dashboard page", file=out)
    elif action == "passwd":
        if users.get_user(store, name) is None:  # said before the prompt, not after two passwords typed
            raise ConfigError(f"no user {name!r:.80}; `edgemed dashboard users list --db DB` shows who there is")
        users.set_password(
            store,
            name,
            read_password(name, from_stdin=args.password_stdin),
            secrets=secrets,
            actor=actor,
            address=address,
        )
        print(f"password of {name} changed; their open sessions were ended", file=out)
    elif action in ("disable", "enable"):
        changed = users.set_disabled(store, name, action == "disable", secrets=secrets, actor=actor, address=address)
        print(f"{name} {action}d" if changed else f"{name} was {action}d already", file=out)
    elif action == "role":
        changed = users.set_role(store, name, args.role, secrets=secrets, actor=actor, address=address)
        print(f"{name} is now {args.role}" if changed else f"{name} was {args.role} already", file=out)


def run_users(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run ``edgemed dashboard users ACTION``.

    Args:
        args: the parsed command line.
        out: where messages go (standard output when None).

    Returns:
        0 on success.

    Raises:
        ConfigError: no action or ``--db``, a bad name, role, site or password, an unknown user, the last admin, or
            an unusable database or secret file.
    """
    from edgemed.dashboard.audit import open_secrets
    from edgemed.dashboard.cli_args import open_store
    from edgemed.dashboard.secrets import resolve_secret_path
    from edgemed.dashboard.users import UserError

    stream = out if out is not None else sys.stdout
    action = getattr(args, "users_action", None)
    db = getattr(args, "db", None)
    if action is None or db is None:
        raise ConfigError(
            "edgemed dashboard users needs an action and --db, e.g. "
            "edgemed dashboard users add NAME --db fleet.sqlite3 --role admin (see --help)"
        )
    store = open_store(db)
    try:
        if action == "list":
            _list(store, stream)
            return 0
        secrets = open_secrets(store, resolve_secret_path(db, getattr(args, "secret_file", None)))
        _change(store, secrets, args, stream)
        return 0
    except UserError as exc:
        raise ConfigError(str(exc)) from exc
    finally:
        store.close()
