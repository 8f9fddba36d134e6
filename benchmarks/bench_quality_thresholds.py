"""Measure the image-quality metrics on real images and degraded copies, to choose the gate's thresholds.

Real images: the repository's dermoscopy JPEGs and DICOM frames (``data/``), and every split of BreastMNIST,
PneumoniaMNIST and ISIC UDA-1 64/128 from ``EDGEMED_DATA`` (default ``../shared/data``; sets that are absent
are skipped and said so). Degraded copies, made at full resolution and scaled to the analysis size so that a
28-pixel and a 1504-pixel image are degraded alike:

    blurS   Gaussian blur, sigma = S analysis pixels (S x long side / analysis_size at full resolution)
    dark    pixel values x 0.25 (two stops under)
    bright  pixel values x 2.5, saturating (about 1.3 stops over)
    blank   every pixel set to the image's mean

Prints, per set and variant, the min / 1st percentile / median / 99th percentile / max of every metric, then
the share of frames each preset passes and whether failures carry the expected reason. Usage:

    .venv/bin/python benchmarks/bench_quality_thresholds.py [--analysis-size 256] [--markdown]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgemed.capture import open_source  # noqa: E402
from edgemed.quality import QualityConfig, check_quality, measure, quality_preset  # noqa: E402

VARIANTS = ["real", "blur1", "blur2", "blur3", "dark", "bright", "blank"]
EXPECTED_REASON = {
    "blur1": "blurred",
    "blur2": "blurred",
    "blur3": "blurred",
    "dark": "dark",
    "bright": "bright|overexposed",
    "blank": "blank",
}
METRICS = ["brightness", "std", "highlight", "clipped_fraction", "blur"]


def degrade(image: np.ndarray, variant: str, analysis_size: int) -> np.ndarray:
    """One degraded copy of a uint8 image (see the module docstring)."""
    k = max(max(image.shape[:2]) / analysis_size, 1.0)
    if variant.startswith("blur"):
        return np.asarray(cv2.GaussianBlur(image, (0, 0), float(variant[4:]) * k))
    if variant == "dark":
        return (image.astype(np.float32) * 0.25).astype(np.uint8)
    if variant == "bright":
        return np.clip(image.astype(np.float32) * 2.5, 0, 255).astype(np.uint8)
    if variant == "blank":
        return np.full_like(image, int(image.mean()))
    return image


def _frames(folder: Path) -> list[np.ndarray]:
    return [f.image for f in open_source(str(folder)) if f.image is not None]


def load_sets(data_dir: Path) -> dict[str, tuple[str, list[np.ndarray]]]:
    """name -> (modality, images)."""
    sets: dict[str, tuple[str, list[np.ndarray]]] = {
        "isic_jpeg": ("dermoscopy", _frames(ROOT / "data/isic_samples")),
        "dicom_us": ("ultrasound", _frames(ROOT / "data/dicom")),
    }
    for name, file, modality in [
        ("breastmnist", ROOT / "data/breastmnist_28.npz", "ultrasound"),
        ("pneumoniamnist", data_dir / "pneumoniamnist_28.npz", "generic"),
        ("isic_uda1_64", data_dir / "isic_uda1_64.npz", "dermoscopy"),
        ("isic_uda1_128", data_dir / "isic_uda1_128.npz", "dermoscopy"),
    ]:
        if not file.exists():
            print(f"(skipped {name}: {file} not found; set EDGEMED_DATA)", file=sys.stderr)
            continue
        with np.load(file) as npz:
            images = [img for split in ("train", "val", "test") for img in npz[f"{split}_images"]]
        sets[name] = (modality, images)
    return sets


def summary(values: list[float]) -> str:
    q = np.percentile(values, [0, 1, 50, 99, 100])
    return " / ".join(f"{v:.3g}" for v in q)


def gate_table(
    sets: dict[str, tuple[str, list[np.ndarray]]],
    analysis_size: int,
    configs: dict[str, Callable[[str], QualityConfig]],
) -> list[str]:
    rows = []
    for cfg_name, make in configs.items():
        for name, (modality, images) in sets.items():
            cfg = make(modality)
            cells = []
            for variant in VARIANTS:
                passed = right = 0
                for image in images:
                    report = check_quality(degrade(image, variant, analysis_size), cfg)
                    passed += report.passed
                    if not report.passed and variant in EXPECTED_REASON:
                        right += any(w in (report.reason or "") for w in EXPECTED_REASON[variant].split("|"))
                failed = len(images) - passed
                cell = (
                    f"{passed}/{len(images)} pass"
                    if variant == "real"
                    else (f"{failed / len(images):.1%} fail ({right}/{failed} right reason)")
                )
                cells.append(cell)
            rows.append(f"| {cfg_name} | {name} ({modality}, n={len(images)}) | " + " | ".join(cells) + " |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--analysis-size", type=int, default=QualityConfig().analysis_size)
    args = parser.parse_args()
    data_dir = Path(os.environ.get("EDGEMED_DATA", ROOT.parent / "shared" / "data"))
    sets = load_sets(data_dir)
    print(f"metrics on the {args.analysis_size}-px analysis copy: min / p1 / median / p99 / max\n")
    print("| set | variant | n | " + " | ".join(METRICS) + " |")
    print("|---|---|---|" + "---|" * len(METRICS))
    for name, (_, images) in sets.items():
        for variant in VARIANTS:
            ms = [measure(degrade(img, variant, args.analysis_size), args.analysis_size) for img in images]
            cells = [summary([m[k] for m in ms]) for k in METRICS]
            print(f"| {name} | {variant} | {len(images)} | " + " | ".join(cells) + " |")
    print("\ngate outcome (real: share passing; degraded: share failing, and with the expected reason)\n")
    print("| preset | set | " + " | ".join(VARIANTS) + " |")
    print("|---|---|" + "---|" * len(VARIANTS))
    configs: dict[str, Callable[[str], QualityConfig]] = {
        "generic (defaults)": lambda _m: QualityConfig(analysis_size=args.analysis_size),
        "modality preset": lambda m: quality_preset(m).model_copy(  # type: ignore[arg-type]
            update={"analysis_size": args.analysis_size}
        ),
    }
    for row in gate_table(sets, args.analysis_size, configs):
        print(row)
    print("\ncost of check_quality per frame (median of 200 calls, this machine)\n")
    print("| frame | size | ms |")
    print("|---|---|---|")
    cfg = QualityConfig(analysis_size=args.analysis_size)
    for name, index in [("isic_jpeg", 1), ("isic_jpeg", 0), ("dicom_us", 0), ("dicom_us", 33), ("breastmnist", 0)]:
        image = sets[name][1][index]
        print(f"| {name}[{index}] | {image.shape} | {time_check(image, cfg):.3f} |")


def time_check(image: np.ndarray, cfg: QualityConfig, calls: int = 200) -> float:
    """Median wall time of one check_quality call in milliseconds."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        check_quality(image, cfg)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


if __name__ == "__main__":
    main()
