"""What the ingest accepts: bounded decoding, the fields the dashboard reads, and a length limit on every string.

``classify(topic, payload)`` turns any message into exactly one ``Filing``: a result, a study decision, a status
or a heartbeat to store, an empty retained message to ignore, or a dead letter with a reason. It never raises on
input: a payload the dashboard cannot use is acknowledged and kept in the dead-letter table (see ``store.py``), so
that no message can sit unacknowledged at the broker and fill the session's in-flight window (mosquitto sends
nothing more once 20 messages wait for an acknowledgement, and a retained poison message would block every new
client id too).

Decoding and length limits: ``strict_json.py``. Batches are filed element by element: each element is checked like
a single result on ``.../results``, an element that fails becomes a dead letter of its own (with its ``seq``, so it
is receipted as rejected) and the others are stored, all in the batch's one transaction. A batch that is not one
(bad JSON, too large, the wrong topic ids, too many elements) is one dead letter and settles nothing: which seqs it
held cannot be told for sure.

Reasons never quote payload text, so they are safe to log and to count: their number is bounded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from edgemed.dashboard.batch import encode_element
from edgemed.dashboard.settlement import LOST_MAX_SEQS, lost_seq_count
from edgemed.dashboard.strict_json import MAX_PAYLOAD_BYTES, Rejected, check_strings, decode
from edgemed.receipts import BATCH_MAX_BYTES, BATCH_MAX_RESULTS, BATCH_SCHEMA, Lost, parse_lost

__all__ = [
    "KINDS",
    "LEVELS",
    "MAX_PAYLOAD_BYTES",
    "Filing",
    "Rejected",
    "check_strings",
    "classify",
    "decode",
    "validate_health",
    "validate_result",
    "validate_status",
    "validate_study",
]

LEVELS = ("urgent", "routine", "no_finding", "inconclusive", "recapture", "error")
KINDS = ("results", "studies", "status", "health", "batches", "lost", "receipts")
#: Topic kinds whose messages carry a device's ``seq``: what they hold is settled, stored or refused.
SETTLING_KINDS = ("results", "studies", "batches")


_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_STREAM = re.compile(r"^[0-9a-f]{16}$")

# Heartbeat fields the page reads, by type; a wrong type there is a dead letter, not a blank or a NaN on the page.
_HEALTH_NUMBERS = (
    "uptime_s",
    "frames",
    "errors",
    "recaptures",
    "fps",
    "pending",
    "oldest_pending_s",
    "disk_free_mb",
    "cpu_temp_c",
    "cpu_percent",
    "peak_rss_mb",
)
_HEALTH_FLAGS = ("degraded", "outbox_full", "connected")
_HEALTH_TEXTS = ("delegate", "degraded_reason", "source_state")


FilingKind = Literal["results", "studies", "status", "health", "batch", "lost", "ignored", "dead"]


@dataclass(frozen=True)
class Filing:
    """What one message becomes: something to store, nothing (``ignored``) or a dead letter (``dead``).

    ``site``, ``device_id``, ``seq`` and ``result_id`` are filled in when they could be read, also for a dead
    letter (a receipt can then say which result of which device was refused). ``retained`` is True when the broker
    sent the message as a topic's retained message (again at each new subscription), not as it was published.
    ``stream`` is the device's seq stream (``''`` when it names none or it is unreadable). A ``batch`` holds one
    filing per element in ``elements`` (each a result or a dead letter of its own); ``lost`` holds the parsed
    announcement.
    """

    kind: FilingKind
    topic: str
    payload: bytes
    body: dict[str, Any] | None = None
    reason: str | None = None
    site: str | None = None
    device_id: str | None = None
    seq: int | None = None
    result_id: str | None = None
    retained: bool = False
    stream: str = ""
    elements: tuple[Filing, ...] = ()
    lost: Lost | None = None

    @property
    def stream_key(self) -> tuple[str, str, str] | None:
        """The ``(site, device_id, stream)`` whose receipt this filing changes, or None when it settles nothing."""
        if self.kind == "lost" and self.lost is not None:
            return (self.lost.site, self.lost.device_id, self.lost.stream)
        if self.site is None or self.device_id is None or self.seq is None:
            return None
        if self.kind in ("results", "studies") or (self.kind == "dead" and self.settles_as_dead):
            return (self.site, self.device_id, self.stream)
        return None

    @property
    def settles_as_dead(self) -> bool:
        """A dead letter with a readable ``seq`` on a topic that carries results: it is receipted as rejected."""
        return self.seq is not None and self.topic.rsplit("/", 1)[-1] in SETTLING_KINDS


def _is_int(value: Any, low: int, high: int = 2**63) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value < high


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_common(body: dict[str, Any], schema: str, site: str, device_id: str) -> str | None:
    if body.get("schema") != schema:
        return f"schema is not {schema}"
    if not isinstance(body.get("result_id"), str) or not _HEX32.match(body["result_id"]):
        return "result_id is not 32 lowercase hex digits"
    if body.get("site") != site or body.get("device_id") != device_id:
        return "site/device_id in the payload differ from the topic"
    if not _is_int(body.get("seq"), 0):
        return "seq is not a non-negative 64-bit integer"
    stream = body.get("stream")
    if stream is not None and not (isinstance(stream, str) and _STREAM.match(stream)):
        return "stream is neither absent nor 16 lowercase hex digits"
    if not isinstance(body.get("created_at"), str):
        return "created_at is not a string"
    triage = body.get("triage")
    if not isinstance(triage, dict):
        return "triage is not an object"
    if triage.get("level") not in LEVELS:
        return "triage.level is not a known level"
    if not isinstance(triage.get("reason"), str):
        return "triage.reason is not a string"
    label = triage.get("label")
    if label is not None and not isinstance(label, str):
        return "triage.label is neither absent nor a string"
    return None


def validate_result(body: Any, site: str, device_id: str) -> str | None:
    """Check the fields the dashboard relies on in an ``edgemed.result/1`` envelope.

    This is not the full JSON Schema (the dashboard does not depend on jsonschema): it checks every field the
    store and the page read, and that the payload's site and device id match the topic it came on.

    Args:
        body: the decoded JSON.
        site: the topic's site segment.
        device_id: the topic's device segment.

    Returns:
        None when usable, else a short reason (safe to log: it quotes no payload text).
    """
    if not isinstance(body, dict):
        return "payload is not a JSON object"
    problem = _check_common(body, "edgemed.result/1", site, device_id)
    if problem:
        return problem
    for name in ("runtime", "model"):
        if not isinstance(body.get(name), dict):
            return f"{name} is not an object"
    prediction = body.get("prediction")
    if prediction is not None and not (isinstance(prediction, dict) and isinstance(prediction.get("label"), str)):
        return "prediction is neither null nor an object with a label"
    return _check_ood(body.get("ood"))


_OOD_METHODS = ("energy", "features", "none")
_OOD_SOURCES = ("manifest", "profile")


def _check_ood(ood: Any) -> str | None:
    """The optional ``ood`` object (devices before issue 14 send none): the result page reads every field."""
    if ood is None:
        return None
    if not isinstance(ood, dict):
        return "ood is neither absent nor an object"
    if ood.get("method") not in _OOD_METHODS or ood.get("source") not in _OOD_SOURCES:
        return "ood.method or ood.source is not a known value"
    if not isinstance(ood.get("flagged"), bool):
        return "ood.flagged is not true or false"
    for name in ("score", "threshold"):
        if ood.get(name) is not None and not _is_number(ood[name]):
            return f"ood.{name} is neither null nor a number"
    return None


def validate_study(body: Any, site: str, device_id: str) -> str | None:
    """Check the fields the dashboard relies on in an ``edgemed.study/1`` decision.

    Args:
        body: the decoded JSON.
        site: the topic's site segment.
        device_id: the topic's device segment.

    Returns:
        None when usable, else a short reason.
    """
    if not isinstance(body, dict):
        return "payload is not a JSON object"
    problem = _check_common(body, "edgemed.study/1", site, device_id)
    if problem:
        return problem
    if not _is_int(body["triage"].get("frames"), 1):
        return "triage.frames is not a positive integer"
    return None


def validate_status(body: Any) -> str | None:
    """Check a retained status message (``online``/``offline`` and what the page shows beside it).

    Args:
        body: the decoded JSON.

    Returns:
        None when usable, else a short reason.
    """
    if not isinstance(body, dict):
        return "payload is not a JSON object"
    state = body.get("state")
    # Devices publish "online" and "offline"; MqttLink.publish_status allows other words, shown as sent.
    if not isinstance(state, str) or not 1 <= len(state) <= 32:
        return "status state is not a short word such as online or offline"
    for name in ("reason", "delegate", "model", "error"):
        if body.get(name) is not None and not isinstance(body[name], str):
            return f"status {name} is not a string"
    if body.get("pending") is not None and not _is_int(body["pending"], 0):
        return "status pending is not a non-negative integer"
    for name in ("degraded", "clean"):
        if body.get(name) is not None and not isinstance(body[name], bool):
            return f"status {name} is not true or false"
    return None


def validate_health(body: Any) -> str | None:
    """Check a heartbeat: every field the page reads has the type the page expects (or is null).

    Args:
        body: the decoded JSON.

    Returns:
        None when usable, else a short reason.
    """
    if not isinstance(body, dict):
        return "payload is not a JSON object"
    for name in _HEALTH_NUMBERS:
        if body.get(name) is not None and not _is_number(body[name]):
            return f"heartbeat {name} is not a number"
    for name in _HEALTH_FLAGS:
        if body.get(name) is not None and not isinstance(body[name], bool):
            return f"heartbeat {name} is not true or false"
    for name in _HEALTH_TEXTS:
        if body.get(name) is not None and not isinstance(body[name], str):
            return f"heartbeat {name} is not a string"
    latency = body.get("latency_ms")
    if latency is not None:
        if not isinstance(latency, dict):
            return "heartbeat latency_ms is not an object"
        if any(latency.get(q) is not None and not _is_number(latency[q]) for q in ("p50", "p95")):
            return "heartbeat latency_ms.p50/p95 is not a number"
    return None


_VALIDATORS = {
    "results": validate_result,
    "studies": validate_study,
}


def _identity(body: Any) -> tuple[int | None, str | None, str]:
    if not isinstance(body, dict):
        return None, None, ""
    seq = body.get("seq") if _is_int(body.get("seq"), 0) else None
    rid = body.get("result_id")
    stream = body.get("stream")
    stream = stream if isinstance(stream, str) and _STREAM.match(stream) else ""
    return seq, rid if isinstance(rid, str) and _HEX32.match(rid) else None, stream


def check_payload(kind: str, body: Any, site: str, device_id: str) -> None:
    """Check a decoded result, study decision, status or heartbeat the way ``classify`` does.

    Args:
        kind: the topic kind (``results``, ``studies``, ``status``, ``health``).
        body: the decoded JSON.
        site: the topic's site segment.
        device_id: the topic's device segment.

    Raises:
        Rejected: the payload is not usable; the reason quotes none of it.
    """
    problem = _VALIDATORS[kind](body, site, device_id) if kind in _VALIDATORS else None
    if problem is None and kind == "status":
        problem = validate_status(body)
    elif problem is None and kind == "health":
        problem = validate_health(body)
    if problem is not None:
        raise Rejected(problem)
    check_strings(body, kind)


def filing_of(
    kind: str, topic: str, payload: bytes, body: Any, site: str, device_id: str, retained: bool = False
) -> Filing:
    """The filing of one decoded result, study decision, status or heartbeat: checked, or a dead letter.

    Args:
        kind: the topic kind.
        topic: the MQTT topic (a batch's for its elements).
        payload: the bytes kept with it (the element re-encoded, for a batch).
        body: the decoded JSON.
        site: the topic's site segment.
        device_id: the topic's device segment.
        retained: it came as a retained message.

    Returns:
        The filing (``dead`` with the reason, and the ``seq`` and stream when readable, if it is not usable).
    """
    seq, rid, stream = _identity(body)
    try:
        check_payload(kind, body, site, device_id)
    except Rejected as exc:
        return Filing("dead", topic, payload, None, exc.reason, site, device_id, seq, rid, retained, stream)
    return Filing(kind, topic, payload, body, None, site, device_id, seq, rid, retained, stream)  # type: ignore[arg-type]


def _elements(body: Any, site: str, device_id: str) -> list[Any]:
    if not isinstance(body, dict) or body.get("schema") != BATCH_SCHEMA:
        raise Rejected(f"schema is not {BATCH_SCHEMA}")
    if body.get("site") != site or body.get("device_id") != device_id:
        raise Rejected("site/device_id in the batch differ from the topic")
    if set(body) != {"schema", "site", "device_id", "results"}:
        raise Rejected("a batch has exactly the fields schema, site, device_id and results")
    results = body["results"]
    if not isinstance(results, list) or not 1 <= len(results) <= BATCH_MAX_RESULTS:
        raise Rejected(f"batch results is not a list of 1 to {BATCH_MAX_RESULTS} result envelopes")
    return results


def classify_batch(topic: str, payload: bytes, site: str, device_id: str, retained: bool) -> Filing:
    """Classify one ``edgemed.batch/1`` message: a ``batch`` filing with one filing per element, or a dead letter.

    Args:
        topic: ``edgemed/{site}/{device_id}/batches``.
        payload: the raw bytes (at most ``receipts.BATCH_MAX_BYTES``).
        site: the topic's site.
        device_id: the topic's device id.
        retained: it came as a retained message.

    Returns:
        The filing; never raises on input.
    """
    try:
        elements = _elements(decode(payload, max_bytes=BATCH_MAX_BYTES), site, device_id)
    except Rejected as exc:
        return Filing("dead", topic, payload, None, exc.reason, site, device_id, retained=retained)
    filed = []
    for element in elements:
        one = filing_of("results", topic, encode_element(element), element, site, device_id, retained)
        if one.kind == "dead":
            one = Filing(
                "dead",
                topic,
                one.payload,
                reason=f"batch element: {one.reason}",
                site=site,
                device_id=device_id,
                seq=one.seq,
                result_id=one.result_id,
                retained=retained,
                stream=one.stream,
            )
        filed.append(one)
    return Filing("batch", topic, payload, site=site, device_id=device_id, retained=retained, elements=tuple(filed))


def classify_lost(topic: str, payload: bytes, site: str, device_id: str, retained: bool) -> Filing:
    """Classify one ``edgemed.lost/1`` announcement: a ``lost`` filing, or a dead letter.

    Args:
        topic: ``edgemed/{site}/{device_id}/lost``.
        payload: the raw bytes.
        site: the topic's site.
        device_id: the topic's device id.
        retained: it came as a retained message.

    Returns:
        The filing; never raises on input.
    """
    try:
        lost = parse_lost(payload)
    except ValueError as exc:
        return Filing(
            "dead", topic, payload, None, f"not a lost announcement: {exc}", site, device_id, retained=retained
        )
    if (lost.site, lost.device_id) != (site, device_id):
        reason = "site/device_id in the lost announcement differ from the topic"
        return Filing("dead", topic, payload, None, reason, site, device_id, retained=retained)
    if lost_seq_count(lost) > LOST_MAX_SEQS:
        reason = f"a lost announcement names more than {LOST_MAX_SEQS} seqs"
        return Filing("dead", topic, payload, None, reason, site, device_id, retained=retained)
    return Filing("lost", topic, payload, site=site, device_id=device_id, retained=retained, lost=lost)


def classify(topic: str, payload: bytes, *, retained: bool = False) -> Filing:
    """Decide what one message is; never raises on input.

    Args:
        topic: the MQTT topic.
        payload: the raw payload.
        retained: the broker sent it as the topic's retained message (``Message.retain``).

    Returns:
        The filing: ``results``/``studies``/``status``/``health`` with the decoded body, ``ignored`` for an empty
        payload (a retained message being cleared) or ``dead`` with the reason.
    """
    parts = topic.split("/")
    if len(parts) != 4 or parts[0] != "edgemed" or parts[3] not in KINDS:
        reason = "topic is not edgemed/{site}/{device_id}/{" + "|".join(KINDS) + "}"
        return Filing("dead", topic, payload, reason=reason, retained=retained)
    _, site, device_id, kind = parts
    if not _ID.match(site) or not _ID.match(device_id):
        reason = "site or device id in the topic has characters other than A-Z a-z 0-9 _ -"
        return Filing("dead", topic, payload, reason=reason, retained=retained)
    if not payload or kind == "receipts":
        # An empty payload clears a retained topic; receipts are the consumers' own messages to the devices.
        return Filing("ignored", topic, payload, site=site, device_id=device_id, retained=retained)
    if kind in ("batches", "lost"):
        classify_other = classify_batch if kind == "batches" else classify_lost
        return classify_other(topic, payload, site, device_id, retained)
    try:
        body = decode(payload)
    except Rejected as exc:
        return Filing("dead", topic, payload, None, exc.reason, site, device_id, retained=retained)
    return filing_of(kind, topic, payload, body, site, device_id, retained)
