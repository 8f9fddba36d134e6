"""Write the images of a MedMNIST-style ``.npz`` split as PNG files, one per image, for `edgemed run`.

    python examples/export_images.py data/breastmnist_28.npz ~/edgemed-first-run/images [--split test]

Files are named ``img0.png``, ``img1.png``, ... in the split's order (edgemed reads a folder in natural order,
so ``source.index`` N is ``imgN.png``); the labels are not written next to them. Needs numpy and OpenCV (the
device extra).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def export_images(npz: Path, out: Path, split: str = "test") -> list[int]:
    """Write ``{split}_images`` of ``npz`` as ``out/img{N}.png``.

    Args:
        npz: a MedMNIST-style archive with ``{split}_images`` (N, H, W[, 3]) and ``{split}_labels``.
        out: folder to write (created if needed).
        split: ``train``, ``val`` or ``test``.

    Returns:
        The labels, in file order.

    Raises:
        SystemExit: the archive lacks the split (the message names the splits it has).
    """
    import cv2
    import numpy as np

    with np.load(npz) as data:
        if f"{split}_images" not in data:
            have = sorted(k.removesuffix("_images") for k in data.files if k.endswith("_images"))
            raise SystemExit(f"{npz} has no {split} split; it has: {', '.join(have)}")
        images, labels = data[f"{split}_images"], data[f"{split}_labels"].reshape(-1)
    out.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        # MedMNIST colour images are RGB; OpenCV writes BGR.
        pixels = cv2.cvtColor(img, cv2.COLOR_RGB2BGR) if img.ndim == 3 else img
        cv2.imwrite(str(out / f"img{i}.png"), pixels)
    return [int(v) for v in labels]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("npz", type=Path, help="e.g. data/breastmnist_28.npz")
    parser.add_argument("out", type=Path, help="folder for the PNG files, e.g. ~/edgemed-first-run/images")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"], help="which split (test)")
    args = parser.parse_args(argv)
    labels = export_images(args.npz.expanduser(), args.out.expanduser(), args.split)
    print(f"wrote {len(labels)} images of the {args.split} split to {args.out.expanduser()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
