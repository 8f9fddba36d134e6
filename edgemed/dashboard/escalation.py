"""Escalation: an urgent result nobody acknowledged in time is highlighted, counted and POSTed to a webhook.

``Escalator`` is a thread of the web process (``--no-escalation`` leaves it out). Every ``interval_s`` (10 s) it

1. claims the urgent results and study decisions that have waited longer than ``escalate_after_min`` (a setting,
   ``review_settings.py``) without an acknowledgement, by inserting them into ``escalations`` with
   ``INSERT ... SELECT ... ON CONFLICT DO NOTHING RETURNING``: when several web processes run behind a load
   balancer, the database lets exactly one of them claim each result, and that one writes its ``escalated`` audit
   row (actor ``system``) in the same transaction;
2. POSTs each claimed escalation to ``webhook_url`` (when one is set), with retries: an attempt is leased first
   (``next_attempt_at`` moved forward by a conditional UPDATE, so one process makes each attempt), then the answer
   is recorded in ``webhook_status`` and, when it failed, the next attempt is due after a back-off that doubles
   from ``retry_base_s`` up to 15 minutes, for ``MAX_ATTEMPTS`` attempts. A result acknowledged before its post
   is not posted.

The post carries ``result_id, site, device_id, level, reason, received_at, minutes_waiting`` and ``link`` (the
result's page) and nothing else: no payload, no probabilities. The webhook address is never logged (it may hold a
token), only its origin.

Only results received in the last ``LOOKBACK_S`` (a day) are claimed: the scan stays an index range of
``results_level``, and a dashboard started on an old database does not post every old result at once.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import httpx
import sqlalchemy as sa

from edgemed.dashboard import audit, review_settings
from edgemed.dashboard.settlement import dialect_insert
from edgemed.dashboard.tables import escalations, results, reviews, studies

if TYPE_CHECKING:
    from sqlalchemy import Connection

    from edgemed.dashboard.secrets import Secrets
    from edgemed.dashboard.store import DashboardStore

log = logging.getLogger(__name__)

__all__ = ["LOOKBACK_S", "MAX_ATTEMPTS", "Escalator", "claim_due", "deliver_due", "escalated_waiting"]

LOOKBACK_S = 24 * 3600.0
MAX_ATTEMPTS = 8
MAX_BACKOFF_S = 15 * 60.0
#: An attempt's lease: another process may try again once it passes (the one that leased it died mid-post).
LEASE_S = 60.0
#: Posts per round: a webhook that was down for hours gets the backlog over several rounds, not all at once.
POSTS_PER_ROUND = 20
_TABLES = (results, studies)


def claim_due(store: DashboardStore, secrets: Secrets, now: float, after_min: int, *, webhook: bool) -> list[str]:
    """Claim every urgent result unacknowledged for more than ``after_min`` minutes, and audit each claim.

    Args:
        store: the dashboard's store.
        secrets: the audit key's holder.
        now: dashboard clock.
        after_min: the ``escalate_after_min`` setting.
        webhook: whether a webhook is set (an escalation without one is never posted).

    Returns:
        The result ids this call claimed (another process's claims are not among them).

    Raises:
        sqlite3.Error, psycopg.Error: the database failed (nothing is claimed).
    """
    cutoff = now - after_min * 60.0
    claimed: list[str] = []
    with store._transaction() as conn:
        for table in _TABLES:
            due = (
                sa.select(
                    table.c.result_id,
                    table.c.site,
                    sa.literal(now, sa.Float),
                    sa.literal(None if webhook else "no webhook set", sa.Text),
                    sa.literal(0, sa.Integer),
                    sa.literal(now if webhook else None, sa.Float),
                )
                .select_from(table.outerjoin(reviews, reviews.c.result_id == table.c.result_id))
                .where(
                    table.c.level == "urgent",
                    table.c.received_at >= cutoff - LOOKBACK_S,
                    table.c.received_at < cutoff,
                    reviews.c.result_id.is_(None),
                    ~sa.exists().where(escalations.c.result_id == table.c.result_id),
                )
            )
            columns = ["result_id", "site", "escalated_at", "webhook_status", "attempts", "next_attempt_at"]
            stmt = dialect_insert(conn, escalations).from_select(columns, due)
            stmt = stmt.on_conflict_do_nothing(index_elements=[escalations.c.result_id])
            rows = conn.execute(stmt.returning(escalations.c.result_id, escalations.c.site)).all()
            for result_id, site in sorted(rows):
                received = conn.execute(sa.select(table.c.received_at).where(table.c.result_id == result_id)).scalar()
                audit.append(
                    conn,
                    secrets.audit_key,
                    at=now,
                    actor="system",
                    address=None,
                    action="escalated",
                    target=result_id,
                    site=site,
                    detail={"after_min": after_min, "waited_min": round((now - float(received or now)) / 60.0, 1)},
                )
                claimed.append(result_id)
    return claimed


def _backoff_s(attempts: int, base_s: float) -> float:
    return float(min(MAX_BACKOFF_S, base_s * 2 ** max(0, attempts - 1)))


def _subject(conn: Connection, result_id: str) -> Any:
    for table in _TABLES:
        row = conn.execute(
            sa.select(table.c.result_id, table.c.site, table.c.device_id, table.c.level, table.c.reason,
                      table.c.received_at).where(table.c.result_id == result_id)
        ).first()  # fmt: skip
        if row is not None:
            return row
    return None


def _lease(store: DashboardStore, now: float) -> list[tuple[Any, int]]:
    """Lease the due attempts: (the result's row, the attempt's number) for each attempt this process makes."""
    leased: list[tuple[Any, int]] = []
    with store._transaction() as conn:
        due = conn.execute(
            sa.select(escalations.c.result_id, escalations.c.next_attempt_at, reviews.c.result_id.label("reviewed"))
            .select_from(escalations.outerjoin(reviews, reviews.c.result_id == escalations.c.result_id))
            .where(escalations.c.next_attempt_at.is_not(None), escalations.c.next_attempt_at <= now)
            .order_by(escalations.c.next_attempt_at)
            .limit(POSTS_PER_ROUND)
        ).all()
        for result_id, next_at, reviewed in due:
            mine = (escalations.c.result_id == result_id) & (escalations.c.next_attempt_at == next_at)
            if reviewed is not None:
                conn.execute(
                    sa.update(escalations)
                    .where(mine)
                    .values(next_attempt_at=None, webhook_status="acknowledged before it was posted")
                )
                continue
            won = conn.execute(
                sa.update(escalations)
                .where(mine)
                .values(attempts=escalations.c.attempts + 1, next_attempt_at=now + LEASE_S)
                .returning(escalations.c.attempts)
            ).first()
            subject = _subject(conn, result_id)
            if won is not None and subject is not None:
                leased.append((subject, int(won[0])))
    return leased


def payload(row: Any, now: float, base_url: str) -> dict[str, Any]:
    """What the webhook receives for one escalation (and nothing else)."""
    return {
        "result_id": row.result_id,
        "site": row.site,
        "device_id": row.device_id,
        "level": row.level,
        "reason": row.reason,
        "received_at": row.received_at,
        "minutes_waiting": round((now - float(row.received_at)) / 60.0, 1),
        "link": f"{base_url.rstrip('/')}/results/{row.result_id}",
    }


def deliver_due(
    store: DashboardStore, url: str, base_url: str, now: float, *, client: httpx.Client, retry_base_s: float
) -> int:
    """POST the escalations whose attempt is due; record each answer and when to try again.

    Args:
        store: the dashboard's store.
        url: the webhook (``review_settings.check_webhook_url``).
        base_url: the dashboard's address for the links (``https://dashboard.example.org``).
        now: dashboard clock.
        client: the HTTP client (time-outs set by the caller).
        retry_base_s: the first back-off; doubled at each failure up to 15 minutes.

    Returns:
        How many posts were answered with a 2xx.

    Raises:
        sqlite3.Error, psycopg.Error: the database failed.
    """
    delivered = 0
    for row, attempt in _lease(store, now):
        try:
            # The status is the answer: its body is never read (closed unread), so a webhook that sends an endless
            # or huge body cannot hold this thread or fill its memory, nor turn a delivered post into a retry.
            with client.stream("POST", url, json=payload(row, now, base_url)) as answer:
                ok, status = answer.is_success, f"HTTP {answer.status_code}"
        except httpx.HTTPError as exc:
            ok, status = False, f"error: {type(exc).__name__}"
        if ok:
            delivered += 1
            values: dict[str, Any] = {"webhook_status": f"delivered ({status})", "next_attempt_at": None}
        elif attempt >= MAX_ATTEMPTS:
            log.warning("escalation of %s: the webhook at %s still answers %s after %d attempts; giving up",
                        row.result_id, review_settings.origin(url), status, attempt)  # fmt: skip
            values = {"webhook_status": f"gave up after {attempt} attempts: {status}", "next_attempt_at": None}
        else:
            values = {"webhook_status": status, "next_attempt_at": now + _backoff_s(attempt, retry_base_s)}
        with store._transaction() as conn:
            conn.execute(sa.update(escalations).where(escalations.c.result_id == row.result_id).values(values))
    return delivered


def escalated_waiting(store: DashboardStore) -> dict[str, int]:
    """Escalated results nobody has acknowledged yet, per site (the ``edgemed_dashboard_escalated`` gauge).

    Raises:
        sqlite3.Error, psycopg.Error: the database could not be read.
    """
    stmt = (
        sa.select(escalations.c.site, sa.func.count())
        .select_from(escalations.outerjoin(reviews, reviews.c.result_id == escalations.c.result_id))
        .where(reviews.c.result_id.is_(None))
        .group_by(escalations.c.site)
    )
    with store._read() as conn:
        return {str(site): int(n) for site, n in conn.execute(stmt)}


class Escalator:
    """The escalation thread of a web process (see the module docstring)."""

    def __init__(
        self,
        store: DashboardStore,
        secrets: Secrets,
        base_url: str,
        *,
        interval_s: float = 10.0,
        retry_base_s: float = 10.0,
        timeout_s: float = 5.0,
    ) -> None:
        """Args:
        store: the dashboard's store.
        secrets: the audit key's holder.
        base_url: the dashboard's own address, for the link in each post (its public origin behind a proxy).
        interval_s: time between rounds.
        retry_base_s: the first back-off after a failed post.
        timeout_s: the longest wait for the webhook's answer (a slow webhook delays this thread only).
        """
        self.store = store
        self.secrets = secrets
        self.base_url = base_url
        self.interval_s = interval_s
        self.retry_base_s = retry_base_s
        self._client = httpx.Client(timeout=timeout_s, follow_redirects=False, trust_env=False)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self, now: float | None = None) -> tuple[int, int]:
        """One round: claim what is due, then post what is due.

        Args:
            now: dashboard clock; now when None.

        Returns:
            ``(claimed, delivered)``.

        Raises:
            sqlite3.Error, psycopg.Error: the database failed (the next round tries again).
        """
        t = time.time() if now is None else now
        current = review_settings.load(self.store)
        claimed = claim_due(
            self.store, self.secrets, t, current.escalate_after_min, webhook=current.webhook_url is not None
        )
        if claimed:
            log.warning("escalated %d urgent results nobody acknowledged for %d minutes", len(claimed),
                        current.escalate_after_min)  # fmt: skip
        delivered = 0
        if current.webhook_url is not None:
            delivered = deliver_due(
                self.store, current.webhook_url, self.base_url, t, client=self._client, retry_base_s=self.retry_base_s
            )
        return len(claimed), delivered

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.run_once()
            except Exception as exc:  # noqa: BLE001 - the database is down or busy: the next round tries again
                log.warning("escalation round failed (%s: %s); trying again in %g s", type(exc).__name__,
                            str(exc)[:200], self.interval_s)  # fmt: skip

    def start(self) -> None:
        """Start the thread (a daemon: it never holds the process up at exit)."""
        self._thread = threading.Thread(target=self._run, name="edgemed-escalation", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the thread (after its current post, at most the webhook time-out) and close the HTTP client."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._client.close()
