"""converters.data: real files from data/ and small folders built from real images, plus broken inputs."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from converters.data import load_dataset
from edgemed.errors import DataError

DATA = Path(__file__).resolve().parent.parent / "data"
BREAST = DATA / "breastmnist_28.npz"
ISIC = DATA / "isic_samples"


def test_breastmnist_npz_loads_with_official_split_sizes() -> None:
    ds = load_dataset(BREAST)
    assert {k: len(v[1]) for k, v in ds.splits.items()} == {"train": 546, "val": 78, "test": 156}
    x, y = ds.splits["train"]
    assert x.shape == (546, 28, 28, 1) and x.dtype == np.uint8
    assert y.shape == (546,) and y.dtype == np.int64
    assert ds.colour_mode == "gray"
    assert ds.labels == ["class_0", "class_1"]
    assert ds.input_spec().channels == 1


def test_labels_argument_names_the_classes() -> None:
    ds = load_dataset(BREAST, labels=["malignant", "benign"])
    assert ds.labels == ["malignant", "benign"]


def test_npz_can_be_resized_and_made_rgb() -> None:
    ds = load_dataset(BREAST, image_size=(32, 32), colour_mode="rgb")
    x, _ = ds.splits["test"]
    assert x.shape == (156, 32, 32, 3)
    assert np.array_equal(x[..., 0], x[..., 2])  # gray -> rgb replicates the channel


def test_isic_labels_csv_folder_is_split_stratified_and_seeded() -> None:
    ds = load_dataset(ISIC, image_size=(32, 32))
    total = sum(len(y) for _, y in ds.splits.values())
    assert total == 12
    for split in ("train", "val", "test"):
        assert set(ds.splits[split][1].tolist()) == {0, 1}, split
    assert ds.splits["train"][0].shape[1:] == (32, 32, 3)
    again = load_dataset(ISIC, image_size=(32, 32))
    assert np.array_equal(again.splits["test"][0], ds.splits["test"][0])


def test_labels_csv_with_class_names(tmp_path: Path) -> None:
    rows = (ISIC / "labels.csv").read_text().splitlines()[1:]
    lines = ["file,label"]
    for row in rows:
        name, _, diagnosis = row.split(",")
        shutil.copy(ISIC / name, tmp_path / name)
        lines.append(f"{name},{diagnosis}")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    ds = load_dataset(tmp_path, image_size=(16, 16), colour_mode="gray")
    assert ds.labels == ["melanoma", "nevus"]
    assert ds.splits["train"][0].shape[1:] == (16, 16, 1)


def _class_folder(root: Path, per_class: int = 4) -> Path:
    rows = (ISIC / "labels.csv").read_text().splitlines()[1:]
    counts = {"nevus": 0, "melanoma": 0}
    for row in rows:
        name, _, diagnosis = row.split(",")
        if counts[diagnosis] >= per_class:
            continue
        counts[diagnosis] += 1
        (root / diagnosis).mkdir(parents=True, exist_ok=True)
        # Re-encode as PNG so the folder mixes formats the way a clinic export does.
        img = cv2.imread(str(ISIC / name))
        small = cv2.resize(img, (48, 40), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(root / diagnosis / (Path(name).stem + ".png")), small)
    return root


def test_class_subfolders_give_names_and_rgb_order(tmp_path: Path) -> None:
    root = _class_folder(tmp_path / "set")
    ds = load_dataset(root, image_size=(24, 24))
    assert ds.labels == ["melanoma", "nevus"]
    assert sum(len(y) for _, y in ds.splits.values()) == 8
    # The first melanoma file read by the loader must equal the file converted BGR -> RGB by hand.
    first = sorted((root / "melanoma").iterdir())[0]
    bgr = cv2.imread(str(first))
    expect = cv2.resize(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), (24, 24), interpolation=cv2.INTER_AREA)
    all_x = np.concatenate([x for x, _ in ds.splits.values()])
    assert any(np.array_equal(expect, x) for x in all_x)


def test_presplit_folder_keeps_its_split(tmp_path: Path) -> None:
    for split in ("train", "test"):
        _class_folder(tmp_path / split, per_class=2 if split == "test" else 4)
    ds = load_dataset(tmp_path, image_size=(20, 20))
    assert set(ds.splits) == {"train", "test"}
    assert ds.count_per_class("test") == [2, 2]


def test_missing_path_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        load_dataset(tmp_path / "absent.npz")


def test_npz_missing_key(tmp_path: Path) -> None:
    f = tmp_path / "bad.npz"
    np.savez(f, train_images=np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(DataError, match="missing key") as info:
        load_dataset(f)
    assert info.value.path == str(f)


def test_npz_wrong_dtype_and_shape(tmp_path: Path) -> None:
    f = tmp_path / "float.npz"
    np.savez(f, train_images=np.zeros((4, 8, 8), np.float32), train_labels=np.zeros((4, 1), np.uint8))
    with pytest.raises(DataError, match="dtype float32"):
        load_dataset(f)
    g = tmp_path / "shape.npz"
    np.savez(g, train_images=np.zeros((4, 8), np.uint8), train_labels=np.zeros((4, 1), np.uint8))
    with pytest.raises(DataError, match="shape"):
        load_dataset(g)


def test_npz_label_count_mismatch_and_out_of_range(tmp_path: Path) -> None:
    f = tmp_path / "count.npz"
    np.savez(f, train_images=np.zeros((4, 8, 8), np.uint8), train_labels=np.array([[0], [1], [0]], np.uint8))
    with pytest.raises(DataError, match="4 images but train_labels has 3"):
        load_dataset(f)
    g = tmp_path / "range.npz"
    np.savez(g, train_images=np.zeros((3, 8, 8), np.uint8), train_labels=np.array([[0], [1], [2]], np.uint8))
    with pytest.raises(DataError, match="labels go up to 2"):
        load_dataset(g, labels=["a", "b"])


def test_npz_classes_vs_labels_mismatch(tmp_path: Path) -> None:
    f = tmp_path / "classes.npz"
    np.savez(
        f,
        train_images=np.zeros((2, 8, 8), np.uint8),
        train_labels=np.array([[0], [1]], np.uint8),
        classes=np.array(["a", "b"]),
    )
    assert load_dataset(f).labels == ["a", "b"]
    with pytest.raises(DataError, match="one name per class"):
        load_dataset(f, labels=["x", "y", "z"])


def test_empty_split_is_an_error(tmp_path: Path) -> None:
    f = tmp_path / "empty.npz"
    np.savez(
        f,
        train_images=np.zeros((2, 8, 8), np.uint8),
        train_labels=np.array([[0], [1]], np.uint8),
        test_images=np.zeros((0, 8, 8), np.uint8),
        test_labels=np.zeros((0, 1), np.uint8),
    )
    with pytest.raises(DataError, match="test split is empty"):
        load_dataset(f)


def test_corrupt_npz_and_corrupt_image(tmp_path: Path) -> None:
    f = tmp_path / "corrupt.npz"
    f.write_bytes(BREAST.read_bytes()[:2000])
    with pytest.raises(DataError, match=r"corrupt\.npz"):
        load_dataset(f)
    root = _class_folder(tmp_path / "set")
    broken = root / "nevus" / "zz_broken.jpg"
    broken.write_bytes((ISIC / "ISIC_0000014.jpg").read_bytes()[:300])
    with pytest.raises(DataError, match="unreadable image") as info:
        load_dataset(root)
    assert info.value.path.endswith("zz_broken.jpg")


def test_csv_problems(tmp_path: Path) -> None:
    shutil.copy(ISIC / "ISIC_0000014.jpg", tmp_path / "a.jpg")
    (tmp_path / "labels.csv").write_text("name,cls\na.jpg,0\n")
    with pytest.raises(DataError, match="header 'file,label'"):
        load_dataset(tmp_path)
    (tmp_path / "labels.csv").write_text("file,label\na.jpg,0\nmissing.jpg,1\n")
    with pytest.raises(DataError, match="not found") as info:
        load_dataset(tmp_path)
    assert info.value.path.endswith("missing.jpg")
    (tmp_path / "labels.csv").write_text("file,label\na.jpg,cat\n")
    with pytest.raises(DataError, match="not among the names"):
        load_dataset(tmp_path, labels=["nevus", "melanoma"])


def test_single_class_folder_is_rejected(tmp_path: Path) -> None:
    root = _class_folder(tmp_path / "set")
    shutil.rmtree(root / "nevus")
    with pytest.raises(DataError, match="1 class sub-folder"):
        load_dataset(root)
