"""What a run did: the counts, the study decisions and what is still on disk, read from the typed results."""

from __future__ import annotations

from dataclasses import dataclass, field

from edgemed.errors import EXIT_OK, EXIT_OUTBOX, EXIT_PENDING
from edgemed.types import FrameResult, TriageResult


@dataclass
class RunSummary:
    """What a run did, for the exit code and the closing line."""

    frames: int = 0
    errors: int = 0
    recaptures: int = 0
    #: classified frames the out-of-distribution check flagged as unlike the training images (level inconclusive)
    ood_flagged: int = 0
    pending: int = 0
    levels: dict[str, int] = field(default_factory=dict)
    studies: list[TriageResult] = field(default_factory=list)
    stopped_by_signal: bool = False
    #: what is still on disk, by state ("12 results sent, awaiting the dashboard's receipt"), when anything is
    backlog: str | None = None
    #: the outbox was found damaged at start: what was recovered and what was not (the run went on)
    outbox_damage: str | None = None

    def add(self, result: FrameResult) -> None:
        """Count one committed frame result."""
        level = result.level
        self.frames += 1
        self.levels[level] = self.levels.get(level, 0) + 1
        if level == "error":
            self.errors += 1
        elif level == "recapture":
            self.recaptures += 1
        if result.ood is not None and result.ood.flagged:
            self.ood_flagged += 1

    def line(self) -> str:
        """The closing line: frames by level, how many were unlike the training images, and what is pending."""
        levels = ", ".join(f"{k} {v}" for k, v in sorted(self.levels.items())) or "none"
        ood = f"; {self.ood_flagged} unlike the training images (inconclusive)" if self.ood_flagged else ""
        return f"edgemed: {self.frames} frames ({levels}){ood}; pending {self.pending}"

    @property
    def exit_code(self) -> int:
        """0 when every result was delivered (acknowledged by the broker, or receipted by the consumer of record
        when the profile names one), 10 when some are still pending on disk, 7 when the outbox was
        found damaged at start (whatever could be read was recovered and sent; the rest may be lost)."""
        if self.outbox_damage is not None:
            return EXIT_OUTBOX
        return EXIT_OK if self.pending == 0 else EXIT_PENDING
