"""Small immutable value types shared by capture, inference, triage and delivery.

numpy is imported for type checking only, so this module (and `import edgemed`) works without the device extra.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import numpy as np

SourceKind = Literal["image", "folder", "watch", "video", "camera", "stream", "dicom"]
#: Where a capture source is in its life (``edgemed.capture.FrameSource`` says what each means).
CaptureState = Literal["connecting", "open", "reconnecting", "ended", "stopped", "failed", "closed"]
Delegate = Literal["cpu", "edgetpu", "gpu"]
TriageLevel = Literal["urgent", "routine", "no_finding", "inconclusive", "recapture", "error"]


@dataclass(frozen=True)
class InputRef:
    """The file a frame came from, as the ledger of processed inputs records it.

    Attributes:
        path: the file's path relative to the source (its name, for a single-file source).
        size: its size in bytes when it was read.
        mtime_ns: its modification time when it was read.
        sha256: hex SHA-256 of the bytes that were decoded (computed once, from the bytes already read).
        frames_total: how many frames the file holds, when known (1 for an image, NumberOfFrames for DICOM, the
            frames read before an error); None for a video.
    """

    path: str
    size: int
    mtime_ns: int
    sha256: str | None
    frames_total: int | None


@dataclass(frozen=True)
class InputDone:
    """One row of the ledger: how far the results of one input file are committed.

    Attributes:
        path: relative to the source.
        size: size in bytes when it was read.
        mtime_ns: modification time when it was read.
        sha256: content hash; None for a file only noted as present when ``watch:`` first started.
        frames_done: frames of the file with a committed result (its first ``frames_done`` frames).
        frames_total: frames the file holds, when known.
    """

    path: str
    size: int
    mtime_ns: int
    sha256: str | None
    frames_done: int
    frames_total: int | None

    @property
    def finished(self) -> bool:
        """True when every frame of the file has a committed result (never for a video: its length is unknown)."""
        return self.frames_total is not None and self.frames_done >= self.frames_total


@dataclass(frozen=True)
class Frame:
    """One frame from a capture source.

    Attributes:
        index: position of the frame in the stream, starting at 0; an unreadable input keeps its index.
        source_kind: what produced it (``folder``, ``video``, ``dicom``, ...).
        image: ``uint8`` pixels, ``(H, W)`` grayscale or ``(H, W, 3)`` RGB; ``None`` when ``error`` is set.
        error: why this input could not be read (shown on the device, published as triage level ``error``).
        captured_at: wall-clock time (``time.time()``) when the frame was read.
        study_uid: a study identifier found in the input (DICOM StudyInstanceUID). It never leaves the device:
            only its keyed pseudonym is published.
        name: local name of the input (file name) for the person at the device; never published.
        input: the file this frame came from, for the ledger of processed inputs (None for live sources, and
            when the run keeps no ledger).
        input_frame: the frame's position within that file, from 0.
    """

    index: int
    source_kind: SourceKind
    image: np.ndarray | None = None
    error: str | None = None
    captured_at: float = 0.0
    study_uid: str | None = None
    name: str | None = None
    input: InputRef | None = None
    input_frame: int = 0


@dataclass(frozen=True)
class TensorSpec:
    """Shape, type and affine quantization of one model input or output.

    ``real = scale * (q - zero_point)``; ``scale == 0`` means the tensor is not quantized.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    scale: float = 0.0
    zero_point: int = 0

    @property
    def quantized(self) -> bool:
        """True when the tensor holds integers that stand for real values."""
        return self.scale != 0.0


@dataclass(frozen=True)
class Prediction:
    """Class probabilities for one frame, in the manifest's label order."""

    labels: tuple[str, ...]
    probabilities: tuple[float, ...]

    @cached_property
    def index(self) -> int:
        """Index of the most probable class (computed once: triage and the envelope ask several times)."""
        return max(range(len(self.probabilities)), key=self.probabilities.__getitem__)

    @property
    def label(self) -> str:
        """Name of the most probable class."""
        return self.labels[self.index]

    @property
    def confidence(self) -> float:
        """Probability of the most probable class."""
        return self.probabilities[self.index]

    def as_dict(self) -> dict[str, Any]:
        """The ``prediction`` object of the result envelope."""
        return {
            "label": self.label,
            "index": self.index,
            "probabilities": {lab: round(p, 6) for lab, p in zip(self.labels, self.probabilities, strict=True)},
        }


@dataclass(frozen=True)
class QualityReport:
    """Outcome of the image-quality gate for one frame."""

    passed: bool
    blur: float
    brightness: float
    clipped_fraction: float
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The ``quality`` object of the result envelope."""
        return {
            "passed": self.passed,
            "blur": round(self.blur, 3),
            "brightness": round(self.brightness, 3),
            "clipped_fraction": round(self.clipped_fraction, 5),
            "reason": self.reason,
        }


@dataclass(frozen=True)
class OodCheck:
    """Whether one classified frame looked like the images the model was trained on.

    Attributes:
        method: ``energy`` or ``features`` (``edgemed.ood``); ``none`` when the profile turned the check off.
        score: the frame's score (higher: less like the training images); None when the check is off.
        threshold: the score above which a frame is flagged; None when the check is off.
        flagged: True when ``score > threshold``.
        source: where the threshold came from: ``manifest`` (fitted at conversion) or ``profile`` (an override).
    """

    method: Literal["energy", "features", "none"]
    score: float | None
    threshold: float | None
    flagged: bool
    source: Literal["manifest", "profile"]

    def as_dict(self) -> dict[str, Any]:
        """The ``ood`` object of the result envelope."""
        return {
            "method": self.method,
            "score": None if self.score is None else round(self.score, 6),
            "threshold": None if self.threshold is None else round(self.threshold, 6),
            "flagged": self.flagged,
            "source": self.source,
        }


@dataclass(frozen=True)
class TriageResult:
    """A clinical decision a nurse can act on, with the reason in plain words."""

    level: TriageLevel
    reason: str
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The ``triage`` object of the result envelope."""
        return {"level": self.level, "reason": self.reason, **self.extra}


@dataclass(frozen=True, slots=True)
class FrameResult:
    """What one frame became, as committed to the outbox: the one value the envelope, the nurse's line, the run
    summary and the health counters all read.

    Attributes:
        frame: the frame it came from. Its pixels and local name stay on the device: the envelope copies neither
            (``edgemed.envelope.build_result``).
        seq: its number on the device's one counter (shared with study decisions; a gap means a lost message).
        result_id: random id, the same through every retry; consumers drop duplicates by it.
        created_at: wall-clock time (``time.time()``) the result was made.
        clock_synced: whether that clock was trustworthy (None when unknown).
        session_id: the keyed pseudonym of the frame's study, or None for a frame of no study.
        quality: the quality gate's report, or None when the gate is off or the frame was unreadable.
        prediction: the class probabilities, or None when the frame was not classified (unreadable, recapture).
        triage: the decision for the person at the device.
        latency_ms: milliseconds per stage (``capture``, ``quality``, ``preprocess``, ``inference``, ``ood`` when
            the model has an out-of-distribution check, ``triage`` when classified, ``total``), in that order: the
            envelope keeps it.
        ood: the out-of-distribution check of a classified frame; None when the frame was not classified or the
            model has no check (no statistics in its manifest).
    """

    frame: Frame
    seq: int
    result_id: str
    created_at: float
    clock_synced: bool | None
    session_id: str | None
    quality: QualityReport | None
    prediction: Prediction | None
    triage: TriageResult
    latency_ms: dict[str, float]
    ood: OodCheck | None = None

    @property
    def level(self) -> TriageLevel:
        """The triage level (what the summary counts)."""
        return self.triage.level


@dataclass(frozen=True, slots=True)
class StudyResult:
    """One study decision, as committed to the outbox (schema ``edgemed.study/1``).

    Attributes:
        seq: its number on the one counter that also numbers frame results (after its last frame).
        result_id: random id, as for a frame result.
        created_at: wall-clock time it was made.
        clock_synced: whether that clock was trustworthy.
        session_id: the keyed pseudonym of the study, or None for a video, stream or camera session without one.
        source_kind: what the frames came from.
        first_seq: ``seq`` of the study's first frame result.
        last_seq: ``seq`` of its last frame result.
        decision: the study-level triage.
    """

    seq: int
    result_id: str
    created_at: float
    clock_synced: bool | None
    session_id: str | None
    source_kind: str
    first_seq: int
    last_seq: int
    decision: TriageResult


ClassMapKind = Literal["cam", "occlusion"]


@dataclass(frozen=True)
class ClassMap:
    """Where the model looked for one class in one frame: shown on the device's screen, never published or stored.

    Attributes:
        values: float32 array ``(h, w)`` on the model input's grid (the feature map's for a CAM, coarser than the
            input; the occlusion grid's for an occlusion map), not normalised: positive where the region raised the
            class's score. The screen scales it over the frame it came from (the whole frame the model saw).
        label: the class it is for (the top class of the frame's prediction).
        kind: ``cam`` (class activation map, computed with every frame) or ``occlusion`` (the drop in the class's
            probability when a patch is covered, computed on request for one frame).
        seq: the ``seq`` of the frame result it belongs to.
    """

    values: np.ndarray
    label: str
    kind: ClassMapKind
    seq: int
