"""The MQTT link: the only module in edgemed that imports paho-mqtt.

``MqttLink`` owns one paho client and a supervisor thread. The supervisor makes every connection attempt itself
(``connect()``/``reconnect()``, which raise) and then hands the live connection to paho's network thread
(``loop_start()`` with ``reconnect_on_failure=False``, so that thread ends with the connection). paho's own retry
loop is not used because it swallows the exception of a failed attempt, and that exception is what tells an
unreachable broker (normal: retry with capped backoff, results wait in the outbox) from a broker that refuses us
(a configuration error: wrong CA, wrong password, exit 5).

Delivery contract: ``publish(..., on_ack=f)`` calls ``f`` from the network thread once the broker has sent a
successful PUBACK for that message, and never otherwise. Messages handed to paho while the connection is down,
or in flight when it drops, are kept by paho in memory and re-sent after reconnect; if the process dies they
are lost from memory but not from the outbox, which replays them at the next start.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgemed.errors import BrokerRefusedError, ConfigError
from edgemed.publish.config import MqttConfig, read_password

log = logging.getLogger(__name__)

AckCallback = Callable[[], None]
StateCallback = Callable[[str], None]

# CONNACK reasons that mean "your settings are wrong", as opposed to "try again later".
_REFUSALS = {
    "Not authorized": "check mqtt.username and the password it reads ({source})",
    "Bad user name or password": "check mqtt.username and the password it reads ({source})",
    "Client identifier not valid": "set mqtt.client_id to an id the broker accepts",
    "Banned": "the broker banned this client; ask its operator",
    "Bad authentication method": "the broker wants another authentication method",
}
# A v5 CONNECT to a 3.1.1-only broker is answered with return code 1 (unacceptable protocol version), which
# paho reports as 1 or as 132 "Unsupported protocol version".
PROTOCOL_REFUSED_CODES = frozenset({1, 132})
# How long a refusal waits for check() to raise it before the link logs it itself.
_REFUSAL_GRACE_S = 1.0


class ReportedRefusal(BrokerRefusedError):
    """A refusal that ``MqttLink`` has already logged (``reported``): the caller need not print it again."""

    reported = True


def _who(cfg: MqttConfig, name: str, hint: str) -> str:
    """``as user 'u': <reason>; <fix>`` for a CONNACK refusal, naming where the password comes from."""
    if cfg.username:
        source = f"env {cfg.password_env}" if cfg.password_env else str(cfg.password_file)
        return f"as user {cfg.username!r}: {name}; {hint.format(source=source)}"
    if "{source}" in hint:  # a credentials refusal, and we sent none
        return (
            f"without a user name: {name}; the broker wants one: set mqtt.username with mqtt.password_env or "
            "mqtt.password_file (or --username with --password-env or --password-file)"
        )
    return f"without a user name: {name}; {hint}"


class MqttLink:
    """A persistent, reconnecting MQTT connection with a retained online/offline status and a last will."""

    def __init__(
        self,
        cfg: MqttConfig,
        *,
        status_topic: str | None,
        client_id: str,
        on_state: StateCallback | None = None,
        status_extra: dict[str, Any] | None = None,
        persistent: bool = True,
    ) -> None:
        """Build the client; no socket is opened until ``start()``.

        Args:
            cfg: broker settings.
            status_topic: where the retained ``online``/``offline`` status and the last will go; None = no
                status and no will (``edgemed flush``, ``edgemed doctor``).
            client_id: stable MQTT client id (see ``default_client_id``).
            on_state: called with ``"online"``, ``"offline"`` or ``"refused"`` from the network thread.
            status_extra: fields added to every status message (for example the device id and model version).
            persistent: keep a session on the broker across connections (a device); False for a one-off check
                that must leave nothing behind on the broker.

        Raises:
            BrokerRefusedError: plaintext to a non-loopback broker without ``allow_plaintext_remote``.
            ConfigError: the password source or a TLS file cannot be read.
        """
        self.cfg = cfg
        self.broker = cfg.broker
        if not self.broker.tls and not self.broker.loopback and not cfg.allow_plaintext_remote:
            raise BrokerRefusedError(
                f"refusing plaintext MQTT to {self.broker.host}:{self.broker.port}: results and the password "
                "would cross the network unencrypted; use mqtts:// (with mqtt.tls.ca_file for a private CA) "
                "or set mqtt.allow_plaintext_remote: true"
            )
        self.status_topic = status_topic
        self.client_id = client_id
        self.status_extra: dict[str, Any] = dict(status_extra or {})
        self.persistent = persistent
        self._on_state = on_state
        self._password = read_password(cfg)
        self._ssl_context = self._make_ssl_context() if self.broker.tls else None
        self._v5 = cfg.protocol != "3.1.1"
        self._lock = threading.Lock()
        self._callbacks: dict[int, AckCallback | None] = {}
        self._early: dict[int, ReasonCode] = {}
        self._dropped = threading.Event()
        self._connected = threading.Event()
        self._stop = threading.Event()
        self._refused: str | None = None
        self._refusal_raised = False  # check() raised the current refusal to a caller
        self._refusal_logged = False  # nobody asked in time, so it was logged
        self._got_connack = False
        self._went_online = False
        self._connect_called = False
        self._tls_alert: str | None = None
        self._tls_eof = False
        self._thread: threading.Thread | None = None
        #: Incremented whenever a new paho client replaces the old one (protocol fallback): messages handed to
        #: the old client are gone from memory and must be re-published from the outbox.
        self.epoch = 0
        #: Incremented on every accepted connection (CONNACK success): the delivery re-sends its replay window
        #: when it sees a reconnection.
        self.connections = 0
        self._client = self._make_client()

    # -- construction ----------------------------------------------------------------------------------------

    def _make_ssl_context(self) -> ssl.SSLContext:
        tls = self.cfg.tls
        ca = str(tls.ca_file) if tls and tls.ca_file else None
        try:
            ctx = ssl.create_default_context(cafile=ca)
            if tls and tls.cert_file and tls.key_file:
                ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"cannot load the TLS files of mqtt.tls ({exc}); check ca_file, cert_file and key_file"
            ) from exc
        return ctx

    def _make_client(self) -> paho.Client:
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=paho.MQTTv5 if self._v5 else paho.MQTTv311,
            # Persistent session: the broker keeps our state across reconnects (v5: clean_start=False).
            clean_session=None if self._v5 else not self.persistent,
            reconnect_on_failure=False,
        )
        client.connect_timeout = self.cfg.connect_timeout_s
        if self.cfg.username:
            client.username_pw_set(self.cfg.username, self._password)
        if self._ssl_context is not None:
            client.tls_set_context(self._ssl_context)
        if self.status_topic:
            # The broker publishes this when the connection ends without a DISCONNECT: a crash, a kill, a power cut
            # or a network failure. The device said nothing more, so it is not a clean stop.
            client.will_set(
                self.status_topic,
                self._status_payload("offline", {"reason": "connection lost", "clean": False}),
                qos=1,
                retain=True,
            )
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_publish = self._handle_publish
        return client

    # -- public API ------------------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True between a successful CONNACK and the loss of the connection."""
        return self._connected.is_set()

    def start(self) -> None:
        """Start connecting in the background; an unreachable broker is not an error: the link retries."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="edgemed-mqtt", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raise if the broker refused us; call it periodically from the main thread.

        Raises:
            BrokerRefusedError: wrong password, untrusted certificate, rejected client id or publish refused.
        """
        refused = self._refused
        if refused is not None:
            self._refusal_raised = True
            raise ReportedRefusal(refused) if self._refusal_logged else BrokerRefusedError(refused)

    def wait_connected(self, timeout_s: float) -> bool:
        """Wait until connected, refused or ``timeout_s`` passed.

        Args:
            timeout_s: longest wait.

        Returns:
            True when connected.
        """
        deadline = time.monotonic() + timeout_s
        while not self._connected.wait(0.05):
            if self._refused is not None or time.monotonic() > deadline:
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
        will (no stop at all) says ``connection lost`` with ``clean: false``.

        Args:
            timeout_s: longest wait for the acknowledgement and the network thread.
            abnormal: why the run ended abnormally (for example the exception's class name); None = a clean stop.
                It is published: never put file names or patient data in it.
            extra: fields added to the offline status (for example ``pending``: results left on disk).
        """
        deadline = time.monotonic() + timeout_s
        if self._thread is None:
            return
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
        self._thread = None
        self._connected.clear()

    # -- network thread --------------------------------------------------------------------------------------

    def _run(self) -> None:
        delay = self.cfg.reconnect_min_s
        outage_logged = False
        silent_closes = 0
        tls_eofs = 0
        while not self._stop.is_set():
            self._got_connack = False
            self._went_online = False
            self._tls_alert = None
            self._tls_eof = False
            continue_eofs = False  # set when this attempt ended in a TLS EOF; any other outcome breaks the run
            # Cleared before connecting, not in _pump: paho can lose the connection (and _handle_log report it)
            # inside connect() already, and that report must not be wiped out.
            self._dropped.clear()
            try:
                self._open()
            except OSError as exc:
                refusal = _tls_refusal(exc, self.cfg)
                if refusal is not None:
                    self._refuse(refusal)
                elif not outage_logged:
                    log.warning(
                        "broker %s is unreachable (%s): results stay in the outbox and are sent when it is "
                        "back; retrying every %.1f-%.1f s",
                        self.cfg.url,
                        exc,
                        self.cfg.reconnect_min_s,
                        self.cfg.reconnect_max_s,
                    )
                    outage_logged = True
            else:
                self._pump(self._client)
                self._connected.clear()
                if self._stop.is_set():
                    break
                if self._went_online:
                    delay = self.cfg.reconnect_min_s
                    silent_closes = tls_eofs = 0
                    log.warning(
                        "lost the connection to broker %s: results stay in the outbox; reconnecting",
                        self.cfg.url,
                    )
                    outage_logged = True
                elif self._tls_alert is not None:
                    self._refuse_tls_alert(self._tls_alert)
                elif self._tls_eof and (self.cfg.tls is None or self.cfg.tls.cert_file is None):
                    tls_eofs += 1
                    if tls_eofs >= 2:  # twice in a row right after the handshake: not a network blip
                        self._refuse_tls_alert("it closed TLS twice before answering CONNECT")
                    continue_eofs = True
                elif not self._got_connack:
                    silent_closes += 1
                    if self._v5 and self.cfg.protocol == "auto" and silent_closes >= 2 and self._refused is None:
                        self._fall_back_to_311("the broker closed two MQTT 5 connections without a CONNACK")
                        silent_closes = 0
            if not continue_eofs:
                tls_eofs = 0
            if self._refused is not None:
                # A refusal does not fix itself: keep trying, slowly, until someone fixes the settings.
                delay = self.cfg.reconnect_max_s
                self._report_refusal()
            self._stop.wait(delay)
            delay = min(delay * 2, self.cfg.reconnect_max_s)

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

    def _pump(self, client: paho.Client) -> None:
        # paho's own network thread (loop_start) runs the connection: in that mode publish() from other threads
        # only queues, and paho writes in bulk, which is twice as fast as driving loop() from here. With
        # reconnect_on_failure=False its thread ends when the connection does; we then reconnect ourselves, so
        # that every connection attempt's exception reaches _tls_refusal().
        client.loop_start()
        connack_deadline = time.monotonic() + self.cfg.connect_timeout_s
        while not self._dropped.wait(0.1):
            if self._stop.is_set():
                break
            if not self._got_connack and time.monotonic() > connack_deadline:
                # paho bounds only the TCP and TLS handshakes; a broker that swallows an MQTT 5 CONNECT it does
                # not understand would otherwise hold us until the keepalive runs out.
                log.warning("broker %s did not answer CONNECT within %.1f s", self.cfg.url, self.cfg.connect_timeout_s)
                client.disconnect()
                break
        # Guarantees that paho's loop ends even when no connection was ever established (stop() while waiting for
        # a CONNACK); a no-op on an already closed connection.
        if self._stop.is_set() and not self._dropped.is_set():
            client.disconnect()
        client.loop_stop()

    def _fall_back_to_311(self, why: str) -> None:
        log.warning("broker %s: %s; falling back to MQTT 3.1.1", self.cfg.url, why)
        self._v5 = False
        with self._lock:
            self._callbacks.clear()
            self._early.clear()
        self._client = self._make_client()
        self._connect_called = False
        self.epoch += 1

    def _handle_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: Any,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._got_connack = True
        if reason.is_failure:
            name = reason.getName()
            if self._v5 and self.cfg.protocol == "auto" and reason.value in PROTOCOL_REFUSED_CODES:
                self._fall_back_to_311(f"the broker refused MQTT 5 ({name})")
                return
            hint = _REFUSALS.get(name)
            if hint is not None:
                who = _who(self.cfg, name, hint)
                self._refuse(f"broker {self.cfg.url} refused the connection of client {self.client_id!r} {who}")
            else:
                log.warning("broker %s refused the connection for now (%s); retrying", self.cfg.url, name)
            return
        client.on_log = None
        self._refused = None
        self._went_online = True
        self.connections += 1
        self._connected.set()
        log.info(
            "connected to broker %s as %s (MQTT %s, session present: %s)",
            self.cfg.url,
            self.client_id,
            "5" if self._v5 else "3.1.1",
            getattr(flags, "session_present", None),
        )
        if self.status_topic:
            client.publish(self.status_topic, self._status_payload("online", {}), qos=1, retain=True)
        self._notify("online")

    def _handle_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: Any,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        self._dropped.set()
        if was:
            self._notify("offline")

    def _refuse_tls_alert(self, alert: str) -> None:
        # TLS 1.3 reports a rejected client certificate only after the handshake, as an alert on the first
        # read; paho logs it and closes. Without this the failure would look like a network outage.
        self._refuse(
            f"TLS: broker {self.cfg.url} rejected the connection ({alert}); if it requires a client "
            "certificate, set mqtt.tls.cert_file and mqtt.tls.key_file to one its CA signed"
        )

    def _handle_log(self, client: paho.Client, userdata: Any, level: int, message: str) -> None:
        # paho swallows socket errors after the handshake and only logs them; a TLS alert from the broker is
        # the one among them that means "your settings are wrong" rather than "the network went away".
        if level == paho.MQTT_LOG_ERR and "SSL:" in message and "ALERT" in message:
            self._tls_alert = message.split(": ", 1)[-1]
        if level == paho.MQTT_LOG_ERR and not self._got_connack and "failed to receive on socket" in message:
            # paho calls no on_disconnect for a connection lost before its CONNACK: end the pump now rather than
            # at the CONNACK deadline. An EOF inside TLS here is how a broker that wants a client certificate
            # often looks when its alert raced our CONNECT (the reset discards the alert).
            if "EOF" in message and self.broker.tls:
                self._tls_eof = True
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
            self._refuse(
                f"broker {self.cfg.url} refused a message from client {self.client_id!r}"
                f"{' on ' + topic if topic else ''}: {reason.getName()}; allow this client to publish on "
                "its edgemed/ topics in the broker's ACL"
            )
            return
        if on_ack is not None:
            try:
                on_ack()
            except Exception:
                # The callback belongs to the delivery layer; a bug there must not kill the network thread.
                log.exception("acknowledgement callback failed for message %d", mid)

    def _refuse(self, message: str) -> None:
        first = self._refused != message
        if first:
            self._refusal_raised = self._refusal_logged = False
        self._refused = message
        if first:
            self._notify("refused")

    def _report_refusal(self) -> None:
        # A refusal is shown once: raised by check() to the caller (the command line prints it as its exit
        # reason), or, when no caller asks within a second (a watch: folder with nothing new), logged here; a
        # later check() then raises it marked as reported, so that it is not printed a second time.
        if self._refused is None or self._refusal_logged or self._stop.wait(_REFUSAL_GRACE_S):
            return
        if not self._refusal_raised:
            log.error("%s", self._refused)
            self._refusal_logged = True

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


def _tls_refusal(exc: OSError, cfg: MqttConfig) -> str | None:
    """A one-line configuration error for a TLS failure, or None for a transient network failure."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        what = exc.verify_message or str(exc)
        fix = (
            "set mqtt.tls.ca_file to the CA that signed the broker's certificate"
            if "hostname" not in what.lower()
            else "use the host name the broker's certificate names in the URL"
        )
        return f"TLS: the certificate of broker {cfg.url} is not trusted ({what}); {fix}"
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return None  # the broker went away mid-handshake: retry
    if isinstance(exc, ssl.SSLError):
        return (
            f"TLS handshake with broker {cfg.url} failed ({exc.reason or exc}); check that the port speaks "
            "TLS and, if the broker requires a client certificate, set mqtt.tls.cert_file and key_file"
        )
    return None
