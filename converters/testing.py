"""Helpers for other packages' tests: a real, small int8 model built from the repository's own data.

``build_reference_model`` trains the reference CNN briefly on ``data/breastmnist_28.npz`` and converts it with
the real converter, so device-side tests run a genuine LiteRT int8 model with a genuine manifest beside it.
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
BREASTMNIST = REPO_ROOT / "data" / "breastmnist_28.npz"
BREAST_LABELS = ["malignant", "benign"]


def build_reference_model(out_dir: Path, epochs: int = 3, seed: int = 0) -> Path:
    """Train the reference CNN on BreastMNIST and convert it to int8 with the acceptance gate.

    Writes ``out_dir/breast_int8.tflite``, ``out_dir/breast.manifest.json`` and the report (the trained Keras
    model stays in ``out_dir/keras/breast.keras``); about 15 s on two cores. With only a few epochs the float
    model is weak but the int8 model matches it, so the gate accepts it.

    Args:
        out_dir: folder for the model files (created if needed).
        epochs: training epochs (3 is enough for a working model).
        seed: training seed.

    Returns:
        Path of the int8 ``.tflite`` (inside ``out_dir/rejected/`` if the gate rejected it).
    """
    from converters.convert import convert
    from converters.data import load_dataset
    from converters.train import train

    out_dir = Path(out_dir)
    ds = load_dataset(BREASTMNIST, labels=BREAST_LABELS)
    trained = train(ds, out_dir / "keras", recipe="reference", seed=seed, epochs=epochs, progress=False, name="breast")
    result = convert(trained.model_path, ds, out_dir, targets=("int8",), name="breast", progress=False)
    return result.artifacts["int8"]


def build_float_model(model_dir: Path, out: Path) -> Path:
    """Convert the reference model kept by :func:`build_reference_model` to a float32 TFLite file with its softmax.

    A genuine converter output that differs from the int8 artifact in every way the manifest records (float32
    tensors, no quantization, probabilities out, a single output), for tests of what the device does with a
    mislabelled file.

    Args:
        model_dir: the ``out_dir`` given to :func:`build_reference_model`.
        out: the ``.tflite`` file to write.

    Returns:
        ``out``.
    """
    from converters.convert import calibration_sample, to_tflite
    from converters.data import load_dataset
    from converters.source import load_source

    # No feature outputs: one output, as every converted file had before the OOD feature score.
    source = load_source(Path(model_dir) / "keras" / "breast.keras", strip_softmax=False, taps=False)
    calib = calibration_sample(load_dataset(BREASTMNIST, labels=BREAST_LABELS))  # unused by float32; required
    Path(out).write_bytes(to_tflite(source, "float32", calib))
    return Path(out)


# Epochs for build_gap_model: measured on two cores, 12 epochs of the `best` recipe on BreastMNIST take about 25 s
# and leave several malignant test images above p(malignant) 0.9 (see the docstring); fewer left the model timid.
GAP_EPOCHS = 12


def build_gap_model(out_dir: Path, epochs: int = GAP_EPOCHS, seed: int = 0) -> Path:
    """Train the ``best`` recipe (a BatchNorm CNN ending in global average pooling) on BreastMNIST; convert int8.

    The conversion keeps its defaults: the OOD feature score (``--ood auto``) and the class activation map
    (``--cam auto``: the model ends in GAP + Dense, so the int8 file gets a ``feature_map`` output and its
    artifact a ``cam`` section). Writes ``out_dir/breast_gap_int8.tflite``, ``out_dir/breast_gap.manifest.json``
    and the report; the Keras model stays in ``out_dir/keras/breast_gap.keras``.

    Args:
        out_dir: folder for the model files (created if needed).
        epochs: training epochs (early stopping may end sooner).
        seed: training seed.

    Returns:
        Path of the int8 ``.tflite`` (inside ``out_dir/rejected/`` if the gate rejected it).
    """
    from converters.convert import convert
    from converters.data import load_dataset
    from converters.train import train

    out_dir = Path(out_dir)
    ds = load_dataset(BREASTMNIST, labels=BREAST_LABELS)
    trained = train(ds, out_dir / "keras", recipe="best", seed=seed, epochs=epochs, progress=False, name="breast_gap")
    result = convert(trained.model_path, ds, out_dir, targets=("int8",), name="breast_gap", progress=False)
    return result.artifacts["int8"]
