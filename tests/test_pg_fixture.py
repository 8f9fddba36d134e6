"""The PostgreSQL test cluster itself (tests/pg_fixtures.py): a real server, password login, defaults kept."""

from __future__ import annotations

import psycopg
import pytest


def test_a_fresh_database_per_test_on_a_real_postgresql_15(pg_url: str) -> None:
    with psycopg.connect(pg_url, connect_timeout=10) as conn:
        version = conn.execute("SHOW server_version_num").fetchone()
        assert version is not None and 150000 <= int(version[0]) < 160000
        # The durability settings are PostgreSQL's own defaults, as users run it.
        assert conn.execute("SHOW fsync").fetchone() == ("on",)
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)
        tables = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()
        assert tables == (0,)


def test_a_wrong_password_is_refused(pg_url: str) -> None:
    wrong = pg_url.replace("edgemed-test-only", "not-the-password")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(wrong, connect_timeout=10)
