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
    _text("model"),  # the model's name (``model.name``)
    sa.Column("confidence", sa.Float),  # the top class's probability; NULL without a prediction
    sa.Column("closed_at", sa.Float),  # when its review was closed (review.py); NULL while it waits or is not reviewed
)
sa.Index("results_level", results.c.level, results.c.received_at)
# A user limited to some sites: their recent results and their review queue.
sa.Index("results_site_recent", results.c.site, results.c.received_at)
sa.Index("results_site_level", results.c.site, results.c.level, results.c.received_at)
# Recent results, newest first (the page's last table and its pages), and the export's order.
sa.Index("results_recent", results.c.received_at, results.c.seq)
# The review queue: the results still waiting for a person (urgent or inconclusive, not closed), in time order per
# site. A partial index holds only those few rows, so the queue's first page and its counts stay fast however many
# closed ones a year of reviewing leaves among the million stored (results_site_level alone made the queue skip
# every closed one: 1.2 s at a million results with their reviews closed). review.py repeats the predicate.
WAITING = sa.text("closed_at IS NULL AND level IN ('urgent', 'inconclusive')")
sa.Index(
    "results_waiting",
    results.c.site,
    results.c.level,
    results.c.received_at,
    sqlite_where=WAITING,
    postgresql_where=WAITING,
)

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
    sa.Column("closed_at", sa.Float),  # as results.closed_at
)
sa.Index("studies_level", studies.c.level, studies.c.received_at)
sa.Index(
    "studies_waiting",
    studies.c.site,
    studies.c.level,
    studies.c.received_at,
    sqlite_where=WAITING,
    postgresql_where=WAITING,
)
sa.Index("studies_received", studies.c.received_at)
sa.Index("studies_site_level", studies.c.site, studies.c.level, studies.c.received_at)

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

# -- the clinical dashboard (issue 13): people, sessions, the review workflow, the audit trail -------------------

ROLES = ("viewer", "reviewer", "admin")
OUTCOMES = ("referred", "seen", "false_alarm", "other")

# A person who may log in. ``sites`` is a JSON list of the sites they may see, NULL for every site.
users = sa.Table(
    "users",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
    _text("password_hash"),  # argon2id (argon2-cffi's encoded form); NULL: single sign-on only
    _text("role", False),
    _text("sites"),
    sa.Column("disabled", sa.Integer, nullable=False, server_default="0"),
    _time("created_at"),
    _time("updated_at"),
    sa.CheckConstraint("role IN ('viewer', 'reviewer', 'admin')", name="users_role"),
)

# A logged-in browser: the cookie holds the token, the database only its sha256 (a copy of the database logs no
# one in). Kept here, not in the process, so any web process behind a load balancer serves any session.
web_sessions = sa.Table(
    "web_sessions",
    metadata,
    sa.Column("token_sha256", sa.Text, primary_key=True),
    _text("user_name", False),
    _text("csrf", False),
    _time("created_at"),
    _time("last_at"),
    _text("address"),
)
sa.Index("web_sessions_user", web_sessions.c.user_name)
sa.Index("web_sessions_last", web_sessions.c.last_at)

# Failed logins, per user name and per address (``key`` is ``user:NAME`` or ``addr:ADDRESS``): the slow-down.
login_failures = sa.Table(
    "login_failures",
    metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    _text("key", False),
    _time("at"),
    sqlite_autoincrement=True,
)
sa.Index("login_failures_key", login_failures.c.key, login_failures.c.at)

# The audit trail: append-only, each row's ``hmac`` chained to the previous row's (``audit.py``).
audit = sa.Table(
    "audit",
    metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    _time("at"),
    _text("actor", False),
    _text("address"),
    _text("action", False),
    _text("target"),
    _text("site"),
    _text("detail", False),
    _text("hmac", False),
    sqlite_autoincrement=True,
)
sa.Index("audit_at", audit.c.at)

# The review of an urgent or inconclusive result or study decision: no row = new.
reviews = sa.Table(
    "reviews",
    metadata,
    sa.Column("result_id", sa.Text, primary_key=True),
    _text("site", False),
    _text("state", False),
    _text("acked_by"),
    _time("acked_at", True),
    _text("closed_by"),
    _time("closed_at", True),
    _text("outcome"),
    _text("note"),
    sa.CheckConstraint("state IN ('acknowledged', 'closed')", name="reviews_state"),
    sa.CheckConstraint(
        "outcome IS NULL OR outcome IN ('referred', 'seen', 'false_alarm', 'other')", name="reviews_outcome"
    ),
)
sa.Index("reviews_site_state", reviews.c.site, reviews.c.state)

# Urgent results nobody acknowledged in time: claimed here once (by whichever web process saw it first), then
# posted to the webhook until it answers.
escalations = sa.Table(
    "escalations",
    metadata,
    sa.Column("result_id", sa.Text, primary_key=True),
    _text("site", False),
    _time("escalated_at"),
    _text("webhook_status"),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    _time("next_attempt_at", True),
)
sa.Index("escalations_next", escalations.c.next_attempt_at)

# Settings an admin changes from the page (JSON values), e.g. ``escalate_after_min``, ``webhook_url``.
settings = sa.Table(
    "settings",
    metadata,
    sa.Column("key", sa.Text, primary_key=True),
    _text("value", False),
    _time("updated_at"),
    _text("updated_by"),
)

# Results per site, hour, model, level and label, kept in the transaction that stores them: charts and drift
# read these few rows instead of scanning a million results.
result_hourly = sa.Table(
    "result_hourly",
    metadata,
    sa.Column("site", sa.Text, primary_key=True),
    sa.Column("hour", sa.BigInteger, primary_key=True),
    sa.Column("model", sa.Text, primary_key=True),
    sa.Column("level", sa.Text, primary_key=True),
    sa.Column("label", sa.Text, primary_key=True),  # '' for a result without a prediction
    _int("n", False),
    sa.Column("confidence_sum", sa.Float, nullable=False, server_default="0"),
)
sa.Index("result_hourly_hour", result_hourly.c.hour)
