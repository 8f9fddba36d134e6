"""The durable outbox: every result is committed to disk before it is published, and leaves only once delivered.

Delivered means acknowledged by the broker (PUBACK), or, when the profile names a consumer of record
(``delivery.consumer``), receipted by that consumer (``edgemed.receipts``): then a PUBACK only marks the result
"sent, awaiting receipt", and the consumer's receipt releases it.

A single SQLite file in WAL mode (``DATA_DIR/outbox.sqlite3``) holds three tables (and the ledger of processed
inputs, ``edgemed.ledger``):

* ``outbox``: results not yet delivered, in the order they were produced (``row_id``), with their ``seq`` and,
  once the broker acknowledged them, ``sent_at``;
* ``meta``: the per-device sequence counter, written in the same transaction as the results it numbered, so a
  crash can never hand out a sequence number twice for two different committed results;
* ``acked``: a bounded log of recently acknowledged ``result_id`` values, so that a result missing at the
  consumer can be shown to have been accepted by the broker (a broker-side loss), not lost by the device; with
  ``replay_window_s`` it also keeps the payloads of the last seconds' acknowledgements, which the delivery
  publishes again on every connection (a broker that acknowledged before writing to disk may have lost them).

Batching and durability: ``put()`` inserts into an open transaction; the transaction is committed when
``commit_every`` results have accumulated or the oldest uncommitted one is ``commit_interval_s`` old (a small
committer thread enforces the time bound), or when ``flush()`` is called. Only committed rows are handed to
the publisher (``pending()``), so a result is never published before it is durable. A power cut or crash loses
at most the uncommitted tail (at most ``commit_every`` results, at most ``commit_interval_s`` old); those
results were never published and their sequence numbers are handed out again. ``commit_every=1`` makes every
``put()`` durable on return at the price of one fsync per result. ``synchronous="FULL"`` fsyncs the WAL on
every commit (survives power loss); ``"NORMAL"`` survives a process crash but may lose the last commits on
power loss.

Caps: ``max_pending`` and ``max_age_s`` bound the rows on disk, whether they wait for the broker or for a
receipt. When reached, ``on_full="block"`` makes ``is_full()`` true so the runtime stops accepting frames and
alerts on its health topic, and ``put()`` raises ``OutboxFullError``; ``on_full="evict_oldest"`` deletes the
oldest rows, counts them in ``evicted_total`` (published on every heartbeat), logs a warning and, with a
consumer, announces their ``seq`` lost: never a silent loss.

The package, by what each part does:

* ``storage``: opening and creating the file, its schema and the in-place upgrades of older files, damage checks;
* ``store``: ``OutboxStore``, the connection, its lock and batch commits, the ``seq`` mark, the ledger;
* ``acklog``: the acknowledgement log and the replay window;
* ``queue``: ``put``/``pending``/``ack_many``, the caps and eviction;
* ``awaiting``: receipt state: awaiting receipt, release by receipt, what is due for sending again, lost numbers.

Threads
    One connection guarded by one lock. ``put()`` and ``next_seq()`` run on the runtime's thread (the one that
    runs the quality gate, inference and triage; the capture thread only reads frames), ``pending()``,
    ``ack_many()`` and the receipt calls on the delivery thread, and time-bound commits on the committer thread;
    they may run concurrently. ``next_seq()`` has a small lock of its own, so numbering a frame never waits
    behind the delivery thread's SQL.
"""

from __future__ import annotations

from edgemed.outbox.awaiting import OutboxReceipts
from edgemed.outbox.config import OUTBOX_FILENAME, OutboxConfig, OutboxFullError, OutboxItem
from edgemed.outbox.queue import EVICTED_REASON, LostAnnouncer

__all__ = [
    "EVICTED_REASON",
    "OUTBOX_FILENAME",
    "LostAnnouncer",
    "Outbox",
    "OutboxConfig",
    "OutboxFullError",
    "OutboxItem",
]


class Outbox(OutboxReceipts):
    """A durable, ordered store-and-forward queue of results (see the module docstring for the guarantees)."""

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
