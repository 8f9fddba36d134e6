"""The dashboard's tables before receipts (main before issue 11; ``PRAGMA user_version`` 0 on SQLite).

Revision ID: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    """Create the tables of a dashboard before receipts."""
    op.create_table(
        "results",
        sa.Column("result_id", sa.Text, primary_key=True),
        sa.Column("site", sa.Text, nullable=False),
        sa.Column("device_id", sa.Text, nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.Text, nullable=False),
        sa.Column("clock_synced", sa.Integer),
        sa.Column("received_at", sa.Float, nullable=False),
        sa.Column("level", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("label", sa.Text),
        sa.Column("delegate", sa.Text),
        sa.Column("degraded", sa.Integer),
        sa.Column("session_id", sa.Text),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("triage_label", sa.Text),
    )
    op.create_index("results_level", "results", ["level", "received_at"])
    op.create_index("results_received", "results", ["received_at"])
    op.create_table(
        "studies",
        sa.Column("result_id", sa.Text, primary_key=True),
        sa.Column("site", sa.Text, nullable=False),
        sa.Column("device_id", sa.Text, nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.Text, nullable=False),
        sa.Column("received_at", sa.Float, nullable=False),
        sa.Column("level", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("frames", sa.BigInteger),
        sa.Column("first_seq", sa.BigInteger),
        sa.Column("last_seq", sa.BigInteger),
        sa.Column("session_id", sa.Text),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("triage_label", sa.Text),
    )
    op.create_index("studies_level", "studies", ["level", "received_at"])
    op.create_index("studies_received", "studies", ["received_at"])
    op.create_table(
        "devices",
        sa.Column("site", sa.Text, primary_key=True),
        sa.Column("device_id", sa.Text, primary_key=True),
        sa.Column("last_seen", sa.Float, nullable=False),
        sa.Column("status", sa.Text),
        sa.Column("status_at", sa.Float),
        sa.Column("health", sa.Text),
        sa.Column("health_at", sa.Float),
    )
    op.create_index("devices_last_seen", "devices", ["last_seen"])
    op.create_table(
        "acks",
        sa.Column("result_id", sa.Text, primary_key=True),
        sa.Column("acked_at", sa.Float, nullable=False),
        sa.Column("acked_by", sa.Text, nullable=False),
    )
    op.create_table(
        "dead_letters",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("received_at", sa.Float, nullable=False),
        sa.Column("topic", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("payload", sa.LargeBinary, nullable=False),
        sa.Column("payload_bytes", sa.Integer, nullable=False),
        sa.Column("site", sa.Text),
        sa.Column("device_id", sa.Text),
        sa.Column("seq", sa.BigInteger),
        sa.Column("result_id", sa.Text),
        sa.Column("payload_sha256", sa.Text),
        sqlite_autoincrement=True,
    )
    op.create_index("dead_letters_received", "dead_letters", ["received_at"])
    op.create_index("dead_letters_sha256", "dead_letters", ["payload_sha256"])
    op.create_table(
        "dead_letter_counts",
        sa.Column("reason", sa.Text, primary_key=True),
        sa.Column("n", sa.BigInteger, nullable=False),
        sa.Column("last_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    """Not supported: the dashboard never goes back to an older schema (restore a backup instead)."""
    raise NotImplementedError("the dashboard database is never downgraded; restore a backup instead")
