"""Receipts (issue 11): settled seqs, lost announcements, stream progress; ``PRAGMA user_version`` 1 on SQLite.

A database that had results, study decisions and dead letters before gets its ``settled`` table filled from them
(stream ``''``: devices then named none), so the first receipts after the upgrade already count them. Only an
SQLite database can be that old: PostgreSQL came later, so on it the tables are new and empty.

Revision ID: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# Rows stored by an older dashboard: the seqs their results, studies and dead letters settle. A dead letter
# settles only on a results or studies topic.
_FILL_SETTLED = (
    "INSERT OR IGNORE INTO settled SELECT site, device_id, coalesce(json_extract(payload, '$.stream'), ''), seq, "
    "'stored' FROM results WHERE json_valid(payload)",
    "INSERT OR IGNORE INTO settled SELECT site, device_id, coalesce(json_extract(payload, '$.stream'), ''), seq, "
    "'stored' FROM studies WHERE json_valid(payload)",
    "INSERT OR IGNORE INTO settled SELECT site, device_id, coalesce(stream, ''), seq, 'rejected' FROM dead_letters "
    "WHERE seq IS NOT NULL AND site IS NOT NULL AND device_id IS NOT NULL "
    "AND (topic LIKE 'edgemed/%/results' OR topic LIKE 'edgemed/%/studies')",
)


def _key() -> list[sa.Column[str]]:
    return [sa.Column(name, sa.Text, primary_key=True) for name in ("site", "device_id", "stream")]


def upgrade() -> None:
    """Add the receipts' tables (those a half-done older upgrade left are kept) and fill ``settled``."""
    bind = op.get_bind()
    inspector = sa.inspect(bind)
    tables = set(inspector.get_table_names())
    if "stream" not in {c["name"] for c in inspector.get_columns("dead_letters")}:
        op.add_column("dead_letters", sa.Column("stream", sa.Text))
    if "settled" not in tables:
        op.create_table(
            "settled",
            *_key(),
            sa.Column("seq", sa.BigInteger, primary_key=True),
            sa.Column("how", sa.Text, nullable=False),
            sa.CheckConstraint("how IN ('stored', 'rejected', 'lost')", name="settled_how"),
            sqlite_with_rowid=False,
        )
        where = sa.text("how <> 'stored'")
        op.create_index(
            "settled_unstored",
            "settled",
            ["site", "device_id", "how"],
            sqlite_where=where,
            postgresql_where=where,
        )
    if "lost_ranges" not in tables:
        op.create_table(
            "lost_ranges",
            *_key(),
            sa.Column("first_seq", sa.BigInteger, primary_key=True),
            sa.Column("last_seq", sa.BigInteger, primary_key=True),
            sa.Column("reason", sa.Text, nullable=False),
            sa.Column("received_at", sa.Float, nullable=False),
        )
    if "stream_seen" not in tables:
        op.create_table("stream_seen", *_key(), sa.Column("seen_at", sa.Float, nullable=False), sqlite_with_rowid=False)
        op.create_index("stream_seen_at", "stream_seen", ["seen_at"])
    if "stream_progress" not in tables:
        op.create_table("stream_progress", *_key(), sa.Column("through_seq", sa.BigInteger, nullable=False))
    if bind.dialect.name == "sqlite":
        for sql in _FILL_SETTLED:
            op.execute(sql)
        op.execute("PRAGMA user_version = 1")  # what an older dashboard reads as "settled is filled"


def downgrade() -> None:
    """Not supported: the dashboard never goes back to an older schema (restore a backup instead)."""
    raise NotImplementedError("the dashboard database is never downgraded; restore a backup instead")
