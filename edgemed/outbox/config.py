"""The outbox's settings, its item type and its one error of its own."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field, model_validator

from edgemed.errors import OutboxError
from edgemed.validation import StrictModel

OUTBOX_FILENAME = "outbox.sqlite3"


class OutboxFullError(OutboxError):
    """The outbox reached its cap and the profile says to block rather than evict."""


class OutboxConfig(StrictModel):
    """How the outbox trades throughput against the size of the window a power cut can lose."""

    commit_every: int = Field(
        100,
        ge=1,
        description="results per durable commit; 1 = every put() is durable on return, at the price of two fsyncs "
        "per result with synchronous FULL (SQLite's log and the seq mark, DATA_DIR/outbox.seq)",
    )
    commit_interval_s: float = Field(
        0.05, gt=0, description="longest time a result may sit uncommitted (and unpublished)"
    )
    max_pending: int = Field(
        1_000_000,
        ge=1,
        description="cap on the results kept on disk (not yet acknowledged, or awaiting the consumer's receipt)",
    )
    max_age_s: float | None = Field(
        None, gt=0, description="cap on the age of the oldest result kept on disk; None = no age cap"
    )
    on_full: Literal["block", "evict_oldest"] = Field(
        "block",
        description="at the cap: 'block' stops accepting results (the runtime alerts), "
        "'evict_oldest' deletes the oldest results kept on disk and counts them (announced lost to a consumer)",
    )
    synchronous: Literal["FULL", "NORMAL"] = Field(
        "FULL", description="SQLite commit level: FULL survives power loss, NORMAL only a process crash"
    )
    keep_acked: int = Field(
        100_000, ge=0, description="how many acknowledged result ids to keep as evidence of broker PUBACKs"
    )
    replay_window_s: float = Field(
        0.0,
        ge=0,
        description="on every broker connection, publish again the results acknowledged within N seconds before "
        "the latest acknowledgement (a broker that acknowledges before it writes to disk, as mosquitto does, "
        "loses those if it crashes); set it a little above the broker's autosave interval; 0 = off; ignored "
        "with delivery.consumer (receipts replace it)",
    )

    @model_validator(mode="after")
    def _replay_needs_the_log(self) -> OutboxConfig:
        if self.replay_window_s > 0 and self.keep_acked == 0:
            raise ValueError(
                "replay_window_s needs the acknowledgement log: set keep_acked above the results of one window "
                "(e.g. the default 100000)"
            )
        return self


@dataclass(frozen=True)
class OutboxItem:
    """One committed result (or lost announcement) kept on disk.

    Attributes:
        row_id: its place in production order.
        result_id: the envelope's id, the same through every retry.
        topic: where it is published.
        payload: the bytes published.
        created_at: wall-clock time it was put (for acknowledged results in the replay log: the acknowledgement).
        seq: the envelope's ``seq``; None for a row without one (a lost announcement).
    """

    row_id: int
    result_id: str
    topic: str
    payload: bytes
    created_at: float
    seq: int | None = None
