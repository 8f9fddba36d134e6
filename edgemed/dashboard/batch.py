"""Batches of results (``edgemed.batch/1`` on ``.../batches``) and lost announcements (``edgemed.lost/1``).

A batch is filed like the results it holds: each element is checked like a single result on ``.../results``, an
element that fails becomes a dead letter of its own (with its ``seq``, so it is receipted as rejected) and the
others are stored, all in the batch's one transaction. What the store keeps of an element is the element
re-encoded compactly (``ensure_ascii=False``, as ``edgemed.envelope.encode`` writes it): that is byte for byte
what the device embedded (``receipts.batch_payload``), so ``edgemed dashboard export`` gives back the bytes the
device committed. A batch that is not one (bad JSON, too large, the wrong topic ids, too many elements) is one dead
letter and settles nothing: which seqs it held cannot be told for sure.
"""

from __future__ import annotations

import json
from typing import Any

from edgemed.dashboard.settlement import LOST_MAX_SEQS, lost_seq_count
from edgemed.dashboard.validate import Filing, Rejected, decode, filing_of
from edgemed.receipts import BATCH_MAX_BYTES, BATCH_MAX_RESULTS, BATCH_SCHEMA, parse_lost


def summarize_batch(outcomes: list[str]) -> str:
    """A batch's outcome from its elements': ``batch: S stored, D duplicates, R rejected``."""
    stored = outcomes.count("stored")
    duplicates = outcomes.count("duplicate")
    return f"batch: {stored} stored, {duplicates} duplicates, {len(outcomes) - stored - duplicates} rejected"


def encode_element(element: Any) -> bytes:
    """A batch element as the device encoded it: compact UTF-8 JSON, non-ASCII kept as it is."""
    return json.dumps(element, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


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
