"""Strict, bounded JSON for everything a device sends the dashboard, and a length limit on every string.

Decoding is bounded: at most ``MAX_PAYLOAD_BYTES``; strict UTF-8; at most ``MAX_DEPTH`` levels of nesting (a
thousand ``[`` make Python's parser raise ``RecursionError``); no ``NaN``/``Infinity`` and no number that only
becomes one (``1e999``), because non-finite numbers are not JSON and would reach the web page's JSON; integers of
at most ``MAX_INT_DIGITS`` digits; no lone surrogate escapes (``"\\ud800"``), which SQLite cannot store as text; no
object with the same key twice (``{"triage": {urgent}, "triage": {routine}}``): JSON parsers disagree on which one
counts, so the dashboard would file one reading while the stored copy, or another consumer, shows the other.

Length limits. A device (or anyone who can publish on the broker) controls every string of a payload; a 20,000
character triage reason froze the page for everyone. Each string the dashboard stores or shows has a limit in
``FIELD_LIMITS``; every other string has ``MAX_TEXT`` and every object key ``MAX_KEY``. A payload over a limit is
not shortened (the store never alters a result): it becomes a dead letter with its raw bytes.

Reasons never quote payload text, so they are safe to log and to count: their number is bounded.
"""

from __future__ import annotations

import json
import math
from typing import Any

from edgemed.dashboard.limits import FIELD_LIMITS, MAX_KEY, MAX_TEXT

MAX_PAYLOAD_BYTES = 256 * 1024  # a result is about 1 KB; anything this big is not from a device of ours
MAX_DEPTH = 32  # a result nests 3 levels deep
MAX_INT_DIGITS = 40


class Rejected(ValueError):
    """A payload the dashboard cannot use; ``reason`` says why without quoting it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _refuse_constant(name: str) -> Any:
    raise Rejected("payload has a non-finite number (NaN or Infinity)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise Rejected("payload has a non-finite number (NaN or Infinity)")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise Rejected("payload has an object with the same key twice")
    return obj


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise Rejected(f"payload has a number with more than {MAX_INT_DIGITS} digits")
    return int(text)


def decode(payload: bytes, max_bytes: int = MAX_PAYLOAD_BYTES) -> Any:
    """Parse a payload as strict, bounded JSON.

    Args:
        payload: the raw bytes.
        max_bytes: the largest payload accepted (a batch may be larger than one result).

    Returns:
        The decoded value.

    Raises:
        Rejected: too large, not UTF-8, not JSON, nested too deep, a non-finite or huge number, a lone surrogate,
            an object with a key twice.
    """
    if len(payload) > max_bytes:
        raise Rejected(f"payload larger than {max_bytes // 1024} KB")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Rejected("payload is not JSON (not UTF-8 text)") from exc
    try:
        value = json.loads(
            text,
            object_pairs_hook=_unique_keys,
            parse_constant=_refuse_constant,
            parse_float=_finite_float,
            parse_int=_bounded_int,
        )
    except Rejected:
        raise
    except RecursionError as exc:
        raise Rejected(f"payload nests deeper than {MAX_DEPTH} levels") from exc
    except ValueError as exc:
        raise Rejected("payload is not JSON") from exc
    return value


def _text_ok(value: str) -> bool:
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_strings(body: Any, kind: str) -> None:
    """Walk the decoded payload once: nesting depth, every string's length and every key's length.

    Args:
        body: the decoded JSON.
        kind: the topic kind, which selects the ``FIELD_LIMITS`` table.

    Raises:
        Rejected: nested deeper than ``MAX_DEPTH``, a string over its limit, a key over ``MAX_KEY``, a lone
            surrogate.
    """
    limits = FIELD_LIMITS.get(kind, {})
    stack: list[tuple[Any, str, int]] = [(body, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            limit = limits.get(path, MAX_TEXT)
            if len(value) > limit:
                where = path if path in limits else "a string in the payload"
                raise Rejected(f"{where} is longer than {limit} characters")
            if not _text_ok(value):
                raise Rejected("payload has text that is not valid Unicode (a lone surrogate escape)")
        elif isinstance(value, (dict, list)):
            if depth >= MAX_DEPTH:
                raise Rejected(f"payload nests deeper than {MAX_DEPTH} levels")
            if isinstance(value, list):
                stack.extend((item, path + "[]", depth + 1) for item in value)
                continue
            for key, item in value.items():
                if len(key) > MAX_KEY:
                    raise Rejected(f"an object key is longer than {MAX_KEY} characters")
                if not _text_ok(key):
                    raise Rejected("payload has text that is not valid Unicode (a lone surrogate escape)")
                stack.append((item, f"{path}.{key}" if path else key, depth + 1))
