"""Load a labelled image dataset from a MedMNIST-style ``.npz`` or from a folder of images.

Every loader returns the same :class:`Dataset`: uint8 images ``(N, H, W, C)`` and int64 labels ``(N,)`` per
split, the label names, and the colour mode. Folder images go through :func:`edgemed.preprocess.prepare`,
the same function the device uses, so a photo is colour-converted and resized identically at training time and
in the field.

Accepted layouts:

* ``file.npz`` with ``train_images``/``train_labels`` (and optionally ``val_*``, ``test_*`` and ``classes``);
  images ``(N, H, W)`` or ``(N, H, W, 3)`` uint8, labels ``(N, 1)`` or ``(N,)`` integers.
* ``folder/<class>/*.png|jpg`` (one sub-folder per class), or ``folder/{train,val,test}/<class>/*``.
* ``folder/labels.csv`` with a header ``file,label[,...]``; ``label`` is an integer index or a class name.

Folders without their own ``train/ val/ test/`` split are split here: stratified per class and seeded, so the
same folder always gives the same split. This module does not import TensorFlow.
"""

from __future__ import annotations

import csv
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgemed.errors import DataError
from edgemed.manifest import InputSpec

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
#: Folder images have no native size; 64x64 keeps a dermoscopy or ultrasound photo recognisable and small.
DEFAULT_FOLDER_SIZE = (64, 64)
#: Fractions of each class sent to (train, val, test) when a folder has no split of its own.
SPLIT_FRACTIONS = (0.7, 0.15, 0.15)
SPLIT_SEED = 0


@dataclass
class Dataset:
    """A labelled image dataset, split into train/val/test.

    Attributes:
        splits: split name -> (images uint8 ``(N, H, W, C)``, labels int64 ``(N,)``); ``train`` is always
            present.
        labels: class names; label value ``i`` means ``labels[i]``.
        colour_mode: ``gray`` (C = 1) or ``rgb`` (C = 3).
        source: the file or folder it was read from.
        stored_labels: the data's own name for each label value (a ``.npz``'s ``classes``, class sub-folder or
            CSV label names), whatever ``labels`` says; ``None`` when it has integer labels only.
        stored_shape: ``(H, W, C)`` of a ``.npz``'s images as stored, before any resize or colour conversion;
            ``None`` for folders (photos have no common stored size).
    """

    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    labels: list[str]
    colour_mode: str
    source: str
    notes: list[str] = field(default_factory=list)
    stored_labels: list[str] | None = None
    stored_shape: tuple[int, int, int] | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of every image."""
        h, w, c = self.splits["train"][0].shape[1:]
        return int(h), int(w), int(c)

    @property
    def num_classes(self) -> int:
        """Number of label names."""
        return len(self.labels)

    def input_spec(self) -> InputSpec:
        """The device-side preprocessing that reproduces these images from a raw frame."""
        h, w, c = self.image_shape
        return InputSpec(
            height=h,
            width=w,
            channels=1 if c == 1 else 3,
            colour_mode="gray" if c == 1 else "rgb",
            resize="area",
        )

    def count_per_class(self, split: str) -> list[int]:
        """How many images of each class the split holds."""
        return [int(n) for n in np.bincount(self.splits[split][1], minlength=self.num_classes)]


def load_dataset(
    path: str | Path,
    labels: list[str] | None = None,
    image_size: tuple[int, int] | None = None,
    colour_mode: str | None = None,
) -> Dataset:
    """Read a dataset from a ``.npz`` file or an image folder.

    Args:
        path: a MedMNIST-layout ``.npz``, a folder with one sub-folder per class, or a folder with
            ``labels.csv``.
        labels: class names in label order (e.g. from ``edgemed train --labels benign,malignant``); overrides
            the names found in the data, and must cover every label value.
        image_size: ``(height, width)`` to resize to; default: the file's own size (``.npz``) or 64x64
            (folders).
        colour_mode: ``gray`` or ``rgb``; default: as stored (``.npz``) or ``rgb`` (folders).

    Returns:
        The dataset with uint8 ``(N, H, W, C)`` images and int64 labels.

    Raises:
        DataError: the path is missing or unusable; the message names the file and the problem.
    """
    path = Path(path)
    if colour_mode not in (None, "gray", "rgb"):
        raise DataError(path, f"colour mode {colour_mode!r} is not supported; use 'gray' or 'rgb'")
    if labels is not None and len(labels) < 2:
        raise DataError(
            path,
            f"{len(labels)} label name(s) given; a classifier needs at least two, e.g. --labels benign,malignant",
        )
    if not path.exists():
        raise DataError(path, "no such file or folder; pass a .npz file or an image folder")
    if path.is_dir():
        ds = _load_folder(path, labels, image_size or DEFAULT_FOLDER_SIZE, colour_mode or "rgb")
    elif path.suffix.lower() == ".npz":
        ds = _load_npz(path, labels)
        ds = _conform(ds, image_size, colour_mode)
    else:
        raise DataError(path, f"unsupported file type {path.suffix!r}; pass a MedMNIST .npz or a folder")
    _check(ds, path)
    return ds


# ------------------------------------------------------------------------------------------------------ npz


def _load_npz(path: Path, labels: list[str] | None) -> Dataset:
    try:
        archive = np.load(path, allow_pickle=False)
        keys = set(archive.files)
        arrays = {k: archive[k] for k in keys}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(path, f"not a readable .npz archive ({exc}); re-download or re-create it") from exc
    if "train_images" not in keys or "train_labels" not in keys:
        raise DataError(
            path,
            f"missing key 'train_images' or 'train_labels' (found: {sorted(keys)}); "
            "use the MedMNIST layout train/val/test_images and _labels",
        )
    splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split in SPLITS:
        ik, lk = f"{split}_images", f"{split}_labels"
        if (ik in keys) != (lk in keys):
            raise DataError(
                path, f"missing key {lk if ik in keys else ik!r}: every split needs both _images and _labels"
            )
        if ik not in keys:
            continue
        splits[split] = (_npz_images(path, ik, arrays[ik]), _npz_labels(path, lk, arrays[lk]))
        if len(splits[split][0]) != len(splits[split][1]):
            raise DataError(
                path,
                f"{ik} has {len(splits[split][0])} images but {lk} has "
                f"{len(splits[split][1])} labels; they must match one to one",
            )
    names = [str(c) for c in arrays["classes"].tolist()] if "classes" in keys else None
    if names is not None and labels is not None and len(names) != len(labels):
        raise DataError(
            path,
            f"--labels gives {len(labels)} names but the file's 'classes' has {len(names)} "
            f"({', '.join(names)}); give one name per class",
        )
    n_classes = max(int(y.max()) + 1 if len(y) else 0 for _, y in splits.values())
    final = labels or names or [f"class_{i}" for i in range(max(n_classes, 2))]
    colour = "gray" if splits["train"][0].shape[-1] == 1 else "rgb"
    h, w, c = splits["train"][0].shape[1:]
    return Dataset(
        splits=splits,
        labels=list(final),
        colour_mode=colour,
        source=str(path),
        stored_labels=names,
        stored_shape=(int(h), int(w), int(c)),
    )


def _npz_images(path: Path, key: str, arr: np.ndarray) -> np.ndarray:
    if arr.dtype != np.uint8:
        raise DataError(path, f"{key} has dtype {arr.dtype}; images must be uint8 pixels 0..255")
    if arr.ndim == 3:
        return arr[..., None]
    if arr.ndim == 4 and arr.shape[-1] in (1, 3):
        return arr
    raise DataError(path, f"{key} has shape {arr.shape}; expected (N, H, W) or (N, H, W, 3)")


def _npz_labels(path: Path, key: str, arr: np.ndarray) -> np.ndarray:
    if not np.issubdtype(arr.dtype, np.integer):
        raise DataError(path, f"{key} has dtype {arr.dtype}; labels must be integer class indices")
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise DataError(path, f"{key} has shape {arr.shape}; expected (N, 1) or (N,) single-label classes")
    if len(arr) and int(arr.min()) < 0:
        raise DataError(path, f"{key} holds a negative label ({int(arr.min())}); labels are 0..K-1")
    return arr.astype(np.int64)


def _conform(ds: Dataset, image_size: tuple[int, int] | None, colour_mode: str | None) -> Dataset:
    """Resize and colour-convert stored arrays when the caller asks for another size or mode."""
    h, w, _ = ds.image_shape
    size = image_size or (h, w)
    mode = colour_mode or ds.colour_mode
    if size == (h, w) and mode == ds.colour_mode:
        return ds
    spec = InputSpec(
        height=size[0],
        width=size[1],
        channels=1 if mode == "gray" else 3,
        colour_mode="gray" if mode == "gray" else "rgb",
    )
    from edgemed.preprocess import prepare

    splits = {
        name: (
            np.stack([prepare(img, spec) for img in x])
            if len(x)
            else np.zeros((0, size[0], size[1], spec.channels), np.uint8),
            y,
        )
        for name, (x, y) in ds.splits.items()
    }
    return Dataset(
        splits=splits,
        labels=ds.labels,
        colour_mode=mode,
        source=ds.source,
        notes=ds.notes,
        stored_labels=ds.stored_labels,
        stored_shape=ds.stored_shape,
    )


# -------------------------------------------------------------------------------------------------- folders


def _load_folder(path: Path, labels: list[str] | None, size: tuple[int, int], mode: str) -> Dataset:
    spec = InputSpec(
        height=size[0],
        width=size[1],
        channels=1 if mode == "gray" else 3,
        colour_mode="gray" if mode == "gray" else "rgb",
    )
    if (path / "labels.csv").is_file():
        files, y, names, named = _read_labels_csv(path / "labels.csv", labels)
        images = np.stack([_read_image(f, spec) for f in files]) if files else _empty(spec)
        splits = _stratified_split(images, y, len(names))
        stored = list(names) if named else None
        return Dataset(splits=splits, labels=names, colour_mode=mode, source=str(path), stored_labels=stored)
    split_dirs = [d for d in SPLITS if (path / d).is_dir()]
    if split_dirs:
        if "train" not in split_dirs:
            raise DataError(path / "train", "the folder has val/ or test/ but no train/ sub-folder")
        names = labels or _class_dirs(path / "train")
        splits = {s: _read_class_dirs(path / s, names, spec) for s in split_dirs}
        return Dataset(splits=splits, labels=list(names), colour_mode=mode, source=str(path), stored_labels=list(names))
    names = labels or _class_dirs(path)
    images, y = _read_class_dirs(path, names, spec)
    return Dataset(
        splits=_stratified_split(images, y, len(names)),
        labels=list(names),
        colour_mode=mode,
        source=str(path),
        stored_labels=list(names),
    )


def _class_dirs(path: Path) -> list[str]:
    names = sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(names) < 2:
        raise DataError(
            path,
            f"found {len(names)} class sub-folder(s); put each class's images in its own "
            "sub-folder (e.g. benign/ and malignant/) or add a labels.csv (file,label)",
        )
    return names


def _read_class_dirs(path: Path, names: Sequence[str], spec: InputSpec) -> tuple[np.ndarray, np.ndarray]:
    found = sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    unknown = [d for d in found if d not in names]
    if unknown:
        raise DataError(
            path,
            f"sub-folder(s) {unknown} are not among the label names {list(names)}; "
            "rename them or pass every class in --labels",
        )
    images: list[np.ndarray] = []
    ys: list[int] = []
    for index, name in enumerate(names):
        folder = path / name
        files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
        images.extend(_read_image(f, spec) for f in files)
        ys.extend([index] * len(files))
    if not images:
        raise DataError(path, f"no images ({', '.join(IMAGE_SUFFIXES)}) in the class sub-folders")
    return np.stack(images), np.asarray(ys, dtype=np.int64)


def _read_labels_csv(csv_path: Path, labels: list[str] | None) -> tuple[list[Path], np.ndarray, list[str], bool]:
    """Files, label values, label names, and whether the CSV itself names the classes."""
    try:
        with open(csv_path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(csv_path, f"cannot read the CSV ({exc})") from exc
    if not rows or "file" not in rows[0] or "label" not in rows[0]:
        raise DataError(csv_path, "needs a header 'file,label' and at least one row, e.g. 'a.jpg,melanoma'")
    raw = [(r["file"] or "").strip() for r in rows], [(r["label"] or "").strip() for r in rows]
    if all(v.lstrip("-").isdigit() for v in raw[1]):
        y = np.asarray([int(v) for v in raw[1]], dtype=np.int64)
        if int(y.min()) < 0:
            raise DataError(csv_path, f"negative label {int(y.min())}; labels are 0..K-1 or class names")
        names = labels or [f"class_{i}" for i in range(max(int(y.max()) + 1, 2))]
        named = False
    else:
        names = labels or sorted(set(raw[1]))
        unknown = sorted(set(raw[1]) - set(names))
        if unknown:
            raise DataError(csv_path, f"label(s) {unknown} are not among the names {names}; fix the CSV or --labels")
        y = np.asarray([names.index(v) for v in raw[1]], dtype=np.int64)
        named = True
    files = [csv_path.parent / f for f in raw[0]]
    return files, y, list(names), named


def _read_image(path: Path, spec: InputSpec) -> np.ndarray:
    import cv2

    from edgemed.preprocess import prepare

    if not path.is_file():
        raise DataError(path, "image listed but not found; fix the file name or remove the row")
    # imdecode on bytes we read ourselves: cv2.imread returns None silently and cannot read non-ASCII paths.
    try:
        buffer = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    except OSError as exc:
        raise DataError(path, f"cannot read the image ({exc})") from exc
    bgr = cv2.imdecode(buffer, cv2.IMREAD_COLOR) if buffer.size else None
    if bgr is None:
        raise DataError(path, "unreadable image (not PNG/JPEG/BMP/TIFF, or truncated); replace or remove it")
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    return prepare(rgb, spec)


def _empty(spec: InputSpec) -> np.ndarray:
    return np.zeros((0, spec.height, spec.width, spec.channels), np.uint8)


def _stratified_split(images: np.ndarray, y: np.ndarray, n_classes: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per class, shuffle with a fixed seed and cut into train/val/test; each split gets >= 1 image per class
    whenever the class has >= 3 images, so small folders still give a usable evaluation split."""
    rng = np.random.default_rng(SPLIT_SEED)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for cls in range(n_classes):
        idx = np.flatnonzero(y == cls)
        rng.shuffle(idx)
        n = len(idx)
        n_val = max(1, round(n * SPLIT_FRACTIONS[1])) if n >= 3 else 0
        n_test = max(1, round(n * SPLIT_FRACTIONS[2])) if n >= 3 else 0
        parts["val"].append(idx[:n_val])
        parts["test"].append(idx[n_val : n_val + n_test])
        parts["train"].append(idx[n_val + n_test :])
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split, chunks in parts.items():
        idx = np.sort(np.concatenate(chunks)) if chunks else np.zeros(0, np.int64)
        out[split] = (images[idx], y[idx])
    return out


# ----------------------------------------------------------------------------------------------- validation


def _check(ds: Dataset, path: Path) -> None:
    shapes = {x.shape[1:] for x, _ in ds.splits.values()}
    if len(shapes) > 1:
        raise DataError(path, f"splits have different image shapes {sorted(shapes)}; use one size for all")
    for split, (x, y) in ds.splits.items():
        if len(x) == 0:
            raise DataError(
                path,
                f"the {split} split is empty; add images (each class needs >= 3 images when the split is made here)",
            )
        if len(y) and int(y.max()) >= ds.num_classes:
            raise DataError(
                path,
                f"{split} labels go up to {int(y.max())} but only {ds.num_classes} names "
                f"are known ({', '.join(ds.labels)}); labels must be "
                f"0..{ds.num_classes - 1}",
            )
    present = np.unique(ds.splits["train"][1])
    if len(present) < 2:
        raise DataError(
            path,
            f"the train split holds only class {ds.labels[int(present[0])]!r}; "
            "training needs images of at least two classes",
        )
