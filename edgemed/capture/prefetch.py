"""Reading ahead: a source is read and decoded on a capture thread while the runtime works on earlier frames.

The image decoders (libjpeg-turbo via OpenCV, pydicom's codecs) release the GIL, so decoding the next frame
overlaps the quality gate, inference, triage and the outbox on the runtime's thread. The quality gate and
preprocessing stay on the runtime's thread: with them on the capture thread the cine benchmark ran 13% slower
(the capture thread became the bottleneck).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Generator, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from edgemed.capture import FrameSource
    from edgemed.types import Frame

log = logging.getLogger("edgemed.capture")

T = TypeVar("T")
_END = object()
# Longer than a source's own open and read timeouts (10 s by default), which bound how long the capture thread
# can be inside a decoder or a stream open after it was told to stop.
_JOIN_TIMEOUT_S = 30.0


def read_ahead(
    source: FrameSource, stop: threading.Event, depth: int = 4
) -> Generator[tuple[Frame, float], None, None]:
    """The source's frames, each with the milliseconds its read and decode took, read ``depth`` frames ahead.

    Args:
        source: an open source (its ledger attached, if it keeps one).
        stop: when set, the capture thread stops after its current read.
        depth: how many frames may wait, decoded, for the consumer.

    Returns:
        A generator; close it (or leave it by an exception) to stop and join the capture thread. Errors the
        source raises (``CaptureError``, ``ConfigError``) re-raise in the consumer.
    """
    return prefetch(timed(source), stop, depth)


def timed(source: FrameSource) -> Iterator[tuple[Frame, float]]:
    """The source's frames with the time each took to read and decode, in milliseconds.

    Run on the capture thread (see :func:`read_ahead`), that is the source's own time, not the time the
    consumer waited for it.
    """
    frames = iter(source)
    while True:
        t0 = time.perf_counter()
        frame = next(frames, None)
        if frame is None:
            return
        yield frame, (time.perf_counter() - t0) * 1e3


def prefetch(items: Iterable[T], stop: threading.Event, depth: int = 4) -> Generator[T, None, None]:
    """Iterate ``items`` on a background thread, ``depth`` items ahead; exceptions re-raise in the consumer.

    Closing the generator (or leaving it by an exception, once it is closed) stops the thread and joins it: a
    capture thread still inside a decoder when the process exits can abort it from C++ ("terminate called
    without an active exception", seen once when a refused broker ended a run mid-frame).
    """
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    done = threading.Event()

    def put(item: Any) -> bool:
        while not (stop.is_set() or done.is_set()):
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer thread, which re-raises it
            put(exc)
            return
        put(_END)

    thread = threading.Thread(target=produce, name="edgemed-capture", daemon=True)
    thread.start()
    try:
        while True:
            try:
                item = q.get(timeout=0.1)
            except queue.Empty:
                if not thread.is_alive() and q.empty():
                    return  # stopped: the producer gave up putting
                continue
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        done.set()
        thread.join(timeout=_JOIN_TIMEOUT_S)
        if thread.is_alive():
            log.warning("the capture thread did not stop within 30 s; the source may be hung")
