"""What the page is sent: the ``frame``, ``status`` and ``map`` events, as plain JSON, and their SSE framing.

The wording is the device's own (``edgemed.triage``): the page shows the reason the terminal line and the envelope
carry, with the level as a word and a colour, and what to do next. Nothing here decides anything.

``frame`` (one per shown frame)::

    seq, index            the result's seq and the frame's index in the source
    level, level_text     triage level and its word (URGENT, ROUTINE, NO FINDING, INCONCLUSIVE, RECAPTURE, ERROR)
    reason, action        the triage reason; what to do next
    reason_repeats        true when the reason says no more than the recapture or OOD prompt (the page hides it)
    confidence            "malignant 93%" (null when not classified)
    quality               {"passed": bool, "text": str} or null (gate off, unreadable frame)
    recapture             "Recapture the image: <why>" for level recapture, else null
    ood_warning           the nurse-actionable out-of-distribution reason when flagged, else null
    study                 {"level", "level_text", "reason", "frames", "valid_frames", "text"} while a study runs
    frame, width, height  the JPEG data URL and its size (null frame for an unreadable input)
    map, map_kind, map_label, map_legend   the class map PNG data URL and its legend, or nulls
    name                  the input's file name, only when the profile allows it (else null)

``status`` (about once a second, and when a client connects)::

    connection ("connected" | "offline" | "none"), pending, awaiting_receipt, delegate, degraded, degraded_reason,
    source_state, model, model_version, class_map ("cam" | "occlusion" | "off"), occlusion_running

``map`` (an occlusion map, when it is ready)::

    seq, map, map_kind ("occlusion"), map_label, map_legend; or seq and error
"""

from __future__ import annotations

import json
from typing import Any

from edgemed.triage import ACTION, OOD_REASON
from edgemed.types import ClassMapKind, FrameResult, TriageLevel, TriageResult

LEVEL_TEXT: dict[str, str] = {
    "urgent": "URGENT",
    "routine": "ROUTINE",
    "no_finding": "NO FINDING",
    "inconclusive": "INCONCLUSIVE",
    "recapture": "RECAPTURE",
    "error": "ERROR",
    "waiting": "Waiting for the first image",
}

# The OOD and recapture prompts (#ood-warning, #recapture) say why and how; the action line says what to do.
OOD_ACTION = "recapture, or refer if in doubt"
RECAPTURE_ACTION = "do not use this image: take it again"
ERROR_ACTION = "check the input and the device, then try again"


def map_legend(kind: ClassMapKind, label: str) -> str:
    """What a map is, in words the page shows beside it (and what it is not)."""
    if kind == "cam":
        return f"Class activation map: regions that raised the score for {label}. Not an explanation of the decision."
    return (
        f"Occlusion map: regions where covering the image lowered the score for {label}. "
        "Not an explanation of the decision."
    )


def action_for(verdict: TriageResult, ood_flagged: bool) -> str:
    """What to do next, in the triage module's words (recapture, OOD and error have their own)."""
    level: TriageLevel = verdict.level
    if level == "recapture":
        return RECAPTURE_ACTION
    if level == "error":
        return ERROR_ACTION
    if ood_flagged or verdict.extra.get("basis") == "ood":
        return OOD_ACTION
    return ACTION.get(level, ERROR_ACTION)


def study_payload(decision: TriageResult) -> dict[str, Any]:
    """The running study decision as the page's ``#study`` panel shows it."""
    frames = int(decision.extra.get("frames", 0))
    valid = int(decision.extra.get("valid_frames", 0))
    return {
        "level": decision.level,
        "level_text": LEVEL_TEXT.get(decision.level, decision.level.upper()),
        "reason": decision.reason,
        "frames": frames,
        "valid_frames": valid,
        "text": f"{frames} {'frame' if frames == 1 else 'frames'}, {valid} usable",
    }


def frame_payload(result: FrameResult, study: TriageResult | None, *, show_name: bool) -> dict[str, Any]:
    """The ``frame`` event's fields that come from the result (the images are added by the push thread)."""
    verdict, pred, quality, ood = result.triage, result.prediction, result.quality, result.ood
    flagged = ood is not None and ood.flagged
    confidence = f"{pred.label} {round(pred.confidence, 6):.0%}" if pred is not None else None
    quality_view = None
    if quality is not None:
        # A failed check's reason is the recapture prompt's: said once, there.
        quality_view = {"passed": quality.passed, "text": f"Image quality: {'good' if quality.passed else 'failed'}"}
    recapture = ood_warning = None
    repeats = False
    if verdict.level == "recapture":
        why = quality.reason if quality is not None and quality.reason else "the image quality check failed"
        recapture = f"Recapture the image: {why}"
        repeats = verdict.reason.startswith(why)
    elif flagged and verdict.extra.get("basis") == "ood":
        ood_warning = OOD_REASON[:1].upper() + OOD_REASON[1:]
        repeats = verdict.reason == OOD_REASON  # an urgent reading adds a sentence of its own: then it is shown
    return {
        "seq": result.seq,
        "index": result.frame.index,
        "level": verdict.level,
        "level_text": LEVEL_TEXT[verdict.level],
        "reason": verdict.reason,
        "reason_repeats": repeats,
        "action": action_for(verdict, flagged),
        "confidence": confidence,
        "quality": quality_view,
        "recapture": recapture,
        "ood_warning": ood_warning,
        "study": study_payload(study) if study is not None else None,
        "name": result.frame.name if show_name else None,
    }


def sse(event: str, data: dict[str, Any]) -> bytes:
    """One Server-Sent Event: ``event: NAME`` and one ``data:`` line of compact JSON, then a blank line.

    JSON never holds a raw newline (``json.dumps`` escapes them), so one ``data:`` line is always enough.
    """
    body = json.dumps(data, separators=(",", ":"), allow_nan=False)
    return f"event: {event}\ndata: {body}\n\n".encode()
