"""The device must resize and colour-convert exactly as training did: one real image through both paths."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from converters.data import load_dataset
from edgemed.capture import open_source
from edgemed.manifest import InputSpec
from edgemed.preprocess import prepare


@pytest.mark.parametrize(("size", "mode"), [((64, 64), "rgb"), ((28, 28), "gray")])
def test_training_and_device_preprocessing_agree(
    tmp_path: Path, data_dir: Path, size: tuple[int, int], mode: str
) -> None:
    # The labelled folder of 12 real full-resolution dermoscopy photographs (722x542 to 1504x1129).
    shutil.copytree(data_dir / "isic_samples", tmp_path, dirs_exist_ok=True)
    names = sorted(p.name for p in tmp_path.glob("*.jpg"))
    ds = load_dataset(tmp_path, labels=["nevus", "melanoma"], image_size=size, colour_mode=mode)
    train_images = np.concatenate([x for x, _ in ds.splits.values() if len(x)])
    spec = InputSpec(height=size[0], width=size[1], channels=3 if mode == "rgb" else 1, colour_mode=mode)

    device_images = []
    for name in names:
        source = open_source(str(tmp_path / name))
        frame = next(iter(source))
        source.close()
        assert frame.image is not None and frame.image.shape[0] > 500  # full resolution from capture
        device_images.append(prepare(frame.image, spec))
    # The loader may shuffle into splits: compare as sets of exact arrays.
    train_set = {x.tobytes() for x in train_images}
    assert {x.tobytes() for x in device_images} == train_set
    assert device_images[0].shape == (*size, 3 if mode == "rgb" else 1)
