"""What the store writes for one result or study decision: its row, the text it keeps, the time a device stamped.

Shared by the store's message-by-message path and its set-based path for a batch (``bulk.py``), so both write
exactly the same rows.
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from typing import Any

from edgemed.dashboard.queries import as_flag, as_int, as_obj, as_text


def dumps(value: Any) -> str:
    """Compact JSON, refusing NaN and Infinity.

    The ingest refuses them, so this raising is a bug caught there (the message becomes a dead letter), never
    invalid JSON in the database.
    """
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


def published_at(body: dict[str, Any] | None, key: str, now: float) -> float | None:
    """The time a device stamped on a message (``at``, ``created_at``), never later than ``now``; None if unreadable."""
    text = body.get(key) if body is not None else None
    if not isinstance(text, str):
        return None
    try:
        stamp = datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except (ValueError, OverflowError, OSError):
        return None
    return min(stamp, now) if math.isfinite(stamp) else None


def kept_text(payload: dict[str, Any], raw: bytes | None) -> str:
    """The envelope as the store keeps it: the JSON text the device sent, or re-encoded when that was not given.

    A device profile may opt in to publishing local file names (privacy.publish_source_names); the central
    dashboard never keeps or shows them, whatever a device sends: such an envelope is kept re-encoded compactly
    without ``source.name`` (the only case where the stored text differs from what the device sent).
    """
    source = payload.get("source")
    if isinstance(source, dict) and "name" in source:
        return dumps({**payload, "source": {k: v for k, v in source.items() if k != "name"}})
    return raw.decode("utf-8") if raw is not None else dumps(payload)


def stream_of(body: dict[str, Any]) -> str:
    """The seq stream an envelope names (``''`` when none: an older device)."""
    stream = body.get("stream")
    return stream if isinstance(stream, str) else ""  # the ingest checked it: 16 hex digits when present


def result_row(result: dict[str, Any], now: float, raw: bytes | None) -> dict[str, Any]:
    """The ``results`` row of a validated ``edgemed.result/1`` envelope."""
    runtime = as_obj(result.get("runtime"))
    prediction = as_obj(result.get("prediction"))
    probabilities = as_obj(prediction.get("probabilities"))
    scores = [p for p in probabilities.values() if isinstance(p, (int, float)) and not isinstance(p, bool)]
    triage = result["triage"]
    return {
        "result_id": result["result_id"],
        "site": result["site"],
        "device_id": result["device_id"],
        "seq": result["seq"],
        "created_at": result["created_at"],
        "clock_synced": as_flag(result.get("clock_synced")),
        "received_at": now,
        "level": triage["level"],
        "reason": triage["reason"],
        "label": as_text(prediction.get("label")),
        "delegate": as_text(runtime.get("delegate")),
        "degraded": as_flag(runtime.get("degraded")),
        "session_id": as_text(result.get("session_id")),
        "payload": kept_text(result, raw),
        "triage_label": as_text(triage.get("label")),
        "stream": stream_of(result),
        "model": as_text(as_obj(result.get("model")).get("name")),
        "confidence": float(max(scores)) if scores else None,
        "closed_at": None,  # set by review.close
    }


def study_row(study: dict[str, Any], now: float, raw: bytes | None) -> dict[str, Any]:
    """The ``studies`` row of a validated ``edgemed.study/1`` decision."""
    triage = study["triage"]
    return {
        "result_id": study["result_id"],
        "site": study["site"],
        "device_id": study["device_id"],
        "seq": study["seq"],
        "created_at": study["created_at"],
        "received_at": now,
        "level": triage["level"],
        "reason": triage["reason"],
        "frames": as_int(triage.get("frames")),
        "first_seq": as_int(study.get("first_seq")),
        "last_seq": as_int(study.get("last_seq")),
        "session_id": as_text(study.get("session_id")),
        "payload": kept_text(study, raw),
        "triage_label": as_text(triage.get("label")),
        "stream": stream_of(study),
        "closed_at": None,  # set by review.close
    }


def row_key(row: dict[str, Any]) -> tuple[str, str, str, int]:
    """``(site, device_id, stream, seq)`` of a result or study row: what its ``result_id`` must always name."""
    return (row["site"], row["device_id"], row["stream"], row["seq"])
