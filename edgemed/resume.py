"""Resuming file sources: the runtime's side of the ledger of processed inputs (``edgemed.ledger``).

At the start of a run :func:`attach_ledger` tells a file source what the ledger knows of it, so that an
interrupted pass resumes after its last committed frame; with every frame result, :func:`input_done` is the
ledger row the outbox commits in the same transaction as the result.

A pass leaves more than its files' rows behind: the study still open at its last committed frame (a cine or a
DICOM series interrupted half-way) and whether the region of interest has fitted a frame of the source. Both are
the pass state (:class:`Pass`), committed as JSON with every result and study decision, in the same transaction,
and restored when the pass resumes. So a resumed run decides over the whole study, frames of both runs, as an
uninterrupted run would; and the first frame a resumed run reads is not taken for the source's first frame (the
region of interest is checked against the first readable frame only, ``edgemed.capture._base``).
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from edgemed.types import Frame, InputDone

if TYPE_CHECKING:
    from edgemed.capture import FrameSource
    from edgemed.outbox import Outbox
    from edgemed.sessions import StudyTracker

log = logging.getLogger("edgemed.runtime")

_VERSION = 1  # of the pass state's JSON; a row of another version is not restored


class Pass:
    """One pass over a source that keeps a ledger: its key there, and the pass state of its committed frames."""

    def __init__(self, key: str, roi: tuple[int, int, int, int] | None) -> None:
        """Args:
        key: the source's key in the ledger.
        roi: the profile's ``source.roi`` (a fitted region is remembered for this region only).
        """
        self.key = key
        self.roi = roi
        self.next_index = 0  # of the frame after the last one processed
        self.roi_fitted = False
        self.mid_input = False  # the last frame processed was not the last of its file

    def advance(self, frame: Frame) -> None:
        """Account for a frame processed in this pass (call before its result is put in the outbox)."""
        self.next_index = frame.index + 1
        # A frame with pixels under a region of interest was cropped: the region fitted it.
        self.roi_fitted = self.roi_fitted or (self.roi is not None and frame.image is not None)
        ref = frame.input
        self.mid_input = ref is not None and (ref.frames_total is None or frame.input_frame + 1 < ref.frames_total)

    def state(self, studies: StudyTracker) -> tuple[str, str]:
        """``(key, JSON)``: the pass state to commit with the next result or study decision."""
        value = {
            "v": _VERSION,
            "next_index": self.next_index,
            "roi": list(self.roi) if self.roi is not None else None,
            "roi_fitted": self.roi_fitted,
            "study": studies.export(),
        }
        return self.key, json.dumps(value, separators=(",", ":"))

    def restore(self, raw: str, source: FrameSource, studies: StudyTracker) -> None:
        """Take up the state an interrupted pass committed last; a row that cannot be used is said and ignored."""
        try:
            value: Any = json.loads(raw)
            if not isinstance(value, dict) or value.get("v") != _VERSION:
                raise ValueError("written by another version of edgemed")
            next_index, study = value["next_index"], value["study"]
            if not isinstance(next_index, int) or next_index < 0:
                raise ValueError("no frame position")
            if study is not None:
                studies.restore(study, resumes_at=next_index if source.finite else None)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning(
                "the ledger's record of the interrupted run's open study cannot be read (%s): the study decision "
                "covers only the frames of this run",
                exc,
            )
            return
        self.next_index = next_index
        same_roi = value.get("roi") == (list(self.roi) if self.roi is not None else None)
        if same_roi and value.get("roi_fitted") is True:
            self.roi_fitted = source.roi_fitted = True


def attach_ledger(
    source: FrameSource, outbox: Outbox, studies: StudyTracker, *, loop: int, from_start: bool
) -> Pass | None:
    """Tell a file source what the ledger knows of it, and begin its pass in the ledger.

    A folder or file resumes only after an interrupted pass; ``watch:`` always takes up where it stopped. A
    looped run (``--loop``) keeps no ledger and leaves none behind to resume from. A resumed pass also takes up
    the study its interrupted run left open, and whether the region of interest had fitted a frame.

    Args:
        source: the open source, before it is iterated.
        outbox: the outbox whose file holds the ledger.
        studies: the run's study tracker, before any frame.
        loop: ``source.loop`` of the profile (passes over a finite source).
        from_start: process the source again from its start (``--from-start``); for ``watch:``, read every
            file in the folder again.

    Returns:
        The pass, or None when this run keeps no ledger for the source.

    Raises:
        OutboxError: the disk refused the write.
    """
    key = source.ledger_key
    if not source.keeps_ledger or key is None:
        return None
    if loop > 1:
        outbox.forget_source(key)
        return None
    watch = source.kind == "watch"
    state, rows = outbox.source_ledger(key)
    resume = not from_start and (state == "interrupted" or (watch and state == "complete"))
    this_pass = Pass(key, source.roi)
    if resume:
        raw = outbox.source_pass_state(key)
        if raw is not None:
            this_pass.restore(raw, source, studies)
    changes = source.attach_ledger(rows if resume else {}, history=from_start or state != "new")
    outbox.start_source(key, keep=resume, add=changes.add, drop=changes.forget)
    finished = sum(1 for row in rows.values() if row.finished and row.frames_total)
    if resume and not watch and finished:
        # The source is not named: its path may carry a patient's name, and this line reaches the journal.
        log.warning(
            "resuming where the interrupted run on this data directory stopped: %d files that already have "
            "results are skipped (pass --from-start to process them again)",
            finished,
        )
    return this_pass


def input_done(this_pass: Pass | None, frame: Frame) -> tuple[str, InputDone] | None:
    """The ledger row a frame's committed result makes true: its file is done up to and including this frame.

    Returns:
        ``(source key, row)``, or None when the run keeps no ledger or the frame came from no file.
    """
    ref = frame.input
    if this_pass is None or ref is None:
        return None
    row = InputDone(ref.path, ref.size, ref.mtime_ns, ref.sha256, frame.input_frame + 1, ref.frames_total)
    return this_pass.key, row
