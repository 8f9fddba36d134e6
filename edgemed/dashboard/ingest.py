"""Ingest: one MQTT subscriber that files everything the fleet publishes into the ``DashboardStore``.

Delivery contract. The subscriber uses a FIXED client id and a persistent session (MQTT 5 ``clean_start=False``
with a session expiry, or MQTT 3.1.1 ``clean_session=False``) at QoS 1 on ``edgemed/+/+/#``: while the dashboard
is down the broker queues what the devices publish, and hands it over when the dashboard returns. paho runs with
``manual_ack=True`` and a message is acknowledged (PUBACK) only once it is committed to SQLite, or once it has been
judged malformed: a crash between receipt and commit leaves the message unacknowledged, so the broker sends it
again. Duplicates from any source are dropped by the store's primary key on ``result_id``.

Nothing a device sends can crash the ingest: bad JSON, a wrong schema, a topic that does not follow
``edgemed/{site}/{device_id}/{kind}`` or a payload whose ids disagree with its topic is counted by reason,
logged (topic and reason only, never the payload) and acknowledged so that the broker does not send it again.
"""

from __future__ import annotations

import json
import logging
import math
import re
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgemed.dashboard.store import LEVELS, DashboardStore
from edgemed.errors import BrokerRefusedError, ConfigError
from edgemed.publish.config import MqttConfig, read_password
from edgemed.publish.mqtt import PROTOCOL_REFUSED_CODES

log = logging.getLogger(__name__)

TOPIC_FILTER = "edgemed/+/+/#"
DEFAULT_CLIENT_ID = "edgemed-dashboard"
_KINDS = ("results", "studies", "status", "health")
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_MAX_PAYLOAD_BYTES = 256 * 1024  # a result is about 1 KB; anything this big is not from a device of ours


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


def _check_common(body: dict[str, Any], schema: str, site: str, device_id: str) -> str | None:
    if body.get("schema") != schema:
        return f"schema is {str(body.get('schema'))[:40]!r}, expected {schema}"
    if not isinstance(body.get("result_id"), str) or not _HEX32.match(body["result_id"]):
        return "result_id is not 32 lowercase hex digits"
    if body.get("site") != site or body.get("device_id") != device_id:
        return "site/device_id in the payload differ from the topic"
    seq = body.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq < 2**63:
        return "seq is not a non-negative 64-bit integer"
    if not isinstance(body.get("created_at"), str):
        return "created_at is not a string"
    triage = body.get("triage")
    if not isinstance(triage, dict):
        return "triage is not an object"
    if triage.get("level") not in LEVELS:
        return "triage.level is not a known level"
    if not isinstance(triage.get("reason"), str):
        return "triage.reason is not a string"
    return None


def validate_result(body: Any, site: str, device_id: str) -> str | None:
    """Check the fields the dashboard relies on in an ``edgemed.result/1`` envelope.

    This is not the full JSON Schema (the dashboard does not depend on jsonschema): it checks every field the
    store and the page read, and that the payload's site and device id match the topic it came on.

    Args:
        body: the decoded JSON.
        site: the topic's site segment.
        device_id: the topic's device segment.

    Returns:
        None when usable, else a short reason (safe to log: it quotes no payload text beyond 40 characters).
    """
    if not isinstance(body, dict):
        return "payload is not a JSON object"
    problem = _check_common(body, "edgemed.result/1", site, device_id)
    if problem:
        return problem
    for name in ("runtime", "model"):
        if not isinstance(body.get(name), dict):
            return f"{name} is not an object"
    prediction = body.get("prediction")
    if prediction is not None and not (isinstance(prediction, dict) and isinstance(prediction.get("label"), str)):
        return "prediction is neither null nor an object with a label"
    return None


def validate_study(body: Any, site: str, device_id: str) -> str | None:
    """Check the fields the dashboard relies on in an ``edgemed.study/1`` decision.

    Args:
        body: the decoded JSON.
        site: the topic's site segment.
        device_id: the topic's device segment.

    Returns:
        None when usable, else a short reason.
    """
    if not isinstance(body, dict):
        return "payload is not a JSON object"
    problem = _check_common(body, "edgemed.study/1", site, device_id)
    if problem:
        return problem
    frames = body["triage"].get("frames")
    if not isinstance(frames, int) or isinstance(frames, bool) or not 1 <= frames < 2**63:
        return "triage.frames is not a positive integer"
    return None


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
        """Counters and connection state for the web page."""
        with self._lock:
            return self.stats.as_dict()

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
            message = (
                f"broker {self.cfg.url} refused the dashboard ({reason.getName()}); check the user name, "
                "password and client id"
            )
            log.error("%s", message)
            with self._lock:
                self.stats.broker_error = message
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
        if not self._stopping:
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
        try:
            self.handle(msg.topic, bytes(msg.payload))
        except Exception:  # a store failure (disk full, locked file) must not kill paho's thread
            # Not acknowledged: the broker redelivers the message after the next reconnect.
            log.exception("could not store the message on %s; it stays unacknowledged at the broker", msg.topic)
            return
        if msg.qos > 0:
            client.ack(msg.mid, msg.qos)

    def handle(self, topic: str, payload: bytes) -> str:
        """File one message; the network thread calls it, and tests may call it directly.

        Args:
            topic: the MQTT topic.
            payload: the raw payload.

        Returns:
            ``"stored"``, ``"duplicate"``, ``"updated"`` (status/health), ``"ignored"`` (an empty retained
            message clearing a topic) or ``"rejected: <reason>"``.
        """
        now = time.time()
        with self._lock:
            self.stats.received += 1
            self.stats.last_message_at = now
        outcome = self._file(topic, payload, now)
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
                log.warning("dropped a message on %r: %s (%d so far)", topic[:200], reason, seen)
        return outcome

    def _file(self, topic: str, payload: bytes, now: float) -> str:
        parts = topic.split("/")
        if len(parts) != 4 or parts[3] not in _KINDS:
            return "rejected: topic is not edgemed/{site}/{device_id}/{results|studies|status|health}"
        _, site, device_id, kind = parts
        if not _ID.match(site) or not _ID.match(device_id):
            return "rejected: site or device id in the topic has characters other than A-Z a-z 0-9 _ -"
        if not payload:
            return "ignored"  # someone cleared a retained message: nothing to file
        if len(payload) > _MAX_PAYLOAD_BYTES:
            return "rejected: payload larger than 256 KB"
        try:
            body = json.loads(payload)
        except (UnicodeDecodeError, ValueError):
            return "rejected: payload is not JSON"
        if kind == "results":
            problem = validate_result(body, site, device_id)
            if problem:
                return f"rejected: {problem}"
            return "stored" if self.store.add_result(body, now) else "duplicate"
        if kind == "studies":
            problem = validate_study(body, site, device_id)
            if problem:
                return f"rejected: {problem}"
            return "stored" if self.store.add_study(body, now) else "duplicate"
        if not isinstance(body, dict):
            return "rejected: payload is not a JSON object"
        if kind == "status":
            state = body.get("state")
            # Devices publish "online" and "offline"; MqttLink.publish_status allows other words, shown as sent.
            if not isinstance(state, str) or not 1 <= len(state) <= 32:
                return "rejected: status state is not a short word such as online or offline"
            self.store.set_status(site, device_id, body, now)
        else:
            self.store.set_health(site, device_id, body, now)
        return "updated"
