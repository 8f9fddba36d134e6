"""`edgemed convert` refuses calibration and evaluation data that is not the model's: other classes, another class
count, another size or colour mode (exit 2, before TensorFlow is imported).

The model is the BreastMNIST reference model behind the `int8_model` fixture (28x28 gray, malignant/benign). The
wrong data is built from the repository's own dermoscopy photographs (data/isic_samples), as the 64x64 colour
ISIC set that was once accepted for it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from converters.data import load_dataset
from converters.fit import Expectation, expectation, fit_to_model, read_training_record
from edgemed.cli import main
from edgemed.errors import DataError

ROOT = Path(__file__).resolve().parent.parent
ISIC = ROOT / "data" / "isic_samples"
BREAST = ROOT / "data" / "breastmnist_28.npz"


@pytest.fixture(scope="module")
def breast_keras(int8_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture's trained Keras model with the training record `edgemed train` wrote beside it."""
    folder = tmp_path_factory.mktemp("keras")
    for f in (int8_model.parent / "keras").iterdir():
        shutil.copy(f, folder / f.name)
    return folder / "breast.keras"


def _isic_npz(path: Path, *, classes: bool = True) -> Path:
    """The 12 ISIC photographs at 64x64 RGB in the MedMNIST layout, like isic_uda1_64.npz.

    Each photograph in its 8 rotations and mirror images (a lesion has no up), so that every class has enough
    images to calibrate (18) and to be judged (24): only the check of what the data is can refuse it.
    """
    ds = load_dataset(ISIC, image_size=(64, 64), colour_mode="rgb")
    x = np.concatenate([x for x, _ in ds.splits.values()])
    y = np.concatenate([y for _, y in ds.splits.values()])
    variants = [np.rot90(x, k, axes=(1, 2)) for k in range(4)]
    variants += [v[:, :, ::-1] for v in variants]
    parts = {"train": variants[:3], "val": variants[3:4], "test": variants[4:]}
    arrays: dict[str, np.ndarray] = {}
    for split, chunk in parts.items():
        arrays[f"{split}_images"] = np.ascontiguousarray(np.concatenate(chunk))
        arrays[f"{split}_labels"] = np.tile(y, len(chunk))[:, None]
    if classes:
        arrays["classes"] = np.asarray(["nevus", "melanoma"])
    np.savez(path, **arrays)
    return path


def _convert(model: Path, data: Path, out: Path, *extra: str) -> int:
    return main(["convert", str(model), "--calibration", str(data), "--out", str(out), "--no-progress", *extra])


def test_data_of_other_classes_is_refused_before_any_work(
    breast_keras: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    npz = _isic_npz(tmp_path / "isic_64.npz")
    assert _convert(breast_keras, npz, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"{npz}: its classes are nevus, melanoma but breast.keras was trained on malignant, benign" in err
    assert "breast.labels.json" in err and "use calibration images of the model's own classes" in err
    assert not (tmp_path / "out").exists()

    # The same photographs as a folder whose labels.csv names the classes.
    folder = tmp_path / "photos"
    folder.mkdir()
    rows = [line.split(",") for line in (ISIC / "labels.csv").read_text().splitlines()[1:]]
    for name, _, _ in rows:
        shutil.copy(ISIC / name, folder / name)
    (folder / "labels.csv").write_text("file,label\n" + "".join(f"{n},{d}\n" for n, _, d in rows))
    assert _convert(breast_keras, folder, tmp_path / "out") == 2
    assert f"{folder}: its classes are " in capsys.readouterr().err


def test_another_size_or_colour_mode_is_refused_unless_converted_on_purpose(
    breast_keras: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    npz = _isic_npz(tmp_path / "unnamed_64.npz", classes=False)  # integer labels only: the names cannot tell
    assert _convert(breast_keras, npz, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "calibration images are stored as 64x64 rgb but the model expects 28x28 gray (breast.keras)" in err
    assert "--image-size 28x28 --colour-mode gray" in err
    assert not (tmp_path / "out").exists()


def test_another_class_count_and_other_labels_are_refused(
    breast_keras: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = dict(np.load(BREAST))
    for split in ("train", "val", "test"):
        labels = data[f"{split}_labels"].copy()
        labels[::3] = 2  # a third class the model has no output for
        data[f"{split}_labels"] = labels
    three = tmp_path / "three.npz"
    np.savez(three, **data)
    assert _convert(breast_keras, three, tmp_path / "out") == 2
    assert "its labels are 0..2 (3 classes) but breast.keras outputs 2 classes" in capsys.readouterr().err

    assert _convert(breast_keras, BREAST, tmp_path / "out", "--labels", "benign,malignant") == 2
    err = capsys.readouterr().err
    assert "--labels benign,malignant differs from the classes breast.keras was trained on" in err


def test_the_models_own_data_fits_and_named_classes_are_put_in_the_models_order(
    breast_keras: Path, tmp_path: Path
) -> None:
    exp = expectation(breast_keras, read_training_record(breast_keras))
    assert exp.labels == ["malignant", "benign"] and exp.shape == (28, 28, 1)
    assert exp.training_shape == (28, 28, 1) and exp.colour_images is False
    fitted = fit_to_model(load_dataset(BREAST), exp, "calibration")
    assert fitted.labels == ["malignant", "benign"]
    assert np.array_equal(fitted.splits["test"][1], np.load(BREAST)["test_labels"].reshape(-1))

    # Class folders sort as benign/ (0), malignant/ (1): fitted, each image keeps its class under the model's order.
    data = np.load(BREAST)
    folder = tmp_path / "classes"
    for i, (image, label) in enumerate(zip(data["train_images"][:60], data["train_labels"][:60, 0], strict=True)):
        sub = folder / ["malignant", "benign"][int(label)]
        sub.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(sub / f"{i}.png"), image)
    ds = load_dataset(folder, image_size=(28, 28), colour_mode="gray")
    assert ds.labels == ["benign", "malignant"]
    fitted = fit_to_model(ds, exp, "calibration")
    assert fitted.labels == ["malignant", "benign"]
    for split, (_, y) in ds.splits.items():
        assert np.array_equal(fitted.splits[split][1], 1 - y)


def test_a_colour_model_is_not_calibrated_on_images_without_colour(tmp_path: Path) -> None:
    colour = load_dataset(ISIC, image_size=(32, 32), colour_mode="rgb")
    exp = Expectation(model="skin.keras", labels=["class_0", "class_1"], classes=2, shape=(32, 32, 3))
    assert fit_to_model(colour, _with_colour(exp, True), "calibration") is not None
    gray_as_rgb = load_dataset(ISIC, image_size=(32, 32), colour_mode="gray")
    splits = {k: (np.repeat(x, 3, axis=-1), y) for k, (x, y) in gray_as_rgb.splits.items()}
    gray_as_rgb.splits = splits
    with pytest.raises(DataError, match=r"every calibration image is grayscale but skin\.keras was trained on colour"):
        fit_to_model(gray_as_rgb, _with_colour(exp, True), "calibration")
    # A model trained on gray images stored as RGB is calibrated with such images.
    assert fit_to_model(gray_as_rgb, _with_colour(exp, False), "calibration").labels == exp.labels


def _with_colour(exp: Expectation, colour: bool) -> Expectation:
    return replace(exp, colour_images=colour)


@pytest.mark.slow
def test_convert_refuses_evaluation_data_of_other_classes(breast_keras: Path, tmp_path: Path) -> None:
    npz = _isic_npz(tmp_path / "isic_64.npz")
    code = (
        "import sys; from pathlib import Path; from converters.convert import convert; "
        "from converters.data import load_dataset; from edgemed.errors import DataError\n"
        "cal = load_dataset(sys.argv[2], labels=['malignant', 'benign'])\n"
        "ev = load_dataset(sys.argv[3], image_size=(28, 28), colour_mode='gray')\n"
        "try:\n    convert(Path(sys.argv[1]), cal, sys.argv[4], evaluation=ev, progress=False)\n"
        "except DataError as exc:\n    print(exc)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(breast_keras), str(BREAST), str(npz), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "its classes are nevus, melanoma" in proc.stdout and "use evaluation images" in proc.stdout
    assert json.dumps(sorted(p.name for p in (tmp_path / "out").glob("*.tflite"))) == "[]"


def test_classes_renamed_at_training_are_recognised_and_fitting_twice_changes_nothing(tmp_path: Path) -> None:
    ds = load_dataset(_isic_npz(tmp_path / "isic.npz"))
    assert ds.stored_labels == ["nevus", "melanoma"]
    # Trained with `--labels malignant,benign` on data that called them melanoma and nevus.
    exp = Expectation(
        model="skin.keras",
        labels=["malignant", "benign"],
        data_labels=["melanoma", "nevus"],
        classes=2,
        shape=(64, 64, 3),
        training_shape=(64, 64, 3),
    )
    once = fit_to_model(ds, exp, "calibration")
    twice = fit_to_model(once, exp, "evaluation")  # convert() checks again what the command line fitted
    assert once.labels == twice.labels == ["malignant", "benign"]
    for split, (_, y) in ds.splits.items():
        assert np.array_equal(once.splits[split][1], 1 - y) and np.array_equal(twice.splits[split][1], 1 - y)

    no_melanoma = {k: (x[y == 0], y[y == 0]) for k, (x, y) in ds.splits.items()}
    with pytest.raises(DataError, match="it has no calibration images of class melanoma; add some"):
        fit_to_model(replace(ds, splits=no_melanoma), exp, "calibration")


def _three_outputs() -> Expectation:
    return Expectation(model="m.keras", labels=["a", "b", "c"], classes=3, shape=(28, 28, 1))


def test_every_class_of_the_model_must_be_in_the_calibration_and_the_judged_split() -> None:
    ds = load_dataset(BREAST)
    assert ds.stored_labels is None  # integer labels only
    # Labels {0, 2} for a model of three outputs: the highest label + 1 is 3, but class b has no image at all.
    skipping = {k: (x, np.where(y == 1, 2, y)) for k, (x, y) in ds.splits.items()}
    with pytest.raises(DataError, match="it has no calibration images of class b; add some"):
        fit_to_model(replace(ds, splits=skipping), _three_outputs(), "calibration")
    # Every class over all splits together, but class c only in the training images: the test split, which the
    # gate judges on, has none, so its clinical floors could not be checked.
    x, y = ds.splits["train"]
    train = (np.concatenate([x, x[:30]]), np.concatenate([y, np.full(30, 2)]))
    only_in_train = {**ds.splits, "train": train, "val": (x[:60], np.repeat([0, 1, 2], 20))}
    with pytest.raises(DataError, match=r"its test split, which the gate judges m\.keras on, has no images of class c"):
        fit_to_model(replace(ds, splits=only_in_train), _three_outputs(), "calibration")
    # The split the gate is told to judge on is the one that must hold every class.
    fitted = fit_to_model(replace(ds, splits=only_in_train), _three_outputs(), "calibration", eval_split="val")
    assert fitted.labels == ["a", "b", "c"]
    with pytest.raises(DataError, match="its test split"):
        fit_to_model(replace(ds, splits=only_in_train), _three_outputs(), "evaluation")
    # Calibration data given beside separate evaluation data is not judged on: only its train split counts.
    assert fit_to_model(replace(ds, splits=only_in_train), _three_outputs(), "calibration", evaluated=False)
    # A label beyond the model's outputs is still refused as before.
    beyond = {k: (x, np.where(y == 1, 3, y)) for k, (x, y) in ds.splits.items()}
    with pytest.raises(DataError, match=r"its labels are 0\.\.3 \(4 classes\) but m\.keras outputs 3 classes"):
        fit_to_model(replace(ds, splits=beyond), _three_outputs(), "calibration")


def test_named_classes_must_be_in_the_judged_split_too(tmp_path: Path) -> None:
    ds = load_dataset(_isic_npz(tmp_path / "isic.npz"))
    exp = Expectation(model="skin.keras", labels=["nevus", "melanoma"], classes=2, shape=(64, 64, 3))
    x, y = ds.splits["test"]
    no_melanoma_in_test = {**ds.splits, "test": (x[y == 0], y[y == 0])}
    with pytest.raises(
        DataError, match=r"its test split, which the gate judges skin\.keras on, has no images of class melanoma"
    ):
        fit_to_model(replace(ds, splits=no_melanoma_in_test), exp, "calibration")
