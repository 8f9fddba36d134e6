"""The clinical dashboard (issue 13): users, sessions, failed logins, the audit trail, reviews, escalations,
settings, per-hour result counts, and each result's model and confidence as columns.

Existing results get ``model`` and ``confidence`` from their kept JSON, and ``result_hourly`` is filled from them,
so the charts and the drift view show what was stored before the upgrade. An acknowledgement of the old page
(typed initials) becomes an ``acknowledged`` review by ``initials:XX``: it was never a login.

Revision ID: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _t(name: str, nullable: bool = True) -> sa.Column[str]:
    return sa.Column(name, sa.Text, nullable=nullable)


def _f(name: str, nullable: bool = False) -> sa.Column[float]:
    return sa.Column(name, sa.Float, nullable=nullable)


def _fill_results() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute(
            "UPDATE results SET model = json_extract(payload, '$.model.name'), confidence = ("
            "SELECT max(value) FROM json_each(payload, '$.prediction.probabilities')) "
            "WHERE json_valid(payload)"
        )
        hour = "CAST(received_at / 3600 AS INTEGER) * 3600"
    else:
        op.execute(
            "UPDATE results SET model = CAST(payload AS json) -> 'model' ->> 'name', confidence = ("
            "SELECT max(value::text::float) FROM json_each(CAST(payload AS json) -> 'prediction' -> 'probabilities'))"
        )
        hour = "CAST(floor(received_at / 3600) AS BIGINT) * 3600"
    op.execute(
        "INSERT INTO result_hourly(site, hour, model, level, label, n, confidence_sum) "
        f"SELECT site, {hour}, coalesce(model, ''), level, coalesce(label, ''), count(*), "
        f"coalesce(sum(confidence), 0) FROM results GROUP BY site, {hour}, coalesce(model, ''), level, "
        "coalesce(label, '')"
    )


def upgrade() -> None:
    """Create the clinical dashboard's tables and fill what can be filled from the rows already stored."""
    op.add_column("results", sa.Column("model", sa.Text))
    op.add_column("results", sa.Column("confidence", sa.Float))
    op.create_index("results_site_recent", "results", ["site", "received_at"])
    op.create_index("results_site_level", "results", ["site", "level", "received_at"])
    op.create_index("studies_site_level", "studies", ["site", "level", "received_at"])
    # The review queue's partial indexes (see tables.py): nothing is closed yet, so every column starts NULL.
    waiting = sa.text("closed_at IS NULL AND level IN ('urgent', 'inconclusive')")
    for table in ("results", "studies"):
        op.add_column(table, sa.Column("closed_at", sa.Float))
        op.create_index(
            f"{table}_waiting",
            table,
            ["site", "level", "received_at"],
            sqlite_where=waiting,
            postgresql_where=waiting,
        )
    op.create_table(
        "users",
        sa.Column("name", sa.Text, primary_key=True),
        _t("password_hash"),
        _t("role", False),
        _t("sites"),
        sa.Column("disabled", sa.Integer, nullable=False, server_default="0"),
        _f("created_at"),
        _f("updated_at"),
        sa.CheckConstraint("role IN ('viewer', 'reviewer', 'admin')", name="users_role"),
    )
    op.create_table(
        "web_sessions",
        sa.Column("token_sha256", sa.Text, primary_key=True),
        _t("user_name", False),
        _t("csrf", False),
        _f("created_at"),
        _f("last_at"),
        _t("address"),
    )
    op.create_index("web_sessions_user", "web_sessions", ["user_name"])
    op.create_index("web_sessions_last", "web_sessions", ["last_at"])
    op.create_table(
        "login_failures",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        _t("key", False),
        _f("at"),
        sqlite_autoincrement=True,
    )
    op.create_index("login_failures_key", "login_failures", ["key", "at"])
    op.create_table(
        "audit",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        _f("at"),
        _t("actor", False),
        _t("address"),
        _t("action", False),
        _t("target"),
        _t("site"),
        _t("detail", False),
        _t("hmac", False),
        sqlite_autoincrement=True,
    )
    op.create_index("audit_at", "audit", ["at"])
    op.create_table(
        "reviews",
        sa.Column("result_id", sa.Text, primary_key=True),
        _t("site", False),
        _t("state", False),
        _t("acked_by"),
        _f("acked_at", True),
        _t("closed_by"),
        _f("closed_at", True),
        _t("outcome"),
        _t("note"),
        sa.CheckConstraint("state IN ('acknowledged', 'closed')", name="reviews_state"),
        sa.CheckConstraint(
            "outcome IS NULL OR outcome IN ('referred', 'seen', 'false_alarm', 'other')", name="reviews_outcome"
        ),
    )
    op.create_index("reviews_site_state", "reviews", ["site", "state"])
    op.create_table(
        "escalations",
        sa.Column("result_id", sa.Text, primary_key=True),
        _t("site", False),
        _f("escalated_at"),
        _t("webhook_status"),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        _f("next_attempt_at", True),
    )
    op.create_index("escalations_next", "escalations", ["next_attempt_at"])
    op.create_table(
        "settings",
        sa.Column("key", sa.Text, primary_key=True),
        _t("value", False),
        _f("updated_at"),
        _t("updated_by"),
    )
    op.create_table(
        "result_hourly",
        sa.Column("site", sa.Text, primary_key=True),
        sa.Column("hour", sa.BigInteger, primary_key=True),
        sa.Column("model", sa.Text, primary_key=True),
        sa.Column("level", sa.Text, primary_key=True),
        sa.Column("label", sa.Text, primary_key=True),
        sa.Column("n", sa.BigInteger, nullable=False),
        sa.Column("confidence_sum", sa.Float, nullable=False, server_default="0"),
    )
    op.create_index("result_hourly_hour", "result_hourly", ["hour"])
    _fill_results()
    op.execute(
        "INSERT INTO reviews(result_id, site, state, acked_by, acked_at) "
        "SELECT a.result_id, coalesce(r.site, s.site), 'acknowledged', 'initials:' || a.acked_by, a.acked_at "
        "FROM acks a LEFT JOIN results r ON r.result_id = a.result_id LEFT JOIN studies s ON s.result_id = a.result_id "
        "WHERE coalesce(r.site, s.site) IS NOT NULL"
    )
    op.drop_table("acks")  # its rows are reviews now; the review workflow (review.py) writes only those


def downgrade() -> None:
    """Refused, like every revision's: a downgrade would drop the audit trail; restore a backup instead."""
    raise NotImplementedError("the dashboard database is never downgraded; restore a backup taken before upgrading")
