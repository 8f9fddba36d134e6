"""The acceptance gate: metric arithmetic, thresholds from files and flags, and real good vs damaged conversions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from converters import metrics as M
from converters.data import Dataset, load_dataset
from converters.gate import GateConfig, evaluate_gate, load_gate_config
from edgemed.errors import ConfigError, ModelRejectedError
from edgemed.manifest import load_manifest, verify_model

ROOT = Path(__file__).resolve().parent.parent
BREAST = ROOT / "data" / "breastmnist_28.npz"
LABELS = ["malignant", "benign"]


def _probs(p1: np.ndarray) -> np.ndarray:
    return np.stack([1 - p1, p1], axis=1)


def test_auc_counts_ties_as_half_so_coarse_scores_lose_auc() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    score = 1 / (1 + np.exp(-(rng.normal(size=400) + 1.0 * (2 * y - 1))))
    fine = M.binary_auc(y, score)
    coarse = M.binary_auc(y, np.round(score * 4) / 4)  # a 2-bit "quantized" probability
    brute = np.mean([(p > n) + 0.5 * (p == n) for p in score[y == 1] for n in score[y == 0]])
    assert fine == pytest.approx(brute)
    assert coarse < fine - 0.005


def test_wilson_interval_is_sane_at_the_edges() -> None:
    lo, hi = M.wilson(20, 20)
    assert hi == 1.0 and 0.8 < lo < 0.9
    assert M.wilson(0, 0) == (0.0, 1.0)


def test_ece_zero_for_perfectly_calibrated_bins() -> None:
    y = np.array([1] * 8 + [0] * 2)
    probs = _probs(np.full(10, 0.8))
    assert M.expected_calibration_error(y, probs) == pytest.approx(0.0, abs=1e-12)


def test_gate_passes_identical_models_and_names_each_failure() -> None:
    rng = np.random.default_rng(1)
    y = np.array([0] * 60 + [1] * 140)
    p1 = np.clip(0.5 + 0.4 * (2 * y - 1) + rng.normal(0, 0.2, 200), 0.01, 0.99)
    good = evaluate_gate(y, _probs(p1), _probs(p1), LABELS, GateConfig())
    assert good.passed and good.failed == []
    # Damage: flip 15 malignant cases to benign in the "quantized" model.
    damaged = p1.copy()
    flip = np.flatnonzero((y == 0) & (p1 < 0.5))[:15]
    damaged[flip] = 0.9
    bad = evaluate_gate(y, _probs(p1), _probs(damaged), LABELS, GateConfig())
    assert not bad.passed
    text = " | ".join(bad.failed)
    assert "accuracy drop" in text and "top-1 agreement" in text and "sensitivity of 'malignant'" in text
    assert "ROC AUC drop" in text


def test_gate_requires_enough_evaluation_images() -> None:
    y = np.array([0] * 5 + [1] * 30)
    p = _probs(np.where(y == 1, 0.9, 0.1))
    res = evaluate_gate(y, p, p, LABELS, GateConfig())
    assert res.failed == ["evaluation size: class 'malignant' has 5 images, need >= 20 to judge the conversion"]


def test_gate_config_file_and_flags(tmp_path: Path) -> None:
    f = tmp_path / "gate.yaml"
    f.write_text("max_accuracy_drop: 0.02\nmin_agreement: 0.95\n")
    cfg = load_gate_config(f, min_agreement=0.97, max_auc_drop=None)
    assert cfg.max_accuracy_drop == 0.02 and cfg.min_agreement == 0.97 and cfg.max_auc_drop == 0.005
    j = tmp_path / "gate.json"
    j.write_text(json.dumps({"max_latency_ms": 2.5}))
    assert load_gate_config(j).max_latency_ms == 2.5
    f.write_text("max_acuracy_drop: 0.02\n")
    with pytest.raises(ConfigError, match="max_acuracy_drop"):
        load_gate_config(f)
    with pytest.raises(ConfigError, match="min_agreement"):
        load_gate_config(None, min_agreement=1.5)


@pytest.fixture(scope="module")
def breast() -> Dataset:
    return load_dataset(BREAST, labels=LABELS)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, breast: Dataset) -> Path:
    from converters.train import train

    return train(breast, tmp_path_factory.mktemp("gate"), epochs=10, progress=False, name="breast").model_path


@pytest.mark.slow
def test_gate_accepts_good_and_rejects_constant_image_calibration(
    tmp_path: Path, trained: Path, breast: Dataset
) -> None:
    from converters.convert import convert

    good = convert(trained, breast, tmp_path / "good", progress=False)
    assert good.verdicts == {"int8": "accepted"}, good.failed
    # Damage: calibrate on constant mid-grey images. The activation ranges then fit one image, real images
    # saturate the int8 range, and the quantized model no longer behaves like its float twin.
    x, y = breast.splits["train"]
    damaged = Dataset(
        splits={"train": (np.full_like(x, 128), y), "test": breast.splits["test"]},
        labels=breast.labels,
        colour_mode="gray",
        source="constant-images",
    )
    # ood="none": the damaged data has no val split to choose OOD thresholds on (and this test is about the gate).
    bad = convert(trained, damaged, tmp_path / "bad", evaluation=breast, progress=False, ood="none")
    assert bad.rejected and bad.verdicts["int8"] == "rejected"
    failed = " | ".join(bad.failed["int8"])
    assert "agreement" in failed or "accuracy drop" in failed or "ROC AUC drop" in failed
    rejected_file = tmp_path / "bad" / "rejected" / "breast_int8.tflite"
    assert rejected_file.is_file() and not (tmp_path / "bad" / "breast_int8.tflite").exists()
    art = load_manifest(bad.manifest_path).artifacts[0]
    assert art.file == "rejected/breast_int8.tflite" and art.verdict == "rejected"
    with pytest.raises(ModelRejectedError):
        verify_model(rejected_file)
    assert (tmp_path / "bad" / "report.html").is_file()

    waived = convert(
        trained,
        damaged,
        tmp_path / "waived",
        evaluation=breast,
        progress=False,
        waiver=("Dr A. Example", "test waiver"),
        ood="none",
    )
    art = load_manifest(waived.manifest_path).artifacts[0]
    assert art.verdict == "waived" and art.waiver is not None and art.waiver.by == "Dr A. Example"
    assert art.failed_criteria  # the failures stay on record next to the waiver
    verify_model(tmp_path / "waived" / "breast_int8.tflite")


@pytest.mark.slow
def test_cli_exit_3_on_rejection(tmp_path: Path, trained: Path) -> None:
    # An impossible threshold rejects even a faithful conversion: the CLI must say which criterion and exit 3.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgemed",
            "convert",
            str(trained),
            "--calibration",
            str(BREAST),
            "--labels",
            "malignant,benign",
            "--out",
            str(tmp_path),
            "--max-latency-ms",
            "0.000001",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "median CPU latency" in proc.stdout and "REJECTED" in proc.stdout
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgemed",
            "convert",
            str(trained),
            "--calibration",
            str(BREAST),
            "--out",
            str(tmp_path / "w"),
            "--waive-gate",
            "--waiver-by",
            "X",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 2 and "--waiver-reason" in proc.stderr


def test_clinical_floors_warn_per_class_and_reject_only_when_required() -> None:
    # Melanoma-like: a faithful conversion (float == int8) of a model that finds 5 of 27 malignant cases.
    y = np.array([0] * 27 + [1] * 100)
    p1 = np.where(y == 1, 0.8, 0.7)
    p1[:5] = 0.3  # the 5 malignant cases it finds
    p1[27:52] = 0.2  # and 25 benign cases it calls malignant: benign sensitivity 0.75, ROC AUC 0.75
    probs = _probs(p1)
    res = evaluate_gate(y, probs, probs, LABELS, GateConfig())
    assert res.passed and res.failed == []  # by default: accepted, as a faithful conversion...
    assert res.weak == ["sensitivity of 'malignant' 0.19 < floor 0.50 (5 of 27)"]  # ...that is clinically weak
    floors = res.numbers["floors"]["classes"]
    assert floors["malignant"]["min_sensitivity"] == 0.5 and floors["benign"]["sensitivity"] == 0.75
    assert floors["malignant"]["min_auc"] == 0.7 and res.numbers["floors"]["require"] is False

    strict = evaluate_gate(y, probs, probs, LABELS, GateConfig(require_floors=True))
    assert not strict.passed
    assert strict.failed == ["clinical floor: sensitivity of 'malignant' 0.19 < floor 0.50 (5 of 27)"]

    # Per-class floors, and as many digits as the comparison needs (never "0.50 < 0.50").
    custom = GateConfig(min_auc=0.99, class_floors={"benign": {"min_sensitivity": 1.0}, "malignant": {"min_auc": 0.99}})
    assert evaluate_gate(y, probs, probs, LABELS, custom).weak == [
        "sensitivity of 'malignant' 0.19 < floor 0.50 (5 of 27)",
        "sensitivity of 'benign' 0.75 < floor 1.00 (75 of 100)",
        "ROC AUC 0.75 < floor 0.99",  # two classes share one AUC: said once
    ]
    three = ["a", "b", "c"]
    y3 = np.repeat([0, 1, 2], 30)
    p3 = np.eye(3)[y3] * 0.6 + 0.2
    p3[:30] = [0.2, 0.6, 0.2]  # class a is never found and ranked like b
    weak3 = evaluate_gate(y3, p3, p3, three, GateConfig(min_eval_per_class=1)).weak
    assert weak3[0] == "sensitivity of 'a' 0.00 < floor 0.50 (0 of 30)"
    assert weak3[1].startswith("ROC AUC of 'a' (one-vs-rest) 0.") and weak3[1].endswith("< floor 0.70")
    near = np.where(y == 1, 0.8, 0.7)
    near[:13] = 0.3  # 13 of 27 = 0.4815
    close = evaluate_gate(y, _probs(near), _probs(near), LABELS, GateConfig(min_sensitivity=0.482)).weak
    assert close == ["sensitivity of 'malignant' 0.481 < floor 0.482 (13 of 27)"]
    with pytest.raises(ConfigError, match="class_floors names melanoma, which the model does not have"):
        evaluate_gate(y, probs, probs, LABELS, GateConfig(class_floors={"melanoma": {"min_sensitivity": 0.9}}))


def test_floors_from_a_gate_file(tmp_path: Path) -> None:
    f = tmp_path / "gate.yaml"
    f.write_text("min_sensitivity: 0.6\nrequire_floors: true\nclass_floors:\n  malignant: {min_sensitivity: 0.9}\n")
    cfg = load_gate_config(f, min_auc=0.8)
    assert (cfg.min_sensitivity, cfg.min_auc, cfg.require_floors) == (0.6, 0.8, True)
    assert cfg.class_floors["malignant"].min_sensitivity == 0.9
    f.write_text("class_floors:\n  malignant: {min_sensitivty: 0.9}\n")
    with pytest.raises(ConfigError, match="min_sensitivty"):
        load_gate_config(f)


@pytest.fixture(scope="module")
def reference_keras(int8_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture's own trained model (3 epochs: a faithful int8 conversion of a weak malignant detector)."""
    import shutil

    folder = tmp_path_factory.mktemp("keras")
    for f in (int8_model.parent / "keras").iterdir():
        shutil.copy(f, folder / f.name)
    return folder / "breast.keras"


@pytest.mark.slow
def test_cli_says_clinically_weak_per_class_and_require_floors_rejects(reference_keras: Path, tmp_path: Path) -> None:
    def convert(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "edgemed", "convert", str(reference_keras), "--calibration", str(BREAST),
             "--out", str(out), "--no-progress", "--min-sensitivity", "0.99", *extra],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip

    weak = convert(tmp_path / "weak")
    assert weak.returncode == 0, weak.stdout[-2000:] + weak.stderr[-2000:]
    line = next(x for x in weak.stdout.splitlines() if x.startswith("  int8 "))
    assert "accepted as a faithful conversion, clinically weak:" in line
    assert "sensitivity malignant 0." in line and " benign 0." in line
    warnings = [x.strip() for x in weak.stdout.splitlines() if x.strip().startswith("WARNING")]
    assert warnings and all(w.startswith("WARNING: clinically weak: sensitivity of '") for w in warnings)
    assert "< floor 0.99" in warnings[0] and "CLINICALLY WEAK: int8 is a faithful conversion" in weak.stdout
    art = load_manifest(tmp_path / "weak" / "breast.manifest.json").artifacts[0]
    assert art.verdict == "accepted" and art.clinically_weak == [w.removeprefix("WARNING: clinically weak: ")
                                                                  for w in warnings]  # fmt: skip
    assert art.gate is not None and art.gate["floors"]["classes"]["malignant"]["min_sensitivity"] == 0.99
    verify_model(tmp_path / "weak" / "breast_int8.tflite")  # the device still runs it
    html = (tmp_path / "weak" / "report.html").read_text()
    assert "<h3>Clinically weak</h3>" in html and html.count('<li class="weak"><b>int8</b> WARNING: ') == len(warnings)

    strict = convert(tmp_path / "strict", "--require-floors")
    assert strict.returncode == 3, strict.stdout[-2000:] + strict.stderr[-2000:]
    assert "FAILED: clinical floor: sensitivity of '" in strict.stdout and "WARNING" not in strict.stdout
    assert load_manifest(tmp_path / "strict" / "breast.manifest.json").artifacts[0].verdict == "rejected"


def test_manifests_written_before_the_floors_still_load(int8_model: Path, tmp_path: Path) -> None:
    raw = json.loads(next(int8_model.parent.glob("*.manifest.json")).read_text())
    for art in raw["artifacts"]:
        art["gate"].pop("floors", None)
        art["gate"].pop("clinically_weak", None)
        art["gate"]["thresholds"] = {k: v for k, v in art["gate"]["thresholds"].items() if "floor" not in k}
    old = tmp_path / "old.manifest.json"
    old.write_text(json.dumps(raw))
    art = load_manifest(old).artifacts[0]
    assert art.verdict == "accepted" and art.clinically_weak == []


def test_a_gate_file_that_is_not_yaml_says_where_in_one_line(tmp_path: Path) -> None:
    f = tmp_path / "gate.yaml"
    f.write_text("min_auc: 0.8\n  min_sensitivity: : 0.5\n")
    with pytest.raises(ConfigError) as info:
        load_gate_config(f)
    assert (
        str(info.value)
        == f"gate config {f} is not valid YAML: mapping values are not allowed here at line 2, column 18"
    )


def test_a_floor_that_cannot_be_checked_is_never_passed_silently() -> None:
    # Three outputs, evaluated on images of classes a and c only: b has no sensitivity and no one-vs-rest AUC.
    three = ["a", "b", "c"]
    y = np.repeat([0, 2], 30)
    p = np.eye(3)[y] * 0.6 + 0.2
    cfg = GateConfig(min_eval_per_class=1)
    res = evaluate_gate(y, p, p, three, cfg)
    assert res.weak == [
        "sensitivity of 'b': floor 0.50 cannot be checked (no evaluation images of this class); "
        "evaluate on images of every class",
        "ROC AUC of 'b' (one-vs-rest): floor 0.70 cannot be checked (the evaluation images lack this class or "
        "every other); evaluate on images of every class",
    ]
    assert not any(f.startswith("clinical floor") for f in res.failed)  # by default a warning ...
    strict = evaluate_gate(y, p, p, three, cfg.model_copy(update={"require_floors": True}))
    assert [f for f in strict.failed if f.startswith("clinical floor")] == [f"clinical floor: {w}" for w in res.weak]
    assert not strict.passed  # ... and a rejection when the floors are required
    # Two classes, one absent: the one AUC between them cannot be checked either.
    y2 = np.zeros(40, dtype=int)
    p2 = _probs(np.full(40, 0.2))
    weak2 = evaluate_gate(y2, p2, p2, LABELS, cfg).weak
    assert f"sensitivity of {LABELS[1]!r}: floor 0.50 cannot be checked" in weak2[0]
    assert weak2[1].startswith("ROC AUC: floor 0.70 cannot be checked (the evaluation images lack one of the two")
    assert len(weak2) == 2
