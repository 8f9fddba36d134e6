"""TLS for the MQTT link: the one SSL context builder, and what a TLS failure means (a setting to fix, or a blip).

Standard library only. Certificates are always verified: there is no switch to turn verification off.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from edgemed.errors import ConfigError
from edgemed.publish.config import TlsConfig


@dataclass(frozen=True)
class TlsSettingNames:
    """How the owner of a link names its TLS settings, for the fix a TLS refusal names.

    Attributes:
        ca_file: the setting of the CA that signs the broker's certificate.
        client_cert: the settings of the client certificate and its key.
    """

    ca_file: str
    client_cert: str


#: A device profile's keys (the dashboard passes its command-line options instead).
DEVICE_TLS_SETTINGS = TlsSettingNames("mqtt.tls.ca_file", "mqtt.tls.cert_file and mqtt.tls.key_file")


def make_ssl_context(tls: TlsConfig | None) -> ssl.SSLContext:
    """A client context that verifies the broker (against ``tls.ca_file`` or the system CAs).

    Args:
        tls: the CA and the optional client certificate and key; None = the system CAs, no client certificate.

    Returns:
        The context, with the client certificate loaded when one is configured.

    Raises:
        ConfigError: a file is missing, unreadable or not a valid PEM (the message names the setting).
    """
    ca = str(tls.ca_file) if tls and tls.ca_file else None
    try:
        ctx = ssl.create_default_context(cafile=ca)
        if tls and tls.cert_file and tls.key_file:
            ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot load the TLS files of mqtt.tls ({exc}); check ca_file, cert_file and key_file "
            "(for the dashboard: --ca-file, --cert-file and --key-file)"
        ) from exc
    return ctx


def handshake_refusal(exc: OSError, url: str, names: TlsSettingNames = DEVICE_TLS_SETTINGS) -> str | None:
    """A one-line configuration error for a failed connection attempt, or None for a transient network failure.

    Args:
        exc: what ``connect()``/``reconnect()`` raised.
        url: the broker URL, for the message.
        names: how the link's owner names its TLS settings, for the fix.

    Returns:
        The refusal with its fix (untrusted certificate, wrong host name, a port that does not speak TLS, a
        required client certificate), or None when the attempt may simply be retried.
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        what = exc.verify_message or str(exc)
        fix = (
            f"set {names.ca_file} to the CA that signed the broker's certificate"
            if "hostname" not in what.lower()
            else "use the host name the broker's certificate names in the URL"
        )
        return f"TLS: the certificate of broker {url} is not trusted ({what}); {fix}"
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return None  # the broker went away mid-handshake: retry
    if isinstance(exc, ssl.SSLError):
        return (
            f"TLS handshake with broker {url} failed ({exc.reason or exc}); check that the port speaks "
            f"TLS and, if the broker requires a client certificate, set {names.client_cert}"
        )
    return None


def rejected_refusal(url: str, alert: str, names: TlsSettingNames = DEVICE_TLS_SETTINGS) -> str:
    """The refusal for a broker that ended TLS after the handshake (TLS 1.3 reports a rejected client
    certificate only then, as an alert on the first read, which paho logs and swallows).

    Args:
        url: the broker URL.
        alert: what the broker said, or what the link saw instead.
        names: how the link's owner names its TLS settings, for the fix.

    Returns:
        The one-line refusal with its fix.
    """
    return (
        f"TLS: broker {url} rejected the connection ({alert}); if it requires a client certificate, set "
        f"{names.client_cert} to one its CA signed"
    )
