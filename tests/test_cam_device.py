"""The device's class activation map and occlusion map (``edgemed.cam``) on real int8 models in a real LiteRT
interpreter: the GAP model's CAM against the float Keras model's, and occlusion on the reference CNN (no CAM)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gap_model import gap_model_fixture

from edgemed.cam import CamComputer, occlusion_map
from edgemed.deploy import check_deployable
from edgemed.errors import ModelError
from edgemed.inference import BackendConfig
from edgemed.inference.classify import Classifier
from edgemed.manifest import Artifact
from edgemed.types import TensorSpec

__all__ = ["gap_model_fixture"]

ROOT = Path(__file__).resolve().parent.parent
MIN_PEARSON = 0.9
CAM_IMAGES = 24  # BreastMNIST validation images compared


def _classifier(model: Path, manifest: Path | None = None) -> Classifier:
    deployable = check_deployable(model, manifest or next(model.parent.glob("*.manifest.json")))
    return Classifier(deployable.open_backend(BackendConfig()), deployable.manifest, deployable.artifact)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def _keras_maps(gap_model: Path, layer: str, images: np.ndarray, classes: np.ndarray, tmp: Path) -> Any:
    """The float Keras model's CAMs, computed by tests/keras_cam.py in a subprocess (no TF in this process)."""
    inputs, out = tmp / "in.npz", tmp / "out.npz"
    np.savez(inputs, images=images, classes=classes)
    env = {**os.environ, "KERAS_HOME": str(tmp / "keras_home"), "PYTHONPATH": str(ROOT)}
    keras_model = gap_model.parent / "keras" / "breast_gap.keras"
    cmd = [sys.executable, str(ROOT / "tests" / "keras_cam.py"), str(keras_model), layer, str(inputs), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return np.load(out)


def test_int8_cam_follows_the_float_keras_cam(gap_model: Path, data_dir: Path, tmp_path: Path) -> None:
    """(a) The device's map from the int8 file's feature_map output vs the float Keras model's on real images."""
    classifier = _classifier(gap_model)
    cam = CamComputer.build(classifier)
    assert cam is not None and cam.shape == (7, 7)
    images = np.load(data_dir / "breastmnist_28.npz")["val_images"][:CAM_IMAGES]
    device_maps, classes = [], []
    for seq, image in enumerate(images):
        raw = classifier.backend.invoke(classifier.preprocess(image))
        top = classifier.scores(raw).index
        result = cam.compute(top, seq)
        assert result.kind == "cam" and result.seq == seq and result.label == classifier.labels[top]
        assert result.values.dtype == np.float32 and result.values.shape == (7, 7)
        device_maps.append(result.values)
        classes.append(top)
    assert set(classes) == {0, 1}, "the images should cover both classes: the maps of each class's column are compared"
    keras = _keras_maps(gap_model, cam.layer or "", images, np.asarray(classes), tmp_path)
    pearson = np.array([_pearson(d, k) for d, k in zip(device_maps, keras["maps"], strict=True)])
    print(
        f"CAM int8 vs float Keras Pearson over {len(pearson)} images: min {pearson.min():.4f} median "
        f"{np.median(pearson):.4f}"
    )
    assert pearson.min() >= MIN_PEARSON, pearson
    # The same values, not only the same shape: a least-squares line from the float map to the device's has slope 1
    # (no lost or doubled scale) and no offset (no lost zero point), and the int8 rounding left is small. Measured on
    # these 24 images: slopes 0.996-1.025, offsets within 4% of the map's peak, relative L2 error at most 8.7%.
    for d, k in zip(device_maps, keras["maps"], strict=True):
        peak = float(np.abs(k).max())
        slope, offset = np.polyfit(k.ravel().astype(np.float64), d.ravel().astype(np.float64), 1)
        assert 0.9 <= slope <= 1.1, slope
        assert abs(offset) <= 0.1 * peak, (offset, peak)
        assert np.linalg.norm(d - k) <= 0.15 * np.linalg.norm(k)
        assert float(np.abs(d - k).max()) <= 0.2 * peak
    # The weights the device used are the Keras Dense kernel, in label order.
    assert classifier.artifact.cam is not None
    np.testing.assert_allclose(np.asarray(classifier.artifact.cam.weights), keras["kernel"], rtol=1e-6)


def test_cam_means_the_class_score(gap_model: Path, data_dir: Path) -> None:
    """The map's mean is the class's logit less its bias (GAP + Dense), so the two classes' maps differ by the
    logit difference: checks that the weights' columns are in label order."""
    classifier = _classifier(gap_model)
    cam = CamComputer.build(classifier)
    assert cam is not None
    spec = classifier.backend.output_spec
    for seq, image in enumerate(np.load(data_dir / "breastmnist_28.npz")["test_images"][:10]):
        raw = classifier.backend.invoke(classifier.preprocess(image))
        logits = spec.scale * (raw.astype(np.float64) - spec.zero_point)
        means = [float(cam.compute(k, seq).values.mean()) for k in range(2)]
        # The biases cancel in neither order: compare the difference, with the int8 output's rounding as slack.
        assert means[0] - means[1] == pytest.approx(logits[0] - logits[1] - _bias_gap(classifier), abs=4 * spec.scale)


def _bias_gap(classifier: Classifier) -> float:
    """b_0 - b_1 of the Dense layer, read off one blank frame: logit difference minus map-mean difference."""
    cam = CamComputer.build(classifier)
    assert cam is not None
    raw = classifier.backend.invoke(classifier.preprocess(np.full((28, 28), 128, np.uint8)))
    spec = classifier.backend.output_spec
    logits = spec.scale * (raw.astype(np.float64) - spec.zero_point)
    return float(logits[0] - logits[1] - (cam.compute(0, 0).values.mean() - cam.compute(1, 0).values.mean()))


class _ReorderedOutputs:
    """A real backend whose outputs are listed in another order, as TFLite may list a model's outputs."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.input_spec = inner.input_spec
        self.output_spec = inner.output_spec
        self.output_specs = tuple(reversed(inner.output_specs))

    def invoke(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self._inner.invoke(x))

    def output(self, name: str) -> np.ndarray:
        return np.asarray(self._inner.output(name))


def test_cam_reads_its_output_by_name_whatever_the_order(gap_model: Path, data_dir: Path) -> None:
    """(e) The same maps when the outputs are listed in reverse, and a same-shaped decoy listed first is ignored."""
    classifier = _classifier(gap_model)
    image = np.load(data_dir / "breastmnist_28.npz")["test_images"][3]
    cam = CamComputer.build(classifier)
    assert cam is not None
    classifier.backend.invoke(classifier.preprocess(image))
    expected = cam.compute(0, 1).values
    reordered = Classifier(
        _ReorderedOutputs(classifier.backend),
        classifier.manifest,
        classifier.artifact,  # type: ignore[arg-type]
    )
    assert classifier.artifact.cam is not None
    name = classifier.artifact.cam.output
    positions = [[s.name for s in b.output_specs].index(name) for b in (classifier.backend, reordered.backend)]
    assert positions[0] != positions[1], positions  # the map's position changed, its name did not
    other = CamComputer.build(reordered)
    assert other is not None
    reordered.backend.invoke(reordered.preprocess(image))
    np.testing.assert_array_equal(other.compute(0, 1).values, expected)

    fmap = next(s for s in classifier.backend.output_specs if s.name == name)
    decoy = TensorSpec("decoy", fmap.shape, fmap.dtype, fmap.scale, fmap.zero_point)
    backend = _DecoyFirst(classifier.backend, decoy)
    decoyed = CamComputer.build(Classifier(backend, classifier.manifest, classifier.artifact))  # type: ignore[arg-type]
    assert decoyed is not None
    backend.invoke(classifier.preprocess(image))
    np.testing.assert_array_equal(decoyed.compute(0, 1).values, expected)
    assert backend.read == [name]


class _DecoyFirst(_ReorderedOutputs):
    """Lists a decoy output of the feature map's shape first (all 127: a map read from it would be flat)."""

    def __init__(self, inner: Any, decoy: TensorSpec) -> None:
        super().__init__(inner)
        self.output_specs = (decoy, *inner.output_specs)
        self._decoy = decoy
        self.read: list[str] = []

    def output(self, name: str) -> np.ndarray:
        if name == self._decoy.name:
            return np.full(int(np.prod(self._decoy.shape)), 127, np.int8)
        if name != self.output_spec.name:
            self.read.append(name)
        return super().output(name)


def test_no_cam_section_means_no_computer(int8_model: Path) -> None:
    """The reference CNN (Flatten + Dense + Dense) has no cam: the screen offers occlusion instead."""
    classifier = _classifier(int8_model)
    assert classifier.artifact.cam is None
    assert CamComputer.build(classifier) is None


def _with_cam(classifier: Classifier, **change: Any) -> Classifier:
    """The classifier with its artifact's cam changed (validated like a manifest read from disk)."""
    raw = classifier.artifact.model_dump()
    raw["cam"] = {**raw["cam"], **change.pop("cam", {})}
    for output in raw["outputs"]:
        if output["role"] == "feature_map":
            output.update(change.pop("feature_map", {}))
    artifact = Artifact.model_validate(raw)
    return Classifier(classifier.backend, classifier.manifest, artifact)


def test_a_cam_that_is_not_the_files_is_refused(gap_model: Path) -> None:
    """(c) A manifest whose cam names an output the file lacks, or whose weights disagree with the file's map."""
    classifier = _classifier(gap_model)
    assert classifier.artifact.cam is not None
    rows = classifier.artifact.cam.weights
    # Renamed in outputs and cam alike (the manifest is consistent with itself, not with the file).
    renamed = _with_cam(classifier, cam={"output": "not_in_the_file"}, feature_map={"name": "not_in_the_file"})
    with pytest.raises(ModelError, match=r"'not_in_the_file', which the model file does not have.*edgemed convert"):
        CamComputer.build(renamed)
    # 32 channels in the manifest, 64 in the file.
    narrower = _with_cam(classifier, cam={"weights": rows[:32]}, feature_map={"shape": [1, 7, 7, 32]})
    with pytest.raises(
        ModelError, match=r"shape \(1, 7, 7, 64\) but the manifest's cam weights expect \(1, H', W', 32\)"
    ):
        CamComputer.build(narrower)
    three = _with_cam(classifier, cam={"weights": [[*row, 0.0] for row in rows]})
    with pytest.raises(ModelError, match="score 3 classes but the model has 2 labels"):
        CamComputer.build(three)


class _CountingBackend(_ReorderedOutputs):
    """A real backend that counts its invokes and checks each happens while the given lock is held."""

    def __init__(self, inner: Any, lock: threading.Lock) -> None:
        super().__init__(inner)
        self.output_specs = inner.output_specs
        self.invokes = 0
        self.unlocked = 0
        self._lock = lock

    def invoke(self, x: np.ndarray) -> np.ndarray:
        self.invokes += 1
        self.unlocked += not self._lock.locked()
        return super().invoke(x)


def _malignant_with_blank_corner(classifier: Classifier, data_dir: Path) -> tuple[np.ndarray, int]:
    """The malignant BreastMNIST test image the model is least decided on (p nearest 0.5, where covering a region
    moves p most: the reference CNN trained for 3 epochs is timid), its top-left 10x10 set to its own mean."""
    data = np.load(data_dir / "breastmnist_28.npz")
    images = data["test_images"][data["test_labels"].reshape(-1) == 0]
    malignant = classifier.labels.index("malignant")
    p = [
        classifier.scores(classifier.backend.invoke(classifier.preprocess(x))).probabilities[malignant] for x in images
    ]
    image = images[int(np.argmin(np.abs(np.asarray(p) - 0.5)))].copy()
    image[:10, :10] = np.uint8(round(float(image.mean())))
    return image, malignant


def test_occlusion_map_on_the_reference_model(int8_model: Path, data_dir: Path) -> None:
    """(d) Finite, on the patch grid, bounded invokes under the lock; covering the lesion lowers p(malignant) more
    than covering a blank corner, and each cell is the drop for the patch at that position."""
    classifier = _classifier(int8_model)
    image, malignant = _malignant_with_blank_corner(classifier, data_dir)
    lock = threading.Lock()
    counting = _CountingBackend(classifier.backend, lock)
    shared = Classifier(counting, classifier.manifest, classifier.artifact)  # type: ignore[arg-type]
    result = occlusion_map(shared, image, malignant, 7, lock=lock)
    # 28 px: patch 4 (a seventh), stride 2 -> top edges 0, 2, ..., 24: 13 x 13 positions, plus the whole frame.
    assert result.kind == "occlusion" and result.seq == 7 and result.label == "malignant"
    assert result.values.shape == (13, 13) and result.values.dtype == np.float32
    assert np.isfinite(result.values).all()
    assert counting.invokes == 13 * 13 + 1 and counting.unlocked == 0
    values = result.values
    corner = float(np.abs(values[:4, :4]).max())  # patches inside the blanked 10x10 corner: covering changes ~nothing
    assert corner < 0.01, values[:4, :4]
    peak = np.unravel_index(int(np.argmax(values)), values.shape)
    assert values[peak] > corner + 0.03, values
    assert min(peak) >= 4, f"the most telling patch {peak} lies in the blanked corner"
    # BreastMNIST crops centre on the lesion: covering the centre lowers p(malignant) on average, the corner not.
    assert float(values[4:9, 4:9].mean()) > corner + 0.01, values
    # The cell is the drop for that very patch (row-major, top-left first), recomputed here by hand.
    x = classifier.preprocess(image)
    base = classifier.scores(classifier.backend.invoke(x)).probabilities[malignant]
    covered = x.copy()
    top, left = 2 * int(peak[0]), 2 * int(peak[1])
    covered[0, top : top + 4, left : left + 4, :] = np.round(x.astype(np.float64).mean()).astype(x.dtype)
    p = classifier.scores(classifier.backend.invoke(covered)).probabilities[malignant]
    assert float(values[peak]) == pytest.approx(base - p, abs=1e-6)

    counting.invokes = 0
    coarse = occlusion_map(shared, image, malignant, 8, lock=lock, max_invokes=40)
    assert counting.invokes <= 40 and coarse.values.size + 1 == counting.invokes
    counting.invokes = 0
    assert occlusion_map(shared, image, malignant, 9, max_invokes=2).values.shape == (1, 1)
    assert counting.invokes == 2


def test_occlusion_map_refuses_bad_arguments(int8_model: Path) -> None:
    classifier = _classifier(int8_model)
    image = np.zeros((28, 28), np.uint8)
    with pytest.raises(ValueError, match="class_index 2 is not one of the model's 2 classes"):
        occlusion_map(classifier, image, 2, 0)
    with pytest.raises(ValueError, match="max_invokes must be at least 2"):
        occlusion_map(classifier, image, 0, 0, max_invokes=1)


def test_a_sparse_occlusion_grid_still_covers_every_pixel(int8_model: Path) -> None:
    """With few invokes allowed the patches move further apart and grow with their spacing: no strip is never
    covered (a checkerboard: no pixel equals the neutral fill, so each covered pixel shows in the input)."""
    classifier = _classifier(int8_model)
    image = (np.indices((28, 28)).sum(axis=0) % 2 * 255).astype(np.uint8)
    x = classifier.preprocess(image)

    class Recording(_ReorderedOutputs):
        def __init__(self, inner: Any) -> None:
            super().__init__(inner)
            self.output_specs = inner.output_specs
            self.covered = np.zeros(x.shape[1:3], bool)
            self.invokes = 0

        def invoke(self, tensor: np.ndarray) -> np.ndarray:
            self.invokes += 1
            self.covered |= (np.asarray(tensor) != x)[0].any(axis=-1)
            return super().invoke(tensor)

    for budget in (5, 10, 40, 400):
        recording = Recording(classifier.backend)
        result = occlusion_map(
            Classifier(recording, classifier.manifest, classifier.artifact),
            image,
            0,
            0,  # type: ignore[arg-type]
            max_invokes=budget,
        )
        assert recording.invokes == result.values.size + 1 <= budget
        assert recording.covered.all(), (budget, np.argwhere(~recording.covered)[:5])


@pytest.mark.parametrize(
    ("dtype", "scale", "zero_point"), [("int8", 0.05, -7), ("uint8", 0.02, 131), ("float32", 0.0, 0)]
)
def test_cam_dequantizes_with_the_maps_own_zero_point(dtype: str, scale: float, zero_point: int) -> None:
    """The map is sum_c w[c][k] * scale * (q - z) for int8 and uint8 maps (any zero point) and w @ F for a float
    one, at the seam: a backend that returns a known raw map."""
    from types import SimpleNamespace

    rng = np.random.default_rng(3)
    spec = TensorSpec("fmap", (1, 3, 4, 5), dtype, scale, zero_point)
    if dtype == "float32":
        raw = rng.normal(size=60).astype(np.float32)
        real = raw.astype(np.float64).reshape(3, 4, 5)
    else:
        info = np.iinfo(np.dtype(dtype))
        raw = rng.integers(info.min, info.max + 1, size=60).astype(dtype)
        real = scale * (raw.astype(np.float64) - zero_point).reshape(3, 4, 5)
    weights = rng.normal(size=(5, 3))
    backend = SimpleNamespace(output=lambda name: raw if name == "fmap" else None)
    classifier = SimpleNamespace(backend=backend, labels=("a", "b", "c"))
    cam = CamComputer(classifier, spec, weights, "conv")  # type: ignore[arg-type]
    for k in range(3):
        got = cam.compute(k, 0)
        assert got.label == "abc"[k] and got.values.shape == (3, 4)
        np.testing.assert_allclose(got.values, real @ weights[:, k], rtol=1e-4, atol=1e-4)
