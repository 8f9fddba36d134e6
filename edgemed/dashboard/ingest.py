"""Ingest: one MQTT subscriber that files everything the fleet publishes into the ``DashboardStore``.

Delivery contract. The subscriber uses a FIXED client id and a persistent session (MQTT 5 ``clean_start=False``
with a session expiry, or MQTT 3.1.1 ``clean_session=False``) at QoS 1 on ``edgemed/+/+/#``: while the dashboard
is down the broker queues what the devices publish, and hands it over when the dashboard returns. paho runs with
``manual_ack=True``: the network thread only queues a message; the writer thread (``writer.py``) commits messages
in batches, durably, and acknowledges each one (PUBACK) only after the commit that holds it, also for a payload
kept as a dead letter. A crash between receipt and commit, or a database that cannot be written, leaves the
message unacknowledged, so the broker keeps it; a failing commit is retried until it works. Duplicates from any
source are dropped by the store's primary key on ``result_id``.

Nothing a device sends can stop the ingest. Every payload it cannot use (not UTF-8 or not JSON, nested too deep,
too large, a non-finite number, a wrong schema or field type, a string over its limit, a topic that does not follow
``edgemed/{site}/{device_id}/{kind}`` or ids that disagree with the topic; see ``validate.py``) is kept in the
store's dead-letter table with its raw bytes and reason, counted by reason, logged (topic and reason only, never the
payload) and acknowledged. An unacknowledged message would stay in the broker's in-flight window for this session:
with mosquitto's default of 20, twenty of them stop all delivery to the dashboard, and a retained one is sent again
to every new subscriber.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgemed.dashboard.store import DashboardStore
from edgemed.dashboard.validate import Filing, classify, validate_result, validate_study
from edgemed.dashboard.writer import Held, StoreWriter
from edgemed.errors import BrokerRefusedError, ConfigError
from edgemed.publish.config import MqttConfig, read_password
from edgemed.publish.mqtt import PROTOCOL_REFUSED_CODES

log = logging.getLogger(__name__)

TOPIC_FILTER = "edgemed/+/+/#"
DEFAULT_CLIENT_ID = "edgemed-dashboard"
# Errors a write raises because of one message's content (the database itself works): that message becomes a
# dead letter. Anything else (disk full, locked, I/O error) is the database's fault and is retried.
_MESSAGE_ERRORS = (sqlite3.IntegrityError, sqlite3.DataError, ValueError, TypeError, OverflowError)

__all__ = ["DEFAULT_CLIENT_ID", "TOPIC_FILTER", "Ingest", "IngestStats", "validate_result", "validate_study"]


@dataclass
class IngestStats:
    """Counters the web page shows under "ingest"; updated from paho's network thread."""

    received: int = 0
    stored: int = 0
    duplicates: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    connected: bool = False
    subscribed: bool = False
    broker_error: str | None = None
    last_message_at: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready copy."""
        return {
            "received": self.received,
            "stored": self.stored,
            "duplicates": self.duplicates,
            "rejected": sum(self.rejected.values()),
            "rejected_by_reason": dict(self.rejected),
            "connected": self.connected,
            "subscribed": self.subscribed,
            "broker_error": self.broker_error,
            "last_message_at": self.last_message_at,
        }


class Ingest:
    """The dashboard's MQTT subscriber: fixed client id, persistent session, QoS 1, manual acknowledgements."""

    def __init__(self, cfg: MqttConfig, store: DashboardStore, *, client_id: str | None = None) -> None:
        """Build the client; nothing connects until ``start()``.

        Args:
            cfg: broker settings (URL, credentials, TLS, protocol, session expiry).
            store: where messages go.
            client_id: MQTT client id; default ``cfg.client_id`` or ``edgemed-dashboard``. It must stay the same
                across restarts, or the broker's queued messages go to a session nobody resumes.

        Raises:
            BrokerRefusedError: plaintext to a non-loopback broker without ``allow_plaintext_remote``.
            ConfigError: the password source or a TLS file cannot be read.
        """
        broker = cfg.broker
        if not broker.tls and not broker.loopback and not cfg.allow_plaintext_remote:
            raise BrokerRefusedError(
                f"refusing plaintext MQTT to {broker.host}:{broker.port}: results and the password would cross "
                "the network unencrypted; use mqtts:// or allow plaintext explicitly"
            )
        self.cfg = cfg
        self.store = store
        self.client_id = client_id or cfg.client_id or DEFAULT_CLIENT_ID
        self.stats = IngestStats()
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        # "auto" tries MQTT 5 and falls back to 3.1.1, as the devices do, when the broker refuses version 5 or
        # leaves an MQTT 5 CONNECT unanswered (see _watch_protocol).
        self._v5 = cfg.protocol != "3.1.1"
        self._attempt_opened_at: float | None = None
        self._connack_seen = False
        self._silent_closes = 0
        self._fallen_back = threading.Event()
        self._helpers: list[threading.Thread] = []  # the protocol watchdog and fall-back threads, joined by stop()
        self._generation = 0  # bumped by start() and stop(): a fall back belongs to one start()
        self._swap_lock = threading.Lock()  # the client is replaced on a fall back; stop() must see which
        self._accepted = False  # the current connection got a successful CONNACK
        self._connection = 0  # bumped at every accepted connection: a PUBACK goes only where its message came from
        self.writer = StoreWriter(classify=self._classify, store=self._store, on_outcome=self._count)
        self._client = self._make_client()
        self._started = False
        self._stopping = False

    def _make_client(self) -> paho.Client:
        cfg = self.cfg
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=paho.MQTTv5 if self._v5 else paho.MQTTv311,
            clean_session=None if self._v5 else False,
            manual_ack=True,
        )
        # paho takes whole seconds here; a dashboard reconnecting one second later than a device is fine.
        client.reconnect_delay_set(max(1, math.ceil(cfg.reconnect_min_s)), max(1, math.ceil(cfg.reconnect_max_s)))
        client.connect_timeout = cfg.connect_timeout_s
        if cfg.username:
            client.username_pw_set(cfg.username, read_password(cfg))
        if cfg.broker.tls:
            client.tls_set_context(self._ssl_context())
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        return client

    def _ssl_context(self) -> ssl.SSLContext:
        tls = self.cfg.tls
        try:
            ctx = ssl.create_default_context(cafile=str(tls.ca_file) if tls and tls.ca_file else None)
            if tls and tls.cert_file and tls.key_file:
                ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"cannot load the dashboard's TLS files ({exc}); check the CA, certificate and key paths"
            ) from exc
        return ctx

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background; an unreachable broker is retried with capped backoff, never fatal."""
        with self._swap_lock:
            if self._started:
                return
            self._started = True
            self._generation += 1
            generation = self._generation
            self.writer.start()
            if self.cfg.protocol == "auto" and not self._v5:
                # An earlier run fell back: probe MQTT 5 again (the broker, or a proxy in front of it, may have
                # been merely unwell then).
                self._v5 = True
                self._fallen_back.clear()
                with self._lock:
                    self._attempt_opened_at = None
                    self._connack_seen = False
                    self._silent_closes = 0
                self._client = self._make_client()
            self._connect(self._client)
        if self._v5 and self.cfg.protocol == "auto":
            self._spawn(self._watch_protocol, generation, name="edgemed-ingest-protocol")

    def _spawn(self, target: Any, *args: Any, name: str) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._lock:
            self._helpers = [t for t in self._helpers if t.is_alive()]
            self._helpers.append(thread)
        thread.start()

    def _connect(self, client: paho.Client) -> None:
        broker = self.cfg.broker
        if self._v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = self.cfg.session_expiry_s
            client.connect_async(broker.host, broker.port, self.cfg.keepalive_s, clean_start=False, properties=props)
        else:
            client.connect_async(broker.host, broker.port, self.cfg.keepalive_s)
        client.loop_start()

    def _watch_protocol(self, generation: int) -> None:
        # paho bounds only the TCP and TLS handshakes: a broker that does not understand an MQTT 5 CONNECT may
        # leave it unanswered, and paho would wait out the keepalive. Watch each attempt until the first CONNACK.
        while self._generation == generation and not self._fallen_back.is_set():
            with self._lock:
                if self._connack_seen:
                    return
                opened = self._attempt_opened_at
                silent = self._silent_closes
            if silent >= 2:
                self._fall_back_to_311("the broker closed two MQTT 5 connections without a CONNACK", generation)
            elif opened is not None and time.monotonic() - opened > self.cfg.connect_timeout_s:
                limit = self.cfg.connect_timeout_s
                self._fall_back_to_311(f"the broker did not answer an MQTT 5 CONNECT within {limit:g} s", generation)
            time.sleep(0.1)

    def _fall_back_to_311(self, why: str, generation: int) -> None:
        # Runs on the watchdog or a helper thread, never on paho's network thread, which loop_stop() joins. The
        # generation ties it to one start(): a stop() (or a later start()) in the meantime makes it a no-op.
        with self._swap_lock:
            if self._fallen_back.is_set() or generation != self._generation or not self._started:
                return
            self._fallen_back.set()
            log.warning("broker %s: %s; the dashboard falls back to MQTT 3.1.1", self.cfg.url, why)
            old = self._client
            old.disconnect()
            old.loop_stop()
            self._v5 = False
            with self._lock:
                self._attempt_opened_at = None
                self._connack_seen = False
            try:
                self._client = self._make_client()
                self._connect(self._client)
            except (ConfigError, OSError, ValueError) as exc:
                # e.g. the password file or a TLS file vanished since start-up: say so where the team looks.
                message = f"cannot reconnect to {self.cfg.url} with MQTT 3.1.1: {exc}"
                log.error("%s", message)
                with self._lock:
                    self.stats.broker_error = message

    def wait_subscribed(self, timeout_s: float) -> bool:
        """Wait until the broker confirmed the subscription (or ``timeout_s`` passed).

        Args:
            timeout_s: longest wait.

        Returns:
            True when subscribed.
        """
        return self._subscribed.wait(timeout_s)

    def stop(self) -> None:
        """Disconnect cleanly; the broker keeps the session and queues messages until the next ``start()``."""
        with self._swap_lock:  # waits for a fall back in progress, whose new client is then the one stopped
            if not self._started:
                return
            self._started = False
            self._generation += 1
            self._stopping = True
            client = self._client
        self.writer.stop()  # commits and acknowledges what arrived, while the connection is still up
        client.disconnect()
        client.loop_stop()
        with self._lock:
            helpers, self._helpers = self._helpers, []
        for thread in helpers:
            if thread is not threading.current_thread():
                thread.join(timeout=15.0)  # each returns within 0.1 s once the generation moved on
        self._stopping = False
        with self._lock:
            self.stats.connected = False

    def snapshot(self) -> dict[str, Any]:
        """Counters, connection state and the database's write state (``store_error``, ``held``) for the page."""
        with self._lock:
            snap = self.stats.as_dict()
        snap.update(self.writer.status())
        return snap

    # -- paho callbacks (network thread) -------------------------------------------------------------------------

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        with self._lock:
            self._attempt_opened_at = time.monotonic()

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        with self._lock:
            if self._attempt_opened_at is not None and not self._connack_seen:
                self._silent_closes += 1
            self._attempt_opened_at = None

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Properties | None
    ) -> None:
        with self._lock:
            self._connack_seen = True
        if reason.is_failure and self._v5 and self.cfg.protocol == "auto" and reason.value in PROTOCOL_REFUSED_CODES:
            why = f"the broker refused MQTT 5 ({reason.getName()})"
            self._spawn(self._fall_back_to_311, why, self._generation, name="edgemed-ingest-fallback")
            return
        if reason.is_failure:
            source = (self.cfg.password_env and f"env {self.cfg.password_env}") or self.cfg.password_file
            message = (
                f"broker {self.cfg.url} refused the dashboard ({reason.getName()}); check the user name"
                + (f" {self.cfg.username!r}" if self.cfg.username else "")
                + (f", the password it reads ({source})" if source else ", the password")
                + " and the client id"
            )
            with self._lock:
                first = self.stats.broker_error != message
                self.stats.broker_error = message
                self._accepted = False
            # Once, as the device does: paho retries with back-off and the broker refuses each attempt the same
            # way until someone fixes the settings; the page shows the refusal meanwhile.
            if first:
                log.error("%s; retrying every %g s or less", message, max(1, math.ceil(self.cfg.reconnect_max_s)))
            else:
                log.debug("%s (again)", message)
            return
        log.info(
            "dashboard connected to %s as %s (session present: %s)",
            self.cfg.url,
            self.client_id,
            getattr(flags, "session_present", None),
        )
        with self._lock:
            self.stats.connected = True
            self.stats.broker_error = None
            self._connection += 1
            self._accepted = True
        # Subscribing again on a resumed session is harmless and covers a broker that lost the session.
        client.subscribe(TOPIC_FILTER, qos=1)

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        message = f"cannot reach broker {self.cfg.url}; retrying"
        with self._lock:
            first = self.stats.broker_error != message
            self.stats.broker_error = message
        if first:
            log.warning("%s", message)

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Properties | None
    ) -> None:
        with self._lock:
            self.stats.connected = False
            self.stats.subscribed = False
            accepted, self._accepted = self._accepted, False
        # After a refused CONNECT paho reports a disconnect too ("Protocol error"): that is the refusal, already
        # reported, not a lost connection.
        if accepted and not self._stopping:
            log.warning("dashboard lost the connection to %s (%s); reconnecting", self.cfg.url, reason)

    def _on_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, reasons: list[ReasonCode], properties: Any
    ) -> None:
        if any(r.is_failure for r in reasons):
            message = f"broker {self.cfg.url} refused the subscription to {TOPIC_FILTER}; check its ACL"
            log.error("%s", message)
            with self._lock:
                self.stats.broker_error = message
            return
        with self._lock:
            self.stats.subscribed = True
        self._subscribed.set()

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        # Only queued here: the writer thread stores messages in batches and acknowledges each one after the
        # commit that holds it (see writer.py). paho's thread stays free to read the socket.
        now = time.time()
        with self._lock:
            self.stats.received += 1
            self.stats.last_message_at = now
            connection = self._connection
        ack = None
        if msg.qos > 0:
            mid, qos = msg.mid, msg.qos

            def ack() -> None:
                self._ack(client, mid, qos, connection)

        self.writer.submit(Held(msg.topic, bytes(msg.payload), now, ack))

    def _ack(self, client: paho.Client, mid: int, qos: int, connection: int) -> None:
        # A message received on a connection that has since dropped is sent again by the broker on the next one
        # (it was never acknowledged); a PUBACK with its old packet id on the new connection could acknowledge
        # another message, so none is sent. The store drops the redelivered copy as a duplicate.
        with self._lock:
            current = connection == self._connection and self.stats.connected
        if current:
            client.ack(mid, qos)

    def handle(self, topic: str, payload: bytes) -> str:
        """File one message now, in its own transaction (tests and tools call it; the network thread batches).

        Whatever the payload, it is either stored or kept as a dead letter: only a failing database raises.

        Args:
            topic: the MQTT topic.
            payload: the raw payload.

        Returns:
            ``"stored"``, ``"duplicate"``, ``"updated"`` (status/health), ``"ignored"`` (an empty retained
            message clearing a topic) or ``"rejected: <reason>"`` (kept in the dead-letter table).

        Raises:
            sqlite3.Error, OSError: the database could not be written (disk full, locked); nothing was stored.
        """
        now = time.time()
        with self._lock:
            self.stats.received += 1
            self.stats.last_message_at = now
        outcome = self._store([self._classify(topic, payload)], now)[0]
        self._count(topic, outcome)
        return outcome

    def _store(self, filings: list[Filing], now: float) -> list[str]:
        try:
            return self.store.file(filings, now)
        except _MESSAGE_ERRORS as exc:
            if len(filings) > 1:  # find the message at fault: the others go in as they are
                return [outcome for f in filings for outcome in self._store([f], now)]
            # The database works but this one message cannot go in: a dead letter, not a stuck message.
            log.exception("could not store a message on %r; keeping it as a dead letter", filings[0].topic[:200])
            reason = f"could not be stored ({type(exc).__name__})"
            return self.store.file([replace(filings[0], kind="dead", body=None, reason=reason)], now)

    @staticmethod
    def _classify(topic: str, payload: bytes) -> Filing:
        try:
            return classify(topic, payload)
        except Exception as exc:  # a bug in a check must not leave a message unacknowledged for ever
            log.exception("could not check a message on %r; keeping it as a dead letter", topic[:200])
            return Filing("dead", topic, payload, reason=f"could not be checked ({type(exc).__name__})")

    def _count(self, topic: str, outcome: str) -> None:
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
