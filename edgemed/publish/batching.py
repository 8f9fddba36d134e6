"""Batched messages: committed results grouped into ``edgemed.batch/1`` messages on ``.../batches``.

Only frame results are batched (rows on ``.../results``); study decisions and lost announcements keep their own
topics, one per message, and a result that would not fit a batch on its own goes alone on ``.../results``. Each
element is the result's committed envelope byte for byte (``receipts.batch_payload``), so a result sent again
in another batch is the same bytes. Rows stay in production order: a row that is not batched ends the batch
before it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from edgemed.outbox import OutboxItem
from edgemed.publish.config import BatchConfig
from edgemed.receipts import batch_payload, device_topic


@dataclass(frozen=True)
class Outgoing:
    """One MQTT message to publish and the outbox rows its PUBACK acknowledges."""

    topic: str
    payload: bytes
    row_ids: tuple[int, ...]


class Batcher:
    """Groups committed rows into messages, bounded by ``max_results`` and ``max_bytes``."""

    def __init__(self, cfg: BatchConfig, *, site: str, device_id: str) -> None:
        """Args:
        cfg: the profile's ``publish.batch`` (``enabled`` is the caller's business).
        site: the device's site.
        device_id: the device's id.
        """
        self.cfg = cfg
        self.site, self.device_id = site, device_id
        self.topic = device_topic(site, device_id, "batches")
        self._results_topic = device_topic(site, device_id, "results")
        self._overhead = len(batch_payload(site, device_id, []))

    def messages(self, items: Sequence[OutboxItem]) -> list[Outgoing]:
        """The messages that carry ``items``, in their order."""
        out: list[Outgoing] = []
        group: list[OutboxItem] = []
        size = self._overhead
        for item in items:
            alone = item.topic != self._results_topic or self._overhead + len(item.payload) > self.cfg.max_bytes
            full = len(group) >= self.cfg.max_results or size + 1 + len(item.payload) > self.cfg.max_bytes
            if group and (alone or full):
                out.append(self._batch(group))
                group, size = [], self._overhead
            if alone:
                out.append(Outgoing(item.topic, item.payload, (item.row_id,)))
                continue
            size += len(item.payload) + (1 if group else 0)
            group.append(item)
        if group:
            out.append(self._batch(group))
        return out

    def _batch(self, group: list[OutboxItem]) -> Outgoing:
        payload = batch_payload(self.site, self.device_id, [i.payload for i in group])
        return Outgoing(self.topic, payload, tuple(i.row_id for i in group))
