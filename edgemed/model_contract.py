"""The load-time model contract: the tensors the interpreter really holds must be the ones the manifest describes.

The sha256 in the manifest proves only that a file is the one the manifest lists; a hand-edited manifest can list
any file. ``check_loaded_model`` compares the loaded interpreter's tensors, output kind and weights with the
manifest's artifact entry before the device runs it (``edgemed.inference.make_backend``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from edgemed.errors import ModelError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from edgemed.manifest import Artifact, Manifest, OutputKind, QuantSpec, WeightKind
    from edgemed.types import TensorSpec

# The dtype of the input and output tensors a converted file of each target has (float16 keeps float32 I/O).
_TARGET_IO: dict[str, tuple[str, ...]] = {
    "int8": ("int8",),
    "uint8": ("uint8",),
    "edgetpu": ("int8", "uint8"),
    "float16": ("float32",),
    "dynamic": ("float32",),
}
# ...and the weights of the targets whose I/O is float32 like a plain float32 model's (edgemed.inference.backends
# .graph_weights): only the weights tell them apart.
_TARGET_WEIGHTS: dict[str, WeightKind] = {"float16": "float16", "dynamic": "int8"}


def check_loaded_model(
    manifest: Manifest,
    model_path: Path,
    input_tensor: TensorSpec,
    output_tensor: TensorSpec,
    output_kind: OutputKind | None,
    weights: WeightKind | None = None,
    outputs: Sequence[TensorSpec] = (),
) -> None:
    """Refuse a loaded model whose real tensors are not the ones its manifest describes.

    The sha256 proves only that the file is the one the manifest lists; a hand-edited manifest can list any file.
    The device publishes the manifest's ``target`` and post-processes by its ``output_kind``, so both must be
    what the interpreter actually holds: a float model listed as int8, or a softmax output listed as logits (a
    second softmax squeezes a certain 1.00 into 0.73), is refused here.

    Args:
        manifest: the model's manifest.
        model_path: the file the interpreter loaded (its name selects the artifact).
        input_tensor: the interpreter's input tensor.
        output_tensor: the interpreter's scores tensor (the one the artifact's ``scores_output`` names; the first
            output for a manifest that lists no outputs).
        output_kind: what the graph's output op computes, or ``None`` where the graph cannot tell (an Edge TPU
            custom op); then that field is not checked.
        weights: how the model stores its weights (``float16``, ``int8``, ``float32``), or ``None`` when not
            known; checked for the ``float16`` and ``dynamic`` targets, whose tensors in and out are float32.
        outputs: every output tensor of the interpreter (``backend.output_specs``); each tensor the artifact
            lists in ``outputs`` must be among them by name, with its dtype, shape, scale and zero point.

    Raises:
        ModelError: a field differs; the message names each field (``artifacts[i].target``, ...) and the fix.
    """
    name = Path(model_path).name
    art = manifest.artifact(name)
    where = f"artifacts[{manifest.artifacts.index(art)}]"
    problems = [
        *_target_problems(where, art, input_tensor, output_tensor, weights),
        *_tensor_problems(f"{where}.input", art.input, input_tensor),
        *_tensor_problems(f"{where}.output", art.output, output_tensor),
        *_shape_problems(manifest, input_tensor, output_tensor),
        *_output_problems(where, art, outputs, output_tensor),
    ]
    if output_kind is not None and output_kind != art.output_kind:
        consequence = (
            "the device would apply a softmax to probabilities"
            if output_kind == "probabilities"
            else "the device would read logits as probabilities"
        )
        problems.append(
            f"{where}.output_kind is {art.output_kind} but the model's output op computes {output_kind} ({consequence})"
        )
    if problems:
        raise ModelError(
            f"{name} does not match its manifest: {'; '.join(problems)}. The model or its manifest was changed "
            "after `edgemed convert`: copy both from the same conversion, or convert again"
        )


def _target_problems(
    where: str, art: Artifact, inp: TensorSpec, out: TensorSpec, weights: WeightKind | None
) -> list[str]:
    wanted = _TARGET_IO.get(art.target)
    if wanted is None:
        return [f"{where}.target is {art.target}, which is not a TFLite model the device can run"]
    quantized = wanted[0] != "float32"
    if inp.dtype in wanted and out.dtype in wanted and (not quantized or (inp.quantized and out.quantized)):
        stored = _TARGET_WEIGHTS.get(art.target)
        if stored is None or weights is None or weights == stored:
            return []
        what = {"float32": "a float32 model", "float16": "a float16 model", "int8": "a dynamic-range model"}
        return [
            f"{where}.target is {art.target} but the model's weights are {weights} ({what[weights]}; a "
            f"{art.target} model stores its weights as {stored})"
        ]
    tensors = inp.dtype if inp.dtype == out.dtype else f"{inp.dtype} in, {out.dtype} out"
    return [
        f"{where}.target is {art.target} but the model's tensors are {tensors} (a {art.target} model has "
        f"{' or '.join(wanted)}{' quantized' if quantized else ''} input and output)"
    ]


def _tensor_problems(where: str, listed: QuantSpec | None, real: TensorSpec) -> list[str]:
    if listed is None:  # manifests may omit the tensor specs; the target and output kind are still checked
        return []
    differ: list[tuple[str, object, object]] = []
    if listed.dtype != real.dtype:
        differ.append(("dtype", listed.dtype, real.dtype))
    if tuple(listed.shape) != tuple(real.shape):
        differ.append(("shape", list(listed.shape), list(real.shape)))
    # The manifest stores the interpreter's float32 scale as JSON; it round-trips exactly, so a small relative
    # tolerance only absorbs a hand-typed value with fewer digits.
    if not math.isclose(listed.scale, real.scale, rel_tol=1e-6, abs_tol=1e-12):
        differ.append(("scale", f"{listed.scale:.9g}", f"{real.scale:.9g}"))
    if listed.zero_point != real.zero_point:
        differ.append(("zero_point", listed.zero_point, real.zero_point))
    return [f"{where}.{field} is {mine} but the model's is {theirs}" for field, mine, theirs in differ]


def _output_problems(where: str, art: Artifact, real: Sequence[TensorSpec], scores: TensorSpec) -> list[str]:
    listed = art.scores_output
    if listed is not None and scores.name != listed.name:  # the device would read another tensor as the scores
        j = art.outputs.index(listed)
        return [
            f"{where}.outputs[{j}] names {listed.name!r} as the scores but the model's scores tensor is {scores.name!r}"
        ]
    if not real:  # the caller did not pass the interpreter's outputs
        return []
    if not art.outputs and len(real) > 1:
        # A manifest from before outputs were listed has one-output models; with several, the first is a guess
        # (TFLite orders a model's outputs as it likes), and a feature vector could be read as the scores.
        names = ", ".join(repr(t.name) for t in real)
        return [
            f"{where}.outputs lists no tensors but the model has {len(real)} outputs ({names}), so the device "
            "cannot tell which holds the scores"
        ]
    by_name = {t.name: t for t in real}
    problems = []
    for j, listed in enumerate(art.outputs):
        tensor = by_name.get(listed.name)
        if tensor is None:
            names = ", ".join(repr(t.name) for t in real)
            problems.append(f"{where}.outputs[{j}] names {listed.name!r} but the model's outputs are {names}")
        else:
            problems.extend(_tensor_problems(f"{where}.outputs[{j}]", listed, tensor))
    return problems


def _shape_problems(manifest: Manifest, inp: TensorSpec, out: TensorSpec) -> list[str]:
    spec = manifest.input
    problems = []
    expected = (1, spec.height, spec.width, spec.channels)
    if tuple(inp.shape) != expected:
        problems.append(
            f"input (height {spec.height}, width {spec.width}, channels {spec.channels}) does not fit the model's "
            f"input tensor {list(inp.shape)}"
        )
    if not out.shape or out.shape[-1] != len(manifest.labels):
        problems.append(f"labels lists {len(manifest.labels)} classes but the model outputs {list(out.shape)}")
    return problems
