"""The Classifier's out-of-distribution check on a real multi-output int8 model: the feature outputs of each run are
read by name and scored with the manifest's statistics, the profile's ``ood:`` setting applied.

The statistics are fitted here, on the training split, with the arithmetic ``FeatureLayerStats`` documents written
out in plain numpy, and thresholded on the validation split; the detector (``edgemed.ood``) must give the same
score per frame.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from multi_output_model import built_model, model_input, output_rows, truth, write_manifest

from edgemed.deploy import check_deployable
from edgemed.errors import ConfigError
from edgemed.inference import Backend, BackendConfig, make_backend
from edgemed.inference.classify import Classifier
from edgemed.manifest import load_manifest
from edgemed.ood import OodSetting


@pytest.fixture(scope="session")
def multi_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real multi-output int8 model (``tests/multi_output_model.py``)."""
    return built_model(tmp_path_factory.mktemp("multi"))


def _features(backend: Backend, images: np.ndarray, tensors: list[str]) -> dict[str, np.ndarray]:
    rows = output_rows(backend, images)
    return {name: rows[name] for name in tensors}


def _fit_layer(f: np.ndarray, y: np.ndarray, shrinkage: float) -> dict[str, Any]:
    """The statistics FeatureLayerStats describes, written out here in plain numpy (the test's own arithmetic)."""
    center = f.mean(axis=0)
    within = np.concatenate([f[y == k] - f[y == k].mean(axis=0) for k in np.unique(y)])
    cov = within.T @ within / len(f)
    dims = f.shape[1]
    cov = (1 - shrinkage) * cov + shrinkage * np.trace(cov) / dims * np.eye(dims)
    values, vectors = np.linalg.eigh(cov)
    whiten = vectors / np.sqrt(values)
    z = (f - center) @ whiten
    means = np.stack([z[y == k].mean(axis=0) for k in np.unique(y)])
    d = ((z[:, None, :] - means[None]) ** 2).sum(axis=2).min(axis=1)
    q1, median, q3 = np.quantile(d, [0.25, 0.5, 0.75])
    return {
        "dims": dims,
        "components": dims,
        "center": center.tolist(),
        "whiten": whiten.tolist(),
        "class_means": means.tolist(),
        "median": float(median),
        "spread": float(max(q3 - q1, 1e-9)),
    }


def _score(layers: list[dict[str, Any]], features: dict[str, np.ndarray]) -> np.ndarray:
    per_layer = []
    for layer in layers:
        z = (features[layer["output"]] - np.array(layer["center"])) @ np.array(layer["whiten"])
        means = np.array(layer["class_means"])
        d = ((z[:, None, :] - means[None]) ** 2).sum(axis=2).min(axis=1)
        per_layer.append((d - layer["median"]) / layer["spread"])
    return np.max(np.stack(per_layer, axis=1), axis=1)


@pytest.fixture(scope="module")
def ood_model(
    multi_model: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, np.ndarray, np.ndarray]:
    """The multi-output model with a manifest whose ``ood`` section was fitted on train and thresholded on val;
    returns the manifest, the val images and their expected feature scores."""
    names, _, _ = truth(multi_model)
    backend = make_backend(multi_model, BackendConfig(), scores_output=names["probs"])
    manifest_path = write_manifest(multi_model, tmp_path_factory.mktemp("ood"), backend)
    data = np.load(data_dir / "breastmnist_28.npz")
    tensors = [names["pool_a"], names["pool_b"]]
    train = _features(backend, data["train_images"], tensors)
    y = data["train_labels"].reshape(-1)
    layers = [
        {"output": t, "layer": k, **_fit_layer(train[t], y, 0.01)}
        for k, t in zip(("pool_a", "pool_b"), tensors, strict=True)
    ]
    val_images = data["val_images"]
    val_scores = _score(layers, _features(backend, val_images, tensors))
    threshold = float(np.quantile(val_scores, 0.97, method="higher"))
    raw = json.loads(manifest_path.read_text())
    raw["artifacts"][0]["ood"] = {
        "default": "features",
        "features": {
            "threshold": threshold,
            "flagged_fraction": float(np.mean(val_scores > threshold)),
            "layers": layers,
            "shrinkage": 0.01,
        },
        "target_fraction": 0.03,
        "fit_split": "train",
        "fit_n": len(y),
        "threshold_split": "val",
        "threshold_n": len(val_images),
    }
    manifest_path.write_text(json.dumps(raw))
    return manifest_path, val_images, val_scores


def _classifier(manifest_path: Path, ood: OodSetting | None = None) -> Classifier:
    model = check_deployable(manifest_path.parent / "multi_int8.tflite", manifest_path)
    return Classifier(model.open_backend(BackendConfig()), model.manifest, model.artifact, ood=ood)


def test_classifier_check_ood_reads_the_features_of_the_same_run(
    ood_model: tuple[Path, np.ndarray, np.ndarray],
) -> None:
    manifest_path, images, expected = ood_model
    classifier = _classifier(manifest_path)
    assert classifier.ood is not None and classifier.ood.method == "features"
    threshold = load_manifest(manifest_path).artifacts[0].ood.features.threshold  # type: ignore[union-attr]
    checks = []
    for image in images:
        raw = classifier.backend.invoke(model_input(image, classifier.backend))
        check = classifier.check_ood(raw)
        assert check is not None
        assert (check.method, check.source, check.threshold) == ("features", "manifest", threshold)
        checks.append(check)
    scores = np.array([c.score for c in checks], np.float64)
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-6)
    assert [c.flagged for c in checks] == [bool(s > threshold) for s in scores]
    # The threshold is one val image's own score (quantile "higher"): that image may land either side of it by
    # rounding; every other image is flagged exactly when this test's arithmetic says so.
    clear = np.abs(expected - threshold) > 1e-6
    assert [c.flagged for c, keep in zip(checks, clear, strict=True) if keep] == list(expected[clear] > threshold)
    assert 0 < sum(c.flagged for c in checks) <= 0.05 * len(images)  # the threshold is the val 97% quantile


def test_classifier_ood_setting_overrides_turns_off_or_refuses(ood_model: tuple[Path, np.ndarray, np.ndarray]) -> None:
    manifest_path, images, expected = ood_model
    override = _classifier(manifest_path, OodSetting(threshold=float(np.median(expected))))
    raw = override.backend.invoke(model_input(images[0], override.backend))
    check = override.check_ood(raw)
    assert check is not None and (check.source, check.threshold) == ("profile", float(np.median(expected)))
    assert check.flagged == bool(expected[0] > np.median(expected))
    off = _classifier(manifest_path, OodSetting(method="none"))
    check = off.check_ood(off.backend.invoke(model_input(images[0], off.backend)))
    assert check is not None and (check.method, check.score, check.flagged) == ("none", None, False)
    with pytest.raises(ConfigError, match="energy"):
        _classifier(manifest_path, OodSetting(method="energy"))  # the model outputs probabilities: no energy


def test_classifier_without_ood_statistics_has_no_check(multi_model: Path, tmp_path: Path) -> None:
    _, images, _ = truth(multi_model)
    manifest_path = write_manifest(multi_model, tmp_path, make_backend(multi_model, BackendConfig()))
    classifier = _classifier(manifest_path)
    assert classifier.ood is None
    assert classifier.check_ood(classifier.backend.invoke(model_input(images[0], classifier.backend))) is None
