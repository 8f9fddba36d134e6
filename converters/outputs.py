"""Name a converted model's outputs: which TFLite output tensor holds the scores, and which holds which tap.

The Keras device graph outputs ``[scores, tap_0, tap_1, ...]`` (``converters.source``), but the TFLite converter
lists a model's outputs in an order of its own (measured with TensorFlow 2.21: a five-output reference CNN came out
as outputs 4, 1, 3, 0, 2), and its tensor names (``StatefulPartitionedCall_1:3``) are not a promise either. So
nothing here trusts a position or a name: each TFLite output is matched to the Keras output it computes by its
shape, then, among outputs of the same shape (the reference CNN has three 64-wide taps), by how closely its
dequantized values follow the float Keras model's on real probe images. The result is written into the manifest
by tensor name and role, and the device finds every output by that name.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgemed.errors import ModelError
from edgemed.manifest import OutputRole, OutputSpec

if TYPE_CHECKING:
    from converters.source import SourceModel

# Pearson correlation, over every value of every probe image, that a matched pair must reach. An int8 output of
# the right tensor follows its float original at 0.99 or better on the models tried; an unrelated tensor of
# the same shape falls far below (its channels mean other things).
MIN_CORRELATION = 0.9
PROBE_IMAGES = 32  # calibration images that tell the converted file's outputs apart
_MAX_BRUTE_FORCE = 7  # outputs of one shape matched by trying every assignment (7! = 5040); greedy beyond


def name_outputs(
    tflite_path: Path,
    reference: Callable[[np.ndarray], Any],
    probe_images: np.ndarray,
    feature_layers: Sequence[str],
    min_correlation: float = MIN_CORRELATION,
    feature_map: str | None = None,
) -> list[OutputSpec]:
    """The converted file's outputs, each by tensor name and role, in the Keras graph's order.

    Args:
        tflite_path: the converted model.
        reference: the Keras device graph (or any callable) mapping a float batch ``(1, H, W, C)`` to its
            outputs ``[scores, tap_0, ..., feature_map]`` (one array is taken as the scores alone).
        probe_images: float images ``(N, H, W, C)`` as the Keras model takes them (uint8 / 255), N >= 2; real
            images (the calibration sample), so that every tap varies as it does in use.
        feature_layers: the tapped Keras layers, in the order of the reference's extra outputs.
        min_correlation: the correlation below which a match is refused.
        feature_map: the layer whose map the reference outputs last, for the class activation map
            (``converters.cam``); None when it has no such output.

    Returns:
        ``[scores, features of feature_layers[0], ..., feature_map]`` as :class:`OutputSpec` (the tensor's name,
        shape, dtype and quantization as the interpreter reports them). TFLite outputs with no Keras counterpart
        are left out.

    Raises:
        ModelError: an output cannot be matched (no TFLite output of its shape, or none follows it closely
            enough): the file is not the conversion of that Keras graph.
    """
    x = np.asarray(probe_images, dtype=np.float32)
    if x.ndim != 4 or len(x) < 2:
        raise ValueError(f"probe_images must be a batch (N, H, W, C) of at least 2 images, not {x.shape}")
    tflite, details = _run_tflite(Path(tflite_path), x)
    keras_outs = _run_reference(reference, x)
    maps = [] if feature_map is None else [feature_map]
    if len(keras_outs) != 1 + len(feature_layers) + len(maps):
        raise ModelError(
            f"the Keras device graph has {len(keras_outs)} outputs but {len(feature_layers)} tapped layers "
            f"{'and a feature map ' if maps else ''}were named; rebuild it with converters.source.load_source"
        )
    layers = [*feature_layers, *maps]
    roles: list[OutputRole] = ["scores", *(["features"] * len(feature_layers)), *(["feature_map"] * len(maps))]
    match = _assign(tflite, keras_outs, min_correlation, Path(tflite_path).name, ["scores", *layers])
    specs = []
    for k, j in enumerate(match):
        detail = details[j]
        scale, zero_point = detail.get("quantization", (0.0, 0))
        specs.append(
            OutputSpec(
                name=str(detail["name"]),
                shape=[int(d) for d in detail["shape"]],
                dtype=np.dtype(detail["dtype"]).name,
                scale=float(scale),
                zero_point=int(zero_point),
                role=roles[k],
                layer=None if k == 0 else layers[k - 1],
            )
        )
    return specs


def name_source_outputs(tflite_path: Path, source: SourceModel, calibration_images: np.ndarray) -> list[OutputSpec]:
    """:func:`name_outputs` for the conversion of ``source``, probed on up to ``PROBE_IMAGES`` uint8 calibration
    images spread over the sample (which is ordered by class, so every class is among them)."""
    spread = np.linspace(0, len(calibration_images) - 1, min(PROBE_IMAGES, len(calibration_images))).astype(int)
    probe = calibration_images[spread].astype(np.float32) / np.float32(255.0)
    reference = source.device_model if source.device_model is not None else source.predict_float
    feature_map = source.cam.layer if source.cam is not None else None
    return name_outputs(tflite_path, reference, probe, source.feature_layers, feature_map=feature_map)


def _run_tflite(path: Path, x: np.ndarray) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
    """Every output of the file, dequantized, for each image: ``(N, size)`` per output in interpreter order."""
    from edgemed.inference.backends import open_interpreter
    from edgemed.inference.interpreters import interpreter_module

    _, module = interpreter_module()
    interp = open_interpreter(module, path, threads=1)
    (inp,) = interp.get_input_details()
    details = list(interp.get_output_details())
    in_scale, in_zero = inp.get("quantization", (0.0, 0))
    in_dtype = np.dtype(inp["dtype"])
    rows: list[list[np.ndarray]] = [[] for _ in details]
    for image in x:
        q = image[None, ...]
        if in_scale:
            info = np.iinfo(in_dtype)
            q = np.clip(np.round(q / in_scale) + in_zero, info.min, info.max)
        interp.set_tensor(int(inp["index"]), q.astype(in_dtype).reshape(inp["shape"]))
        interp.invoke()
        for j, detail in enumerate(details):
            raw = interp.get_tensor(int(detail["index"])).reshape(-1).astype(np.float64)
            scale, zero_point = detail.get("quantization", (0.0, 0))
            rows[j].append((raw - zero_point) * scale if scale else raw)
    return [np.asarray(r) for r in rows], details


def _run_reference(reference: Callable[[np.ndarray], Any], x: np.ndarray) -> list[np.ndarray]:
    """The Keras outputs for each image (one call per image: the device graph has a batch of 1)."""
    per_image = []
    for image in x:
        out = reference(image[None, ...])
        outs = list(out) if isinstance(out, list | tuple) else [out]
        per_image.append([np.asarray(o, dtype=np.float64).reshape(-1) for o in outs])
    return [np.asarray([row[k] for row in per_image]) for k in range(len(per_image[0]))]


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation over all values; -1 when either side is constant (it cannot be told apart)."""
    a, b = a.reshape(-1), b.reshape(-1)
    da, db = a - a.mean(), b - b.mean()
    denom = float(np.sqrt((da * da).sum() * (db * db).sum()))
    return float((da * db).sum() / denom) if denom > 0 else -1.0


def _assign(
    tflite: list[np.ndarray], keras_outs: list[np.ndarray], floor: float, file: str, roles: list[str]
) -> list[int]:
    """For each Keras output, the index of the TFLite output that computes it."""
    match: list[int] = [-1] * len(keras_outs)
    groups: dict[int, list[int]] = {}
    for k, out in enumerate(keras_outs):
        groups.setdefault(out.shape[1], []).append(k)
    candidates = {size: [j for j, out in enumerate(tflite) if out.shape[1] == size] for size in groups}
    for size, ks in groups.items():  # every shape first: a missing output is named as such
        if len(candidates[size]) < len(ks):
            names = ", ".join(roles[k] for k in ks)
            raise ModelError(
                f"{file} has {len(candidates[size])} output(s) of {size} values but the Keras graph has {len(ks)} "
                f"({names}); the file is not this model's conversion: convert again"
            )
    for size, ks in groups.items():
        js = candidates[size]
        corr = np.array([[_correlation(tflite[j], keras_outs[k]) for j in js] for k in ks])
        for row, col in zip(range(len(ks)), _best_assignment(corr), strict=True):
            if corr[row, col] < floor:
                raise ModelError(
                    f"no output of {file} follows the Keras output {roles[ks[row]]} (best correlation "
                    f"{corr[row, col]:.3f} < {floor}); the conversion lost that output: check the model, or "
                    "convert with --ood none"
                )
            match[ks[row]] = js[col]
    return match


def _best_assignment(corr: np.ndarray) -> list[int]:
    """Columns for the rows, each column once, maximizing the summed correlation."""
    rows, cols = corr.shape
    if cols <= _MAX_BRUTE_FORCE:
        best = max(itertools.permutations(range(cols), rows), key=lambda p: sum(corr[r, c] for r, c in enumerate(p)))
        return list(best)
    chosen: list[int] = [-1] * rows
    free = set(range(cols))
    for flat in np.argsort(-corr, axis=None):
        r, c = divmod(int(flat), cols)
        if chosen[r] == -1 and c in free:
            chosen[r] = c
            free.discard(c)
    return chosen
