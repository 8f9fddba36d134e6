"""What the screen's server accepts: loopback Host headers, same-origin POSTs with the run's token, strict headers.

The page is served on 127.0.0.1 only, but a browser on the device can still be made to send requests to it by any
web page it opens: a page on ``evil.example`` whose name is later re-pointed at 127.0.0.1 (DNS rebinding) reads the
screen as its own origin unless the server refuses a ``Host`` that does not name the loopback. A cross-site form
or ``fetch`` can POST without reading the answer; the token (a random per-run value only the page served here
knows) and the ``Origin`` check stop that.
"""

from __future__ import annotations

import hmac
import secrets

#: Sent with every response, whatever the route and status.
SECURITY_HEADERS: tuple[tuple[str, str], ...] = (
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    # No frame in the browser's disk cache: the page, its events and its images are never stored.
    ("Cache-Control", "no-store"),
    ("X-Frame-Options", "DENY"),
)

TOKEN_HEADER = "X-Edgemed-Screen"
_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


def host_allowed(host: str | None, port: int) -> bool:
    """Whether a request's ``Host`` header names this server on the loopback.

    Args:
        host: the header's value (None when the request has none).
        port: the port the server listens on.

    Returns:
        True only for ``127.0.0.1:PORT``, ``localhost:PORT`` or ``[::1]:PORT`` (case-insensitive); a missing
        header, another name, a missing or other port is refused.
    """
    if host is None:
        return False
    value = host.strip().lower()
    return any(value == f"{name}:{port}" for name in _LOOPBACK_NAMES)


def origin_allowed(origin: str | None, port: int) -> bool:
    """Whether a POST's ``Origin`` is absent or this screen's own loopback origin (``http://HOST:PORT``)."""
    if origin is None:
        return True
    value = origin.strip().lower()
    scheme, sep, rest = value.partition("://")
    return sep == "://" and scheme == "http" and host_allowed(rest, port)


def new_token() -> str:
    """A random token for one run; the page reads it from its ``<meta name="edgemed-screen-token">``."""
    return secrets.token_urlsafe(24)


def token_matches(sent: str | None, token: str) -> bool:
    """Whether the request's token header carries the run's token (compared in constant time)."""
    return sent is not None and hmac.compare_digest(sent.encode(), token.encode())
