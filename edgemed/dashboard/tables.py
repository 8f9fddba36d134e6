"""Every table of the dashboard database, for SQLite and PostgreSQL alike (SQLAlchemy Core; one ``MetaData``).

The migrations (``migrations/versions``) create these tables; this module is what the store's statements are built
from, and ``tests/test_dashboard_migrations.py`` checks that a migrated database matches it. Column types are
chosen for both engines: ``seq`` and other device integers are 64-bit (``BIGINT`` on PostgreSQL, ``INTEGER`` on
SQLite), times are seconds since the epoch as double precision, an envelope is kept as the text the device sent.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

# An auto-numbered key: SQLite's rowid alias must be spelled INTEGER; PostgreSQL needs 64 bits.
_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

#: Numeric heartbeat fields kept per heartbeat (``health_history``) and per hour (``health_hourly``).
HEALTH_FIELDS = (
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


def _text(name: str, nullable: bool = True) -> sa.Column[str]:
    return sa.Column(name, sa.Text, nullable=nullable)


def _time(name: str, nullable: bool = False) -> sa.Column[float]:
    return sa.Column(name, sa.Float, nullable=nullable)


def _int(name: str, nullable: bool = True) -> sa.Column[int]:
    return sa.Column(name, sa.BigInteger, nullable=nullable)


results = sa.Table(
    "results",
    metadata,
    sa.Column("result_id", sa.Text, primary_key=True),
    _text("site", False),
    _text("device_id", False),
    _int("seq", False),
    _text("created_at", False),
    sa.Column("clock_synced", sa.Integer),
    _time("received_at"),
    _text("level", False),
    _text("reason", False),
    _text("label"),
    _text("delegate"),
    sa.Column("degraded", sa.Integer),
    _text("session_id"),
    _text("payload", False),
    _text("triage_label"),
    sa.Column("stream", sa.Text, nullable=False, server_default=""),
)
sa.Index("results_level", results.c.level, results.c.received_at)
# Recent results, newest first (the page's last table and its pages), and the export's order.
sa.Index("results_recent", results.c.received_at, results.c.seq)

studies = sa.Table(
    "studies",
    metadata,
    sa.Column("result_id", sa.Text, primary_key=True),
    _text("site", False),
    _text("device_id", False),
    _int("seq", False),
    _text("created_at", False),
    _time("received_at"),
    _text("level", False),
    _text("reason", False),
    _int("frames"),
    _int("first_seq"),
    _int("last_seq"),
    _text("session_id"),
    _text("payload", False),
    _text("triage_label"),
    sa.Column("stream", sa.Text, nullable=False, server_default=""),
)
sa.Index("studies_level", studies.c.level, studies.c.received_at)
sa.Index("studies_received", studies.c.received_at)

devices = sa.Table(
    "devices",
    metadata,
    sa.Column("site", sa.Text, primary_key=True),
    sa.Column("device_id", sa.Text, primary_key=True),
    _time("last_seen"),
    _text("status"),
    _time("status_at", True),
    _text("health"),
    _time("health_at", True),
)
sa.Index("devices_last_seen", devices.c.last_seen)

acks = sa.Table(
    "acks",
    metadata,
    sa.Column("result_id", sa.Text, primary_key=True),
    _time("acked_at"),
    _text("acked_by", False),
)

dead_letters = sa.Table(
    "dead_letters",
    metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    _time("received_at"),
    _text("topic", False),
    _text("reason", False),
    sa.Column("payload", sa.LargeBinary, nullable=False),
    sa.Column("payload_bytes", sa.Integer, nullable=False),
    _text("site"),
    _text("device_id"),
    _int("seq"),
    _text("result_id"),
    _text("payload_sha256"),
    _text("stream"),
    sqlite_autoincrement=True,
)
sa.Index("dead_letters_received", dead_letters.c.received_at)
sa.Index("dead_letters_sha256", dead_letters.c.payload_sha256)

dead_letter_counts = sa.Table(
    "dead_letter_counts",
    metadata,
    sa.Column("reason", sa.Text, primary_key=True),
    _int("n", False),
    _time("last_at"),
)


def _stream_key() -> list[sa.Column[str]]:
    return [sa.Column(name, sa.Text, primary_key=True) for name in ("site", "device_id", "stream")]


# Every seq settled per stream (see settlement.py): stored, rejected (a dead letter) or lost (announced).
settled = sa.Table(
    "settled",
    metadata,
    *_stream_key(),
    sa.Column("seq", sa.BigInteger, primary_key=True),
    sa.Column("how", sa.Text, nullable=False),
    sa.CheckConstraint("how IN ('stored', 'rejected', 'lost')", name="settled_how"),
    sqlite_with_rowid=False,
)
# The page counts what is not stored per device: few rows, so a partial index keeps that cheap.
_UNSTORED = sa.text("how <> 'stored'")
sa.Index(
    "settled_unstored",
    settled.c.site,
    settled.c.device_id,
    settled.c.how,
    sqlite_where=_UNSTORED,
    postgresql_where=_UNSTORED,
)

lost_ranges = sa.Table(
    "lost_ranges",
    metadata,
    *_stream_key(),
    sa.Column("first_seq", sa.BigInteger, primary_key=True),
    sa.Column("last_seq", sa.BigInteger, primary_key=True),
    _text("reason", False),
    _time("received_at"),
)

stream_seen = sa.Table(
    "stream_seen",
    metadata,
    *_stream_key(),
    _time("seen_at"),
    sqlite_with_rowid=False,
)
sa.Index("stream_seen_at", stream_seen.c.seen_at)

stream_progress = sa.Table(
    "stream_progress",
    metadata,
    *_stream_key(),
    _int("through_seq", False),
)

# One row per ingest process (``--group`` workers and the embedded dashboard): its last report of its counters.
ingest_workers = sa.Table(
    "ingest_workers",
    metadata,
    sa.Column("worker_id", sa.Text, primary_key=True),
    _text("consumer_id", False),
    _text("group_name"),
    _time("started_at"),
    _time("last_at"),
    sa.Column("stats", sa.JSON, nullable=False),
)

# Raw heartbeats (their numeric fields), kept for --health-retention-days.
health_history = sa.Table(
    "health_history",
    metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    _text("site", False),
    _text("device_id", False),
    _time("at"),
    _int("hour", False),  # start of the hour of ``at`` (downsampling groups by it)
    *(sa.Column(name, sa.Float) for name in HEALTH_FIELDS),
)
sa.Index("health_history_device", health_history.c.site, health_history.c.device_id, health_history.c.at)
sa.Index("health_history_at", health_history.c.at)

# Per device and hour: how many heartbeats, and the min, max and last value of each numeric field (365 days).
health_hourly = sa.Table(
    "health_hourly",
    metadata,
    sa.Column("site", sa.Text, primary_key=True),
    sa.Column("device_id", sa.Text, primary_key=True),
    sa.Column("hour", sa.BigInteger, primary_key=True),
    sa.Column("n", sa.Integer, nullable=False),
    *(sa.Column(f"{name}_{agg}", sa.Float) for name in HEALTH_FIELDS for agg in ("min", "max", "last")),
)
sa.Index("health_hourly_hour", health_hourly.c.hour)
