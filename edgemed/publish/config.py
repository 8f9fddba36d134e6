"""Broker settings: URL, TLS, credentials and reconnect policy (validated here, used by ``publish.mqtt``).

No network and no paho here: the models only check what can be checked from the text of a profile. Secrets
never live in a profile: a password comes from an environment variable or a file, read by ``read_password()``
when the link is built.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from edgemed.errors import ConfigError
from edgemed.identity import ID_PATTERN
from edgemed.publish.password_file import read_password_file
from edgemed.receipts import BATCH_MAX_BYTES, BATCH_MAX_RESULTS
from edgemed.validation import StrictModel

log = logging.getLogger(__name__)

_DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


@dataclass(frozen=True)
class BrokerUrl:
    """A parsed ``mqtt://host:port`` or ``mqtts://host:port``."""

    scheme: Literal["mqtt", "mqtts"]
    host: str
    port: int

    @property
    def tls(self) -> bool:
        """True for ``mqtts://``."""
        return self.scheme == "mqtts"

    @property
    def loopback(self) -> bool:
        """True when the host is this machine (``localhost`` or a loopback address); no DNS lookup is made."""
        return is_loopback(self.host)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine, judged from its text alone (no DNS lookup).

    Only a loopback IP literal or exactly ``localhost`` counts: the plaintext and TLS-drop rules trust it, so it
    must not be a name that can point anywhere. glibc answers ``localhost`` from ``/etc/hosts``, but the
    fully qualified ``localhost.`` (and ``localhost.example.org``, ``127.0.0.1.nip.io``) goes to DNS.

    Args:
        host: a host name or an IPv4/IPv6 address.

    Returns:
        True for ``localhost`` (any case) and loopback addresses (127.0.0.0/8, ::1).
    """
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_broker_url(url: str) -> BrokerUrl:
    """Parse a broker URL.

    Args:
        url: ``mqtt://host[:port]`` (plaintext, default port 1883) or ``mqtts://host[:port]`` (TLS, 8883).

    Returns:
        The scheme, host and port.

    Raises:
        ConfigError: the URL has another scheme, no host, a bad port, a path, or credentials in it.
    """
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise ConfigError(
            f"broker URL {url!r} is malformed ({exc}); write it as mqtt://host:1883 or mqtts://host:8883"
        ) from exc
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ConfigError(f"broker URL {url!r} must start with mqtt:// (plaintext) or mqtts:// (TLS)")
    if not parts.hostname:
        raise ConfigError(f"broker URL {url!r} has no host; write it as {scheme}://host:port")
    if parts.username or parts.password:
        raise ConfigError(
            f"broker URL {url!r} contains credentials; remove them and set mqtt.username with "
            "mqtt.password_env or mqtt.password_file instead"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"broker URL {url!r} must not have a path or query; write it as {scheme}://host:port")
    if port == 0:
        raise ConfigError(f"broker URL {url!r} has port 0; give the broker's real port")
    return BrokerUrl(scheme, parts.hostname, port or _DEFAULT_PORTS[scheme])  # type: ignore[arg-type]


class TlsConfig(StrictModel):
    """TLS settings. Certificates are always verified: there is no switch to turn verification off."""

    ca_file: Path | None = Field(
        None, description="PEM file of the CA that signed the broker's certificate; None = the system CAs"
    )
    cert_file: Path | None = Field(None, description="PEM client certificate, when the broker requires one")
    key_file: Path | None = Field(None, description="PEM private key of cert_file")

    @model_validator(mode="after")
    def _cert_and_key_together(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError(
                "tls.cert_file and tls.key_file go together: set both for a client certificate, or neither"
            )
        return self


class MqttConfig(StrictModel):
    """How the device reaches its broker."""

    url: str = Field(..., description="mqtt://host:port (plaintext) or mqtts://host:port (TLS)")
    client_id: str | None = Field(
        None, max_length=128, description="MQTT client id; None = stable id derived from the device id"
    )
    username: str | None = Field(None, description="broker user name, if the broker requires one")
    password_env: str | None = Field(None, description="name of the environment variable holding the password")
    password_file: Path | None = Field(None, description="file whose first line is the password")
    tls: TlsConfig | None = Field(None, description="TLS settings; needed with mqtts:// only for a private CA")
    allow_plaintext_remote: bool = Field(
        False,
        description="allow mqtt:// (no TLS) to a host other than this machine; results and passwords then "
        "cross the network in clear text",
    )
    protocol: Literal["auto", "5", "3.1.1"] = Field(
        "auto", description="MQTT version; auto = 5, falling back to 3.1.1 if the broker refuses 5"
    )
    keepalive_s: int = Field(30, ge=5, le=65535, description="MQTT keepalive interval")
    reconnect_min_s: float = Field(0.5, gt=0, description="first reconnect delay; doubles after each failure")
    reconnect_max_s: float = Field(30.0, gt=0, description="cap on the reconnect delay")
    connect_timeout_s: float = Field(5.0, gt=0, description="TCP and TLS handshake timeout per attempt")
    session_expiry_s: int = Field(
        86_400,
        ge=0,
        description="how long the broker keeps this client's session while it is offline (MQTT 5)",
    )

    @field_validator("url")
    @classmethod
    def _url_parses(cls, value: str) -> str:
        try:
            parse_broker_url(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from exc
        return value

    @model_validator(mode="after")
    def _consistent(self) -> MqttConfig:
        url = parse_broker_url(self.url)
        if self.password_env and self.password_file:
            raise ValueError("set only one of mqtt.password_env and mqtt.password_file")
        has_password = bool(self.password_env or self.password_file)
        if self.username and not has_password:
            raise ValueError(
                "mqtt.username is set but no password source: set mqtt.password_env (an environment "
                "variable name) or mqtt.password_file"
            )
        if has_password and not self.username:
            raise ValueError("a password source is set but mqtt.username is not; set the user name too")
        if self.tls is not None and not url.tls:
            raise ValueError(f"mqtt.tls is set but the URL {self.url!r} is plaintext; use mqtts://")
        if self.reconnect_min_s > self.reconnect_max_s:
            raise ValueError("mqtt.reconnect_min_s must not exceed mqtt.reconnect_max_s")
        return self

    @property
    def broker(self) -> BrokerUrl:
        """The parsed URL."""
        return parse_broker_url(self.url)


def read_password(cfg: MqttConfig) -> str | None:
    """Read the broker password from the configured environment variable or file.

    Args:
        cfg: the broker settings.

    Returns:
        The password, or None when no password source is configured.

    Raises:
        ConfigError: the variable is unset or empty; or the file is unreadable, empty, not a regular file, belongs
            to another user or can be changed by other users (see ``publish.password_file``).
    """
    if cfg.password_env:
        value = os.environ.get(cfg.password_env)
        if not value:
            raise ConfigError(
                f"the broker password variable {cfg.password_env} is not set; export it or set mqtt.password_file"
            )
        return value
    if cfg.password_file:
        return read_password_file(cfg.password_file)
    return None


class DeliveryConfig(StrictModel):
    """Who releases a result: the broker's PUBACK (no consumer), or the receipt of a consumer of record."""

    consumer: str | None = Field(
        None,
        description="the consumer of record (the dashboard's --consumer-id, e.g. dashboard): a result stays on "
        "the device until that consumer's receipt says it is stored; None = the broker's PUBACK releases it",
    )
    receipt_timeout_s: float = Field(
        60.0,
        gt=0,
        description="the longest wait before results acknowledged by the broker and not receipted are sent again "
        "(same result_id and seq) while receipts settle nothing new: the first wait is 2 s, doubling up to this",
    )

    @field_validator("consumer")
    @classmethod
    def _topic_safe(cls, value: str | None) -> str | None:
        if value is not None and not ID_PATTERN.match(value):
            raise ValueError(f"{value!r} must be 1-64 letters, digits, '_' or '-' (it becomes part of MQTT topics)")
        return value


class BatchConfig(StrictModel):
    """Several results in one MQTT message (``edgemed.batch/1`` on ``.../batches``), for high frame rates."""

    enabled: bool = Field(
        False, description="send results as batches on .../batches; off = one result per message on .../results"
    )
    max_results: int = Field(100, ge=1, le=BATCH_MAX_RESULTS, description="most results in one batch")
    max_bytes: int = Field(
        262_144,
        ge=4096,
        lt=BATCH_MAX_BYTES,
        description="most bytes in one batch message (a single larger result goes on .../results alone)",
    )


class PublishConfig(StrictModel):
    """How results are shaped on the wire."""

    batch: BatchConfig = BatchConfig()
