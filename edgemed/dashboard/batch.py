"""Batches of results (``edgemed.batch/1`` on ``.../batches``): what the store keeps of each element, and outcomes.

Each element is classified like a single result (``validate.classify_batch``). What the store keeps of an element
is the element re-encoded compactly (``ensure_ascii=False``, as ``edgemed.envelope.encode`` writes it): that is
byte for byte what the device embedded (``receipts.batch_payload``), so ``edgemed dashboard export`` gives back the
bytes the device committed.
"""

from __future__ import annotations

import json
from typing import Any


def summarize_batch(outcomes: list[str]) -> str:
    """A batch's outcome from its elements': ``batch: S stored, D duplicates, R rejected``."""
    stored = outcomes.count("stored")
    duplicates = outcomes.count("duplicate")
    return f"batch: {stored} stored, {duplicates} duplicates, {len(outcomes) - stored - duplicates} rejected"


def encode_element(element: Any) -> bytes:
    """A batch element as the device encoded it: compact UTF-8 JSON, non-ASCII kept as it is."""
    return json.dumps(element, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
