"""The MQTT core: the only module in edgemed that imports paho-mqtt, used by the device and the dashboard alike.

``MqttLink`` owns one paho client and a supervisor thread. The supervisor makes every connection attempt itself
(``connect()``/``reconnect()``, which raise) and then hands the live connection to paho's network thread
(``loop_start()`` with ``reconnect_on_failure=False``, so that thread ends with the connection). paho's own retry
loop is not used because it swallows the exception of a failed attempt, and that exception is what tells an
unreachable broker (normal: retry with capped backoff) from a broker that refuses us (a configuration error: wrong
CA, wrong password, exit 5). What an attempt amounts to (back-off, refusal, MQTT 5 -> 3.1.1 fall back) is decided
by ``policy.ReconnectPolicy``; the TLS context comes from ``tls.make_ssl_context``.

One link serves both ends. The device publishes (``publish(..., on_ack=f)``) with a retained status and a last
will; the dashboard subscribes (``subscriptions``, restored on every connection) and acknowledges each received
message itself (``manual_ack``) after the commit that holds it, on the connection the message came on.

Delivery contract: ``publish(..., on_ack=f)`` calls ``f`` from the network thread once the broker has sent a
successful PUBACK for that message, and never otherwise. Messages handed to paho while the connection is down,
or in flight when it drops, are kept by paho in memory and re-sent after reconnect; if the process dies, or the
client is replaced by a protocol fall back (``epoch``), they are lost from memory but not from the outbox, which
replays them.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from edgemed.errors import ConfigError
from edgemed.publish.config import MqttConfig, read_password
from edgemed.publish.policy import (
    PROTOCOL_REFUSED_CODES,
    Attempt,
    ReconnectPolicy,
    RefusalState,
    RefusalWording,
    ReportedRefusal,
    Step,
    connack_refusal,
    describe_device_refusal,
    publish_refusal,
    require_safe_transport,
    subscribe_refusal,
)
from edgemed.publish.publisher import AckCallback, Message, MessageCallback, StateCallback, Subscription
from edgemed.publish.tls import DEVICE_TLS_SETTINGS, TlsSettingNames, make_ssl_context

log = logging.getLogger(__name__)

__all__ = ["MqttLink", "ReportedRefusal"]

_DEVICE_NOTE = "results stay in the outbox and are sent when it is back"


class MqttLink:
    """A persistent, reconnecting MQTT connection: publishes with acknowledgements, subscribes and receives."""

    def __init__(
        self,
        cfg: MqttConfig,
        *,
        status_topic: str | None,
        client_id: str,
        on_state: StateCallback | None = None,
        status_extra: dict[str, Any] | None = None,
        persistent: bool = True,
        subscriptions: Iterable[Subscription] = (),
        on_message: MessageCallback | None = None,
        manual_ack: bool = False,
        describe_refusal: RefusalWording = describe_device_refusal,
        offline_note: str = _DEVICE_NOTE,
        unanswered_to_fall_back: int = 2,
        tls_names: TlsSettingNames = DEVICE_TLS_SETTINGS,
        online_when_subscribed: bool = False,
        on_subscribed: Callable[[], None] | None = None,
        on_dropped: Callable[[str], None] | None = None,
    ) -> None:
        """Build the client; no socket is opened until ``start()``.

        Args:
            cfg: broker settings.
            status_topic: where the retained ``online``/``offline`` status and the last will go; None = no
                status and no will (``edgemed flush``, ``edgemed doctor``).
            client_id: MQTT client id; keep it the same across restarts for a persistent session.
            on_state: called with ``"online"``, ``"offline"`` or ``"refused"`` from the network thread.
            status_extra: fields added to every status message (for example the device id and model version).
            persistent: keep a session on the broker across connections; False for a one-off check that must
                leave nothing behind on the broker.
            subscriptions: topic filters subscribed to on every connection.
            on_message: receives every message (network thread; it must only hand the message on).
            manual_ack: QoS 1 messages are acknowledged only by ``Message.ack()`` (after a durable commit);
                otherwise the link acknowledges each one when ``on_message`` returns.
            describe_refusal: words a CONNACK refusal in the owner's terms (profile keys, command-line options).
            tls_names: the owner's names of its TLS settings, for the fix a TLS refusal names.
            offline_note: what happens to the owner's messages while the broker is away, said in the log.
            unanswered_to_fall_back: with ``protocol: auto``, MQTT 5 CONNECTs in a row left unanswered for
                ``connect_timeout_s`` after which the link falls back to 3.1.1. The device waits for two (one can
                be a slow broker); the dashboard falls back after the first, so that on a 3.1.1-only broker it
                receives after one ``connect_timeout_s``. Connections closed without a CONNACK take two either way.
            online_when_subscribed: publish the ``online`` status only once the broker granted the subscriptions
                (at every connection), not at the CONNACK: for a consumer whose ``online`` tells publishers that
                what they send now reaches it (on a brand-new session, messages published before the SUBSCRIBE
                was granted are not queued for it).
            on_subscribed: called from the network thread each time the broker granted the subscriptions (at
                every connection, after the ``online`` of ``online_when_subscribed``); it must only hand on.
            on_dropped: called from the network thread with the broker's reason (MQTT 5 DISCONNECT reason name,
                such as ``Session taken over``) each time an accepted connection ends; it must only hand on.

        Raises:
            BrokerRefusedError: plaintext to a non-loopback broker without ``allow_plaintext_remote``.
            ConfigError: the password source or a TLS file cannot be read.
            ValueError: subscriptions or ``manual_ack`` without ``on_message``, or ``unanswered_to_fall_back``
                below 1.
        """
        if unanswered_to_fall_back < 1:
            raise ValueError(f"unanswered_to_fall_back must be 1 or more, not {unanswered_to_fall_back}")
        self._unanswered_to_fall_back = unanswered_to_fall_back
        self._tls_names = tls_names
        self._subscriptions = tuple(subscriptions)
        self._online_when_subscribed = online_when_subscribed and bool(self._subscriptions)
        if (self._subscriptions or manual_ack) and on_message is None:
            raise ValueError("subscriptions and manual_ack need on_message, the callback that receives messages")
        require_safe_transport(cfg)
        self.cfg = cfg
        self.broker = cfg.broker
        self.status_topic = status_topic
        self.client_id = client_id
        self.status_extra: dict[str, Any] = dict(status_extra or {})
        self.persistent = persistent
        self._on_state = on_state
        self._on_message = on_message
        self._on_subscribed = on_subscribed
        self._on_dropped = on_dropped
        self._manual_ack = manual_ack
        self._describe_refusal = describe_refusal
        self._offline_note = offline_note
        self._password = read_password(cfg)
        self._ssl_context: ssl.SSLContext | None = make_ssl_context(cfg.tls) if self.broker.tls else None
        self._v5 = cfg.protocol != "3.1.1"
        self._lock = threading.Lock()
        self._callbacks: dict[int, AckCallback | None] = {}
        self._early: dict[int, ReasonCode] = {}
        self._dropped = threading.Event()
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._stop = threading.Event()
        self._refusal = RefusalState()
        self._unreachable: str | None = None
        self._sub_mid: int | None = None
        self._attempt = Attempt()
        self._connect_called = False
        self._thread: threading.Thread | None = None
        #: Incremented whenever a new paho client replaces the old one (protocol fallback): messages handed to
        #: the old client are gone from memory and must be re-published from the outbox.
        self.epoch = 0
        #: Incremented on every accepted connection (CONNACK success): the delivery re-sends its replay window
        #: when it sees a reconnection, and a received message is acknowledged only on its own connection.
        self.connections = 0
        self._client = self._make_client()

    def _make_client(self) -> paho.Client:
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=paho.MQTTv5 if self._v5 else paho.MQTTv311,
            # Persistent session: the broker keeps our state across reconnects (v5: clean_start=False).
            clean_session=None if self._v5 else not self.persistent,
            reconnect_on_failure=False,
            manual_ack=self._manual_ack,
        )
        client.connect_timeout = self.cfg.connect_timeout_s
        if self.cfg.username:
            client.username_pw_set(self.cfg.username, self._password)
        if self._ssl_context is not None:
            client.tls_set_context(self._ssl_context)
        if self.status_topic:
            # The broker publishes this when the connection ends without a DISCONNECT: a crash, a kill, a power cut
            # or a network failure. The owner said nothing more, so it is not a clean stop.
            client.will_set(
                self.status_topic,
                self._status_payload("offline", {"reason": "connection lost", "clean": False}),
                qos=1,
                retain=True,
            )
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_publish = self._handle_publish
        if self._subscriptions:
            client.on_subscribe = self._handle_subscribe
        if self._on_message is not None:
            client.on_message = self._handle_message
        return client

    # -- public API ------------------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True between a successful CONNACK and the loss of the connection."""
        return self._connected.is_set()

    @property
    def subscribed(self) -> bool:
        """True once the broker granted every subscription on the current connection."""
        return self._subscribed.is_set()

    @property
    def protocol(self) -> str:
        """The MQTT version this link speaks now: ``"5"``, or ``"3.1.1"`` (configured, or after a fall back)."""
        return "5" if self._v5 else "3.1.1"

    @property
    def problem(self) -> str | None:
        """Why the link is not working, for a status page: the refusal, or the broker being unreachable."""
        return self._refusal.message or (None if self.connected else self._unreachable)

    def start(self) -> None:
        """Start connecting in the background; an unreachable broker is not an error: the link retries.

        After a ``stop()`` that timed out (the supervisor was blocked in a TCP or TLS handshake, which paho bounds by
        ``connect_timeout_s`` each), the previous supervisor is waited for first: two of them must never drive
        the one paho client.

        Raises:
            RuntimeError: the previous run's supervisor is still blocked after its handshakes' time limit.
        """
        thread = self._thread
        if thread is not None and not self._stop.is_set():
            return  # running
        if thread is not None:
            # Ended by stop(), which timed out; its own stop event stays set, so it ends at its next check.
            thread.join(2 * self.cfg.connect_timeout_s + 1.0)
            if thread.is_alive():
                raise RuntimeError(
                    f"the MQTT link to {self.cfg.url} cannot start again yet: its previous connection attempt is "
                    "still blocked (a DNS lookup that does not answer?); call start() again later"
                )
            self._thread = None
        if self.cfg.protocol == "auto" and not self._v5:
            # An earlier run of this link fell back: probe MQTT 5 again (the broker, or a proxy in front of it,
            # may have been merely unwell then).
            self._v5 = True
            self._replace_client()
        # Each run has its own stop event, captured by its supervisor: a new run never revives an old one's.
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(self._stop,), name="edgemed-mqtt", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raise if the broker refused us; call it periodically from the main thread.

        Raises:
            BrokerRefusedError: wrong password, untrusted certificate, rejected client id, or a message or
                subscription refused.
        """
        self._refusal.check()

    def wait_connected(self, timeout_s: float) -> bool:
        """Wait until connected, refused or ``timeout_s`` passed.

        Args:
            timeout_s: longest wait.

        Returns:
            True when connected.
        """
        return self._wait(self._connected, timeout_s)

    def wait_subscribed(self, timeout_s: float) -> bool:
        """Wait until the broker granted every subscription (or refused, or ``timeout_s`` passed).

        Args:
            timeout_s: longest wait.

        Returns:
            True when subscribed (with no subscriptions: when connected).
        """
        return self._wait(self._subscribed if self._subscriptions else self._connected, timeout_s)

    def _wait(self, event: threading.Event, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not event.wait(0.05):
            if self._refusal.message is not None or time.monotonic() > deadline:
                return False
        return True

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        on_ack: AckCallback | None = None,
    ) -> None:
        """Hand one message to the client; while disconnected it is held in memory and sent after reconnect.

        Args:
            topic: MQTT topic.
            payload: message bytes.
            qos: 0 or 1 (QoS 0 messages are dropped while disconnected).
            retain: ask the broker to keep it as the topic's last value.
            on_ack: called once, from the network thread, when the broker acknowledged a QoS 1 message.

        Raises:
            ConfigError: the topic or QoS is invalid.
        """
        if qos not in (0, 1):
            raise ConfigError(f"MQTT QoS must be 0 or 1, not {qos}")
        client = self._client
        try:
            info = client.publish(topic, payload, qos=qos, retain=retain)
        except ValueError as exc:
            raise ConfigError(f"cannot publish on MQTT topic {topic!r}: {exc}") from exc
        if qos == 0:
            return
        # paho may deliver the PUBACK (in the network thread) before publish() returned the mid to us.
        with self._lock:
            early = self._early.pop(info.mid, None)
            if early is None:
                self._callbacks[info.mid] = on_ack
        if early is not None:
            self._finish(info.mid, topic, early, on_ack)

    def publish_status(self, state: str, extra: dict[str, Any] | None = None) -> None:
        """Publish a retained QoS 1 status message; does nothing when the link has no status topic.

        Args:
            state: ``online``, ``offline`` or another word the dashboard shows.
            extra: fields added to this message only.
        """
        if self.status_topic:
            self.publish(self.status_topic, self._status_payload(state, extra or {}), qos=1, retain=True)

    def stop(self, timeout_s: float = 5.0, *, abnormal: str | None = None, extra: dict[str, Any] | None = None) -> None:
        """Publish ``offline`` (retained), wait up to ``timeout_s`` for its PUBACK, then disconnect cleanly.

        The offline status says how the run ended: ``clean: true`` and reason ``stopped`` after a normal end, or
        ``clean: false`` and reason ``ended with an error (...)`` when ``abnormal`` names what ended it. The last
        will (no stop at all) says ``connection lost`` with ``clean: false``. A persistent session stays on the
        broker, which queues what arrives for it until the next ``start()``.

        Args:
            timeout_s: longest wait for the acknowledgement and the network thread.
            abnormal: why the run ended abnormally (for example the exception's class name); None = a clean stop.
                It is published: never put file names or patient data in it.
            extra: fields added to the offline status (for example ``pending``: results left on disk).
        """
        deadline = time.monotonic() + timeout_s
        if self._thread is None or self._stop.is_set():
            return  # never started, or stopped already (its supervisor may still be ending: start() waits for it)
        if self.connected and self.status_topic:
            ending: dict[str, Any] = (
                {"reason": "stopped", "clean": True}
                if abnormal is None
                else {"reason": f"ended with an error ({abnormal})", "clean": False}
            )
            acked = threading.Event()
            self.publish(
                self.status_topic,
                self._status_payload("offline", {**(extra or {}), **ending}),
                qos=1,
                retain=True,
                on_ack=acked.set,
            )
            acked.wait(max(0.0, deadline - time.monotonic()))
        self._stop.set()
        self._client.disconnect()
        self._thread.join(max(0.1, deadline - time.monotonic()))
        if self._thread.is_alive():
            # Blocked in a handshake (paho bounds it by connect_timeout_s): kept, so that start() waits for it.
            log.debug("the MQTT supervisor is still ending (blocked connecting to %s)", self.cfg.url)
        else:
            self._thread = None
        self._connected.clear()
        self._subscribed.clear()

    # -- supervisor thread -----------------------------------------------------------------------------------

    def _run(self, stop: threading.Event) -> None:
        policy = ReconnectPolicy(
            self.cfg, unanswered_to_fall_back=self._unanswered_to_fall_back, tls_names=self._tls_names
        )
        while not stop.is_set():
            attempt = self._connect_once(stop)
            if stop.is_set():
                break
            may_fall_back = self._v5 and self.cfg.protocol == "auto"
            step = policy.after(attempt, refused=self._refusal.message is not None, may_fall_back=may_fall_back)
            self._follow(step, attempt)
            if self._refusal.message is not None:
                # Leave check() its chance to raise the refusal first (see RefusalState), then log it if nobody did.
                stop.wait(self._refusal.due_in(time.monotonic()))
                self._report_refusal()
            stop.wait(step.delay_s)

    def _connect_once(self, stop: threading.Event) -> Attempt:
        """One connection attempt, from CONNECT until the connection ends (the callbacks fill in the record)."""
        attempt = self._attempt = Attempt()
        # Cleared before connecting, not in _pump: paho can lose the connection (and _handle_log report it)
        # inside connect() already, and that report must not be wiped out.
        self._dropped.clear()
        try:
            self._open()
        except OSError as exc:
            attempt.error = exc
            return attempt
        self._pump(self._client, stop)
        self._connected.clear()
        self._subscribed.clear()
        return attempt

    def _follow(self, step: Step, attempt: Attempt) -> None:
        if step.refusal is not None:
            self._refuse(step.refusal, retry=True)
        if step.fall_back is not None:
            self._fall_back_to_311(step.fall_back)
        if step.report == "unreachable":
            log.warning(
                "broker %s is unreachable (%s): %s; retrying every %.1f-%.1f s",
                self.cfg.url,
                attempt.error,
                self._offline_note,
                self.cfg.reconnect_min_s,
                self.cfg.reconnect_max_s,
            )
        elif step.report == "lost":
            log.warning("lost the connection to broker %s: %s; reconnecting", self.cfg.url, self._offline_note)
        if attempt.error is not None and step.refusal is None:
            self._unreachable = f"broker {self.cfg.url} is unreachable ({attempt.error}); retrying"

    def _open(self) -> None:
        # Listen to paho's log only until connected: with a log callback set, paho formats a debug line for
        # every packet, which costs a third of the throughput.
        self._client.on_log = self._handle_log
        if not self._connect_called:
            # connect() records host, port and session options even when it raises; later tries reconnect().
            self._connect_called = True
            if self._v5:
                props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                props.SessionExpiryInterval = self.cfg.session_expiry_s if self.persistent else 0
                self._client.connect(
                    self.broker.host,
                    self.broker.port,
                    self.cfg.keepalive_s,
                    clean_start=not self.persistent,
                    properties=props,
                )
            else:
                self._client.connect(self.broker.host, self.broker.port, self.cfg.keepalive_s)
        else:
            self._client.reconnect()

    def _pump(self, client: paho.Client, stop: threading.Event) -> None:
        # paho's own network thread (loop_start) runs the connection: in that mode publish() from other threads
        # only queues, and paho writes in bulk, which is twice as fast as driving loop() from here. With
        # reconnect_on_failure=False its thread ends when the connection does; we then reconnect ourselves, so
        # that every connection attempt's exception reaches the policy.
        client.loop_start()
        connack_deadline = time.monotonic() + self.cfg.connect_timeout_s
        while not self._dropped.wait(0.1):
            if stop.is_set():
                break
            self._report_refusal()  # a message or subscription refused while the connection stays up
            if not self._attempt.connack and time.monotonic() > connack_deadline:
                # paho bounds only the TCP and TLS handshakes; a broker that swallows an MQTT 5 CONNECT it does
                # not understand would otherwise hold us until the keepalive runs out.
                log.warning("broker %s did not answer CONNECT within %.1f s", self.cfg.url, self.cfg.connect_timeout_s)
                self._attempt.unanswered = True
                client.disconnect()
                break
        # Guarantees that paho's loop ends even when no connection was ever established (stop() while waiting for
        # a CONNACK); a no-op on an already closed connection.
        if stop.is_set() and not self._dropped.is_set():
            client.disconnect()
        client.loop_stop()

    def _fall_back_to_311(self, why: str) -> None:
        log.warning("broker %s: %s; falling back to MQTT 3.1.1", self.cfg.url, why)
        self._v5 = False
        self._replace_client()

    def _replace_client(self) -> None:
        # Only ever on the supervisor thread (or before it starts): paho's network thread for the old client has
        # ended, so nothing can call back into it any more.
        with self._lock:
            self._callbacks.clear()
            self._early.clear()
        self._client = self._make_client()
        self._connect_called = False
        self.epoch += 1

    # -- network thread --------------------------------------------------------------------------------------

    def _handle_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Properties | None
    ) -> None:
        self._attempt.connack = True
        if reason.is_failure:
            name = reason.getName()
            if self._v5 and reason.value in PROTOCOL_REFUSED_CODES:
                self._attempt.protocol_refused = name
                if self.cfg.protocol == "auto":
                    return  # the supervisor falls back once this connection has ended
            refusal = connack_refusal(name, self.cfg, self.client_id)
            if refusal is not None:
                self._refuse(self._describe_refusal(refusal), retry=True)
            else:
                log.warning("broker %s refused the connection for now (%s); retrying", self.cfg.url, name)
            return
        client.on_log = None
        self._refusal.clear()
        self._unreachable = None
        self._attempt.online = True
        self.connections += 1
        self._connected.set()
        log.info(
            "connected to broker %s as %s (MQTT %s, session present: %s)",
            self.cfg.url,
            self.client_id,
            self.protocol,
            getattr(flags, "session_present", None),
        )
        if self.status_topic and not self._online_when_subscribed:
            client.publish(self.status_topic, self._status_payload("online", {}), qos=1, retain=True)
        if self._subscriptions:
            # Also on a resumed session: harmless there, and it covers a broker that lost the session.
            self._sub_mid = client.subscribe(self._subscribe_list())[1]
        self._notify("online")

    def _subscribe_list(self) -> list[tuple[str, Any]]:
        if self._v5:
            return [
                (s.topic_filter, SubscribeOptions(qos=s.qos, noLocal=s.no_local, retainHandling=int(s.retained_if_new)))
                for s in self._subscriptions
            ]
        return [(s.topic_filter, s.qos) for s in self._subscriptions]

    def _handle_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, reasons: list[ReasonCode], properties: Any
    ) -> None:
        if mid != self._sub_mid:
            return
        # One reason code per filter, in order; only the codes the broker sent are judged.
        pairs = zip(self._subscriptions, reasons, strict=False)
        refused = {s.topic_filter: r.getName() for s, r in pairs if r.is_failure}
        if refused:
            self._refuse(subscribe_refusal(self.cfg.url, self.client_id, refused), retry=False)
        else:
            self._subscribed.set()
            if self.status_topic and self._online_when_subscribed:
                client.publish(self.status_topic, self._status_payload("online", {}), qos=1, retain=True)
            if self._on_subscribed is not None:
                try:
                    self._on_subscribed()
                except Exception:  # the owner's bug must not kill the network thread
                    log.exception("on_subscribed callback failed")

    def _handle_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        ack = None
        if self._manual_ack and msg.qos > 0:
            ack = partial(self._ack, client, msg.mid, msg.qos, self.connections)
        if self._on_message is None:
            return
        try:
            self._on_message(Message(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain), ack))
        except Exception:
            # The handler belongs to the owner; a bug there must not kill the network thread. Unacknowledged, the
            # message comes again on the next connection.
            log.exception("message handler failed for a message on %r", msg.topic[:200])

    def _ack(self, client: paho.Client, mid: int, qos: int, connection: int) -> None:
        # A message received on a connection that has since dropped is sent again by the broker on the next one
        # (it was never acknowledged); a PUBACK with its old packet id on the new connection could acknowledge
        # another message, so none is sent. The owner drops the redelivered copy as a duplicate.
        if connection == self.connections and client is self._client and self._connected.is_set():
            client.ack(mid, qos)

    def _handle_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Properties | None
    ) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        self._subscribed.clear()
        self._dropped.set()
        if was:
            self._notify("offline")
            if self._on_dropped is not None:
                try:
                    self._on_dropped(reason.getName())
                except Exception:  # the owner's bug must not kill the network thread
                    log.exception("on_dropped callback failed")

    def _handle_log(self, client: paho.Client, userdata: Any, level: int, message: str) -> None:
        # paho swallows socket errors after the handshake and only logs them; a TLS alert from the broker is
        # the one among them that means "your settings are wrong" rather than "the network went away".
        if level == paho.MQTT_LOG_ERR and "SSL:" in message and "ALERT" in message:
            self._attempt.tls_alert = message.split(": ", 1)[-1]
        if level == paho.MQTT_LOG_ERR and not self._attempt.connack and "failed to receive on socket" in message:
            # paho calls no on_disconnect for a connection lost before its CONNACK: end the pump now rather than
            # at the CONNACK deadline.
            if "EOF" in message and self.broker.tls:
                self._attempt.tls_eof = True
            self._dropped.set()
        if level in (paho.MQTT_LOG_ERR, paho.MQTT_LOG_WARNING):
            log.debug("paho: %s", message)

    def _handle_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode, properties: Properties | None
    ) -> None:
        with self._lock:
            if mid not in self._callbacks:
                self._early[mid] = reason
                return
            on_ack = self._callbacks.pop(mid)
        self._finish(mid, "", reason, on_ack)

    def _finish(self, mid: int, topic: str, reason: ReasonCode, on_ack: AckCallback | None) -> None:
        # v5 PUBACK reason codes >= 0x80 mean the broker did not take the message (typically an ACL denial).
        if reason.is_failure:
            self._refuse(publish_refusal(self.cfg.url, self.client_id, topic, reason.getName()), retry=False)
            return
        if on_ack is not None:
            try:
                on_ack()
            except Exception:
                # The callback belongs to the delivery layer; a bug there must not kill the network thread.
                log.exception("acknowledgement callback failed for message %d", mid)

    # -- refusals and status ---------------------------------------------------------------------------------

    def _refuse(self, message: str, *, retry: bool) -> None:
        retry_s = self.cfg.reconnect_max_s if retry else None
        if self._refusal.set(message, time.monotonic(), retry_s=retry_s):
            self._notify("refused")
        else:
            log.debug("%s (again)", message)

    def _report_refusal(self) -> None:
        line = self._refusal.take_log_line(time.monotonic())
        if line is not None:
            log.error("%s", line)

    def _notify(self, state: str) -> None:
        if self._on_state is None:
            return
        try:
            self._on_state(state)
        except Exception:
            log.exception("on_state callback failed for state %s", state)

    def _status_payload(self, state: str, extra: dict[str, Any]) -> bytes:
        body = {
            "state": state,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **self.status_extra,
            **extra,
        }
        return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
