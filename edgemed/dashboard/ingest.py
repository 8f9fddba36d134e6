"""Ingest: one MQTT subscriber that files everything the fleet publishes into the ``DashboardStore``.

Delivery contract. The subscriber uses a FIXED client id and a persistent session (MQTT 5 ``clean_start=False``
with a session expiry, or MQTT 3.1.1 ``clean_session=False``) at QoS 1 on ``edgemed/+/+/#``: while the dashboard
is down the broker queues what the devices publish, and hands it over when the dashboard returns. The connection
is the devices' own MQTT core (``edgemed.publish.mqtt.MqttLink``: the same TLS, refusal classification and MQTT 5
-> 3.1.1 fall back) with manual acknowledgements: the network thread only queues a message; the writer thread
(``writer.py``) commits messages in batches, durably, and acknowledges each one (PUBACK) only after the commit
that holds it, on the connection it came on, also for a payload kept as a dead letter. A crash between receipt
and commit, or a database that cannot be written, leaves the message unacknowledged, so the broker keeps it; a
failing commit is retried until it works. Duplicates from any source are dropped by the store's primary key on
``result_id``.

Nothing a device sends can stop the ingest. Every payload it cannot use (not UTF-8 or not JSON, nested too deep,
too large, a non-finite number, a wrong schema or field type, a string over its limit, a topic that does not follow
``edgemed/{site}/{device_id}/{kind}`` or ids that disagree with the topic; see ``validate.py``) is kept in the
store's dead-letter table with its raw bytes and reason, counted by reason, logged (topic and reason only, never the
payload) and acknowledged. An unacknowledged message would stay in the broker's in-flight window for this session:
with mosquitto's default of 20, twenty of them stop all delivery to the dashboard, and a retained one is sent again
to every new subscriber.

Receipts and consumer state. After each commit the streams it touched are handed to ``ReceiptSender``
(``receipt_sender.py``), which publishes their receipts from the store on its own thread. The link says this
process's retained ``online``/``offline`` on ``edgemed-consumer/{consumer_id}/{client_id}`` (``offline`` also as
its last will), ``online`` only once the subscription is granted; at every (re)connection, once subscribed, it
says ``online`` again and the receipts of recently settled streams are sent again (a broker restarted without
persistence has lost both). Receipts arriving on ``.../receipts`` (other
processes', and our own on MQTT 3.1.1, which has no ``no_local``) are acknowledged and dropped on arrival.

Retained messages (every device's ``status``) come again with each new subscription. The store treats them as old
news (``Filing.retained``; see ``store.py``): they never make a device look seen just now. On MQTT 5 the
subscription also asks for them only when it is new (retain handling 1), so a resumed session's reconnections
do not bring them again; a database that knows no device yet asks for them at every subscription instead, since
the broker would not send them to a session that already holds the subscription.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from edgemed.dashboard.batch import summarize_batch
from edgemed.dashboard.metrics import KINDS, CommitTimes
from edgemed.dashboard.receipt_sender import ReceiptSender
from edgemed.dashboard.settlement import StreamKey
from edgemed.dashboard.store import DashboardStore
from edgemed.dashboard.validate import Filing, classify, validate_result, validate_study
from edgemed.dashboard.writer import Held, StoreWriter
from edgemed.errors import ConfigError
from edgemed.publish.config import MqttConfig
from edgemed.publish.mqtt import MqttLink
from edgemed.publish.policy import ConnackRefusal
from edgemed.publish.publisher import Message, Subscription
from edgemed.publish.tls import TlsSettingNames
from edgemed.receipts import CONSUMER_SCHEMA, DEFAULT_CONSUMER_ID, consumer_topic

log = logging.getLogger(__name__)

TOPIC_FILTER = "edgemed/+/+/#"
DEFAULT_CLIENT_ID = "edgemed-dashboard"
#: What a group of workers shares (each message goes to one of them): every kind a device publishes once.
SHARED_KINDS = ("results", "studies", "batches", "lost")
#: What every worker of a group subscribes to plainly: retained (status) or latest-wins (health), never sent
#: through a shared subscription by the broker, and stored idempotently by each worker.
PLAIN_KINDS = ("status", "health")
#: Seconds between two reports of a worker's counters to the store (``store.report_worker``).
REPORT_INTERVAL_S = 5.0
#: With a group, a stream's receipt is computed and published once more this long after its last commit here:
#: two workers' receipts of one stream race (each computed from the store at its own moment), and the retained
#: one must end up holding both workers' commits.
SETTLE_AGAIN_S = 1.0
#: Session take-overs within this window that count as two clients fighting over one client id.
TAKEOVER_WINDOW_S = 60.0
#: ... of connections that lasted less than this (or that the broker ended saying "Session taken over").
SHORT_CONNECTION_S = 5.0
TAKEOVERS_TO_REPORT = 3
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_WHILE_DOWN = "results wait in the devices' outboxes and in the broker's queue for this session"
_TLS_OPTIONS = TlsSettingNames("--ca-file", "--cert-file and --key-file")  # the dashboard's command-line options

__all__ = [
    "DEFAULT_CLIENT_ID",
    "TOPIC_FILTER",
    "Ingest",
    "IngestStats",
    "default_client_id",
    "subscriptions",
    "validate_result",
    "validate_study",
]


@dataclass
class IngestStats:
    """Counters the web page shows under "ingest"; updated from the link's network thread and the writer."""

    received: int = 0
    stored: int = 0
    duplicates: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    last_message_at: float | None = None
    kinds: Counter[str] = field(default_factory=Counter)
    takeovers: int = 0

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready copy."""
        return {
            "received": self.received,
            "stored": self.stored,
            "duplicates": self.duplicates,
            "rejected": sum(self.rejected.values()),
            "rejected_by_reason": dict(self.rejected),
            "last_message_at": self.last_message_at,
        }


def default_client_id(group: str | None, hostname: str | None = None) -> str:
    """The client id a worker uses when ``--client-id`` is not given.

    Without a group: ``edgemed-dashboard``, as the embedded dashboard always had (so moving the ingest into its own
    process resumes the same broker session). With one: ``edgemed-ingest-{group}-{hostname}``, fixed across
    restarts and different on every host; a second worker on one host needs ``--client-id``.

    Args:
        group: the shared-subscription group, or None.
        hostname: this machine's name (default ``socket.gethostname()``); its first label, with characters
            outside ``[A-Za-z0-9_-]`` replaced by ``-``.

    Returns:
        At most 64 characters of ``[A-Za-z0-9_-]``.
    """
    if group is None:
        return DEFAULT_CLIENT_ID
    host = (hostname or socket.gethostname()).split(".", 1)[0]
    host = re.sub(r"[^A-Za-z0-9_-]", "-", host) or "host"
    return f"edgemed-ingest-{group}-{host}"[:64]


def subscriptions(group: str | None, *, retained_if_new: bool) -> list[Subscription]:
    """What a worker subscribes to.

    Without a group: ``edgemed/+/+/#`` plainly (one worker; it also works on MQTT 3.1.1). With one:
    ``$share/{group}/edgemed/+/+/{kind}`` for each kind a device sends once (the broker hands each message to one
    worker of the group), and ``edgemed/+/+/status`` and ``.../health`` plainly; never ``receipts``.

    Args:
        group: the shared-subscription group, or None.
        retained_if_new: MQTT 5 retain handling 1 for the subscriptions that bring retained messages.

    Returns:
        The subscriptions, at QoS 1.
    """
    if group is None:
        # no_local (MQTT 5): our own receipts are not sent back to us; other processes' are, and are ignored.
        return [Subscription(TOPIC_FILTER, qos=1, no_local=True, retained_if_new=retained_if_new)]
    # No no_local on a shared subscription: MQTT 5 makes it a protocol error; none of these topics is ours anyway.
    shared = [Subscription(f"$share/{group}/edgemed/+/+/{kind}", qos=1) for kind in SHARED_KINDS]
    plain = [Subscription(f"edgemed/+/+/{kind}", qos=1, retained_if_new=retained_if_new) for kind in PLAIN_KINDS]
    return shared + plain


def describe_dashboard_refusal(refusal: ConnackRefusal) -> str:
    """A refused connection in the dashboard's terms (its command-line options, not a device profile's keys).

    Args:
        refusal: what the broker refused, and with which credentials.

    Returns:
        One line: ``broker URL refused the dashboard (<reason>); <what to check>``.
    """
    if refusal.kind == "credentials":
        user = f" {refusal.username!r}" if refusal.username else ""
        source = f" ({refusal.password_source})" if refusal.password_source else ""
        fix = f"check the user name{user}, the password it reads{source} and the client id"
    elif refusal.kind == "client_id":
        fix = "pass a --client-id the broker accepts"
    elif refusal.kind == "banned":
        fix = "the broker banned this client; ask its operator"
    else:
        fix = "the broker wants another authentication method"
    return f"broker {refusal.url} refused the dashboard ({refusal.reason}); {fix}"


class Ingest:
    """The dashboard's MQTT subscriber: fixed client id, persistent session, QoS 1, manual acknowledgements."""

    def __init__(
        self,
        cfg: MqttConfig,
        store: DashboardStore,
        *,
        client_id: str | None = None,
        consumer_id: str = DEFAULT_CONSUMER_ID,
        receipt_interval_s: float = 0.25,
        group: str | None = None,
        report_interval_s: float = REPORT_INTERVAL_S,
    ) -> None:
        """Build the link; nothing connects until ``start()``.

        Args:
            cfg: broker settings (URL, credentials, TLS, protocol, session expiry).
            store: where messages go.
            client_id: MQTT client id; default ``cfg.client_id`` or ``default_client_id(group)``. It must stay the
                same across restarts, or the broker's queued messages go to a session nobody resumes, and be unique
                per worker. It also names this process in its consumer state topic and its reports, so it must
                match ``[A-Za-z0-9_-]{1,64}``.
            consumer_id: the consumer of record this process is part of (``--consumer-id``): its receipts name
                it, and devices whose profile names it (``delivery.consumer``) wait for them.
            receipt_interval_s: shortest time between two receipt rounds for one device.
            group: share results, study decisions, batches and lost announcements with the other workers of this
                MQTT 5 shared-subscription group (``--group``); None: one worker takes everything.
            report_interval_s: seconds between two reports of this worker's counters to the store.

        Raises:
            BrokerRefusedError: plaintext to a non-loopback broker without ``allow_plaintext_remote``.
            ConfigError: the password source or a TLS file cannot be read, the consumer or client id does not
                fit in a topic, the group name is not ``[A-Za-z0-9_-]{1,64}``, or a group with MQTT 3.1.1.
        """
        if group is not None and not _NAME.match(group):
            raise ConfigError(f"--group {group[:80]!r} must be 1-64 letters, digits, _ or - (it is part of a topic)")
        if group is not None and cfg.protocol == "3.1.1":
            raise ConfigError(
                "--group needs MQTT 5 (shared subscriptions), and MQTT 3.1.1 has none: drop --mqtt-protocol 3.1.1, "
                "or run a single worker without --group"
            )
        self.cfg = cfg
        self.store = store
        self.group = group
        self.client_id = client_id or cfg.client_id or default_client_id(group)
        self.consumer_id = consumer_id
        self.report_interval_s = report_interval_s
        self.commit_times = CommitTimes()
        self._fatal: str | None = None
        self._takeover_times: list[float] = []
        self._takeover_logged_at = -1e9
        self._connected_at = 0.0
        self._settle_again: set[StreamKey] = set()
        self._last_commit_at = 0.0
        self._reporter: threading.Thread | None = None
        self._reporting = threading.Event()
        try:
            state_topic = consumer_topic(consumer_id, self.client_id)
        except ValueError as exc:
            raise ConfigError(f"{exc} (--consumer-id and --client-id name this dashboard in MQTT topics)") from exc
        self.stats = IngestStats()
        self._lock = threading.Lock()
        self.writer = StoreWriter(classify=self._classify, store=self._file, on_outcome=self._count)
        # A database that knows no device yet wants the retained statuses, also from a session whose
        # subscription the broker already holds (retain handling 1 would send them only to a new subscription).
        knows_devices = sum(store.device_counts()) > 0
        self.link = MqttLink(
            cfg,
            # Retained online/offline (offline also as the last will): devices that name this consumer publish
            # results only while one of its processes is online, and "online" is said only once the
            # subscription is granted, so that nothing they send after seeing it can miss a new session.
            status_topic=state_topic,
            status_extra={"schema": CONSUMER_SCHEMA, "consumer": consumer_id, "process": self.client_id},
            online_when_subscribed=True,
            client_id=self.client_id,
            subscriptions=subscriptions(group, retained_if_new=knows_devices),
            on_message=self._on_message,
            manual_ack=True,
            describe_refusal=describe_dashboard_refusal,
            tls_names=_TLS_OPTIONS,
            offline_note=_WHILE_DOWN,
            # A 3.1.1-only broker that ignores MQTT 5 CONNECT would otherwise keep the page empty for two
            # connect_timeout_s and a back-off: the dashboard has always fallen back after the first.
            unanswered_to_fall_back=1,
            # At every (re)connection: a broker restarted without persistence lost the retained receipts.
            on_subscribed=lambda: self.receipts.republish(),
            on_state=self._on_link_state,
            on_dropped=self._on_dropped,
        )
        self.receipts = ReceiptSender(store.path, self._publish_receipt, consumer_id, min_interval_s=receipt_interval_s)

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background; an unreachable broker is retried with capped backoff, never fatal.

        With ``protocol: auto`` every start probes MQTT 5 first, also after an earlier fall back to 3.1.1.
        """
        self.writer.start()
        self.receipts.start()
        self.link.start()
        self._reporting.clear()
        self._reporter = threading.Thread(target=self._report_loop, name="edgemed-ingest-report", daemon=True)
        self._reporter.start()

    def wait_subscribed(self, timeout_s: float) -> bool:
        """Wait until the broker confirmed the subscription (or ``timeout_s`` passed).

        Args:
            timeout_s: longest wait.

        Returns:
            True when subscribed.
        """
        return self.link.wait_subscribed(timeout_s)

    def stop(self) -> None:
        """Say ``offline`` and disconnect cleanly; the broker keeps the session and queues messages until the next
        ``start()``."""
        self.writer.stop()  # commits and acknowledges what arrived, while the connection is still up
        self._settle_due(force=True)  # a group's second receipt round is not left for a later start
        self.receipts.stop()  # the receipts of those commits go out before "offline"
        self.link.stop(timeout_s=5.0)
        self._reporting.set()
        if self._reporter is not None:
            self._reporter.join(5.0)
            self._reporter = None
        self._report()  # the last counters, disconnected: the web process shows this worker as stopped

    def check(self) -> None:
        """Raise what makes this worker useless until its settings change (call it from the main thread).

        Raises:
            ConfigError: ``--group`` on a broker that speaks only MQTT 3.1.1 (no shared subscriptions).
        """
        if self._fatal is not None:
            raise ConfigError(self._fatal)

    def snapshot(self) -> dict[str, Any]:
        """Counters, connection state and the database's write state (``store_error``, ``held``) for the page."""
        with self._lock:
            snap = self.stats.as_dict()
        snap.update(connected=self.link.connected, subscribed=self.link.subscribed, broker_error=self.link.problem)
        if snap["broker_error"] is None:
            snap["broker_error"] = self._fatal or self._takeover_problem()
        snap.update(self.writer.status())
        snap.update(worker_id=self.client_id, group=self.group)
        return snap

    def worker_stats(self) -> dict[str, float | int]:
        """This worker's counters as flat numbers, what ``store.report_worker`` keeps and ``/metrics`` exports."""
        snap = self.snapshot()
        with self._lock:
            kinds = dict(self.stats.kinds)
            takeovers = self.stats.takeovers
        stats: dict[str, float | int] = {
            "received": snap["received"],
            "stored": snap["stored"],
            "duplicates": snap["duplicates"],
            "rejected": snap["rejected"],
            "held": snap["held"],
            "connected": int(bool(snap["connected"])),
            "subscribed": int(bool(snap["subscribed"])),
            "store_failing": int(snap["store_error"] is not None),
            "takeovers": takeovers,
            "last_message_at": snap["last_message_at"] or 0.0,
        }
        stats.update({f"messages_{kind}": kinds.get(kind, 0) for kind in KINDS})
        stats.update(self.commit_times.as_stats())
        return stats

    def live_row(self) -> dict[str, Any]:
        """This worker as a row of ``store.workers()``, with its counters of this moment."""
        return {
            "worker_id": self.client_id,
            "consumer_id": self.consumer_id,
            "group": self.group,
            "last_at": time.time(),
            "stats": self.worker_stats(),
        }

    # -- reports, a group's second receipt round -------------------------------------------------------------

    def _report_loop(self) -> None:
        next_report = 0.0
        while not self._reporting.wait(0.25):
            self._settle_due(force=False)
            if time.monotonic() >= next_report:
                self._report()
                next_report = time.monotonic() + self.report_interval_s

    def _report(self) -> None:
        try:
            self.store.report_worker(
                self.client_id, consumer_id=self.consumer_id, group=self.group, stats=self.worker_stats()
            )
        except Exception as exc:  # noqa: BLE001 - a locked or failing database: the writer says so; report later
            log.debug("could not report this worker's counters to the store (%s)", exc)

    def _settle_due(self, *, force: bool) -> None:
        with self._lock:
            if not self._settle_again or not (force or time.monotonic() - self._last_commit_at >= SETTLE_AGAIN_S):
                return
            keys, self._settle_again = self._settle_again, set()
        self.receipts.notify(keys)

    # -- the link's callbacks ----------------------------------------------------------------------------------

    def _on_link_state(self, state: str) -> None:
        if state == "online":
            self._connected_at = time.monotonic()
        if state == "online" and self.group is not None and self.link.protocol == "3.1.1":
            self._fatal = (
                f"broker {self.cfg.url} speaks only MQTT 3.1.1, which has no shared subscriptions: --group "
                f"{self.group} needs an MQTT 5 broker (mosquitto 1.6 or later, EMQX, HiveMQ, VerneMQ); or run a "
                "single worker without --group"
            )  # raised by check(): the worker's process ends with it

    def _on_dropped(self, reason: str) -> None:
        # Two clients with one client id take the session from each other in turn: an MQTT 5 broker may say so
        # ("Session taken over", EMQX and HiveMQ do); mosquitto 2.0 just closes the older connection. Either way
        # this worker then sees connections the broker ends soon after accepting them, over and over.
        now = time.monotonic()
        if reason in ("Success", "Normal disconnection"):
            return  # we disconnected
        short = now - self._connected_at < SHORT_CONNECTION_S
        if reason != "Session taken over" and not short:
            return
        with self._lock:
            self.stats.takeovers += 1
            self._takeover_times = [t for t in self._takeover_times if now - t < TAKEOVER_WINDOW_S] + [now]
            looping = len(self._takeover_times) >= TAKEOVERS_TO_REPORT
            due = looping and now - self._takeover_logged_at >= TAKEOVER_WINDOW_S
            if due:
                self._takeover_logged_at = now
        if due:
            log.error("%s", self._takeover_problem())

    def _takeover_problem(self) -> str | None:
        with self._lock:
            recent = [t for t in self._takeover_times if time.monotonic() - t < TAKEOVER_WINDOW_S]
        if len(recent) < TAKEOVERS_TO_REPORT:
            return None
        return (
            f"broker {self.cfg.url} keeps closing this worker's connection soon after accepting it: another client "
            f"most likely uses its client id {self.client_id}, and the two take the broker session from each other "
            "in turn; give each ingest worker its own --client-id (a second worker on one host needs one)"
        )

    # -- the link's network thread ------------------------------------------------------------------------------

    def _publish_receipt(self, topic: str, payload: bytes) -> None:
        self.link.publish(topic, payload, qos=1, retain=True)

    def _on_message(self, msg: Message) -> None:
        # Only queued here: the writer thread stores messages in batches and acknowledges each one after the
        # commit that holds it (see writer.py). The network thread stays free to read the socket.
        if _is_receipt(msg.topic):
            # Receipts are the consumers' messages to the devices (other processes', and on MQTT 3.1.1, which
            # has no no_local, our own): nothing to store, acknowledged at once.
            if msg.ack is not None:
                msg.ack()
            return
        now = time.time()
        with self._lock:
            self.stats.received += 1
            self.stats.last_message_at = now
            self.stats.kinds[_kind(msg.topic)] += 1
        self.writer.submit(Held(msg.topic, msg.payload, now, msg.ack, retain=msg.retain))

    def handle(self, topic: str, payload: bytes, *, retained: bool = False) -> str:
        """File one message now, in its own transaction (tests and tools call it; the network thread batches).

        Whatever the payload, it is either stored or kept as a dead letter: only a failing database raises.

        Args:
            topic: the MQTT topic.
            payload: the raw payload.
            retained: it came as the topic's retained message (``Message.retain``).

        Returns:
            ``"stored"``, ``"duplicate"``, ``"updated"`` (status/health), ``"ignored"`` (an empty retained
            message clearing a topic), ``"unchanged"`` (a retained message the store already holds) or
            ``"rejected: <reason>"`` (kept in the dead-letter table).

        Raises:
            sqlite3.Error, OSError: the database could not be written (disk full, locked); nothing was stored.
        """
        now = time.time()
        with self._lock:
            self.stats.received += 1
            self.stats.last_message_at = now
            self.stats.kinds[_kind(topic)] += 1
        outcome = self._file([self._classify(topic, payload, retained)], now)[0]
        self._count(topic, outcome)
        return outcome

    def _file(self, filings: list[Filing], now: float) -> list[str]:
        # A batch's elements are filed one by one (each stored or a dead letter of its own), in the same commit.
        flat: list[Filing] = []
        for filing in filings:
            flat.extend(filing.elements if filing.kind == "batch" else (filing,))
        started = time.perf_counter()
        outcomes = iter(self.store.file(flat, now))
        self.commit_times.observe(time.perf_counter() - started)
        # Committed: the touched streams get their receipts (the hand-off only marks them).
        touched = {key for key in (f.stream_key for f in flat) if key is not None}
        self.receipts.notify(touched)
        if self.group is not None and touched:
            with self._lock:
                self._settle_again.update(touched)
                self._last_commit_at = time.monotonic()
        out = []
        for filing in filings:
            if filing.kind != "batch":
                out.append(next(outcomes))
                continue
            parts = [next(outcomes) for _ in filing.elements]
            for element, outcome in zip(filing.elements, parts, strict=True):
                self._count(element.topic, outcome)
            out.append(summarize_batch(parts))
        return out

    @staticmethod
    def _classify(topic: str, payload: bytes, retained: bool) -> Filing:
        try:
            return classify(topic, payload, retained=retained)
        except Exception as exc:  # a bug in a check must not leave a message unacknowledged for ever
            log.exception("could not check a message on %r; keeping it as a dead letter", topic[:200])
            reason = f"could not be checked ({type(exc).__name__})"
            return Filing("dead", topic, payload, reason=reason, retained=retained)

    def _count(self, topic: str, outcome: str) -> None:
        # A batch's outcome sums up its elements', counted one by one in _file.
        with self._lock:
            if outcome == "stored":
                self.stats.stored += 1
            elif outcome == "duplicate":
                self.stats.duplicates += 1
            elif outcome.startswith("rejected: "):
                self.stats.rejected[outcome.removeprefix("rejected: ")] += 1
        if outcome.startswith("rejected: "):
            reason = outcome.removeprefix("rejected: ")
            with self._lock:
                seen = self.stats.rejected[reason]
            # The first of each kind, then every 100th: a misbehaving device must not flood the log.
            if seen == 1 or seen % 100 == 0:
                log.warning(
                    "dead letter on %r: %s (%d so far; kept in the dead_letters table)", topic[:200], reason, seen
                )


def _kind(topic: str) -> str:
    """The message kind a topic names (``results``, ``status``...), ``other`` for anything else."""
    parts = topic.split("/")
    kind = parts[3] if len(parts) == 4 and parts[0] == "edgemed" else "other"
    return kind if kind in KINDS else "other"


def _is_receipt(topic: str) -> bool:
    parts = topic.split("/")
    return len(parts) == 4 and parts[0] == "edgemed" and parts[3] == "receipts"
