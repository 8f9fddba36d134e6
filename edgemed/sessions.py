"""Which frames form a study, and when a study decision is due.

A study decision only makes sense over frames of one study: frames that carry the same study id (``--study-id``,
or a DICOM file's StudyInstanceUID), or every frame of one video, stream or camera session. A folder of
unrelated photos forms no study, even when a DICOM file sits among them: each photo is a decision of its own.
A study is a run of consecutive frames with the same key; the first frame with another key (or with none) ends
it.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgemed.triage import StudyAggregator, TriagePolicy
from edgemed.types import Frame, Prediction, TriageResult

# Every frame of one of these is one session, with or without a study id.
SESSION_SOURCES = ("video", "stream", "camera")
_SESSION = "\0session"  # the key of a video/stream/camera session without a study id (never a real study id)


@dataclass(frozen=True)
class ClosedStudy:
    """A study that has ended and is to be published.

    Attributes:
        decision: the study-level result.
        study: the study id (pseudonymised into ``session_id`` by the caller), or None for a session without one.
        first_seq: ``seq`` of its first frame result.
        last_seq: ``seq`` of its last frame result.
    """

    decision: TriageResult
    study: str | None
    first_seq: int
    last_seq: int


class StudyTracker:
    """Groups consecutive frames into studies and says when one ends."""

    def __init__(self, policy: TriagePolicy, study_id: str | None = None) -> None:
        """Args:
        policy: the triage policy (its ``study`` part decides what a study needs).
        study_id: a study id given for the whole run (``--study-id``); it ties every frame together.
        """
        self.policy = policy
        self.study_id = study_id
        self.aggregator = StudyAggregator(policy)
        self._key: str | None = None
        self._first_seq = self._last_seq = 0

    def study_of(self, frame: Frame) -> str | None:
        """The study id a frame belongs to (pseudonymised into its ``session_id``), or None."""
        return self.study_id or frame.study_uid

    def _key_of(self, frame: Frame) -> str | None:
        study = self.study_of(frame)
        if study:
            return study
        return _SESSION if frame.source_kind in SESSION_SOURCES else None

    def before(self, frame: Frame) -> ClosedStudy | None:
        """Call before numbering ``frame``: ends the open study when the frame does not belong to it.

        Returns:
            The study that ended, when it is to be published (see :meth:`close`).
        """
        key = self._key_of(frame)
        closed = self.close() if key != self._key else None
        self._key = key
        return closed

    def add(self, frame: Frame, seq: int, result: TriageResult, prediction: Prediction | None) -> None:
        """Record the frame's committed result in its study (a frame of no study is its own decision)."""
        if self._key_of(frame) is None:
            return
        if not self.aggregator.frames:
            self._first_seq = seq
        self._last_seq = seq
        self.aggregator.add(result, prediction)

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
            study = None if self._key == _SESSION else self._key
            closed = ClosedStudy(agg.decision(), study, self._first_seq, self._last_seq)
        agg.reset()
        return closed
