"""Frame preprocessing shared by training (host) and inference (device).

Training and the device call the *same* functions here, so a frame is resized, colour-converted and normalised
on the device exactly as the training images were. Quantization goes through a 256-entry lookup table: every
uint8 pixel maps to one model-input value, so the per-frame cost is one table lookup instead of float arithmetic.

What comes out of the model (dequantize, softmax, probabilities) is read in ``edgemed.inference.classify``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from edgemed.types import TensorSpec

if TYPE_CHECKING:
    from edgemed.manifest import InputSpec, Normalisation

_DTYPE_RANGE = {"int8": (-128, 127), "uint8": (0, 255), "int16": (-32768, 32767)}


def _cv2() -> Any:
    # OpenCV is imported on first use: `import edgemed.preprocess` stays cheap for pure-logic callers.
    import cv2

    return cv2


def to_colour_mode(image: np.ndarray, mode: str) -> np.ndarray:
    """Return ``image`` as ``(H, W)`` grayscale (``mode="gray"``) or ``(H, W, 3)`` RGB (``mode="rgb"``).

    Grayscale uses the ITU-R BT.601 luma weights (OpenCV's RGB2GRAY), the same on host and device.
    """
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if mode == "gray":
        return image if image.ndim == 2 else _cv2().cvtColor(np.ascontiguousarray(image), _cv2().COLOR_RGB2GRAY)
    if mode == "rgb":
        return image if image.ndim == 3 else np.repeat(image[:, :, None], 3, axis=2)
    raise ValueError(f"unknown colour mode {mode!r}; use 'gray' or 'rgb'")


def resize(image: np.ndarray, height: int, width: int, method: str = "area") -> np.ndarray:
    """Resize to ``(height, width)``; a no-op when the size already matches.

    ``area`` averages source pixels (no aliasing when shrinking a full-resolution frame to 28 or 64 pixels).
    """
    if image.shape[0] == height and image.shape[1] == width:
        return image
    cv2 = _cv2()
    interp = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST}[method]
    return np.asarray(cv2.resize(np.ascontiguousarray(image), (width, height), interpolation=interp))


def prepare(image: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Colour-convert and resize one uint8 frame to the model's ``(H, W, C)`` layout (still uint8)."""
    out = resize(to_colour_mode(image, spec.colour_mode), spec.height, spec.width, spec.resize)
    return out[:, :, None] if out.ndim == 2 else out


def normalise(images: np.ndarray, norm: Normalisation) -> np.ndarray:
    """uint8 pixels to the float model's input: ``pixel * scale + offset`` as float32."""
    return images.astype(np.float32) * np.float32(norm.scale) + np.float32(norm.offset)


def quantize(x: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Real values to the tensor's integer type: ``round(x / scale) + zero_point``, saturated to the type's range."""
    if not spec.quantized:
        return x.astype(spec.dtype)
    lo, hi = _DTYPE_RANGE[spec.dtype]
    q = np.round(x / spec.scale) + spec.zero_point
    return np.clip(q, lo, hi).astype(spec.dtype)


def input_lut(norm: Normalisation, spec: TensorSpec) -> np.ndarray:
    """The 256-entry table mapping each uint8 pixel straight to the model-input value (quantized or float)."""
    pixels = np.arange(256, dtype=np.float32)
    return quantize(pixels * np.float32(norm.scale) + np.float32(norm.offset), spec)


class Preprocessor:
    """Turns a captured uint8 frame into the batch-of-one tensor the interpreter expects."""

    def __init__(self, spec: InputSpec, tensor: TensorSpec) -> None:
        self.spec = spec
        self.tensor = tensor
        self._lut = input_lut(spec.normalisation, tensor)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Prepare, normalise and quantize one frame; returns shape ``(1, H, W, C)``."""
        out: np.ndarray = self._lut[prepare(image, self.spec)][None, ...]
        return out
