"""The ``gap_model`` fixture builds a working GAP int8 model: it loads on the device and ranks malignant images high."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gap_model import gap_model_fixture

from edgemed.deploy import check_deployable
from edgemed.inference import BackendConfig
from edgemed.inference.classify import Classifier

__all__ = ["gap_model_fixture"]


def test_gap_model_is_a_working_int8_classifier(gap_model: Path, data_dir: Path) -> None:
    manifest = next(gap_model.parent.glob("*.manifest.json"))
    model = check_deployable(gap_model, manifest)
    assert model.artifact.target == "int8" and model.artifact.verdict == "accepted"
    assert (gap_model.parent / "keras" / "breast_gap.keras").is_file()
    classifier = Classifier(model.open_backend(BackendConfig()), model.manifest, model.artifact)
    data = np.load(data_dir / "breastmnist_28.npz")
    images, labels = data["test_images"], data["test_labels"].reshape(-1)
    p_malignant = np.array(
        [classifier.scores(classifier.backend.invoke(classifier.preprocess(x))).probabilities[0] for x in images]
    )
    # Several malignant test images (label 0) reach the example profiles' urgent thresholds (0.35/0.4) by a margin,
    # and the ranking means something: malignant images score higher than benign ones on average.
    assert (p_malignant[labels == 0] >= 0.9).sum() >= 2
    assert p_malignant[labels == 0].mean() > p_malignant[labels == 1].mean() + 0.2
