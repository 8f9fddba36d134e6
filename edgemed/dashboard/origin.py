"""The origin a browser names in ``Origin`` for a page, from the address a person types (``--public-origin``).

Behind a TLS reverse proxy the page is served from the proxy's address, so the browser's ``Origin`` is
``https://dashboard.example.org``, not the ``http://127.0.0.1:8080`` the dashboard listens on. An origin is
compared as the browser writes it: scheme and host in lower case, the port only when it is not the scheme's
default, no path and no trailing ``/``.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from edgemed.errors import ConfigError

__all__ = ["parse_origin"]


def parse_origin(url: str) -> str:
    """The origin (``scheme://host[:port]``) a browser sends for pages served at ``url``, as it sends it.

    Args:
        url: ``https://host[:port]`` or ``http://host[:port]``, as typed after ``--public-origin``.

    Returns:
        The origin: scheme and host in lower case, the port only when it is not the scheme's default, no ``/``.

    Raises:
        ConfigError: another scheme, no host, a path, query or user name in it, or a bad port.
    """
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"--public-origin {url!r} is malformed ({exc}); write it as https://host[:port]") from exc
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--public-origin {url!r} must be https://host[:port] (or http://), the proxy's address")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
        raise ConfigError(f"--public-origin {url!r} must be only https://host[:port], without a path or user name")
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"  # an IPv6 address, as a browser writes it in an origin
    default = {"http": 80, "https": 443}[scheme]
    return f"{scheme}://{host}" + (f":{port}" if port is not None and port != default else "")
