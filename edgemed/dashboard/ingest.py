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
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from edgemed.dashboard.batch import summarize_batch
from edgemed.dashboard.receipt_sender import ReceiptSender
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
_WHILE_DOWN = "results wait in the devices' outboxes and in the broker's queue for this session"
_TLS_OPTIONS = TlsSettingNames("--ca-file", "--cert-file and --key-file")  # the dashboard's command-line options

__all__ = ["DEFAULT_CLIENT_ID", "TOPIC_FILTER", "Ingest", "IngestStats", "validate_result", "validate_study"]


@dataclass
class IngestStats:
    """Counters the web page shows under "ingest"; updated from the link's network thread and the writer."""

    received: int = 0
    stored: int = 0
    duplicates: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    last_message_at: float | None = None

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
    ) -> None:
        """Build the link; nothing connects until ``start()``.

        Args:
            cfg: broker settings (URL, credentials, TLS, protocol, session expiry).
            store: where messages go.
            client_id: MQTT client id; default ``cfg.client_id`` or ``edgemed-dashboard``. It must stay the same
                across restarts, or the broker's queued messages go to a session nobody resumes. It also names
                this process in its consumer state topic, so it must match ``[A-Za-z0-9_-]{1,64}``.
            consumer_id: the consumer of record this process is part of (``--consumer-id``): its receipts name
                it, and devices whose profile names it (``delivery.consumer``) wait for them.
            receipt_interval_s: shortest time between two receipt rounds for one device.

        Raises:
            BrokerRefusedError: plaintext to a non-loopback broker without ``allow_plaintext_remote``.
            ConfigError: the password source or a TLS file cannot be read, or the consumer or client id does not
                fit in a topic.
        """
        self.cfg = cfg
        self.store = store
        self.client_id = client_id or cfg.client_id or DEFAULT_CLIENT_ID
        self.consumer_id = consumer_id
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
            # no_local (MQTT 5): our own receipts are not sent back to us; other processes' are, and are ignored.
            subscriptions=[Subscription(TOPIC_FILTER, qos=1, no_local=True, retained_if_new=knows_devices)],
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
        self.receipts.stop()  # the receipts of those commits go out before "offline"
        self.link.stop(timeout_s=5.0)

    def snapshot(self) -> dict[str, Any]:
        """Counters, connection state and the database's write state (``store_error``, ``held``) for the page."""
        with self._lock:
            snap = self.stats.as_dict()
        snap.update(connected=self.link.connected, subscribed=self.link.subscribed, broker_error=self.link.problem)
        snap.update(self.writer.status())
        return snap

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
        outcome = self._file([self._classify(topic, payload, retained)], now)[0]
        self._count(topic, outcome)
        return outcome

    def _file(self, filings: list[Filing], now: float) -> list[str]:
        # A batch's elements are filed one by one (each stored or a dead letter of its own), in the same commit.
        flat: list[Filing] = []
        for filing in filings:
            flat.extend(filing.elements if filing.kind == "batch" else (filing,))
        outcomes = iter(self.store.file(flat, now))
        # Committed: the touched streams get their receipts (the hand-off only marks them).
        self.receipts.notify(key for key in (f.stream_key for f in flat) if key is not None)
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


def _is_receipt(topic: str) -> bool:
    parts = topic.split("/")
    return len(parts) == 4 and parts[0] == "edgemed" and parts[3] == "receipts"
