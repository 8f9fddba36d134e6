"""Fakes at the device's seams (backend, source, publisher), for logic tests of ``edgemed.runtime.Device``.

Only the seams are fake: the device under test still runs the real quality gate, preprocessing, triage,
envelope, outbox (SQLite in a temporary folder) and delivery thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgemed.capture._base import LedgerChanges
from edgemed.deploy import Deployable
from edgemed.manifest import Artifact, InputSpec, Manifest
from edgemed.types import CaptureState, Frame, InputDone, SourceKind, TensorSpec

LABELS = ("benign", "malignant")
# The quantization of a real int8 model: input pixel p -> p - 128; output logit = 0.1 * q.
INPUT = TensorSpec("input", (1, 28, 28, 1), "int8", 1 / 255, -128)
OUTPUT = TensorSpec("logits", (1, 2), "int8", 0.1, 0)


def fake_model(labels: tuple[str, ...] = LABELS) -> Deployable:
    """A checked model as ``check_deployable`` returns it, for a 28x28 gray int8 model that emits logits."""
    artifact = Artifact(
        file="fake_int8.tflite",
        target="int8",
        sha256="0" * 64,
        size_bytes=0,
        output_kind="logits",
        verdict="accepted",
    )
    manifest = Manifest.model_validate(
        {
            "name": "fake",
            "version": "1",
            "created_at": "2025-01-01T00:00:00Z",
            "labels": list(labels),
            "input": InputSpec(height=28, width=28, channels=1, colour_mode="gray").model_dump(),
            "artifacts": [artifact.model_dump()],
        }
    )
    return Deployable(Path("fake_int8.tflite"), Path("fake.manifest.json"), manifest, artifact)


class BrightnessBackend:
    """Says ``malignant`` for bright frames, ``benign`` for dark ones and is unsure in between.

    It reads the quantized input tensor it is given, so a result shows that the frame's own pixels reached the
    model. Records every input it was invoked with.
    """

    input_spec = INPUT
    output_spec = OUTPUT
    backend = "ai_edge_litert"  # the result schema names only real interpreter packages: the one it stands in for
    delegate = "cpu"
    degraded = False
    degraded_reason: str | None = None
    output_kind = "logits"

    def __init__(self) -> None:
        self.inputs: list[np.ndarray] = []
        self.closed = False

    def invoke(self, x: np.ndarray) -> np.ndarray:
        if x.shape != INPUT.shape or x.dtype != np.int8:
            raise ValueError(f"input {x.shape} {x.dtype} is not the model's {INPUT.shape} int8")
        self.inputs.append(x)
        mean = float(x.mean())  # pixel - 128
        if mean > 40:
            return np.array([-30, 30], np.int8)  # malignant: softmax(-3, 3) = 0.9975
        if mean < -40:
            return np.array([30, -30], np.int8)  # benign
        return np.array([1, 0], np.int8)  # 0.525 / 0.475: inconclusive

    def close(self) -> None:
        self.closed = True


def noise(low: int, high: int, seed: int, size: int = 64) -> np.ndarray:
    """A textured gray frame (passes the quality gate) with pixels in ``[low, high)``."""
    return np.random.default_rng(seed).integers(low, high, (size, size), dtype=np.uint8)


DARK = (20, 100)  # mean 60: benign
BRIGHT = (150, 250)  # mean 200: malignant
MID = (80, 180)  # mean 130: inconclusive


class ListSource:
    """A source that yields the given frames and ends (``ended``), as a file, video or DICOM source does."""

    keeps_ledger = False
    ledger_key: str | None = None

    def __init__(self, frames: list[Frame], kind: SourceKind = "video", reconnects: int = 0) -> None:
        self.frames = frames
        self.kind = kind
        self.state: CaptureState = "open"
        self.reconnects = reconnects
        self.closed = False

    def __iter__(self) -> Iterator[Frame]:
        for frame in self.frames:
            if self.closed:
                return
            yield frame
        self.state = "ended"

    def close(self) -> None:
        self.closed = True
        if self.state != "failed":
            self.state = "closed"

    def attach_ledger(self, done: Mapping[str, InputDone], *, history: bool) -> LedgerChanges:
        raise AssertionError("a source that keeps no ledger is never attached to one")


@dataclass(frozen=True)
class Published:
    topic: str
    payload: bytes
    qos: int
    retain: bool


class MemoryLink:
    """An always-connected publisher that acknowledges every QoS 1 message at once, in memory."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.messages: list[Published] = []
        self.connected = False
        self.epoch = 0
        self.connections = 0
        self.stopped: dict[str, Any] | None = None

    def start(self) -> None:
        self.connected = True
        self.connections += 1

    def wait_connected(self, timeout_s: float) -> bool:
        return self.connected

    def check(self) -> None:
        return None

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        on_ack: Callable[[], None] | None = None,
    ) -> None:
        with self._lock:
            self.messages.append(Published(topic, payload, qos, retain))
        if qos == 1 and on_ack is not None:
            on_ack()

    def stop(self, timeout_s: float = 5.0, *, abnormal: str | None = None, extra: dict[str, Any] | None = None) -> None:
        self.connected = False
        self.stopped = {"abnormal": abnormal, "extra": extra}

    def on(self, kind: str) -> list[bytes]:
        """Payloads published on ``.../{kind}``, in publication order."""
        with self._lock:
            return [m.payload for m in self.messages if m.topic.rsplit("/", 1)[1] == kind]
