"""The contract between a device and its consumer of record: receipts, lost ranges, batches and consumer state.

Both sides import this module (it has no dependency beyond the standard library), so the topic names, the message
shapes and the arithmetic of "which ``seq`` is settled" exist once.

Why receipts. A broker is not a store of record: mosquitto acknowledges a QoS 1 publish before it writes it to disk
(``autosave_interval`` 1800 s by default) and keeps at most ``max_queued_messages`` (1000) for a disconnected
persistent subscriber. A device that deletes a result on the broker's PUBACK can therefore lose it silently. With a
consumer named in its profile (``delivery.consumer``), a device keeps each result until the consumer (the
dashboard) says it has stored it.

Messages (JSON Schemas in ``edgemed/schemas/``):

* ``edgemed.receipt/1`` on ``edgemed/{site}/{device_id}/receipts`` (QoS 1, retained, published by the consumer):
  for one ``stream`` of one device, every ``seq`` up to ``through_seq`` is settled; above it, every ``seq`` up to
  ``max_seq`` is settled except those in ``missing`` (inclusive ``[first, last]`` ranges); nothing is known of a
  ``seq`` above ``max_seq``. A ``seq`` is settled when its result or study decision is stored, when its payload was
  kept as a dead letter (refused: sending it again would not help), or when the device announced it lost.
* ``edgemed.lost/1`` on ``edgemed/{site}/{device_id}/lost`` (QoS 1, from the device): ranges of ``seq`` the device
  no longer holds and never will (evicted by ``on_full: evict_oldest``, or missing from a damaged outbox), so the
  consumer can settle them and show them as lost at the device.
* ``edgemed.batch/1`` on ``edgemed/{site}/{device_id}/batches`` (QoS 1, from the device, when ``publish.batch`` is
  on): several complete ``edgemed.result/1`` envelopes in one message, bounded in count and bytes.
* consumer state on ``edgemed-consumer/{consumer_id}/{process}`` (retained; ``offline`` is also the process's last
  will): outside the device namespace ``edgemed/{site}/{device_id}/...``, which no ``edgemed-consumer`` prefix can
  equal. The consumer is online while any of its processes says ``online``; unknown counts as offline.

``stream``: a device's ``seq`` counter lives in its data directory. A device re-flashed with a fresh data directory
starts again at 0 under the same device id, so a receipt names the stream it is about (``stream_id``, derived from
the data directory's device secret): a receipt of the old stream never releases a result of the new one.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

RECEIPT_SCHEMA = "edgemed.receipt/1"
LOST_SCHEMA = "edgemed.lost/1"
BATCH_SCHEMA = "edgemed.batch/1"
CONSUMER_SCHEMA = "edgemed.consumer/1"

CONSUMER_PREFIX = "edgemed-consumer"
DEFAULT_CONSUMER_ID = "dashboard"

#: Most ``missing`` ranges one receipt lists (and ranges one lost announcement carries); beyond them the receipt's
#: ``max_seq`` stops before the first range left out, so the device learns of the rest from a later receipt.
MAX_RANGES = 64
#: Most ``seq`` numbers one lost announcement may name (a consumer refuses more); ``lost_messages`` splits.
MAX_LOST_SEQS = 50_000
#: Most results and bytes one batch may hold: what a consumer accepts. A device's ``publish.batch`` stays below.
BATCH_MAX_RESULTS = 1000
BATCH_MAX_BYTES = 1024 * 1024

_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_STREAM = re.compile(r"^[0-9a-f]{16}$")

SeqRange = tuple[int, int]


# -- topics ---------------------------------------------------------------------------------------------------------


def device_topic(site: str, device_id: str, kind: str) -> str:
    """``edgemed/{site}/{device_id}/{kind}`` (``kind``: results, studies, batches, lost, receipts, status, health)."""
    return f"edgemed/{site}/{device_id}/{kind}"


def consumer_topic(consumer_id: str, process: str) -> str:
    """Where one process of a consumer publishes its retained ``online``/``offline`` state.

    Raises:
        ValueError: an id outside ``[A-Za-z0-9_-]{1,64}`` (it would break the topic).
    """
    for name, value in (("consumer id", consumer_id), ("consumer process", process)):
        if not _ID.match(value):
            raise ValueError(f"{name} {value!r} is invalid: use 1-64 letters, digits, '_' or '-'")
    return f"{CONSUMER_PREFIX}/{consumer_id}/{process}"


def consumer_filter(consumer_id: str) -> str:
    """The filter a device subscribes to for the state of every process of its consumer."""
    return f"{CONSUMER_PREFIX}/{consumer_id}/+"


def stream_id(secret: bytes) -> str:
    """The stream a data directory's ``seq`` counter belongs to: 16 hex digits derived from its device secret.

    The secret never leaves the device; this HMAC of a fixed label reveals nothing of it.
    """
    return hmac.new(secret, b"edgemed seq stream", hashlib.sha256).hexdigest()[:16]


# -- ranges ---------------------------------------------------------------------------------------------------------


def to_ranges(seqs: Iterable[int]) -> list[SeqRange]:
    """Sorted, merged inclusive ranges of the given numbers: ``[1, 2, 3, 7]`` -> ``[(1, 3), (7, 7)]``."""
    out: list[SeqRange] = []
    for s in sorted(set(seqs)):
        if out and s == out[-1][1] + 1:
            out[-1] = (out[-1][0], s)
        else:
            out.append((s, s))
    return out


def merge_ranges(ranges: Iterable[SeqRange]) -> list[SeqRange]:
    """Sorted union of inclusive ranges; touching ranges (``(1, 3), (4, 5)``) become one."""
    out: list[SeqRange] = []
    for first, last in sorted(ranges):
        if out and first <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], last))
        else:
            out.append((first, last))
    return out


@dataclass(frozen=True)
class Progress:
    """What a consumer can say of one stream: ``through_seq``, ``missing`` ranges and ``max_seq`` (see above)."""

    through_seq: int
    missing: tuple[SeqRange, ...] = ()
    max_seq: int = -1

    def settles(self, seq: int) -> bool:
        """True when ``seq`` is settled at the consumer."""
        if seq <= self.through_seq:
            return True
        if seq > self.max_seq:
            return False
        return not any(first <= seq <= last for first, last in self.missing)


def progress(through_seq: int, settled: Iterable[SeqRange], *, max_ranges: int = MAX_RANGES) -> Progress:
    """Advance a stream's ``through_seq`` over what is settled above it, and list the holes that remain.

    Args:
        through_seq: every ``seq`` up to it was already settled (-1 when none is).
        settled: inclusive ranges of settled ``seq`` (stored, dead-lettered or announced lost), in any order;
            ranges at or below ``through_seq`` are allowed and change nothing.
        max_ranges: most ``missing`` ranges to list; ``max_seq`` then stops before the first one left out.

    Returns:
        The new ``through_seq``, the ``missing`` ranges above it and ``max_seq``.
    """
    through = through_seq
    above: list[SeqRange] = []
    for first, last in merge_ranges(settled):
        if last <= through:
            continue
        if not above and first <= through + 1:
            through = last
        else:
            above.append((max(first, through + 1), last))
    missing: list[SeqRange] = []
    max_seq = through
    previous_end = through
    for first, last in above:
        if len(missing) == max_ranges:
            break
        missing.append((previous_end + 1, first - 1))
        previous_end = max_seq = last
    return Progress(through, tuple(missing), max_seq)


# -- receipts -------------------------------------------------------------------------------------------------------


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


@dataclass(frozen=True)
class Receipt:
    """One ``edgemed.receipt/1`` message."""

    consumer: str
    site: str
    device_id: str
    stream: str
    state: Progress
    at: float = field(default_factory=time.time)

    def encode(self) -> bytes:
        """The message as compact JSON bytes."""
        body = {
            "schema": RECEIPT_SCHEMA,
            "consumer": self.consumer,
            "site": self.site,
            "device_id": self.device_id,
            "stream": self.stream,
            "through_seq": self.state.through_seq,
            "missing": [list(r) for r in self.state.missing],
            "max_seq": self.state.max_seq,
            "at": _iso(self.at),
        }
        return json.dumps(body, separators=(",", ":")).encode()


def _int(body: dict[str, Any], key: str, low: int) -> int:
    value = body.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value < 2**63:
        raise ValueError(f"{key} must be an integer of at least {low}")
    return value


def _ranges(value: Any, low: int, high: int) -> tuple[SeqRange, ...]:
    if not isinstance(value, list) or len(value) > MAX_RANGES:
        raise ValueError(f"ranges must be a list of at most {MAX_RANGES} [first, last] pairs")
    out: list[SeqRange] = []
    for item in value:
        pair = isinstance(item, list) and len(item) == 2
        ok = pair and all(isinstance(v, int) and not isinstance(v, bool) for v in item)
        if not ok or not low <= item[0] <= item[1] <= high or (out and item[0] <= out[-1][1]):
            raise ValueError(f"ranges must be sorted, disjoint [first, last] pairs between {low} and {high}")
        out.append((item[0], item[1]))
    return tuple(out)


def _object(payload: bytes, schema: str) -> dict[str, Any]:
    if len(payload) > 64 * 1024:
        raise ValueError(f"a {schema} message is never larger than 64 KiB")
    try:
        body = json.loads(payload)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"not JSON ({type(exc).__name__})") from exc
    if not isinstance(body, dict) or body.get("schema") != schema:
        raise ValueError(f"not an {schema} message")
    return body


def _ids(body: dict[str, Any], keys: Sequence[str]) -> dict[str, str]:
    out = {}
    for key in keys:
        value = body.get(key)
        if not isinstance(value, str) or not _ID.match(value):
            raise ValueError(f"{key} must match [A-Za-z0-9_-]{{1,64}}")
        out[key] = value
    return out


def _stream(body: dict[str, Any]) -> str:
    stream = body.get("stream")
    if not isinstance(stream, str) or not (stream == "" or _STREAM.match(stream)):
        raise ValueError("stream must be 16 lower-case hex digits (or empty for a device without one)")
    return stream


def parse_receipt(payload: bytes) -> Receipt:
    """Read an ``edgemed.receipt/1`` message.

    Raises:
        ValueError: it is not one, or its fields are inconsistent (the device then ignores it).
    """
    body = _object(payload, RECEIPT_SCHEMA)
    texts = _ids(body, ("consumer", "site", "device_id"))
    stream = _stream(body)
    through = _int(body, "through_seq", -1)
    max_seq = _int(body, "max_seq", through)
    missing = _ranges(body.get("missing"), through + 1, max_seq)
    return Receipt(texts["consumer"], texts["site"], texts["device_id"], stream, Progress(through, missing, max_seq))


# -- lost announcements ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lost:
    """One ``edgemed.lost/1`` message: ``seq`` ranges a device no longer holds and never will, and why."""

    site: str
    device_id: str
    stream: str
    ranges: tuple[SeqRange, ...]
    reason: str
    at: float = field(default_factory=time.time)

    def encode(self) -> bytes:
        """The message as compact JSON bytes."""
        body = {
            "schema": LOST_SCHEMA,
            "site": self.site,
            "device_id": self.device_id,
            "stream": self.stream,
            "ranges": [list(r) for r in self.ranges],
            "reason": self.reason,
            "at": _iso(self.at),
        }
        return json.dumps(body, separators=(",", ":")).encode()


def lost_messages(site: str, device_id: str, stream: str, ranges: Iterable[SeqRange], reason: str) -> list[Lost]:
    """Announcements for lost ``seq`` ranges (``to_ranges`` turns numbers into ranges).

    Each message holds at most ``MAX_RANGES`` ranges and ``MAX_LOST_SEQS`` numbers (a longer range is split): the
    consumer settles every number of an announcement in the transaction that stores it, so one message must stay
    a bounded amount of work (a million numbers took 11 s on PostgreSQL, stalling every other message).
    """
    out: list[Lost] = []
    group: list[SeqRange] = []
    count = 0
    for first, last in merge_ranges(ranges):
        while first <= last:
            if len(group) == MAX_RANGES or count == MAX_LOST_SEQS:
                out.append(Lost(site, device_id, stream, tuple(group), reason))
                group, count = [], 0
            end = min(last, first + (MAX_LOST_SEQS - count) - 1)
            group.append((first, end))
            count += end - first + 1
            first = end + 1
    if group:
        out.append(Lost(site, device_id, stream, tuple(group), reason))
    return out


def parse_lost(payload: bytes) -> Lost:
    """Read an ``edgemed.lost/1`` message.

    Raises:
        ValueError: it is not one.
    """
    body = _object(payload, LOST_SCHEMA)
    texts = _ids(body, ("site", "device_id"))
    stream = _stream(body)
    reason = body.get("reason")
    if not isinstance(reason, str) or not 0 < len(reason) <= 200:
        raise ValueError("reason must be a text of 1-200 characters")
    ranges = _ranges(body.get("ranges"), 0, 2**63 - 1)
    if not ranges:
        raise ValueError("ranges must list at least one [first, last] pair")
    return Lost(texts["site"], texts["device_id"], stream, ranges, reason)


# -- batches --------------------------------------------------------------------------------------------------------


def batch_payload(site: str, device_id: str, envelopes: Sequence[bytes]) -> bytes:
    """One ``edgemed.batch/1`` message holding the given result envelopes byte for byte.

    Each envelope is already compact JSON (``edgemed.envelope.encode``): it is embedded as it is, so a consumer
    that re-encodes an element compactly gets back the bytes the device committed.
    """
    head = json.dumps({"schema": BATCH_SCHEMA, "site": site, "device_id": device_id}, separators=(",", ":"))
    return head[:-1].encode() + b',"results":[' + b",".join(envelopes) + b"]}"


# -- consumer state -------------------------------------------------------------------------------------------------


class ConsumerPresence:
    """Whether a device's consumer of record is online, from its processes' retained state messages.

    Thread-safe: messages arrive on the network thread, the delivery thread asks ``online``.
    """

    def __init__(self, consumer_id: str) -> None:
        """Args:
        consumer_id: the consumer named by the profile (``delivery.consumer``).
        """
        self.consumer_id = consumer_id
        self._prefix = f"{CONSUMER_PREFIX}/{consumer_id}/"
        self._lock = threading.Lock()
        self._states: dict[str, bool] = {}
        self._changed_at = time.monotonic()

    def reset(self) -> None:
        """Forget every state (at each new connection: the retained ones come again with the subscription)."""
        with self._lock:
            was = any(self._states.values())
            self._states.clear()
            if was:
                self._changed_at = time.monotonic()

    def update(self, topic: str, payload: bytes) -> bool:
        """Take one state message; returns True when it was one of this consumer's (whatever it said).

        An empty payload (a cleared retained topic) or one that is not readable counts as offline for that process.
        """
        if not topic.startswith(self._prefix) or "/" in topic[len(self._prefix) :]:
            return False
        process = topic[len(self._prefix) :]
        try:
            body = json.loads(payload) if payload else {}
        except (UnicodeDecodeError, ValueError):
            body = {}
        up = isinstance(body, dict) and body.get("state") == "online"
        with self._lock:
            was = any(self._states.values())
            self._states[process] = up
            if any(self._states.values()) != was:
                self._changed_at = time.monotonic()
        return True

    @property
    def online(self) -> bool:
        """True while any process of the consumer says ``online``."""
        with self._lock:
            return any(self._states.values())

    def online_for_s(self) -> float:
        """Seconds since the consumer came online (0 while it is offline)."""
        with self._lock:
            up = any(self._states.values())
            return time.monotonic() - self._changed_at if up else 0.0
