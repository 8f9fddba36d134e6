"""What a conversion produced, as typed values: read by the manifest, the report and the console summary.

``convert()`` builds these once, in its named steps; nothing downstream looks numbers up by string keys until
they are written out (``record()`` methods and :func:`jsonable` make the JSON forms, field for field the same
as ``report.json`` and the manifest have always held).

    FloatReference    the float Keras model on the evaluation images (the gate's reference)
    Footprint         a TFLite file's size and median latency (as the device times inference)
    TargetOutcome     one converted target: its file, tensors, probabilities, gate result and verdict
    EdgeTpuOutcome    the Edge TPU compatibility check and compiler run, and the compiled file
    Conversion        all of the above for one ``convert()`` call: what the report is written from
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from converters.gate import GateResult
from converters.metrics import ModelSummary
from edgemed.manifest import OutputKind, OutputSpec, QuantSpec, Verdict


@dataclass(frozen=True)
class FloatReference:
    """The float model's probabilities ``(N, K)`` on the evaluation images, and its numbers."""

    probs: np.ndarray
    summary: ModelSummary


@dataclass(frozen=True)
class Footprint:
    """A TFLite file's size, and the median time of one inference on one image (batch 1, one CPU thread)."""

    size_bytes: int
    latency_ms: float


@dataclass(frozen=True)
class TargetOutcome:
    """One converted target, gated.

    Attributes:
        target: ``int8``, ``uint8``, ``float16`` or ``dynamic``.
        path: the file; inside ``rejected/`` once a rejected file has been moved away.
        input, output: its tensors, as the manifest records them (``output``: the scores tensor).
        output_kind: what its output holds, read from the graph (the device reads the same at load).
        footprint: its size and latency.
        probs: its probabilities on the evaluation images, computed the way the device computes them.
        gate: the gate's result.
        verdict: ``accepted``, ``waived`` (rejected, shipped under a waiver) or ``rejected``.
        outputs: every output by tensor name and role (``converters.outputs.name_outputs``): the scores, then
            one feature output per tapped layer.
    """

    target: str
    path: Path
    input: QuantSpec
    output: QuantSpec
    output_kind: OutputKind
    footprint: Footprint
    probs: np.ndarray
    gate: GateResult
    verdict: Verdict
    outputs: list[OutputSpec] = field(default_factory=list)


@dataclass(frozen=True)
class CompilerRun:
    """What ``edgetpu_compiler`` did with the int8 model."""

    ok: bool
    version: str
    ops_on_tpu: int
    ops_on_cpu: int
    total_ops: int
    table: list[tuple[str, int, str]]  # operator, count, status, as the compiler printed them
    log: str  # the log file's name, beside the models


@dataclass(frozen=True)
class EdgeTpuOutcome:
    """The Edge TPU build of the int8 model.

    Attributes:
        compatible, problems, ops: the compatibility check of the int8 model (``converters.edgetpu``).
        twin: the int8 model's file name: the compiled model's CPU twin.
        compiler: the compiler's run, or None when it is not installed.
        compiled: the compiled file, or None when none was made; inside ``rejected/`` when its twin is.
        notes: what the user must know about this build.
    """

    compatible: bool
    problems: list[str]
    ops: dict[str, int]
    twin: str
    compiler: CompilerRun | None
    compiled: Path | None
    notes: list[str]

    def record(self, out: Path) -> dict[str, Any]:
        """The manifest's ``metrics.edgetpu`` and report.json's ``edgetpu``; ``out`` is the output folder."""
        data: dict[str, Any] = {
            "compatible": self.compatible,
            "problems": self.problems,
            "ops": self.ops,
            "twin": self.twin,
            "compiler": None,
        }
        if self.compiler is not None:
            run = self.compiler
            data["compiler"] = {
                "ok": run.ok,
                "version": run.version,
                "ops_on_tpu": run.ops_on_tpu,
                "ops_on_cpu": run.ops_on_cpu,
                "total_ops": run.total_ops,
                "table": [list(row) for row in run.table],
                "log": run.log,
            }
        if self.compiled is not None:
            data["file"] = str(self.compiled.relative_to(out))
        return data


@dataclass(frozen=True)
class Conversion:
    """Everything one ``convert()`` call measured and decided, for the report.

    Attributes:
        out: the output folder.
        labels: class names, in the model's output order.
        y: true labels of the evaluation images.
        reference: the float model on them.
        baseline: the float32 TFLite file's footprint (the size and latency the targets are compared with).
        targets: one outcome per converted target, in the order converted.
        edgetpu: the Edge TPU build, when asked for.
        notes: what the user must know (e.g. the Edge TPU compiler was not found).
    """

    out: Path
    labels: list[str]
    y: np.ndarray
    reference: FloatReference
    baseline: Footprint
    targets: list[TargetOutcome]
    edgetpu: EdgeTpuOutcome | None
    notes: list[str]


def jsonable(value: Any) -> Any:
    """Recursively turn numpy scalars into Python ones, tuples into lists, NaN into None (strict JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, Path):
        return value.name
    return value
