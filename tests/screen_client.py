"""Helpers for the screen's tests: a Server-Sent Events client (http.client on the loopback, bounded reads) and
typed results as the runtime makes them."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from edgemed.types import Frame, FrameResult, OodCheck, Prediction, QualityReport, TriageResult

GOOD = QualityReport(True, 50.0, 0.5, 0.0)


class EventStream:
    """``GET /events`` on a screen; :meth:`next` parses one event at a time (socket reads time out)."""

    def __init__(self, port: int, timeout_s: float = 5.0, host: str | None = None) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
        self.conn.putrequest("GET", "/events", skip_host=True)
        self.conn.putheader("Host", host or f"127.0.0.1:{port}")
        self.conn.putheader("Accept", "text/event-stream")
        self.conn.endheaders()
        self.response = self.conn.getresponse()
        self.raw: list[bytes] = []  # every line read, as sent

    @property
    def status(self) -> int:
        return self.response.status

    def next(self) -> tuple[str, dict[str, Any] | None, list[bytes]]:
        """The next event: its name (``""`` for a field-only block such as ``retry:``), its JSON data, its lines."""
        lines: list[bytes] = []
        while True:
            line = self.response.readline()
            if not line:
                raise EOFError("the event stream ended")
            self.raw.append(line)
            if line == b"\n":
                if lines:
                    break
                continue
            lines.append(line)
        name, data = "", None
        for line in lines:
            field, _, value = line.decode().rstrip("\n").partition(": ")
            if field == "event":
                name = value
            elif field == "data":
                data = json.loads(value)
        return name, data, lines

    def until(
        self, event: str, pred: Callable[[dict[str, Any]], bool] = lambda d: True, timeout_s: float = 10.0
    ) -> dict[str, Any]:
        """Read events until one named ``event`` whose data satisfies ``pred`` (bounded by ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            name, data, _ = self.next()
            if name == event and data is not None and pred(data):
                return data
        raise TimeoutError(f"no {event!r} event matched within {timeout_s} s")

    def close(self) -> None:
        self.conn.close()


def result(
    seq: int,
    level: str = "urgent",
    *,
    probs: tuple[float, float] | None = (0.07, 0.93),
    quality: QualityReport | None = GOOD,
    ood: OodCheck | None = None,
    reason: str = "malignant (0.93): refer now",
    extra: dict[str, Any] | None = None,
) -> FrameResult:
    """A typed result as the runtime makes it."""
    return FrameResult(
        frame=Frame(index=seq, source_kind="folder", image=None, name=f"MRN-{seq}.png"),
        seq=seq,
        result_id=f"r{seq}",
        created_at=0.0,
        clock_synced=True,
        session_id=None,
        quality=quality,
        prediction=Prediction(("benign", "malignant"), probs) if probs is not None else None,
        triage=TriageResult(level, reason, extra or {}),  # type: ignore[arg-type]
        latency_ms={"total": 1.0},
        ood=ood,
    )


def image(seed: int = 0, shape: tuple[int, ...] = (96, 128, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)
