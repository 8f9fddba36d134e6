"""Resuming file sources: the runtime's side of the ledger of processed inputs (``edgemed.ledger``).

At the start of a run :func:`attach_ledger` tells a file source what the ledger knows of it, so that an
interrupted pass resumes after its last committed frame; with every frame result, :func:`input_done` is the
ledger row the outbox commits in the same transaction as the result.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from edgemed.types import Frame, InputDone

if TYPE_CHECKING:
    from edgemed.capture import FrameSource
    from edgemed.outbox import Outbox

log = logging.getLogger("edgemed.runtime")


def attach_ledger(source: FrameSource, outbox: Outbox, *, loop: int, from_start: bool) -> str | None:
    """Tell a file source what the ledger knows of it, and begin its pass in the ledger.

    A folder or file resumes only after an interrupted pass; ``watch:`` always takes up where it stopped. A
    looped run (``--loop``) keeps no ledger and leaves none behind to resume from.

    Args:
        source: the open source, before it is iterated.
        outbox: the outbox whose file holds the ledger.
        loop: ``source.loop`` of the profile (passes over a finite source).
        from_start: process the source again from its start (``--from-start``); for ``watch:``, read every
            file in the folder again.

    Returns:
        The source's key in the ledger, or None when this run keeps no ledger for it.

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
    return key


def input_done(key: str | None, frame: Frame) -> tuple[str, InputDone] | None:
    """The ledger row a frame's committed result makes true: its file is done up to and including this frame.

    Returns:
        ``(source key, row)``, or None when the run keeps no ledger or the frame came from no file.
    """
    ref = frame.input
    if key is None or ref is None:
        return None
    return key, InputDone(ref.path, ref.size, ref.mtime_ns, ref.sha256, frame.input_frame + 1, ref.frames_total)
