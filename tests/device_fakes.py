"""Fakes at the device's seams (backend, source, publisher), for logic tests of ``edgemed.runtime.Device``.

Only the seams are fake: the device under test still runs the real quality gate, preprocessing, triage,
envelope, outbox (SQLite in a temporary folder) and delivery thread. The publisher is the project's in-memory one
(``tests/fakes.py``), acknowledging at once.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
from fakes import FakePublisher

from edgemed.capture._base import LedgerChanges
from edgemed.deploy import Deployable
from edgemed.errors import ModelError
from edgemed.manifest import Artifact, InputSpec, Manifest
from edgemed.publish.publisher import AckCallback
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
    output_specs = (OUTPUT,)
    backend = "ai_edge_litert"  # the result schema names only real interpreter packages: the one it stands in for
    delegate = "cpu"
    degraded = False
    degraded_reason: str | None = None
    output_kind = "logits"

    def __init__(self) -> None:
        self.inputs: list[np.ndarray] = []
        self.closed = False
        self._last: np.ndarray | None = None

    def invoke(self, x: np.ndarray) -> np.ndarray:
        if x.shape != INPUT.shape or x.dtype != np.int8:
            raise ValueError(f"input {x.shape} {x.dtype} is not the model's {INPUT.shape} int8")
        self.inputs.append(x)
        mean = float(x.mean())  # pixel - 128
        if mean > 40:
            self._last = np.array([-30, 30], np.int8)  # malignant: softmax(-3, 3) = 0.9975
        elif mean < -40:
            self._last = np.array([30, -30], np.int8)  # benign
        else:
            self._last = np.array([1, 0], np.int8)  # 0.525 / 0.475: inconclusive
        return self._last.copy()

    def output(self, name: str) -> np.ndarray:
        """The scores row of the last invoke (the only output), as the real backends give it."""
        if name != OUTPUT.name:
            raise ModelError(f"the model has no output named {name!r}; its outputs are {OUTPUT.name!r}")
        if self._last is None:
            raise ModelError(f"output {name!r} is read after invoke()")
        return self._last.copy()

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


class AcknowledgingPublisher(FakePublisher):
    """The in-memory publisher (``tests/fakes.py``) with a broker that acknowledges every QoS 1 message at once."""

    def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, on_ack: AckCallback | None = None
    ) -> None:
        super().publish(topic, payload, qos, retain, on_ack)
        self.ack()

    def on(self, kind: str) -> list[bytes]:
        """Payloads published on ``.../{kind}``, in publication order."""
        return [m.payload for m in list(self.sent) if m.topic.rsplit("/", 1)[1] == kind]
