"""``/metrics``: the dashboard in Prometheus text format, for the operations team's scraper.

What is exported (names fixed by the issue 12 contract):

* per ingest worker (``worker`` = its MQTT client id), from its reports in the store (``store.workers()``, every
  few seconds), so one scrape of the web process covers every worker of the fleet:
  ``edgemed_ingest_messages_total{worker,kind}``, ``edgemed_results_stored_total{worker}``,
  ``edgemed_store_commit_seconds{worker}`` (histogram), ``edgemed_ingest_worker_connected{worker}`` and
  ``edgemed_ingest_worker_last_report_timestamp_seconds{worker}`` (a worker that stopped reporting is stale);
* for the fleet, from the store: ``edgemed_dead_letters_total{reason}`` (kept for ever, so a true counter),
  ``edgemed_device_last_seen_timestamp_seconds{site,device}``, ``edgemed_device_pending_results{site,device}``
  and ``edgemed_device_awaiting_receipt_results{site,device}`` (from the device's newest report),
  ``edgemed_urgent_unacknowledged`` and ``edgemed_dashboard_escalated{site}`` (urgent results escalated for
  waiting too long and still unacknowledged, ``escalation.py``).

Access: no login, but only clients whose address is in ``--metrics-allow`` (CIDRs; default the loopback,
``127.0.0.0/8`` and ``::1``). Any other client gets a bare ``403`` with no detail. A request relayed by a reverse
proxy (it carries ``Forwarded``, ``X-Forwarded-For`` or ``X-Real-IP``) is refused too: its peer address is the
proxy's, which is typically the loopback, so the allow-list could not tell who asked.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from edgemed.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = [
    "COMMIT_BUCKETS_S",
    "DEFAULT_ALLOW",
    "CommitTimes",
    "MetricsCollector",
    "MetricsServer",
    "address_allowed",
    "parse_allow",
    "proxied",
    "render",
    "store_collector",
]

#: Upper bounds of the commit-latency histogram's buckets, seconds (the last one, +Inf, is implied).
COMMIT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DEFAULT_ALLOW = ("127.0.0.0/8", "::1/128")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Headers a reverse proxy adds: such a request's peer address is the proxy's, not the scraper's.
PROXY_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Real-IP")
#: The per-kind message counters a worker reports (``messages_<kind>`` in its stats).
KINDS = ("results", "studies", "batches", "lost", "status", "health", "other")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class CommitTimes:
    """How long the store's commits took: a cumulative histogram, safe to update from one thread and read from
    others."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = [0] * len(COMMIT_BUCKETS_S)
        self._count = 0
        self._sum = 0.0

    def observe(self, seconds: float) -> None:
        """Count one commit that took ``seconds``."""
        with self._lock:
            self._count += 1
            self._sum += seconds
            for i, bound in enumerate(COMMIT_BUCKETS_S):
                if seconds <= bound:
                    self._counts[i] += 1

    def as_stats(self) -> dict[str, float | int]:
        """The histogram as flat numbers for ``store.report_worker``: ``commit_count``, ``commit_sum`` and
        ``commit_le_<bound>`` (cumulative)."""
        with self._lock:
            out: dict[str, float | int] = {"commit_count": self._count, "commit_sum": self._sum}
            for bound, n in zip(COMMIT_BUCKETS_S, self._counts, strict=True):
                out[f"commit_le_{bound:g}"] = n
        return out


def parse_allow(cidrs: Iterable[str]) -> tuple[Network, ...]:
    """Parse ``--metrics-allow`` values (``10.0.0.0/8``, ``192.0.2.7``, ``fd00::/8``, ``::1``).

    Args:
        cidrs: networks or single addresses.

    Returns:
        The networks.

    Raises:
        ConfigError: a value that is not an IPv4 or IPv6 network (host bits set count as a typo).
    """
    out = []
    for text in cidrs:
        try:
            out.append(ipaddress.ip_network(text.strip(), strict=True))
        except ValueError as exc:
            raise ConfigError(
                f"--metrics-allow {text!r} is not a network ({exc}); give a CIDR such as 10.0.0.0/8 or fd00::/8"
            ) from exc
    return tuple(out)


def address_allowed(address: str, allowed: Sequence[Network]) -> bool:
    """Whether a client address is in one of the allowed networks.

    An IPv4 client of a dual-stack (``::``) socket shows as ``::ffff:a.b.c.d``: it is checked as the IPv4 address.

    Args:
        address: the peer's address as the socket reports it (an IPv6 scope ``%eth0`` is ignored).
        allowed: from ``parse_allow``.

    Returns:
        True when allowed; False for anything unparsable.
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == net.version and ip in net for net in allowed)


def proxied(headers: Any) -> bool:
    """Whether a request came through a reverse proxy (see the module docstring); ``headers`` has ``get``."""
    return any(headers.get(name) is not None for name in PROXY_HEADERS)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _stat(stats: dict[str, Any], key: str) -> float:
    return _number(stats.get(key)) or 0.0


class MetricsCollector(Collector):
    """Builds every metric at scrape time from the store (and, in a process with its own ingest, its live
    counters)."""

    def __init__(
        self,
        workers: Callable[[], list[dict[str, Any]]],
        fleet: Callable[[], Iterator[dict[str, Any]]] | None = None,
        dead_letters: Callable[[], dict[str, int]] | None = None,
        urgent_unacknowledged: Callable[[], int] | None = None,
        escalated: Callable[[], dict[str, int]] | None = None,
    ) -> None:
        """Args:
        workers: every worker as ``{"worker_id", "last_at", "stats"}`` (``store.workers()``, live rows first).
        fleet: the listed devices (``site, device_id, last_seen, pending, awaiting_receipt``); None: no fleet
            gauges (an ingest worker's own ``/metrics``).
        dead_letters: counts by reason; None: not exported.
        urgent_unacknowledged: how many urgent results nobody acknowledged; None: not exported.
        escalated: escalated results still unacknowledged, per site; None: not exported.
        """
        self._workers = workers
        self._fleet = fleet
        self._dead_letters = dead_letters
        self._urgent = urgent_unacknowledged
        self._escalated = escalated

    def collect(self) -> Iterator[Metric]:
        """Every metric family (prometheus-client calls this at each scrape)."""
        yield from self._worker_metrics()
        if self._dead_letters is not None:
            dead = CounterMetricFamily(
                "edgemed_dead_letters", "Payloads refused into the dead-letter table, by reason", labels=["reason"]
            )
            for reason, n in sorted(self._dead_letters().items()):
                dead.add_metric([reason], n)
            yield dead
        if self._urgent is not None:
            yield GaugeMetricFamily(
                "edgemed_urgent_unacknowledged", "Urgent results nobody has acknowledged yet", value=self._urgent()
            )
        if self._escalated is not None:
            escalated = GaugeMetricFamily(
                "edgemed_dashboard_escalated",
                "Urgent results escalated for waiting too long and still unacknowledged, per site",
                labels=["site"],
            )
            for site, n in sorted(self._escalated().items()):
                escalated.add_metric([site], n)
            yield escalated
        if self._fleet is not None:
            yield from self._device_metrics(self._fleet())

    def _worker_metrics(self) -> Iterator[Metric]:
        messages = CounterMetricFamily(
            "edgemed_ingest_messages", "Messages an ingest worker received, by kind", labels=["worker", "kind"]
        )
        stored = CounterMetricFamily(
            "edgemed_results_stored", "Results a worker stored (duplicates not counted)", labels=["worker"]
        )
        commits = HistogramMetricFamily(
            "edgemed_store_commit_seconds", "Time one store commit (a batch of messages) took", labels=["worker"]
        )
        connected = GaugeMetricFamily(
            "edgemed_ingest_worker_connected", "1 while the worker is connected to the broker", labels=["worker"]
        )
        reported = GaugeMetricFamily(
            "edgemed_ingest_worker_last_report_timestamp_seconds",
            "When the worker last reported its counters (seconds since the epoch)",
            labels=["worker"],
        )
        for row in self._workers():
            worker, stats = str(row["worker_id"]), row.get("stats") or {}
            for kind in KINDS:
                messages.add_metric([worker, kind], _stat(stats, f"messages_{kind}"))
            stored.add_metric([worker], _stat(stats, "stored"))
            buckets = [(f"{b:g}", _stat(stats, f"commit_le_{b:g}")) for b in COMMIT_BUCKETS_S]
            buckets.append(("+Inf", _stat(stats, "commit_count")))
            commits.add_metric([worker], buckets, _stat(stats, "commit_sum"))
            connected.add_metric([worker], _stat(stats, "connected"))
            reported.add_metric([worker], _number(row.get("last_at")) or 0.0)
        yield from (messages, stored, commits, connected, reported)

    @staticmethod
    def _device_metrics(devices: Iterable[dict[str, Any]]) -> Iterator[Metric]:
        labels = ["site", "device"]
        seen = GaugeMetricFamily(
            "edgemed_device_last_seen_timestamp_seconds",
            "When the dashboard last heard from the device (dashboard clock, seconds since the epoch)",
            labels=labels,
        )
        pending = GaugeMetricFamily(
            "edgemed_device_pending_results",
            "Results waiting to be sent on the device (its newest report)",
            labels=labels,
        )
        awaiting = GaugeMetricFamily(
            "edgemed_device_awaiting_receipt_results",
            "Results the broker has and the device keeps until a receipt covers them (its newest heartbeat)",
            labels=labels,
        )
        for device in devices:
            key = [str(device["site"]), str(device["device_id"])]
            last_seen = _number(device.get("last_seen"))
            if last_seen is not None:
                seen.add_metric(key, last_seen)
            # A figure the device did not send is left out rather than shown as 0.
            for family, field in ((pending, "pending"), (awaiting, "awaiting_receipt")):
                value = _number(device.get(field))
                if value is not None:
                    family.add_metric(key, value)
        yield from (seen, pending, awaiting)


def render(collector: Collector) -> bytes:
    """The collector's metrics in Prometheus text format (a registry of its own: no process-wide state)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry)


def store_collector(
    store: Any,
    *,
    device_expiry_s: float | None,
    live_workers: Callable[[], list[dict[str, Any]]] | None = None,
) -> MetricsCollector:
    """The web process's collector: every worker's reports and the fleet gauges, read from the store at each scrape.

    Args:
        store: the ``DashboardStore``.
        device_expiry_s: devices silent for longer are left out (as on the page); None lists every device.
        live_workers: this process's own workers with their counters of this moment; they replace their
            (up to a few seconds older) rows from the store.

    Returns:
        The collector.
    """

    def workers() -> list[dict[str, Any]]:
        live = live_workers() if live_workers is not None else []
        names = {row["worker_id"] for row in live}
        return live + [row for row in store.workers() if row["worker_id"] not in names]

    def fleet() -> Iterator[dict[str, Any]]:
        offset, page = 0, 1000
        while True:
            rows: list[dict[str, Any]] = store.fleet(offset=offset, limit=page, expire_after_s=device_expiry_s)
            yield from rows
            if len(rows) < page:
                return
            offset += page

    from edgemed.dashboard.escalation import escalated_waiting  # the web side only (it brings httpx)

    return MetricsCollector(
        workers,
        fleet,
        dead_letters=store.dead_letter_counts,
        urgent_unacknowledged=store.unacknowledged_urgent_count,
        escalated=lambda: escalated_waiting(store),
    )


class _MetricsHandler(BaseHTTPRequestHandler):
    server: MetricsServer
    server_version = "edgemed-metrics"
    sys_version = ""

    def setup(self) -> None:
        self.request.settimeout(10.0)  # a connection that says nothing is closed
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        allowed = address_allowed(str(self.client_address[0]), self.server.allow) and not proxied(self.headers)
        if not allowed:
            body, status, kind = b"", HTTPStatus.FORBIDDEN, "text/plain; charset=utf-8"
        elif urlsplit(self.path).path != "/metrics":
            body, status, kind = b"", HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8"
        else:
            body, status, kind = render(self.server.collector), HTTPStatus.OK, CONTENT_TYPE
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.do_GET()


class MetricsServer(ThreadingHTTPServer):
    """An HTTP server with ``/metrics`` only: what an ingest worker serves on ``--metrics-port``."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], collector: Collector, allow: tuple[Network, ...]) -> None:
        """Bind the socket.

        Args:
            address: (host, port); port 0 picks a free one.
            collector: what ``/metrics`` exports.
            allow: networks whose clients may read it.

        Raises:
            ConfigError: the address cannot be bound.
        """
        self.collector = collector
        self.allow = allow
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        try:
            super().__init__(address, _MetricsHandler)
        except OSError as exc:
            raise ConfigError(
                f"cannot serve metrics on {address[0]}:{address[1]} ({exc}); choose another --metrics-port"
            ) from exc

    @property
    def url(self) -> str:
        """``http://host:port/metrics`` of the bound socket."""
        host, port = str(self.server_address[0]), int(self.server_address[1])
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"
