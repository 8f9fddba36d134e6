"""Fleet scale (issue 12): ``stream`` on results and studies, ingest workers, heartbeat history, page indexes.

``stream`` (the seq stream a result names) was read from the kept JSON with SQLite's ``json_extract``; a column
reads the same on both engines and lets a duplicate be checked without parsing. Old rows get it from their JSON.

Revision ID: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_HEALTH_FIELDS = (
    "pending",
    "awaiting_receipt",
    "oldest_pending_s",
    "fps",
    "p95_ms",
    "frames",
    "errors",
    "cpu_percent",
    "cpu_temp_c",
    "peak_rss_mb",
    "disk_free_mb",
)


def _fill_stream(table: str) -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute(
            f"UPDATE {table} SET stream = json_extract(payload, '$.stream') "
            "WHERE json_valid(payload) AND json_type(payload, '$.stream') = 'text'"
        )
    else:
        op.execute(f"UPDATE {table} SET stream = coalesce(CAST(payload AS json) ->> 'stream', '')")


def upgrade() -> None:
    """Add the columns, tables and indexes of the central side at fleet scale."""
    for table in ("results", "studies"):
        op.add_column(table, sa.Column("stream", sa.Text, nullable=False, server_default=""))
        _fill_stream(table)
    op.drop_index("results_received", "results")
    op.create_index("results_recent", "results", ["received_at", "seq"])
    op.create_table(
        "ingest_workers",
        sa.Column("worker_id", sa.Text, primary_key=True),
        sa.Column("consumer_id", sa.Text, nullable=False),
        sa.Column("group_name", sa.Text),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("last_at", sa.Float, nullable=False),
        sa.Column("stats", sa.JSON, nullable=False),
    )
    op.create_table(
        "health_history",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("site", sa.Text, nullable=False),
        sa.Column("device_id", sa.Text, nullable=False),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("hour", sa.BigInteger, nullable=False),
        *(sa.Column(name, sa.Float) for name in _HEALTH_FIELDS),
    )
    op.create_index("health_history_device", "health_history", ["site", "device_id", "at"])
    op.create_index("health_history_at", "health_history", ["at"])
    op.create_table(
        "health_hourly",
        sa.Column("site", sa.Text, primary_key=True),
        sa.Column("device_id", sa.Text, primary_key=True),
        sa.Column("hour", sa.BigInteger, primary_key=True),
        sa.Column("n", sa.Integer, nullable=False),
        *(sa.Column(f"{name}_{agg}", sa.Float) for name in _HEALTH_FIELDS for agg in ("min", "max", "last")),
    )
    op.create_index("health_hourly_hour", "health_hourly", ["hour"])


def downgrade() -> None:
    """Not supported: the dashboard never goes back to an older schema (restore a backup instead)."""
    raise NotImplementedError("the dashboard database is never downgraded; restore a backup instead")
