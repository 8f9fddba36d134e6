"""Out-of-distribution scores, fitting, thresholds and metrics on synthetic data (pure logic, no model).

The per-frame detector (``edgemed.ood.OodDetector``) folds dequantization and whitening into precomputed matrices;
these tests hold it to the batch arithmetic (``feature_scores``) on quantized rows read by tensor name in another
order than the statistics list them, as TFLite may order a model's outputs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import pytest

from converters.ood import (
    auroc_fpr95,
    check_option,
    fit_feature_spec,
    fit_layer,
    fit_ood,
    load_ood_eval,
    method_scores,
    rank_agreement,
    threshold_at,
)
from edgemed.errors import ConfigError, DataError, ModelError
from edgemed.inference.classify import dequantize, softmax
from edgemed.manifest import Artifact, OodSpec, OutputSpec
from edgemed.ood import OodDetector, OodSetting, energy_scores, feature_scores, layer_scores, max_softmax_scores
from edgemed.types import TensorSpec


@dataclass
class Outputs:
    """The fields of ``converters.runner.ModelOutputs`` the OOD fitting reads (a seam for logic tests)."""

    probs: np.ndarray
    logits: np.ndarray | None
    features: dict[str, np.ndarray] = field(default_factory=dict)
    layers: dict[str, str | None] = field(default_factory=dict)


def _quantize(x: np.ndarray, scale: float, zp: int) -> np.ndarray:
    return np.clip(np.round(x / scale) + zp, -128, 127).astype(np.int8)


def _synthetic(rng: np.random.Generator, n: int, shift: float = 0.0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Two classes; layer ``a`` 6-D, layer ``b`` 20-D with correlated channels; ``shift`` moves every image."""
    y = rng.integers(0, 2, n)
    mix = rng.normal(size=(20, 20)) / 4
    a = rng.normal(size=(n, 6)) + y[:, None] * 1.5 + shift
    b = rng.normal(size=(n, 20)) @ mix + y[:, None] * 0.8 + 2.0 + shift
    return y, {"feat_a": np.maximum(a + 3.0, 0.0), "feat_b": b}


QUANT = {"feat_a": (0.05, -128), "feat_b": (0.04, -30)}
SCORES = TensorSpec("Identity", (1, 2), "int8", 0.1, 3)


def _dequantized(features: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Raw int8 rows per output, and the same dequantized as the device dequantizes them."""
    raw = {k: _quantize(v, *QUANT[k]) for k, v in features.items()}
    real = {k: dequantize(raw[k], TensorSpec(k, (1, raw[k].shape[1]), "int8", *QUANT[k])) for k in raw}
    return raw, real


def _outputs(rng: np.random.Generator, n: int, shift: float = 0.0) -> tuple[np.ndarray, Outputs, dict[str, np.ndarray]]:
    y, features = _synthetic(rng, n, shift)
    raw, real = _dequantized(features)
    logits_raw = _quantize(np.stack([-(y - 0.5), y - 0.5], axis=1) * 3 + rng.normal(size=(n, 2)), 0.1, 3)
    logits = dequantize(logits_raw, SCORES)
    raw["Identity"] = logits_raw
    outputs = Outputs(softmax(logits), logits, real, {"feat_a": "conv2d", "feat_b": "dense"})
    return y, outputs, raw


def _artifact(ood: OodSpec) -> Artifact:
    outputs = [OutputSpec(name="Identity", shape=[1, 2], dtype="int8", scale=0.1, zero_point=3, role="scores")]
    for name, (scale, zp) in QUANT.items():
        dims = 6 if name == "feat_a" else 20
        outputs.append(
            OutputSpec(name=name, shape=[1, dims], dtype="int8", scale=scale, zero_point=zp, role="features")
        )
    art = Artifact(file="m_int8.tflite", target="int8", sha256="0" * 64, size_bytes=1, output_kind="logits",
                   outputs=outputs, ood=ood)  # fmt: skip
    # Through JSON and back, as the device reads it from the manifest.
    return Artifact.model_validate(json.loads(art.model_dump_json()))


def _specs() -> dict[str, TensorSpec]:
    specs = {"Identity": SCORES}
    for name, (scale, zp) in QUANT.items():
        specs[name] = TensorSpec(name, (1, 6 if name == "feat_a" else 20), "int8", scale, zp)
    return specs


@pytest.fixture(scope="module")
def fitted() -> tuple[OodSpec, Outputs, dict[str, np.ndarray], Outputs, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    y_train, train, _ = _outputs(rng, 600)
    _, val, val_raw = _outputs(rng, 300)
    _, far, far_raw = _outputs(rng, 100, shift=4.0)
    ood = fit_ood(train, y_train, val, "auto", 0.03)  # type: ignore[arg-type]
    assert ood is not None
    return ood, val, val_raw, far, far_raw


def test_energy_is_minus_logsumexp_and_stable_for_large_logits() -> None:
    logits = np.array([[1.0, 2.0, 3.0], [1000.0, 1000.0, -5.0]])
    expected0 = -math.log(math.exp(1) + math.exp(2) + math.exp(3))
    got = energy_scores(logits)
    assert got[0] == pytest.approx(expected0)
    assert got[1] == pytest.approx(-(1000.0 + math.log(2.0)))
    assert energy_scores(logits, temperature=2.0)[0] == pytest.approx(
        -2.0 * math.log(sum(math.exp(v / 2) for v in (1, 2, 3)))
    )
    assert max_softmax_scores(np.array([[0.2, 0.8], [0.5, 0.5]])).tolist() == [-0.8, -0.5]


def test_whitening_makes_the_within_class_covariance_the_identity() -> None:
    rng = np.random.default_rng(1)
    y, features = _synthetic(rng, 4000)
    f = features["feat_b"]
    stats = fit_layer(f, y, "feat_b", shrinkage=0.0)
    z = (f - np.asarray(stats.center)) @ np.asarray(stats.whiten)
    within = z - np.asarray(stats.class_means)[y]
    cov = within.T @ within / (len(f) - 2)
    np.testing.assert_allclose(cov, np.eye(20), atol=1e-8)
    # d is the Mahalanobis distance to the nearest class mean under the pooled covariance.
    means = np.stack([f[y == k].mean(axis=0) for k in (0, 1)])
    resid = f - means[y]
    inv = np.linalg.inv(resid.T @ resid / (len(f) - 2))
    x = f[:5]
    d_direct = np.min([np.einsum("ij,jk,ik->i", x - m, inv, x - m) for m in means], axis=0)
    spec = fit_feature_spec(Outputs(np.zeros((4000, 2)), None, {"feat_b": f}), y, shrinkage=0.0)
    layer = layer_scores(spec, [x])[:, 0] * stats.spread + stats.median
    np.testing.assert_allclose(layer, d_direct, rtol=1e-8)


def test_truncation_keeps_the_largest_components_and_layers_are_standardized_on_train() -> None:
    rng = np.random.default_rng(2)
    y, features = _synthetic(rng, 800)
    stats = fit_layer(features["feat_b"], y, "feat_b", max_components=5)
    assert (stats.dims, stats.components) == (20, 5)
    assert len(stats.whiten[0]) == 5 and len(stats.class_means[0]) == 5
    spec = fit_feature_spec(Outputs(np.zeros((800, 2)), None, features), y)
    per_layer = layer_scores(spec, [features["feat_a"], features["feat_b"]])
    np.testing.assert_allclose(np.median(per_layer, axis=0), 0.0, atol=1e-9)
    q75, q25 = np.percentile(per_layer, [75, 25], axis=0)
    np.testing.assert_allclose(q75 - q25, 1.0, atol=1e-9)
    np.testing.assert_array_equal(feature_scores(spec, [features["feat_a"], features["feat_b"]]), per_layer.max(axis=1))


def test_threshold_is_the_higher_quantile_of_val_and_flags_about_the_target() -> None:
    scores = np.arange(1000, dtype=np.float64)[::-1]
    threshold, flagged = threshold_at(scores, 0.03)
    # numpy "higher": index ceil(999 * 0.97) of the sorted scores, an actual score, nudged up by a hair so that the
    # device's rounding cannot flag that image.
    assert threshold == pytest.approx(970.0, rel=1e-6) and threshold > 970.0
    assert flagged == pytest.approx(0.029)
    assert threshold_at(np.array([1.0, 1.0 + 1e-9, 0.5]), 0.5)[0] == pytest.approx(1.0 + 5e-10, abs=1e-15)
    with pytest.raises(ConfigError, match="not all finite"):
        threshold_at(np.array([1.0, np.nan]), 0.03)


def test_fit_ood_thresholds_on_val_and_defaults_to_features(fitted) -> None:  # type: ignore[no-untyped-def]
    ood, val, _, far, _ = fitted
    assert ood.default == "features" and ood.energy is not None and ood.features is not None
    assert (ood.fit_split, ood.fit_n, ood.threshold_split, ood.threshold_n) == ("train", 600, "val", 300)
    assert [layer.output for layer in ood.features.layers] == ["feat_a", "feat_b"]
    assert [layer.layer for layer in ood.features.layers] == ["conv2d", "dense"]
    scores = method_scores(ood, val)
    assert set(scores) == {"max_softmax", "energy", "features"}
    for name in ("energy", "features"):
        flagged = float((scores[name] > getattr(ood, name).threshold).mean())
        assert flagged == getattr(ood, name).flagged_fraction
        assert 0.015 <= flagged <= 0.03
    far_scores = method_scores(ood, far)["features"]
    assert (far_scores > ood.features.threshold).mean() > 0.95
    auroc, fpr = auroc_fpr95(scores["features"], far_scores)
    assert auroc > 0.99 and fpr < 0.05


def test_fit_ood_options() -> None:
    rng = np.random.default_rng(3)
    y, train, _ = _outputs(rng, 200)
    _, val, _ = _outputs(rng, 100)
    energy_only = fit_ood(train, y, val, "energy")
    assert energy_only is not None and energy_only.default == "energy" and energy_only.features is None
    assert fit_ood(train, y, val, "none") is None
    no_taps = Outputs(train.probs, train.logits)
    auto = fit_ood(no_taps, y, Outputs(val.probs, val.logits), "auto")
    assert auto is not None and auto.default == "energy"
    with pytest.raises(ConfigError, match="--ood energy"):
        fit_ood(no_taps, y, val, "features")
    probs_only = Outputs(train.probs, None, train.features, train.layers)
    with pytest.raises(ConfigError, match="logits"):
        fit_ood(probs_only, y, Outputs(val.probs, None, val.features), "energy")
    assert fit_ood(Outputs(train.probs, None), y, Outputs(val.probs, None), "auto") is None
    agreed = fit_ood(train, y, val, "auto", reference_val_scores=np.arange(100.0))
    assert agreed is not None and agreed.feature_rank_agreement is not None


def test_check_option_errors_name_the_fix() -> None:
    assert check_option("auto", "logits", 0.03) == "auto"
    with pytest.raises(ConfigError, match="choose one of auto, energy, features, none"):
        check_option("mahalanobis", "logits", 0.03)
    with pytest.raises(ConfigError, match="drop --output probabilities"):
        check_option("energy", "probabilities", 0.03)
    with pytest.raises(ConfigError, match=r"\(0, 0.5\]"):
        check_option("auto", "logits", 0.0)


def test_per_frame_check_equals_the_batch_scores_on_quantized_rows(fitted) -> None:  # type: ignore[no-untyped-def]
    ood, val, val_raw, far, far_raw = fitted
    art = _artifact(ood)
    # Every output by name, in another order than the statistics list them (TFLite reorders outputs).
    specs = dict(reversed(list(_specs().items())))
    features = OodDetector.build(art, SCORES, specs, OodSetting())
    energy = OodDetector.build(art, SCORES, specs, OodSetting(method="energy"))
    assert features is not None and energy is not None
    assert (features.method, features.source, features.reads) == ("features", "manifest", ("feat_a", "feat_b"))
    assert energy.reads == ()
    for outputs, raw in ((val, val_raw), (far, far_raw)):
        batch = method_scores(art.ood, outputs)
        for i in range(len(outputs.probs)):
            row = {name: raw[name][i] for name in raw}
            checked = features.check(row["Identity"], row.__getitem__)
            assert checked.score == pytest.approx(batch["features"][i], abs=1e-6)
            assert checked.flagged == (batch["features"][i] > ood.features.threshold)
            e = energy.check(row["Identity"], row.__getitem__)
            assert e.score == pytest.approx(batch["energy"][i], abs=1e-9)


def test_float_feature_outputs_are_read_unscaled() -> None:
    rng = np.random.default_rng(4)
    y, features = _synthetic(rng, 300)
    spec = fit_feature_spec(Outputs(np.zeros((300, 2)), None, {"feat_a": features["feat_a"]}), y)
    ood = OodSpec(default="features", features=spec.model_copy(update={"threshold": 1.0}), target_fraction=0.03,
                  fit_split="train", fit_n=300, threshold_split="val", threshold_n=300)  # fmt: skip
    art = Artifact(file="m.tflite", target="float16", sha256="0" * 64, size_bytes=1, ood=ood, outputs=[
        OutputSpec(name="s", shape=[1, 2], dtype="float32", role="scores"),
        OutputSpec(name="feat_a", shape=[1, 6], dtype="float32", role="features")])  # fmt: skip
    spec32 = TensorSpec("feat_a", (1, 6), "float32")
    det = OodDetector.build(art, TensorSpec("s", (1, 2), "float32"), {"feat_a": spec32}, OodSetting())
    assert det is not None
    x = features["feat_a"][:10].astype(np.float32)
    batch = feature_scores(spec, [x.astype(np.float64)])
    got = [det.check(np.zeros(2, np.float32), lambda _name, r=row: r).score for row in x]
    np.testing.assert_allclose(got, batch, atol=1e-9)


def test_detector_settings_and_errors(fitted) -> None:  # type: ignore[no-untyped-def]
    ood = fitted[0]
    art = _artifact(ood)
    specs = _specs()
    off = OodDetector.build(art, SCORES, specs, OodSetting(method="none"))
    assert off is not None
    assert off.check(np.zeros(2, np.int8), specs.__getitem__).as_dict() == {
        "method": "none", "score": None, "threshold": None, "flagged": False, "source": "profile"}  # fmt: skip
    plain = art.model_copy(update={"ood": None, "outputs": []})
    assert OodDetector.build(plain, SCORES, specs, OodSetting()) is None
    with pytest.raises(ConfigError, match="convert it again"):
        OodDetector.build(plain, SCORES, specs, OodSetting(method="energy"))
    no_energy = _artifact(ood.model_copy(update={"energy": None}))
    with pytest.raises(ConfigError, match="has only features"):
        OodDetector.build(no_energy, SCORES, specs, OodSetting(method="energy"))
    with pytest.raises(ConfigError, match="not a finite number"):
        OodDetector.build(art, SCORES, specs, OodSetting(threshold=math.inf))
    override = OodDetector.build(art, SCORES, specs, OodSetting(method="energy", threshold=-1e9))
    assert override is not None and (override.threshold, override.source) == (-1e9, "profile")
    check = override.check(np.array([3, 3], np.int8), specs.__getitem__)
    assert check.flagged and check.source == "profile" and check.threshold == -1e9
    missing = {k: v for k, v in specs.items() if k != "feat_b"}
    with pytest.raises(ModelError, match="'feat_b', which the model does not have"):
        OodDetector.build(art, SCORES, missing, OodSetting())
    wrong = {**specs, "feat_b": TensorSpec("feat_b", (1, 19), "int8", 0.04, -30)}
    with pytest.raises(ModelError, match="holds 19 values"):
        OodDetector.build(art, SCORES, wrong, OodSetting())


def test_auroc_and_fpr_at_95_tpr_on_known_cases() -> None:
    ind = np.arange(100, dtype=np.float64)  # 0..99; 95% of them are <= 94
    assert auroc_fpr95(ind, ind + 1000) == (1.0, 0.0)
    assert auroc_fpr95(ind, ind - 1000) == (0.0, 1.0)
    auroc, fpr = auroc_fpr95(ind, np.array([94.0, 94.5, 200.0, 300.0]))
    assert fpr == 0.25  # only 94 is still accepted at the 95% cut
    assert auroc == pytest.approx((94.5 + 95 + 100 + 100) / 400)  # 94 ties one: half a win
    assert all(math.isnan(v) for v in auroc_fpr95(ind, np.array([])))


def test_rank_agreement_is_spearman() -> None:
    a = np.array([3.0, 1.0, 2.0, 5.0, 4.0])
    assert rank_agreement(a, np.exp(a)) == pytest.approx(1.0)
    assert rank_agreement(a, -a) == pytest.approx(-1.0)
    # Ties take average ranks: ranks (1.5, 1.5, 3) against (1, 2, 3) -> Pearson of the ranks.
    assert rank_agreement(np.array([1.0, 1.0, 2.0]), np.array([1.0, 2.0, 3.0])) == pytest.approx(math.sqrt(3) / 2)
    assert math.isnan(rank_agreement(np.ones(4), a[:4]))
    with pytest.raises(ValueError, match="one length"):
        rank_agreement(a, a[:3])


def test_load_ood_eval_reads_npz_test_split_folders_and_names_bad_input(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(5)
    both = tmp_path / "both.npz"
    np.savez(both, train_images=rng.integers(0, 255, (4, 8, 8), dtype=np.uint8),
             test_images=rng.integers(0, 255, (3, 8, 8, 3), dtype=np.uint8))  # fmt: skip
    got = load_ood_eval(both)
    assert got.name == "both" and len(got.images) == 3 and got.images[0].shape == (8, 8, 3)
    untested = tmp_path / "frames.npz"
    np.savez(untested, a_images=np.zeros((2, 5, 5), np.uint8), b_images=np.zeros((1, 6, 6), np.uint8))
    assert [im.shape for im in load_ood_eval(untested).images] == [(5, 5), (5, 5), (6, 6)]
    bad = tmp_path / "bad.npz"
    np.savez(bad, test_images=np.zeros((2, 5, 5), np.float32))
    with pytest.raises(DataError, match="must be uint8"):
        load_ood_eval(bad)
    with pytest.raises(DataError, match="no test_images"):
        np.savez(tmp_path / "labels.npz", labels=np.zeros(3))
        load_ood_eval(tmp_path / "labels.npz")
    with pytest.raises(DataError, match="no such file"):
        load_ood_eval(tmp_path / "absent")
    folder = load_ood_eval("data/isic_samples")
    assert folder.name == "isic_samples" and len(folder.images) >= 10
    assert all(im.dtype == np.uint8 and im.ndim in (2, 3) for im in folder.images)
    dicom = load_ood_eval("data/dicom")
    assert len(dicom.images) >= 1


def test_outcome_table_summary_and_report_section(fitted) -> None:  # type: ignore[no-untyped-def]
    from converters.ood_step import OodOutcome
    from converters.report_ood import ood_section

    ood, val, _, far, _ = fitted
    weak = ood.model_copy(update={"feature_rank_agreement": 0.9})
    scores = {"val": method_scores(weak, val), "test": method_scores(weak, val), "far": method_scores(weak, far)}
    outcome = OodOutcome(
        "int8", weak, scores, {"train": 600, "val": 300, "test": 300, "far": 100}, -0.6, "test", ["far"]
    )
    rows = {(r["set"], r["score"]): r for r in outcome.table()}
    assert math.isnan(rows[("val", "features")]["auroc"])  # in-distribution sets are the reference, not rated
    far_row = rows[("far", "features")]
    assert (
        far_row["shipped"] and far_row["auroc"] == auroc_fpr95(scores["test"]["features"], scores["far"]["features"])[0]
    )
    assert far_row["flagged"] == float((scores["far"]["features"] > ood.features.threshold).mean())
    assert set(outcome.thresholds()) == {"max_softmax", "energy", "features"}
    line = outcome.summary_line()
    assert line.startswith("  ood int8: features threshold") and "of 300 val images" in line
    assert f"far AUROC {far_row['auroc']:.3f}, 100% flagged" in line and "rank agreement with float 0.900" in line
    page = ood_section([outcome], lambda fig: "data:image/png;base64,AAAA")
    assert "<h2>Out-of-distribution</h2>" in page and "(below 0.95)" in page and ">far<" in page
    assert "<b>test</b> split" in page and "baseline only" in page
    assert "--ood none" in ood_section([], lambda fig: "")
    record = outcome.record()
    assert record["default"] == "features" and record["feature_rank_agreement"] == 0.9
    json.dumps(record["thresholds"])  # plain numbers
