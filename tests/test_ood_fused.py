"""The per-frame OOD check folded into one pipeline, held to the batch arithmetic on a real int8 model.

``OodDetector`` stacks every feature layer into a few padded arrays (dequantization, whitening, ``1/spread`` and
the median folded in); the energy at T = 1 is taken from the log-sum-exp of the Classifier's softmax. Both must
give the batch scores (``feature_scores``, ``energy_scores``) of the real outputs of the ``int8_model`` fixture
(the reference CNN with its taps), frame by frame, as the device computes them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgemed.deploy import check_deployable
from edgemed.errors import ModelError
from edgemed.inference import BackendConfig
from edgemed.inference.classify import Classifier, dequantize
from edgemed.ood import OodDetector, OodSetting, energy_scores, feature_scores

DATA = Path(__file__).resolve().parent.parent / "data"


def _classifier(model: Path, method: str) -> Classifier:
    deployable = check_deployable(model)
    backend = deployable.open_backend(BackendConfig(threads=1))
    return Classifier(backend, deployable.manifest, deployable.artifact, ood=OodSetting(method=method))  # type: ignore[arg-type]


def _images() -> np.ndarray:
    with np.load(DATA / "breastmnist_28.npz") as npz:
        return np.asarray(npz["val_images"][:40])


def test_fused_feature_score_equals_feature_scores_on_real_outputs(int8_model: Path) -> None:
    classifier = _classifier(int8_model, "features")
    det = classifier.ood
    spec = classifier.artifact.ood.features if classifier.artifact.ood is not None else None
    assert det is not None and spec is not None and len(spec.layers) >= 2  # several taps: the fused path
    specs = {s.name: s for s in classifier.backend.output_specs}
    rows: dict[str, list[np.ndarray]] = {name: [] for name in det.reads}
    per_frame = []
    noise = np.random.default_rng(0).integers(0, 256, (8, 28, 28), dtype=np.uint8)  # far out of distribution
    for image in [*_images(), *noise]:
        raw = classifier.backend.invoke(classifier.preprocess(image))
        for name in det.reads:
            rows[name].append(dequantize(classifier.backend.output(name), specs[name]))
        check = classifier.check_ood(raw)
        assert check is not None and check.score is not None
        per_frame.append(check.score)
    batch = feature_scores(spec, [np.stack(rows[stats.output]) for stats in spec.layers])
    np.testing.assert_allclose(per_frame, batch, rtol=0, atol=1e-9)
    assert max(per_frame[-8:]) > spec.threshold  # the noise frames are scored, not only the easy ones


def test_energy_from_the_softmax_pass_equals_energy_scores(int8_model: Path) -> None:
    classifier = _classifier(int8_model, "energy")
    assert classifier.ood is not None and classifier.ood.energy_is_minus_logsumexp
    spec = classifier.backend.output_spec
    images = _images()
    raws = [classifier.backend.invoke(classifier.preprocess(image)) for image in images]
    batch = energy_scores(np.stack([dequantize(raw, spec) for raw in raws]))
    for raw, expected in zip(raws, batch, strict=True):
        check = classifier.check_ood(raw)
        assert check is not None and check.score == pytest.approx(expected, abs=1e-12)
        # scores() after check_ood (the runtime's order) reuses the pass; the numbers are the plain function's.
        alone = Classifier(classifier.backend, classifier.manifest, classifier.artifact, ood=OodSetting(method="none"))
        assert classifier.scores(raw).probabilities == alone.scores(raw).probabilities
    # A row changed in place is computed again, not answered from the kept pass.
    raw = raws[0].copy()
    first = classifier.check_ood(raw)
    raw[:] = raws[1]
    second = classifier.check_ood(raw)
    assert first is not None and second is not None and second.score == pytest.approx(batch[1], abs=1e-12)


def test_a_feature_row_of_the_wrong_size_names_the_output(int8_model: Path) -> None:
    classifier = _classifier(int8_model, "features")
    det = classifier.ood
    assert isinstance(det, OodDetector)
    raw = classifier.backend.invoke(classifier.preprocess(_images()[0]))
    name = det.reads[0]
    with pytest.raises(ModelError, match=f"output '{name}' was read with shape"):
        det.check(raw, lambda n: np.zeros(3, np.int8) if n == name else classifier.backend.output(n))
