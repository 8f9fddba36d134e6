"""Which frames form a study, and when a study decision is due.

A study decision only makes sense over frames of one study: frames that carry the same study id (``--study-id``,
or a DICOM file's StudyInstanceUID), or every frame of one video, stream or camera session. A folder of
unrelated photos forms no study, even when a DICOM file sits among them: each photo is a decision of its own.
A study is a run of consecutive frames with the same key; the first frame with another key (or with none) ends
it.

A study id never leaves the device: results and decisions carry its keyed pseudonym (``session_id``, an HMAC
with the device secret, ``edgemed.identity.pseudonym``), computed here once per study rather than once per frame.
Studies are told apart by that pseudonym too, so the open study can be kept in the ledger of processed inputs
without its study id (:meth:`StudyTracker.export`): a resumed run continues it and decides over all its frames.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edgemed.identity import pseudonym
from edgemed.study import StudyAggregator
from edgemed.triage import TriagePolicy
from edgemed.types import Frame, FrameResult, TriageResult

# Every frame of one of these is one session, with or without a study id.
SESSION_SOURCES = ("video", "stream", "camera")
_SESSION = "\0session"  # the key of a video/stream/camera session without a study id (never a real study id)
_PSEUDONYMS_KEPT = 1024  # a folder of single DICOM files has one study each: bound the cache

log = logging.getLogger("edgemed.runtime")


@dataclass(frozen=True)
class ClosedStudy:
    """A study that has ended and is to be published.

    Attributes:
        decision: the study-level result.
        session_id: the study id's pseudonym, or None for a video, stream or camera session without a study id.
        first_seq: ``seq`` of its first frame result.
        last_seq: ``seq`` of its last frame result.
    """

    decision: TriageResult
    session_id: str | None
    first_seq: int
    last_seq: int


class StudyTracker:
    """Groups consecutive frames into studies and says when one ends."""

    def __init__(self, policy: TriagePolicy, secret: bytes, study_id: str | None = None) -> None:
        """Args:
        policy: the triage policy (its ``study`` part decides what a study needs).
        secret: the device secret that keys the pseudonyms (``edgemed.identity.load_or_create_secret``).
        study_id: a study id given for the whole run (``--study-id``); it ties every frame together.
        """
        self.policy = policy
        self.study_id = study_id
        self.aggregator = StudyAggregator(policy)
        self._secret = secret
        self._pseudonyms: dict[str, str] = {}
        self._key: str | None = None  # the open study's pseudonym (or _SESSION); None: no study open
        self._first_seq = self._last_seq = 0
        self._resumes_at: int | None = None  # a restored study continues only at this frame index

    def study_of(self, frame: Frame) -> str | None:
        """The study id a frame belongs to (never published: see :meth:`session_id`), or None."""
        return self.study_id or frame.study_uid

    def session_id(self, frame: Frame) -> str | None:
        """The published stand-in for the frame's study id (its keyed pseudonym), or None for a frame of none."""
        return self._pseudonym(self.study_of(frame))

    def _pseudonym(self, study: str | None) -> str | None:
        # Every frame of a cine carries the same study id: its HMAC is computed once, not once per frame.
        if not study:
            return None
        known = self._pseudonyms.get(study)
        if known is None:
            if len(self._pseudonyms) >= _PSEUDONYMS_KEPT:
                self._pseudonyms.clear()
            known = self._pseudonyms[study] = pseudonym(self._secret, study)
        return known

    def _key_of(self, frame: Frame) -> str | None:
        study = self._pseudonym(self.study_of(frame))
        if study:
            return study
        return _SESSION if frame.source_kind in SESSION_SOURCES else None

    @property
    def is_open(self) -> bool:
        """True when a study has frames and no decision yet."""
        return bool(self.aggregator.frames)

    def export(self) -> dict[str, Any] | None:
        """The open study as plain JSON values (no study id: its pseudonym), or None when none is open."""
        if not self.aggregator.frames:
            return None
        return {
            "key": self._key,
            "first_seq": self._first_seq,
            "last_seq": self._last_seq,
            "frames": self.aggregator.export(),
        }

    def restore(self, state: Mapping[str, Any], *, resumes_at: int | None) -> None:
        """Re-open a study that :meth:`export` returned in an interrupted run.

        Args:
            state: what :meth:`export` returned.
            resumes_at: the index the next frame must have to continue it (the frame after the last committed
                one); None when frame indexes start again in every run (``watch:``).

        Raises:
            ValueError: ``state`` is not what :meth:`export` writes.
        """
        key, first, last = state["key"], state["first_seq"], state["last_seq"]
        if not (isinstance(key, str) and key and isinstance(first, int) and isinstance(last, int) and first <= last):
            raise ValueError("not a study state this version of edgemed wrote")
        self.aggregator.restore(state["frames"])
        self._key, self._first_seq, self._last_seq = key, first, last
        self._resumes_at = resumes_at

    def before(self, frame: Frame) -> ClosedStudy | None:
        """Call before numbering ``frame``: ends the open study when the frame does not belong to it.

        Returns:
            The study that ended, when it is to be published (see :meth:`close`).
        """
        key = self._key_of(frame)
        expected, self._resumes_at = self._resumes_at, None
        if expected is not None and frame.index != expected and self.aggregator.frames:
            # The files before this frame changed since the interrupted run (some are read again): its frames
            # would be counted twice. No study id or file name here: this line reaches the journal.
            log.warning(
                "the study the interrupted run left open cannot be continued (files of the source changed or "
                "went away since): its %d frames are left out of the study decision",
                self.aggregator.frames,
            )
            self.aggregator.reset()
            self._key = None
        closed = self.close() if key != self._key else None
        self._key = key
        return closed

    def add(self, result: FrameResult) -> None:
        """Record a frame's committed result in its study (a frame of no study is its own decision)."""
        if self._key_of(result.frame) is None:
            return
        if not self.aggregator.frames:
            self._first_seq = result.seq
        self._last_seq = result.seq
        self.aggregator.add(result.triage, result.prediction)

    def close(self) -> ClosedStudy | None:
        """End the open study (at the end of the source, or when a frame of another study arrives).

        Returns:
            Its decision when one is due: always when the profile configures ``triage.study``, otherwise for
            studies of at least ``min_valid_frames`` frames (a still image or two is its own decision). None when
            no study is open or none is due.
        """
        agg = self.aggregator
        if not agg.frames:
            return None
        due = self.policy.study is not None or agg.frames >= agg.study.min_valid_frames
        closed = None
        if due:
            session_id = None if self._key == _SESSION else self._key
            closed = ClosedStudy(agg.decision(), session_id, self._first_seq, self._last_seq)
        agg.reset()
        return closed
