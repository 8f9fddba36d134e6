"""The device side of a delivery benchmark, in this process: the device's own ``Outbox``, ``Delivery`` and ``MqttLink``.

Built from the same parts, with the same settings, as ``edgemed run`` builds them from a profile (``delivery`` and
``publish.batch`` keys), so a benchmark measures the code a device runs, without a model or frames in front.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from edgemed import receipts
from edgemed.outbox import Outbox, OutboxConfig
from edgemed.outbox.stream import sequence_stream
from edgemed.publish.batching import Batcher
from edgemed.publish.config import BatchConfig, MqttConfig
from edgemed.publish.consumer import Consumer, effective_outbox_config
from edgemed.publish.delivery import Delivery
from edgemed.publish.mqtt import MqttLink


class DeviceSide:
    """One simulated device: results ``put()`` here are committed, published and released like a real device's.

    Wired as ``edgemed.runtime.Device`` wires a profile with ``delivery.consumer`` and ``publish.batch``: the
    consumer's subscriptions and callbacks on the link, evicted rows announced through it, the replay window off.

    Args:
        data_dir: its data directory (outbox and device secret).
        url: the broker.
        site, device_id: its topic segments.
        consumer: the consumer of record (``delivery.consumer``); None = a PUBACK releases a result.
        batch: results per ``edgemed.batch/1`` message (``publish.batch.max_results``); 0 = batching off.
        receipt_timeout_s: ``delivery.receipt_timeout_s``.
    """

    def __init__(
        self,
        data_dir: Path,
        url: str,
        *,
        site: str,
        device_id: str,
        consumer: str | None,
        batch: int,
        receipt_timeout_s: float = 60.0,
    ) -> None:
        self.site, self.device_id = site, device_id
        self.topic = receipts.device_topic(site, device_id, "results")
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.stream = sequence_stream(data_dir)  # as edgemed run does (edgemed.outbox.stream)
        self.consumer = (
            Consumer(consumer, site=site, device_id=device_id, stream=self.stream, receipt_timeout_s=receipt_timeout_s)
            if consumer is not None
            else None
        )
        self.outbox = Outbox(data_dir / "outbox.sqlite3", effective_outbox_config(OutboxConfig(), self.consumer))
        c = self.consumer
        self.link = MqttLink(
            MqttConfig(url=url),
            status_topic=receipts.device_topic(site, device_id, "status"),
            client_id=f"edgemed-{site}-{device_id}",
            subscriptions=c.subscriptions if c is not None else (),
            on_message=c.on_message if c is not None else None,
            on_state=c.on_state if c is not None else None,
        )
        batcher = (
            Batcher(BatchConfig(enabled=True, max_results=batch), site=site, device_id=device_id) if batch else None
        )
        self.delivery = Delivery(self.outbox, self.link, consumer=self.consumer, batch=batcher)

    def start(self) -> None:
        self.link.start()
        self.delivery.start()

    def wait_ready(self, timeout_s: float) -> bool:
        """Connected (and, with a consumer, the consumer seen online) within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        if not self.link.wait_connected(timeout_s):
            return False
        while self.consumer is not None and not self.consumer.online:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def put(self, result_id: str, payload: bytes, seq: int) -> None:
        self.outbox.put(result_id, self.topic, payload, seq=seq)

    def wait_empty(self, timeout_s: float) -> int:
        """Wait until no result is left on disk (every one receipted, or acknowledged without a consumer).

        Returns:
            How many are still on disk after ``timeout_s`` (0 = done).
        """
        self.outbox.flush()
        deadline = time.monotonic() + timeout_s
        left = self.outbox.pending_count()
        while left and time.monotonic() < deadline:
            time.sleep(0.005)
            self.delivery.check()
            left = self.outbox.pending_count()
        return left

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"published": self.delivery.published_total}
        if self.consumer is not None:
            out["resent"] = self.consumer.resent_total
        return out

    def stop(self) -> None:
        self.delivery.stop()
        self.link.stop(2)
        self.outbox.close()
