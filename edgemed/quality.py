"""The image-quality gate: refuse to triage a frame that is blank, badly exposed or blurred.

Every metric is computed on a reduced grayscale copy (long side at most ``analysis_size`` pixels) so that
the gate costs well under a millisecond per frame even on full-resolution photographs, and so that blur is
judged at about the scale the model sees. The default thresholds were chosen from measurements of the real
images in ``data/`` and ``../shared/data`` and of degraded copies of them: see
``docs/quality-thresholds.md`` and ``benchmarks/bench_quality_thresholds.py``.

Checks run in this order, and the first failure is the reason given:

1. too bright: mean above ``max_brightness`` (a white-out frame is reported as too bright, not as blank);
2. blank: pixel standard deviation below ``min_std`` (nothing imaged: lens cap, probe in the air,
   dead stream);
3. too dark: mean below ``min_brightness``, or the brightest 1% of pixels below ``min_highlight`` (ultrasound
   and dermoscopy frames are legitimately dark on average, so the highlights carry the exposure signal);
4. overexposed: more than ``max_clipped_fraction`` of the imaged (non-black) area saturated;
5. too blurred: variance of the Laplacian below ``min_blur``.

A darkened frame also loses Laplacian variance (it scales with contrast squared), which is why exposure is
checked before blur: the reason names the cause, not the symptom.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from edgemed.types import QualityReport
from edgemed.validation import StrictModel

if TYPE_CHECKING:
    import numpy as np

# Pixels at or above this level count as saturated; pixels at or below BLACK_LEVEL are background (the black
# surround of an ultrasound sector or a dermoscope's vignette), which is not part of the imaged area.
SATURATED_LEVEL = 250
BLACK_LEVEL = 10


class QualityConfig(StrictModel):
    """Thresholds of the image-quality gate; the defaults pass every real image measured."""

    enabled: bool = Field(True, description="run the gate; when false every frame passes unmeasured")
    analysis_size: int = Field(
        256, ge=16, description="metrics are computed on a copy whose long side is at most this many pixels"
    )
    min_std: float = Field(
        2.0, ge=0, description="pixel standard deviation (0-255) below which a frame is blank or uniform"
    )
    min_brightness: float = Field(4.0, ge=0, le=255, description="lowest acceptable mean pixel value (0-255)")
    min_highlight: float = Field(
        68.0, ge=0, le=255, description="lowest acceptable 99th-percentile pixel value (0-255): underexposure"
    )
    max_brightness: float = Field(240.0, ge=0, le=255, description="highest acceptable mean pixel value (0-255)")
    max_clipped_fraction: float = Field(
        0.5, ge=0, le=1, description="largest acceptable share of the imaged (non-black) area at saturation"
    )
    min_blur: float = Field(
        12.0, ge=0, description="lowest acceptable variance of the Laplacian on the analysis copy (sharpness)"
    )


Modality = Literal["generic", "dermoscopy", "ultrasound"]

# Tighter thresholds for one kind of image, from the same measurements (docs/quality-thresholds.md). The
# generic defaults must pass dermoscopy, ultrasound and X-ray alike, which leaves over-gained ultrasound
# undetected: an ultrasound frame is mostly black, so even a badly over-gained one saturates only a few
# percent of its area.
_PRESETS: dict[str, dict[str, float]] = {
    "generic": {},
    "dermoscopy": {},
    "ultrasound": {"max_clipped_fraction": 0.1, "min_blur": 60.0},
}


def quality_preset(modality: Modality) -> QualityConfig:
    """The measured thresholds for one imaging modality.

    Args:
        modality: ``generic`` (the defaults), ``dermoscopy`` (the same) or ``ultrasound`` (sharper blur limit,
            clipping limit that still tolerates white on-screen text).

    Returns:
        A config a device profile can start from and override.

    Raises:
        ValueError: unknown modality.
    """
    if modality not in _PRESETS:
        raise ValueError(f"unknown modality {modality!r}; use one of {', '.join(_PRESETS)}")
    return QualityConfig(**_PRESETS[modality])


def analysis_copy(image: np.ndarray, size: int) -> np.ndarray:
    """A grayscale uint8 copy of ``image`` whose long side is at most ``size`` pixels.

    Large frames are decimated (every k-th pixel, k = ceil(long side / size); OpenCV's nearest-neighbour
    resize, which reads only the pixels it keeps) rather than area-averaged. It costs a few tens of
    microseconds, which keeps the gate far below the cost of decoding the frame, and it keeps the
    high-frequency content that the blur metric looks for. A frame blurred at full resolution stays blurred
    after decimation, so blur is still detected (measured in docs/quality-thresholds.md).
    """
    import cv2
    import numpy as np

    height, width = image.shape[0], image.shape[1]
    step = -(-max(height, width) // size)
    if step > 1:
        small = (-(-width // step), -(-height // step))
        image = np.asarray(cv2.resize(image, small, interpolation=cv2.INTER_NEAREST))
    if image.ndim == 3:
        if image.shape[2] == 1:
            return np.ascontiguousarray(image[:, :, 0])
        return np.asarray(cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY))
    return np.ascontiguousarray(image)


def measure(image: np.ndarray, analysis_size: int = 256) -> dict[str, float]:
    """All gate metrics of one uint8 frame (gray or RGB), on its analysis copy.

    A gray frame and the RGB frame it was converted from (BT.601, OpenCV's RGB2GRAY) measure the same: the
    runtime converts once for a grayscale model and gives the gate the gray copy.

    Returns:
        ``brightness`` (mean), ``std``, ``highlight`` (99th percentile), ``clipped_fraction`` (saturated share
        of the non-black area) and ``blur`` (variance of the Laplacian), all on the 0-255 scale.
    """
    import cv2
    import numpy as np

    gray = analysis_copy(image, analysis_size)
    # One 256-bin histogram gives the percentile and the clipping without sorting; mean and spread come from one
    # OpenCV pass (cheaper than weighting the histogram in numpy; the same values to about 1e-5).
    cum = np.cumsum(cv2.calcHist([gray], [0], None, [256], [0, 256]).ravel().astype(np.float64))
    total = float(cum[-1])
    mean_px, std_px = cv2.meanStdDev(gray)
    mean, std = float(mean_px[0, 0]), float(std_px[0, 0])
    highlight = float(np.searchsorted(cum, 0.99 * total))
    imaged = total - float(cum[BLACK_LEVEL])
    clipped = float((total - cum[SATURATED_LEVEL - 1]) / imaged) if imaged else 0.0
    # A 3x3 Laplacian of uint8 pixels lies in [-1020, 1020]: int16 holds it exactly and is twice as fast.
    _, lap_std = cv2.meanStdDev(cv2.Laplacian(gray, cv2.CV_16S))
    blur = float(lap_std[0, 0]) ** 2
    return {"brightness": mean, "std": std, "highlight": highlight, "clipped_fraction": clipped, "blur": blur}


def check_quality(image: np.ndarray, cfg: QualityConfig) -> QualityReport:
    """Decide whether one frame is good enough to triage.

    Args:
        image: uint8 ``(H, W)`` gray or ``(H, W, 3)`` RGB frame.
        cfg: the gate's thresholds.

    Returns:
        A report with the measured values; ``passed`` is False with a one-sentence ``reason`` naming the
        problem, the measured value, the threshold and what to do.

    Raises:
        ValueError: the image is not a non-empty uint8 gray or RGB array.
    """
    _check_image(image)
    if not cfg.enabled:
        return QualityReport(passed=True, blur=0.0, brightness=0.0, clipped_fraction=0.0, reason=None)
    m = measure(image, cfg.analysis_size)
    reason = _reason(m, cfg)
    return QualityReport(
        passed=reason is None,
        blur=m["blur"],
        brightness=m["brightness"],
        clipped_fraction=m["clipped_fraction"],
        reason=reason,
    )


def _reason(m: dict[str, float], cfg: QualityConfig) -> str | None:
    if m["brightness"] > cfg.max_brightness:
        return (
            f"too bright (mean brightness {m['brightness']:.1f} > {cfg.max_brightness:g}): reduce gain or "
            "lighting and recapture"
        )
    if m["std"] < cfg.min_std:
        return (
            f"blank or uniform frame (pixel standard deviation {m['std']:.1f} < {cfg.min_std:g}): check "
            "that the probe or camera is in contact and connected, then recapture"
        )
    if m["brightness"] < cfg.min_brightness:
        return (
            f"too dark (mean brightness {m['brightness']:.1f} < {cfg.min_brightness:g}): increase gain or "
            "lighting and recapture"
        )
    if m["highlight"] < cfg.min_highlight:
        return (
            f"too dark (brightest 1% of pixels at {m['highlight']:.0f} < {cfg.min_highlight:g}): increase "
            "gain or lighting and recapture"
        )
    if m["clipped_fraction"] > cfg.max_clipped_fraction:
        return (
            f"overexposed ({m['clipped_fraction']:.1%} of the image saturated > "
            f"{cfg.max_clipped_fraction:.1%}): reduce gain or lighting and recapture"
        )
    if m["blur"] < cfg.min_blur:
        return (
            f"too blurred (Laplacian variance {m['blur']:.1f} < {cfg.min_blur:g}): hold the probe or camera "
            "still, focus, and recapture"
        )
    return None


def _check_image(image: Any) -> None:
    import numpy as np

    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.size == 0:
        raise ValueError("quality check needs a non-empty uint8 numpy image; convert the frame to uint8")
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3)):
        raise ValueError(f"quality check needs an (H, W) or (H, W, 3) image, got shape {image.shape}")
