"""Frames and class maps as data URLs for the page: a JPEG of the frame, a transparent PNG of the map over it.

Encoded in memory and sent over the loopback only: nothing here writes a file, and the browser is told not to
cache them (``Cache-Control: no-store``). OpenCV does the encoding (the device extra already needs it for capture).
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

#: The longest side of a frame sent to the page: the 7-inch panel is 800 px wide, a tablet's frame box no wider.
MAX_SIDE_PX = 800
#: The smallest longest side of a rendered map: a 7x7 CAM drawn at 28 px and stretched by the browser is blocky.
MIN_MAP_SIDE_PX = 224
JPEG_QUALITY = 85
#: The most opaque a map gets (at its peak): the frame under it stays readable.
MAP_ALPHA = 0.6


def _cv2() -> Any:
    import cv2  # the device extra: `import edgemed` works without it

    return cv2


def fit_size(height: int, width: int, max_side: int = MAX_SIDE_PX) -> tuple[int, int]:
    """``(height, width)`` scaled down (never up) so that the longest side is at most ``max_side``."""
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def _data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def frame_data_url(image: np.ndarray, quality: int = JPEG_QUALITY) -> tuple[str, int, int]:
    """The frame as a JPEG data URL, downscaled to fit :data:`MAX_SIDE_PX`.

    Args:
        image: uint8 ``(H, W)`` gray or ``(H, W, 3)`` RGB pixels (as ``Frame.image``).
        quality: JPEG quality (1-100).

    Returns:
        The data URL, and the encoded image's height and width.

    Raises:
        ValueError: the image is not uint8 gray or RGB, or the encoder failed.
    """
    cv2 = _cv2()
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3)):
        raise ValueError(f"a frame to show must be uint8 (H, W) or (H, W, 3), not {image.dtype} {image.shape}")
    pixels = image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image
    h, w = fit_size(pixels.shape[0], pixels.shape[1])
    if (h, w) != pixels.shape[:2]:
        pixels = cv2.resize(np.ascontiguousarray(pixels), (w, h), interpolation=cv2.INTER_AREA)
    if pixels.ndim == 3:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)  # OpenCV encodes BGR; frames are RGB
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(pixels), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError("the frame could not be encoded as JPEG")
    return _data_url("image/jpeg", buf.tobytes()), h, w


def map_size(height: int, width: int) -> tuple[int, int]:
    """The size to draw a map over a frame shown at ``(height, width)``: the same aspect, at least
    :data:`MIN_MAP_SIDE_PX` on its longest side."""
    scale = max(1.0, MIN_MAP_SIDE_PX / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def map_rgba(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """A class map as an RGBA overlay of ``(height, width)``: its positive part, scaled to its peak, colour-mapped,
    transparent where the map is zero.

    Only the positive part is drawn: it is where the region raised the class's score (``ClassMap.values``). A map
    with no positive value (or not finite) is fully transparent rather than an arbitrary colour.

    Raises:
        ValueError: ``values`` is not a 2-D array.
    """
    cv2 = _cv2()
    if values.ndim != 2 or values.size == 0:
        raise ValueError(f"a class map must be a non-empty 2-D array, not shape {values.shape}")
    v = np.nan_to_num(values.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    v = np.maximum(v, 0.0)
    peak = float(v.max())
    norm = v / peak if peak > 0 else v
    norm = cv2.resize(norm, (width, height), interpolation=cv2.INTER_LINEAR)
    norm = np.clip(norm, 0.0, 1.0)
    # Turbo: a rainbow with even lightness steps, readable on gray ultrasound and on colour dermoscopy alike.
    bgr = cv2.applyColorMap((norm * 255).astype(np.uint8), cv2.COLORMAP_TURBO)
    alpha = (norm * (MAP_ALPHA * 255)).astype(np.uint8)
    return np.dstack([bgr, alpha])  # BGRA, as OpenCV's PNG encoder takes it


def map_data_url(values: np.ndarray, frame_height: int, frame_width: int) -> str:
    """A class map as a transparent PNG data URL to lay over a frame shown at ``(frame_height, frame_width)``.

    Raises:
        ValueError: ``values`` is not a 2-D array, or the encoder failed.
    """
    h, w = map_size(frame_height, frame_width)
    ok, buf = _cv2().imencode(".png", map_rgba(values, h, w))
    if not ok:
        raise ValueError("the class map could not be encoded as PNG")
    return _data_url("image/png", buf.tobytes())
