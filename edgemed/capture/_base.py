"""What every source shares: frame numbering, the region of interest, the frame-rate cap and the stop event.

A concrete source only yields ``Item`` tuples (pixels or an error, plus local metadata); the base turns them
into numbered :class:`Frame` objects. Keeping the numbering here guarantees that an unreadable input still
consumes an index, whatever the source.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, NamedTuple

from edgemed.errors import ConfigError
from edgemed.types import Frame

if TYPE_CHECKING:
    from collections.abc import Mapping

    import numpy as np

    from edgemed.capture import CaptureConfig
    from edgemed.types import CaptureState, InputDone, InputRef, SourceKind


class Item(NamedTuple):
    """One input as a concrete source produced it, before numbering.

    An item with ``skip`` set is not a frame: that many frames of an input already have committed results from
    an earlier run (the ledger says so), and numbering moves on past them as if they had been read.
    """

    image: np.ndarray | None
    error: str | None = None
    name: str | None = None
    study_uid: str | None = None
    input: InputRef | None = None
    input_frame: int = 0
    skip: int = 0


class LedgerChanges(NamedTuple):
    """What a source asks the ledger to record when it is attached (``watch:`` only)."""

    add: list[InputDone]  # files present when watching started for the first time: not new, noted as seen
    forget: list[str]  # files the ledger has that are gone from the folder


class BaseSource:
    """Numbering, cropping, pacing and stopping around a concrete source's ``_items()``."""

    kind: SourceKind = "image"
    #: see ``edgemed.capture.FrameSource`` for what each state means
    state: CaptureState
    finite: bool = True
    #: how many times a live source lost its connection and began reconnecting (0 for files); on every heartbeat
    reconnects: int = 0
    #: file sources can keep a ledger of processed inputs (resume, watch: across restarts); live ones cannot
    keeps_ledger: bool = False
    #: how the ledger names this source: its absolute path (``watch:`` and the path for a watched folder)
    ledger_key: str | None = None

    def __init__(self, cfg: CaptureConfig, stop: threading.Event) -> None:
        self.cfg = cfg
        self.stop = stop
        self.state = "open"
        self._closed = False
        self._iterating = False
        # The region of interest fitted a frame of this source at least once: in this run, or (set by
        # edgemed.resume) in the interrupted run this one resumes, whose first frames this run does not read.
        self.roi_fitted = False
        self.ledger = False  # frames carry an InputRef for the ledger (attach_ledger)
        self._done: dict[str, InputDone] = {}

    @property
    def roi(self) -> tuple[int, int, int, int] | None:
        """The region of interest every frame is cropped to (``source.roi``), or None for the whole picture."""
        return self.cfg.roi

    def _items(self) -> Iterator[Item]:
        """One pass over the inputs; finite sources are replayed ``cfg.loop`` times by ``__iter__``."""
        raise NotImplementedError

    def attach_ledger(self, done: Mapping[str, InputDone], *, history: bool) -> LedgerChanges:
        """Use the ledger of processed inputs: frames then carry an ``InputRef``, and inputs it shows as done
        are skipped (their frames keep their numbers).

        Args:
            done: the ledger's rows for this source, by relative path (empty to process everything).
            history: the ledger has seen this source before (``watch:``: files not in it arrived while edgemed
                was not running).

        Returns:
            Rows to add or drop (only ``watch:`` has any).
        """
        self.ledger = True
        self._done = dict(done)
        return LedgerChanges([], [])

    def __iter__(self) -> Iterator[Frame]:
        index = 0
        interval_s = 1.0 / self.cfg.fps_cap if self.cfg.fps_cap else 0.0
        next_due = time.monotonic()
        passes = self.cfg.loop if self.finite else 1
        self._iterating = True
        try:
            for _ in range(passes):
                for item in self._items():
                    if item.skip:
                        index += item.skip  # done by an earlier run: the frames after keep their numbers
                        continue
                    if self._stopped():
                        break
                    if interval_s:
                        # Pace on a schedule, not a fixed sleep, so slow frames do not drift.
                        delay_s = next_due - time.monotonic()
                        if delay_s > 0 and self.stop.wait(delay_s):
                            break
                        # A late frame moves the schedule instead of letting the next ones burst to catch up.
                        next_due = max(next_due, time.monotonic()) + interval_s
                    yield self._frame(index, item)
                    index += 1
                if self._stopped():
                    break
            if self.state in ("open", "connecting", "reconnecting"):
                self.state = "stopped" if self._stopped() else "ended"
        finally:
            self._iterating = False
            self._release()

    def _frame(self, index: int, item: Item) -> Frame:
        image = item.image
        error = item.error
        if image is not None and self.cfg.roi is not None:
            image, error = self._crop(image, self.cfg.roi, item.name)
        return Frame(
            index=index,
            source_kind=self.kind,
            image=image,
            error=error,
            captured_at=time.time(),
            study_uid=item.study_uid,
            name=item.name,
            input=item.input,
            input_frame=item.input_frame,
        )

    def _crop(
        self, image: np.ndarray, roi: tuple[int, int, int, int], name: str | None
    ) -> tuple[np.ndarray | None, str | None]:
        """The region of interest of one frame, or the error that replaces it.

        A region of interest belongs to a device's fixed picture geometry (a probe's screen layout), so when it
        does not fit the first readable frame it would fail every frame: that is a configuration error and the
        run stops before any result. Once it has fitted a frame, a later frame it does not fit (a folder mixing
        picture sizes) is one error result and the run goes on.

        Raises:
            ConfigError: the region does not fit the first readable frame of the source.
        """
        x, y, w, h = roi
        height, width = image.shape[:2]
        if x + w <= width and y + h <= height:
            self.roi_fitted = True
            # A slice is a view: no copy here; preprocessing makes the one contiguous copy it needs.
            return image[y : y + h, x : x + w], None
        where = f"region of interest x={x} y={y} w={w} h={h} (source.roi) lies outside the {width}x{height}"
        if not self.roi_fitted:
            self.state = "failed"
            raise ConfigError(
                f"{where} first frame of the source, so it would fail every frame; set source.roi in the device "
                f"profile to a region inside {width}x{height} pixels, or remove it to use the whole picture"
            )
        return None, f"{name or 'frame'}: {where} frame; fix source.roi in the device profile"

    def _stopped(self) -> bool:
        return self.stop.is_set() or self._closed

    def close(self) -> None:
        """Stop iterating and release the underlying file, camera or connection.

        Safe to call from another thread (a signal handler): while a frame is being read, the reading thread
        releases the device itself once its current read returns, since OpenCV must not release a capture
        that another thread is reading from.
        """
        self._closed = True
        if self.state != "failed":
            self.state = "closed"
        if not self._iterating:
            self._release()

    def _release(self) -> None:
        """Free OS resources; safe to call more than once."""
