"""What the MQTT link decides, as plain functions and one small state machine: no paho, no threads, no sockets.

* ``require_safe_transport``: plaintext to another machine is refused before any socket exists.
* ``connack_refusal``: which CONNACK reasons mean "your settings are wrong" (a refusal, exit 5) rather than "try
  again later"; ``describe_device_refusal`` words one for a device profile (the dashboard words its own).
* ``RefusalState``: a refusal is shown once: raised by ``check()`` to a caller that asks, or logged when nobody
  asks in time.
* ``ReconnectPolicy``: after each connection attempt, how long to wait, whether the attempt amounts to a refusal
  (a TLS alert, two TLS EOFs in a row), and whether to fall back from MQTT 5 to 3.1.1 (the broker refused
  version 5, closed two MQTT 5 connections without a CONNACK, or left as many MQTT 5 CONNECTs unanswered until
  the CONNACK deadline as its owner allows: two for the device, one for the dashboard).

``publish.mqtt`` runs these decisions; the tests drive them directly (``tests/test_mqtt_policy.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from edgemed.errors import BrokerRefusedError
from edgemed.publish.config import MqttConfig
from edgemed.publish.tls import DEVICE_TLS_SETTINGS, TlsSettingNames, handshake_refusal, rejected_refusal

RefusalKind = Literal["credentials", "client_id", "banned", "auth_method"]

# CONNACK reasons that mean "your settings are wrong", as opposed to "try again later" (server busy,
# unavailable, quota exceeded: retried with back-off).
_REFUSAL_KINDS: dict[str, RefusalKind] = {
    "Not authorized": "credentials",
    "Bad user name or password": "credentials",
    "Client identifier not valid": "client_id",
    "Banned": "banned",
    "Bad authentication method": "auth_method",
}
_DEVICE_HINTS: dict[RefusalKind, str] = {
    "credentials": "check mqtt.username and the password it reads ({source})",
    "client_id": "set mqtt.client_id to an id the broker accepts",
    "banned": "the broker banned this client; ask its operator",
    "auth_method": "the broker wants another authentication method",
}
# A v5 CONNECT to a 3.1.1-only broker is answered with return code 1 (unacceptable protocol version), which
# paho reports as 1 or as 132 "Unsupported protocol version".
PROTOCOL_REFUSED_CODES = frozenset({1, 132})


def require_safe_transport(cfg: MqttConfig) -> None:
    """Refuse plaintext MQTT to anything but this machine unless the settings allow it explicitly.

    Judged from the URL's text alone (no DNS lookup), before any socket exists.

    Args:
        cfg: the broker settings.

    Raises:
        BrokerRefusedError: ``mqtt://`` to a non-loopback host without ``allow_plaintext_remote``.
    """
    broker = cfg.broker
    if not broker.tls and not broker.loopback and not cfg.allow_plaintext_remote:
        raise BrokerRefusedError(
            f"refusing plaintext MQTT to {broker.host}:{broker.port}: results and the password would cross the "
            "network unencrypted; use mqtts:// (with mqtt.tls.ca_file for a private CA) or set "
            "mqtt.allow_plaintext_remote: true (for the dashboard: --allow-plaintext-remote)"
        )


@dataclass(frozen=True)
class ConnackRefusal:
    """A CONNACK that refused us for a reason a person must fix, with what a message about it needs.

    Attributes:
        kind: what is wrong: the credentials, the client id, a ban, the authentication method.
        reason: the broker's reason, as paho names it (``Not authorized``).
        url: the broker URL.
        client_id: the client id that was refused.
        username: the user name sent, or None.
        password_source: where the password came from (``env VAR`` or the file's path), or None.
    """

    kind: RefusalKind
    reason: str
    url: str
    client_id: str
    username: str | None
    password_source: str | None


#: Turns a refusal into the one-line message the link raises and logs; each owner names its own settings.
RefusalWording = Callable[[ConnackRefusal], str]


def connack_refusal(reason: str, cfg: MqttConfig, client_id: str) -> ConnackRefusal | None:
    """Classify a failed CONNACK.

    Args:
        reason: paho's name of the reason code.
        cfg: the settings that were used.
        client_id: the client id that was sent.

    Returns:
        The refusal, or None when the failure is worth retrying as it is.
    """
    kind = _REFUSAL_KINDS.get(reason)
    if kind is None:
        return None
    source = f"env {cfg.password_env}" if cfg.password_env else str(cfg.password_file) if cfg.password_file else None
    return ConnackRefusal(kind, reason, cfg.url, client_id, cfg.username, source)


def describe_device_refusal(refusal: ConnackRefusal) -> str:
    """``broker URL refused the connection of client 'id' as user 'u': <reason>; <fix in profile terms>``."""
    hint = _DEVICE_HINTS[refusal.kind]
    if refusal.username:
        who = f"as user {refusal.username!r}: {refusal.reason}; {hint.format(source=refusal.password_source)}"
    elif refusal.kind == "credentials":  # a credentials refusal, and we sent none
        who = (
            f"without a user name: {refusal.reason}; the broker wants one: set mqtt.username with "
            "mqtt.password_env or mqtt.password_file (or --username with --password-env or --password-file)"
        )
    else:
        who = f"without a user name: {refusal.reason}; {hint}"
    return f"broker {refusal.url} refused the connection of client {refusal.client_id!r} {who}"


def publish_refusal(url: str, client_id: str, topic: str, reason: str) -> str:
    """The refusal for a message the broker did not take (an MQTT 5 PUBACK reason code >= 0x80)."""
    on = f" on {topic}" if topic else ""
    return (
        f"broker {url} refused a message from client {client_id!r}{on}: {reason}; allow this client to publish "
        "on its edgemed/ topics in the broker's ACL"
    )


def subscribe_refusal(url: str, client_id: str, refused: dict[str, str]) -> str:
    """The refusal for topic filters the broker would not subscribe us to (SUBACK failure codes).

    Args:
        url: the broker URL.
        client_id: our client id.
        refused: topic filter -> the broker's reason.
    """
    what = ", ".join(f"{topic} ({reason})" for topic, reason in refused.items())
    return f"broker {url} refused the subscription of client {client_id!r} to {what}; check its ACL"


class ReportedRefusal(BrokerRefusedError):
    """A refusal that the link has already logged (``reported``): the caller need not print it again."""

    reported = True


class RefusalState:
    """The link's current refusal and whether it was shown.

    A refusal is shown once: raised by ``check()`` to the caller (the command line prints it as its exit reason),
    or, when no caller asks within ``grace_s`` (a watch folder with nothing new, the dashboard, which never asks),
    logged by the link; a later ``check()`` then raises it marked as reported, so that it is not printed twice.
    """

    def __init__(self, grace_s: float = 1.0) -> None:
        """Start with no refusal.

        Args:
            grace_s: how long a refusal waits for ``check()`` before the link logs it itself.
        """
        self.message: str | None = None
        self._grace_s = grace_s
        self._since = 0.0
        self._retry_s: float | None = None
        self._raised = self._logged = False

    def set(self, message: str, now: float, *, retry_s: float | None = None) -> bool:
        """Record a refusal (a repeat of the current one changes nothing).

        Args:
            message: the one-line refusal with its fix.
            now: ``time.monotonic()``.
            retry_s: the link retries the connection every this many seconds (said in the log line); None for a
                refusal that no retry answers (a refused message).

        Returns:
            True when it is a new refusal.
        """
        if message == self.message:
            return False
        self.message, self._since, self._retry_s = message, now, retry_s
        self._raised = self._logged = False
        return True

    def clear(self) -> None:
        """The broker accepted us: forget the refusal."""
        self.message = None

    def check(self) -> None:
        """Raise the current refusal, if any.

        Raises:
            BrokerRefusedError: the refusal (a ``ReportedRefusal`` when it was logged already).
        """
        message = self.message
        if message is not None:
            self._raised = True
            raise ReportedRefusal(message) if self._logged else BrokerRefusedError(message)

    def due_in(self, now: float) -> float:
        """Seconds until the refusal is to be logged (0 when it is due, or when there is nothing to log)."""
        if self.message is None or self._raised or self._logged:
            return 0.0
        return max(0.0, self._since + self._grace_s - now)

    def take_log_line(self, now: float) -> str | None:
        """The line to log now, once per refusal; None when nothing is due."""
        if self.message is None or self._raised or self._logged or self.due_in(now) > 0:
            return None
        self._logged = True
        if self._retry_s is None:
            return self.message
        return f"{self.message}; retrying every {self._retry_s:g} s or less"


@dataclass
class Attempt:
    """What one connection attempt came to; the link's network callbacks fill it in while it runs.

    Attributes:
        error: what ``connect()``/``reconnect()`` raised; the attempt ended there.
        connack: the broker answered the CONNECT (accepting it or not).
        online: the broker accepted the connection.
        protocol_refused: the broker refused MQTT 5 itself (its reason's name).
        tls_alert: a TLS alert the broker sent before its CONNACK.
        tls_eof: TLS ended with an EOF before any CONNACK.
        unanswered: the connection stayed up without a CONNACK until the deadline (``connect_timeout_s``): how a
            3.1.1-only broker that ignores an MQTT 5 CONNECT looks (amqtt does).
    """

    error: OSError | None = None
    connack: bool = False
    online: bool = False
    protocol_refused: str | None = None
    tls_alert: str | None = None
    tls_eof: bool = False
    unanswered: bool = False


@dataclass(frozen=True)
class Step:
    """What the link does after an attempt.

    Attributes:
        delay_s: wait this long before the next attempt.
        refusal: the attempt amounts to this refusal (set it; ``check()`` raises it).
        fall_back: fall back to MQTT 3.1.1, for this reason (log it).
        report: log ``unreachable`` (first failed attempt of a run) or ``lost`` (a connection that was up ended).
    """

    delay_s: float
    refusal: str | None = None
    fall_back: str | None = None
    report: Literal["unreachable", "lost"] | None = None


class ReconnectPolicy:
    """Back-off, refusal and protocol fall back decisions over a sequence of attempts (one per link run)."""

    def __init__(
        self,
        cfg: MqttConfig,
        *,
        unanswered_to_fall_back: int = 2,
        tls_names: TlsSettingNames = DEVICE_TLS_SETTINGS,
    ) -> None:
        """Start with the shortest delay.

        Args:
            cfg: ``reconnect_min_s``/``reconnect_max_s``, the URL, ``connect_timeout_s``, and whether a client
                certificate is set.
            unanswered_to_fall_back: MQTT 5 CONNECTs in a row left unanswered until the CONNACK deadline after
                which to fall back to 3.1.1 (closes without a CONNACK always take two).
            tls_names: how the owner names its TLS settings in a TLS refusal's fix.

        Raises:
            ValueError: ``unanswered_to_fall_back`` is below 1.
        """
        if unanswered_to_fall_back < 1:
            raise ValueError(f"unanswered_to_fall_back must be 1 or more, not {unanswered_to_fall_back}")
        self._unanswered_to_fall_back = unanswered_to_fall_back
        self._tls_names = tls_names
        self._connect_timeout_s = cfg.connect_timeout_s
        self._min_s, self._max_s = cfg.reconnect_min_s, cfg.reconnect_max_s
        self._url = cfg.url
        self._client_cert = cfg.tls is not None and cfg.tls.cert_file is not None
        self._delay_s = self._min_s
        self._silent = 0  # MQTT 5 CONNECTs in a row that got no CONNACK at all
        self._unanswered = 0  # ... of which the connection stayed up until the CONNACK deadline
        self._eofs = 0  # attempts in a row that ended in a TLS EOF before the CONNACK
        self._outage_reported = False

    def after(self, attempt: Attempt, *, refused: bool, may_fall_back: bool) -> Step:
        """Decide what follows ``attempt``.

        Args:
            attempt: how it went.
            refused: the link already holds a refusal (a refusal does not fix itself: retry slowly).
            may_fall_back: the link speaks MQTT 5 and its settings say ``protocol: auto``.

        Returns:
            The delay, and the refusal, fall back or report the attempt calls for.
        """
        refusal = fall_back = None
        report: Literal["unreachable", "lost"] | None = None
        eof_streak = False
        if attempt.error is not None:
            refusal = handshake_refusal(attempt.error, self._url, self._tls_names)
            if refusal is None and not self._outage_reported:
                report, self._outage_reported = "unreachable", True
        elif attempt.online:
            self._delay_s, self._silent, self._unanswered, self._eofs = self._min_s, 0, 0, 0
            report, self._outage_reported = "lost", True
        elif attempt.protocol_refused is not None and may_fall_back:
            fall_back = f"the broker refused MQTT 5 ({attempt.protocol_refused})"
        elif attempt.tls_alert is not None:
            refusal = rejected_refusal(self._url, attempt.tls_alert, self._tls_names)
        elif attempt.tls_eof and not self._client_cert:
            # How a broker that wants a client certificate often looks when its alert raced our CONNECT (the
            # reset discards the alert); once can be a network blip, twice in a row right after the handshake
            # is not.
            self._eofs += 1
            eof_streak = True
            if self._eofs >= 2:
                refusal = rejected_refusal(self._url, "it closed TLS twice before answering CONNECT", self._tls_names)
        elif not attempt.connack:
            fall_back = self._silence(attempt.unanswered, allowed=may_fall_back and not refused)
        if not eof_streak:
            self._eofs = 0
        delay = self._max_s if refused or refusal else self._delay_s
        self._delay_s = min(delay * 2, self._max_s)
        return Step(delay, refusal, fall_back, report)

    def _silence(self, unanswered: bool, *, allowed: bool) -> str | None:
        """Count a CONNECT that got no CONNACK; the fall back's reason once there were enough in a row (and it is
        ``allowed``: the link speaks MQTT 5 with ``protocol: auto`` and holds no refusal), else None."""
        self._silent += 1
        self._unanswered = self._unanswered + 1 if unanswered else 0
        if not allowed:
            return None
        if self._silent >= 2:
            why = "the broker closed two MQTT 5 connections without a CONNACK"
        elif self._unanswered >= self._unanswered_to_fall_back:
            why = f"the broker did not answer an MQTT 5 CONNECT within {self._connect_timeout_s:g} s"
        else:
            return None
        self._silent = self._unanswered = 0
        return why
