"""The image-quality gate on real images and on degraded copies of them.

The degradations are those of benchmarks/bench_quality_thresholds.py, scaled to the analysis size so that tiny
and large images are degraded alike.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from pydantic import ValidationError

from edgemed.capture import open_source
from edgemed.quality import QualityConfig, analysis_copy, check_quality, measure, quality_preset

DATA = Path(__file__).resolve().parent.parent / "data"
CFG = QualityConfig()


def _frames(folder: str) -> list[np.ndarray]:
    return [f.image for f in open_source(str(DATA / folder)) if f.image is not None]


ISIC = _frames("isic_samples")
ULTRASOUND = _frames("dicom")
with np.load(DATA / "breastmnist_28.npz") as _npz:
    BREAST = list(_npz["test_images"])


def blurred(image: np.ndarray, sigma_analysis_px: float = 3.0) -> np.ndarray:
    k = max(max(image.shape[:2]) / CFG.analysis_size, 1.0)
    return np.asarray(cv2.GaussianBlur(image, (0, 0), sigma_analysis_px * k))


def dark(image: np.ndarray) -> np.ndarray:
    return (image.astype(np.float32) * 0.25).astype(np.uint8)


def bright(image: np.ndarray) -> np.ndarray:
    return np.clip(image.astype(np.float32) * 2.5, 0, 255).astype(np.uint8)


def blank(image: np.ndarray) -> np.ndarray:
    return np.full_like(image, int(image.mean()))


def test_the_real_images_are_there() -> None:
    assert len(ISIC) == 12
    assert len(ULTRASOUND) == 34  # 30 cine frames + 4 single-frame ultrasound DICOMs
    assert len(BREAST) == 156


@pytest.mark.parametrize("images", [ISIC, ULTRASOUND, BREAST], ids=["dermoscopy", "dicom-ultrasound", "breastmnist"])
def test_every_real_image_passes_the_default_gate(images: list[np.ndarray]) -> None:
    failures = [r.reason for r in (check_quality(img, CFG) for img in images) if not r.passed]
    assert failures == []


@pytest.mark.parametrize("images", [ULTRASOUND, BREAST], ids=["dicom-ultrasound", "breastmnist"])
def test_every_real_ultrasound_image_passes_the_ultrasound_preset(images: list[np.ndarray]) -> None:
    cfg = quality_preset("ultrasound")
    assert [r.reason for r in (check_quality(img, cfg) for img in images) if not r.passed] == []


@pytest.mark.parametrize(
    ("degrade", "word"),
    [(blurred, "too blurred"), (dark, "too dark"), (blank, "blank")],
    ids=["blurred", "dark", "blank"],
)
@pytest.mark.parametrize("images", [ISIC, ULTRASOUND, BREAST], ids=["dermoscopy", "dicom-ultrasound", "breastmnist"])
def test_degraded_copies_fail_with_the_right_reason(images: list[np.ndarray], degrade, word: str) -> None:  # type: ignore[no-untyped-def]
    for image in images:
        report = check_quality(degrade(image), CFG)
        assert not report.passed
        assert report.reason is not None and report.reason.startswith(word), report.reason


def test_overexposed_dermoscopy_fails_as_overexposed_or_too_bright() -> None:
    for image in ISIC:
        report = check_quality(bright(image), CFG)
        assert not report.passed
        assert report.reason is not None
        assert report.reason.startswith(("overexposed", "too bright")), report.reason
        assert report.clipped_fraction > CFG.max_clipped_fraction or report.brightness > CFG.max_brightness


def test_ultrasound_preset_catches_a_milder_blur_on_every_ultrasound_frame() -> None:
    cfg = quality_preset("ultrasound")
    for image in ULTRASOUND + BREAST:
        report = check_quality(blurred(image, 2.0), cfg)
        assert not report.passed and report.reason is not None and report.reason.startswith("too blurred")


def test_reason_names_the_value_and_the_threshold() -> None:
    report = check_quality(blurred(ISIC[0]), CFG)
    assert f"{report.blur:.1f} < {CFG.min_blur:g}" in (report.reason or "")
    assert "recapture" in (report.reason or "")


def test_white_out_frame_is_too_bright_and_black_frame_is_blank() -> None:
    white = np.full((480, 640, 3), 255, np.uint8)
    black = np.zeros((480, 640), np.uint8)
    assert (check_quality(white, CFG).reason or "").startswith("too bright")
    assert (check_quality(black, CFG).reason or "").startswith("blank")


def test_report_carries_the_measured_values() -> None:
    image = ISIC[3]
    report = check_quality(image, CFG)
    m = measure(image, CFG.analysis_size)
    assert report.passed and report.reason is None
    assert report.blur == pytest.approx(m["blur"])
    assert report.brightness == pytest.approx(m["brightness"])
    # The analysis copy is a decimation of the frame: its mean stays close to the full frame's luma mean.
    full_mean = float(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).mean())
    assert report.brightness == pytest.approx(full_mean, abs=3.0)
    assert set(report.as_dict()) == {"passed", "blur", "brightness", "clipped_fraction", "reason"}


def test_clipping_ignores_the_black_background_of_an_ultrasound_sector() -> None:
    # 70 % black background, 30 % tissue of which one third is saturated: 10 % of the imaged area.
    image = np.zeros((100, 100), np.uint8)
    image[:, 70:] = np.tile(np.arange(60, 240, 6, dtype=np.uint8), (100, 1))[:, :30]
    image[:, 90:] = 255
    m = measure(image, 256)
    assert m["clipped_fraction"] == pytest.approx(10 / 30)


def test_analysis_copy_is_small_gray_and_never_upscaled() -> None:
    big = ISIC[1]  # 1504 x 1129
    small = analysis_copy(big, 256)
    assert small.ndim == 2 and small.dtype == np.uint8 and max(small.shape) <= 256
    tiny = BREAST[0]
    assert analysis_copy(tiny, 256).shape == tiny.shape


def test_disabled_gate_passes_everything() -> None:
    report = check_quality(np.zeros((10, 10), np.uint8), QualityConfig(enabled=False))
    assert report.passed


@pytest.mark.parametrize(
    "bad", [np.zeros((0, 0), np.uint8), np.zeros((4, 4), np.float32), np.zeros((4, 4, 4), np.uint8)]
)
def test_bad_input_is_a_clear_error(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="quality check needs"):
        check_quality(bad, CFG)


def test_config_rejects_unknown_keys_and_impossible_values() -> None:
    with pytest.raises(ValidationError):
        QualityConfig(min_blurr=3.0)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        QualityConfig(max_clipped_fraction=1.5)
    with pytest.raises(ValueError, match="unknown modality"):
        quality_preset("xray")  # type: ignore[arg-type]


def test_blur_is_exactly_the_variance_of_the_laplacian_of_the_analysis_copy() -> None:
    for image in (ISIC[0], ULTRASOUND[0], BREAST[0]):
        gray = analysis_copy(image, CFG.analysis_size)
        kernel = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=np.float64)
        lap = cv2.filter2D(gray.astype(np.float64), -1, kernel, borderType=cv2.BORDER_REFLECT_101)
        m = measure(image, CFG.analysis_size)
        assert m["blur"] == pytest.approx(float(lap.var()), rel=1e-9)
        assert m["brightness"] == pytest.approx(float(gray.mean()), rel=1e-9)
        assert m["std"] == pytest.approx(float(gray.std()), rel=1e-9)
        assert m["highlight"] == pytest.approx(float(np.percentile(gray, 99, method="inverted_cdf")), abs=1)


def test_a_gray_copy_measures_exactly_like_the_rgb_frame_it_came_from() -> None:
    # The runtime converts once for a grayscale model and hands the gate the gray copy: the verdict and every
    # published value must not depend on which of the two the gate saw.
    colour = [im for im in ISIC + ULTRASOUND if im.ndim == 3]
    assert len(colour) >= 12
    for image in [*colour, dark(colour[0]), blurred(colour[-1])]:
        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        a, b = measure(image), measure(gray)
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-9, abs=1e-9), key
        assert check_quality(image, CFG).reason == check_quality(gray, CFG).reason


def test_measure_matches_a_plain_numpy_reading_of_the_definitions() -> None:
    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, (120, 160), dtype=np.uint8)
    image[:40] = 0  # a black surround, excluded from the clipping denominator
    image[40:50] = 255
    m = measure(image)
    flat = image.astype(np.float64).ravel()
    assert m["brightness"] == pytest.approx(flat.mean())
    assert m["std"] == pytest.approx(flat.std())
    assert m["highlight"] == float(np.sort(image.ravel())[int(np.ceil(0.99 * flat.size)) - 1])
    assert m["clipped_fraction"] == pytest.approx((image >= 250).sum() / (image > 10).sum())
