"""The out-of-distribution check inside the device (issue 14): the ``ood`` stage of a run, its results and study
decision, and what the profile's ``ood:`` section may ask of a model (start-up errors and the warning).

The backend is a fake with a feature output (only the seam is fake: the Classifier, the OodDetector, triage,
envelope, outbox and delivery are the real ones), and one real run goes through the converted int8 model.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from device_fakes import BRIGHT, DARK, MID, OUTPUT, AcknowledgingPublisher, BrightnessBackend, ListSource, noise

from edgemed.config import DeviceProfile
from edgemed.deploy import Deployable
from edgemed.envelope import result_schema, study_schema
from edgemed.errors import ConfigError
from edgemed.manifest import Artifact, InputSpec, Manifest
from edgemed.runtime import Device
from edgemed.triage import OOD_REASON
from edgemed.types import Frame, TensorSpec

TRIAGE = {"rules": {"malignant": {"level": "urgent", "min_probability": 0.5}, "benign": {"level": "no_finding"}}}
DATA = Path(__file__).resolve().parent.parent / "data"
# A pooled feature output: two channels, 0.1 * q.
FEATURES = TensorSpec("pooled", (1, 2), "int8", 0.1, 0)
# Energy of the fake's logits: confident frames (+-3) about -3.0, the unsure one (0.1, 0) about -0.74.
ENERGY = {"threshold": -2.0, "flagged_fraction": 0.03, "temperature": 1.0}
# Whitening is the identity and both class means sit at the origin: the layer score is |f|^2, so a bright frame
# (f = (5, 5), score 50) is flagged at threshold 10 and a dark or unsure one (score <= 0.01) is not.
FEATURE_SPEC = {
    "threshold": 10.0,
    "flagged_fraction": 0.03,
    "shrinkage": 0.01,
    "layers": [
        {
            "output": "pooled",
            "layer": "conv2d",
            "dims": 2,
            "components": 2,
            "center": [0.0, 0.0],
            "whiten": [[1.0, 0.0], [0.0, 1.0]],
            "class_means": [[0.0, 0.0], [0.0, 0.0]],
            "median": 0.0,
            "spread": 1.0,
        }
    ],
}


class FeatureBackend(BrightnessBackend):
    """The brightness fake with a second output: pooled features that are large for bright frames only."""

    output_specs = (OUTPUT, FEATURES)

    def invoke(self, x: np.ndarray) -> np.ndarray:
        raw = super().invoke(x)
        self._features = np.array([50, 50] if float(x.mean()) > 40 else [1, 0], np.int8)
        return raw

    def output(self, name: str) -> np.ndarray:
        if name == FEATURES.name:
            return self._features.copy()
        return super().output(name)


def _model(ood: dict[str, Any] | None, default: str = "features") -> Deployable:
    artifact: dict[str, Any] = {
        "file": "fake_int8.tflite",
        "target": "int8",
        "sha256": "0" * 64,
        "size_bytes": 0,
        "output_kind": "logits",
        "verdict": "accepted",
    }
    if ood is not None:
        artifact["outputs"] = [
            {"name": OUTPUT.name, "shape": list(OUTPUT.shape), "dtype": "int8", "scale": 0.1, "role": "scores"},
            {
                "name": FEATURES.name,
                "shape": list(FEATURES.shape),
                "dtype": "int8",
                "scale": 0.1,
                "role": "features",
                "layer": "conv2d",
            },
        ]
        artifact["ood"] = {
            "default": default,
            "target_fraction": 0.03,
            "fit_split": "train",
            "fit_n": 100,
            "threshold_split": "val",
            "threshold_n": 50,
            **ood,
        }
    manifest = Manifest.model_validate(
        {
            "name": "fake",
            "version": "1",
            "created_at": "2025-01-01T00:00:00Z",
            "labels": ["benign", "malignant"],
            "input": InputSpec(height=28, width=28, channels=1, colour_mode="gray").model_dump(),
            "artifacts": [artifact],
        }
    )
    return Deployable(Path("fake_int8.tflite"), Path("fake.manifest.json"), manifest, Artifact(**artifact))


def _profile(data_dir: Path, **sections: Any) -> DeviceProfile:
    raw = {
        "profile": "ood-test",
        "device": {"id": "ood-01", "site": "ward", "data_dir": str(data_dir)},
        "triage": TRIAGE,
        "health": {"interval_s": 3600},
        **sections,
    }
    return DeviceProfile.model_validate(raw)


def _cine() -> list[Frame]:
    """Dark (benign), bright (urgent), bright, unsure, dark, dark, dark: one video session."""
    levels = [DARK, BRIGHT, BRIGHT, MID, DARK, DARK, DARK]
    return [Frame(index=i, source_kind="video", image=noise(*lv, seed=i)) for i, lv in enumerate(levels)]


def _run(
    tmp_path: Path, model: Deployable, **sections: Any
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], Any, str]:
    link, out = AcknowledgingPublisher(), io.StringIO()
    profile = _profile(tmp_path, triage={**TRIAGE, "study": {"min_valid_frames": 3}}, **sections)
    with Device(
        profile, out=out, model=model, backend=FeatureBackend(), source=ListSource(_cine()), publisher=link
    ) as device:
        summary = device.run()
    results = [json.loads(p) for p in link.on("results")]
    studies = [json.loads(p) for p in link.on("studies")]
    for env in results:
        jsonschema.validate(env, result_schema())
    for env in studies:
        jsonschema.validate(env, study_schema())
    return results, studies, summary, out.getvalue()


def test_frames_unlike_the_training_images_are_inconclusive_and_left_out_of_the_study(tmp_path: Path) -> None:
    results, studies, summary, printed = _run(tmp_path, _model({"features": FEATURE_SPEC, "energy": ENERGY}))

    oods = [r["ood"] for r in results]
    assert [o["flagged"] for o in oods] == [False, True, True, False, False, False, False]
    assert {(o["method"], o["threshold"], o["source"]) for o in oods} == {("features", 10.0, "manifest")}
    assert oods[1]["score"] == pytest.approx(50.0) and oods[0]["score"] == pytest.approx(0.01)
    flagged = results[1]
    assert flagged["triage"]["level"] == "inconclusive" and flagged["triage"]["basis"] == "ood"
    assert flagged["triage"]["model_level"] == "urgent"
    assert flagged["triage"]["reason"].startswith(OOD_REASON)
    assert "the model read it as urgent (malignant 1.00): refer if in doubt" in flagged["triage"]["reason"]
    assert flagged["prediction"]["label"] == "malignant"  # still recorded, for audit
    assert [r["triage"]["level"] for r in results] == [
        "no_finding",
        "inconclusive",
        "inconclusive",
        "inconclusive",
        "no_finding",
        "no_finding",
        "no_finding",
    ]
    assert results[3]["triage"]["basis"] == "confidence"  # unsure, but like the training images
    assert list(flagged["latency_ms"]) == ["capture", "quality", "preprocess", "inference", "ood", "triage", "total"]

    # Without the check the two bright frames would make the worst-case study urgent; flagged, they are no evidence.
    (study,) = studies
    assert study["triage"]["level"] == "inconclusive"  # the one unsure frame like the training images is the worst
    assert study["triage"]["valid_frames"] == 5 and study["triage"]["ood_frames"] == 2
    assert study["triage"]["reason"].endswith(
        "(2 frames unlike the training images left out; the model read 2 of them as urgent: refer if in doubt)"
    )
    assert study["triage"]["ood_urgent_frames"] == 2

    assert summary.ood_flagged == 2 and "2 unlike the training images" in summary.line()
    lines = printed.splitlines()
    assert "[unlike the training images: features 50.00 > 10.00]  -> INCONCLUSIVE: " + OOD_REASON in lines[1]
    assert "unlike" not in lines[0] and "unlike" not in lines[3]


def test_the_profile_picks_energy_and_overrides_its_threshold_on_every_result(tmp_path: Path) -> None:
    model = _model({"features": FEATURE_SPEC, "energy": ENERGY})
    results, _, summary, _ = _run(tmp_path, model, ood={"method": "energy", "threshold": -0.5})
    assert {(r["ood"]["method"], r["ood"]["threshold"], r["ood"]["source"]) for r in results} == {
        ("energy", -0.5, "profile")
    }
    # At -0.5 not even the unsure frame (energy -0.74) is flagged.
    assert summary.ood_flagged == 0 and results[1]["triage"]["level"] == "urgent"
    energies = [r["ood"]["score"] for r in results]
    assert energies[3] == pytest.approx(-np.logaddexp(0.1, 0.0), abs=1e-6)
    assert energies[1] == pytest.approx(-np.logaddexp(-3.0, 3.0), abs=1e-6)


def test_the_check_turned_off_is_recorded_on_every_result(tmp_path: Path) -> None:
    results, studies, summary, _ = _run(tmp_path, _model({"features": FEATURE_SPEC}), ood={"method": "none"})
    assert all(r["ood"]["method"] == "none" and r["ood"]["flagged"] is False for r in results)
    assert all(r["ood"]["score"] is None and r["ood"]["threshold"] is None for r in results)
    assert results[1]["triage"]["level"] == "urgent" and studies[0]["triage"]["level"] == "urgent"
    assert summary.ood_flagged == 0


def test_a_model_without_statistics_runs_as_before_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="edgemed.runtime"):
        results, studies, summary, _ = _run(tmp_path, _model(None))
    warned = [r.getMessage() for r in caplog.records if "out-of-distribution" in r.getMessage()]
    assert len(warned) == 1 and "convert it again with `edgemed convert`" in warned[0]
    assert all("ood" not in r for r in results)
    assert list(results[1]["latency_ms"]) == ["capture", "quality", "preprocess", "inference", "triage", "total"]
    assert studies[0]["triage"]["level"] == "urgent" and summary.ood_flagged == 0

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="edgemed.runtime"):
        _run(tmp_path / "off", _model(None), ood={"method": "none"})
    assert not [r for r in caplog.records if "out-of-distribution" in r.getMessage()]


@pytest.mark.parametrize(
    ("ood", "setting", "names"),
    [
        (None, {"method": "features"}, ("features", "edgemed convert")),
        ({"features": FEATURE_SPEC}, {"method": "energy"}, ("energy",)),
        # (a threshold without a method is refused with the profile: tests/test_ood_review.py)
        (None, {"method": "energy", "threshold": 3.0}, ("energy", "edgemed convert")),
    ],
)
def test_what_the_model_cannot_give_stops_the_device_at_start(
    tmp_path: Path, ood: dict[str, Any] | None, setting: dict[str, Any], names: tuple[str, ...]
) -> None:
    backend = FeatureBackend()
    with (
        pytest.raises(ConfigError) as caught,
        Device(_profile(tmp_path, ood=setting), model=_model(ood), backend=backend),
    ):
        pass
    for name in names:
        assert name in str(caught.value)
    assert backend.closed  # what was handed in is closed when set-up fails


def test_a_bad_ood_section_is_a_profile_error_naming_the_key(tmp_path: Path) -> None:
    from edgemed.config import parse_profile

    raw = {"profile": "p", "device": {"id": "d"}, "ood": {"method": "mahalanobis"}}
    with pytest.raises(ConfigError, match=r"ood\.method"):
        parse_profile(raw, None)
    with pytest.raises(ConfigError, match=r"ood\.treshold"):
        parse_profile({**raw, "ood": {"treshold": 2.0}}, None)


def test_a_real_run_checks_every_classified_frame(tmp_path: Path, int8_model: Path) -> None:
    """The converted reference CNN (BreastMNIST ultrasound) over dermoscopy photographs and a blank frame."""
    images = tmp_path / "images"
    images.mkdir()
    for photo in sorted((DATA / "isic_samples").glob("*.jpg"))[:4]:
        shutil.copy(photo, images)
    import cv2

    cv2.imwrite(str(images / "blank.png"), np.full((64, 64), 128, np.uint8))
    link = AcknowledgingPublisher()
    profile = _profile(
        tmp_path / "d",
        model={"path": str(int8_model)},
        source={"uri": str(images)},
        triage={},
        run={"print_results": False},
    )
    with Device(profile, publisher=link) as device:
        summary = device.run()
    results = [json.loads(p) for p in link.on("results")]
    assert len(results) == 5 and summary.frames == 5
    for env in results:
        jsonschema.validate(env, result_schema())
    classified = [r for r in results if r["prediction"] is not None]
    blank = [r for r in results if r["prediction"] is None]
    assert len(classified) == 4 and len(blank) == 1 and "ood" not in blank[0]  # the blank frame fails the gate
    for env in classified:
        ood = env["ood"]
        # The reference CNN has taps: the default is the feature score, with the threshold fitted on val.
        assert ood["method"] == "features" and ood["source"] == "manifest"
        assert ood["flagged"] == (ood["score"] > ood["threshold"])
        assert "ood" in env["latency_ms"]
        # Dermoscopy photographs are another modality: this model scored every one of the 12 in data/isic_samples
        # above its threshold by a factor of 1.8 or more when this test was written.
        assert ood["flagged"], ood
        assert env["triage"]["level"] == "inconclusive" and env["triage"]["basis"] == "ood"
        assert env["prediction"] is not None  # still recorded
    assert summary.ood_flagged == 4 and summary.levels == {"inconclusive": 4, "recapture": 1}
