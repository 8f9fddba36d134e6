"""The wall clock results are stamped with, and whether it can be trusted.

A seam of its own so that a logic test can run a device on a fixed clock, and so that the (system call) check of
clock synchronisation runs once a minute rather than once per frame.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from edgemed.identity import clock_synced


class Clock:
    """Wall-clock time and whether it is synchronised (checked at most every ``recheck_s`` seconds)."""

    def __init__(
        self,
        *,
        now: Callable[[], float] = time.time,
        synced: Callable[[], bool | None] = clock_synced,
        monotonic: Callable[[], float] = time.monotonic,
        recheck_s: float = 60.0,
    ) -> None:
        """Args:
        now: seconds since the epoch (``time.time``).
        synced: True/False when the system clock is known to be synchronised or not, None when unknown
            (``edgemed.identity.clock_synced``).
        monotonic: a clock that never jumps, to time the re-checks.
        recheck_s: how long one answer of ``synced`` is reused.
        """
        self._now = now
        self._check = synced
        self._monotonic = monotonic
        self._recheck_s = recheck_s
        # -inf, not 0: the monotonic clock counts from boot, and a device service starts within a minute of it.
        self._checked_at = -math.inf
        self._synced: bool | None = None

    def now(self) -> float:
        """Seconds since the epoch."""
        return self._now()

    def synced(self) -> bool | None:
        """Whether the clock is trustworthy: False when unsynchronised or implausible, None when unknown."""
        at = self._monotonic()
        if at - self._checked_at > self._recheck_s:
            self._synced = self._check()
            self._checked_at = at
        return self._synced
