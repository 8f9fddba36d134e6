"""The result envelope (schema ``edgemed.result/1``): what one frame's result looks like on the wire.

The JSON Schemas in ``edgemed/schemas/`` are the published contract. The runtime encodes each typed result once:
:func:`result_envelope` for a :class:`~edgemed.types.FrameResult`, :func:`study_envelope` for a
:class:`~edgemed.types.StudyResult`, then :func:`encode`. Those two are the only places that assemble an envelope,
so the privacy rules (no file names, no study ids) are enforced in one spot.
"""

from __future__ import annotations

import json
import math
import os
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING, Any

from edgemed import RESULT_SCHEMA, __version__
from edgemed.types import Frame, FrameResult, OodCheck, Prediction, QualityReport, StudyResult, TriageResult

if TYPE_CHECKING:
    from edgemed.inference.classify import Classifier

STUDY_SCHEMA = "edgemed.study/1"


@dataclass(frozen=True)
class EnvelopeContext:
    """The parts of every envelope that do not change from frame to frame."""

    device_id: str
    site: str
    model: dict[str, str]
    preprocess_sha256: str
    backend: str
    delegate: str
    degraded: bool
    publish_source_names: bool = False
    backend_version: str | None = None
    #: the data directory's ``seq`` stream (``edgemed.outbox.stream``), right after ``device_id`` in every envelope
    stream: str | None = None

    @classmethod
    def of(
        cls,
        device_id: str,
        site: str,
        classifier: Classifier,
        *,
        publish_source_names: bool = False,
        stream: str | None = None,
    ) -> EnvelopeContext:
        """The context of a device running ``classifier``: its model's identity and the backend that runs it."""
        from edgemed.inference.probe import runtime_version

        manifest, artifact, backend = classifier.manifest, classifier.artifact, classifier.backend
        return cls(
            device_id=device_id,
            site=site,
            model={
                "name": manifest.name,
                "version": manifest.version,
                "sha256": artifact.sha256,
                "target": artifact.target,
            },
            preprocess_sha256=manifest.preprocess_sha256(),
            backend=backend.backend,
            delegate=backend.delegate,
            degraded=backend.degraded,
            publish_source_names=publish_source_names,
            backend_version=runtime_version(backend.backend),
            stream=stream,
        )


_SECOND_PREFIX: tuple[int, str] = (-1, "")


def utc_now_iso(ts: float) -> str:
    """``ts`` (seconds since the epoch) as UTC ISO 8601 with millisecond precision and a ``Z`` suffix."""
    global _SECOND_PREFIX
    # Rounded to the microsecond first, as datetime does, then cut to milliseconds, as the format always was.
    frac, whole = math.modf(ts)
    second, micros = int(whole), round(frac * 1_000_000)
    if micros >= 1_000_000:
        second, micros = second + 1, micros - 1_000_000
    ms = micros // 1000
    cached_second, prefix = _SECOND_PREFIX
    if second != cached_second:
        # Formatting a datetime costs more than the rest of the envelope: once per second is enough.
        prefix = datetime.fromtimestamp(second, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.")
        _SECOND_PREFIX = (second, prefix)
    return f"{prefix}{ms:03d}Z"


class _ResultIds:
    """Random 128-bit ids from the OS's cryptographic source, read 4 KiB at a time.

    One ``os.urandom`` call per result (what ``uuid.uuid4`` does) was a system call per frame on the inference
    thread; reading 256 ids' worth at once keeps the same source and the same 122 random bits of a version-4
    UUID.
    """

    _PER_READ = 256

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: list[str] = []
        # A forked child must not hand out the ids its parent still holds.
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._pool = []

    def next(self) -> str:
        with self._lock:
            if not self._pool:
                raw = os.urandom(16 * self._PER_READ)
                self._pool = [uuid.UUID(bytes=raw[i : i + 16], version=4).hex for i in range(0, len(raw), 16)]
                self._pool.reverse()
            return self._pool.pop()


_RESULT_IDS = _ResultIds()


def new_result_id() -> str:
    """A fresh random result id (a version-4 UUID as 32 hex digits); it stays the same through every retry."""
    return _RESULT_IDS.next()


def result_envelope(ctx: EnvelopeContext, result: FrameResult) -> dict[str, Any]:
    """Assemble the envelope (``edgemed.result/1``) of one frame result.

    The frame's local name and study id are deliberately not copied in: only the pseudonymous ``session_id`` is
    (and the name only where the profile sets ``privacy.publish_source_names``). ``ood`` follows ``prediction``
    only when the frame was checked (a classified frame of a model with out-of-distribution statistics), so a
    device without them publishes exactly the envelope it published before.
    """
    frame = result.frame
    source: dict[str, Any] = {"kind": frame.source_kind, "index": frame.index}
    if ctx.publish_source_names and frame.name:
        source["name"] = frame.name
    quality, prediction = result.quality, result.prediction
    envelope = _head(RESULT_SCHEMA, ctx, result.result_id, result.seq)
    envelope.update(
        {
            "site": ctx.site,
            "created_at": utc_now_iso(result.created_at),
            "clock_synced": result.clock_synced,
            "session_id": result.session_id,
            "model": ctx.model,
            "preprocess_sha256": ctx.preprocess_sha256,
            "runtime": _runtime(ctx),
            "source": source,
            "quality": quality.as_dict() if quality is not None else None,
            "prediction": prediction.as_dict() if prediction is not None else None,
        }
    )
    if result.ood is not None:
        envelope["ood"] = result.ood.as_dict()
    envelope["triage"] = result.triage.as_dict()
    envelope["latency_ms"] = {k: round(v, 3) for k, v in result.latency_ms.items()}
    return envelope


def _head(schema: str, ctx: EnvelopeContext, result_id: str, seq: int) -> dict[str, Any]:
    """The first keys of every envelope; ``stream`` right after ``device_id`` when the device has one."""
    head: dict[str, Any] = {"schema": schema, "result_id": result_id, "seq": seq, "device_id": ctx.device_id}
    if ctx.stream is not None:
        head["stream"] = ctx.stream
    return head


def build_result(
    ctx: EnvelopeContext,
    *,
    frame: Frame,
    seq: int,
    created_at: float,
    clock_synced: bool | None,
    session_id: str | None,
    quality: QualityReport | None,
    prediction: Prediction | None,
    triage: TriageResult,
    latency_ms: dict[str, float],
    result_id: str | None = None,
    ood: OodCheck | None = None,
) -> dict[str, Any]:
    """The envelope of a result given field by field (a fresh ``result_id`` when none is given); see
    :func:`result_envelope`."""
    result = FrameResult(
        frame=frame,
        seq=seq,
        result_id=result_id or new_result_id(),
        created_at=created_at,
        clock_synced=clock_synced,
        session_id=session_id,
        quality=quality,
        prediction=prediction,
        triage=triage,
        latency_ms=latency_ms,
        ood=ood,
    )
    return result_envelope(ctx, result)


def _runtime(ctx: EnvelopeContext) -> dict[str, Any]:
    runtime: dict[str, Any] = {
        "backend": ctx.backend,
        "delegate": ctx.delegate,
        "degraded": ctx.degraded,
        "edgemed": __version__,
    }
    if ctx.backend_version:  # provenance: which interpreter build produced the numbers
        runtime["backend_version"] = ctx.backend_version
    return runtime


def study_envelope(ctx: EnvelopeContext, study: StudyResult) -> dict[str, Any]:
    """The envelope (``edgemed.study/1``) of one study decision over the frames ``first_seq..last_seq``."""
    envelope = _head(STUDY_SCHEMA, ctx, study.result_id, study.seq)
    envelope.update(
        {
            "site": ctx.site,
            "created_at": utc_now_iso(study.created_at),
            "clock_synced": study.clock_synced,
            "session_id": study.session_id,
            "model": ctx.model,
            "source_kind": study.source_kind,
            "first_seq": study.first_seq,
            "last_seq": study.last_seq,
            "triage": study.decision.as_dict(),
        }
    )
    return envelope


def encode(envelope: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON, the bytes that go to the outbox and the broker."""
    return json.dumps(envelope, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


@lru_cache(maxsize=4)
def _schema(name: str) -> dict[str, Any]:
    text = resources.files("edgemed").joinpath(f"schemas/{name}").read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


def result_schema() -> dict[str, Any]:
    """The JSON Schema of the result envelope, loaded from the package."""
    return _schema("result-v1.json")


def study_schema() -> dict[str, Any]:
    """The JSON Schema of the study decision, loaded from the package."""
    return _schema("study-v1.json")
