"""What the page is told (edgemed.screen.events) and how images are drawn for it (edgemed.screen.render).

The wording comes from the device's own triage functions, so a reworded reason or action shows here first.
"""

from __future__ import annotations

import base64
from typing import Any

import cv2
import numpy as np
import pytest
from screen_client import image, result

from edgemed.screen.events import frame_payload, study_payload
from edgemed.screen.render import MAP_ALPHA, MAP_FLOOR, frame_data_url, map_data_url, map_rgba
from edgemed.triage import ACTION, OOD_REASON, TriagePolicy, triage, triage_ood, triage_recapture
from edgemed.types import FrameResult, OodCheck, Prediction, QualityReport, TriageResult


def _with(verdict: TriageResult, **kwargs: Any) -> FrameResult:
    return result(7, verdict.level, reason=verdict.reason, extra=verdict.extra, **kwargs)


def test_recapture_ood_and_error_results_say_what_to_do_once() -> None:
    why = "too blurred (Laplacian variance 3.0 < 12): hold the probe or camera still, focus, and recapture"
    blurred = QualityReport(False, 3.0, 0.5, 0.0, reason=why)
    recapture = frame_payload(_with(triage_recapture(blurred), probs=None, quality=blurred), None, show_name=False)
    assert recapture["recapture"] == f"Recapture the image: {why}" and recapture["level_text"] == "RECAPTURE"
    assert recapture["action"] == "do not use this image: take it again"
    assert recapture["quality"] == {"passed": False, "text": "Image quality: failed"}
    assert recapture["confidence"] is None and recapture["reason_repeats"] is True  # the prompt says it all

    pred = Prediction(("benign", "malignant"), (0.97, 0.03))
    policy = TriagePolicy.model_validate({"rules": {"malignant": {"level": "urgent", "min_probability": 0.5}}})
    flagged = OodCheck("energy", 9.0, 2.0, True, "manifest")
    ood = frame_payload(
        _with(triage_ood(triage(pred, policy), pred), probs=(0.97, 0.03), ood=flagged), None, show_name=True
    )
    assert ood["ood_warning"] == OOD_REASON[0].upper() + OOD_REASON[1:] and "probe" in ood["ood_warning"]
    assert ood["action"] == "recapture, or refer if in doubt" and ood["reason_repeats"] is True
    assert ood["name"] == "MRN-7.png"  # only with show_name (privacy.print_source_names: always)
    # Flagged, but the model read it as urgent: the reason says so, and is shown beside the warning.
    urgent_pred = Prediction(("benign", "malignant"), (0.1, 0.9))
    urgent = frame_payload(
        _with(triage_ood(triage(urgent_pred, policy), urgent_pred), probs=(0.1, 0.9), ood=flagged),
        None,
        show_name=False,
    )
    assert urgent["ood_warning"] is not None and urgent["reason_repeats"] is False
    assert "the model read it as urgent (malignant 0.90)" in urgent["reason"]

    error = frame_payload(
        result(3, "error", probs=None, quality=None, reason="the input cannot be decoded"), None, show_name=False
    )
    assert error["level_text"] == "ERROR" and error["quality"] is None and error["action"].startswith("check")
    assert error["reason_repeats"] is False
    study = TriageResult("urgent", "2 of 12 frames urgent: refer now", {"frames": 12, "valid_frames": 9})
    with_study = frame_payload(result(4), study, show_name=False)
    assert with_study["study"]["text"] == "12 frames, 9 usable" and with_study["study"]["level_text"] == "URGENT"
    for level, action in ACTION.items():
        shown = frame_payload(result(5, level, reason="r"), None, show_name=False)
        assert shown["action"] == action and shown["level_text"] == level.upper().replace("_", " ")


def test_a_map_is_drawn_where_it_is_positive_and_transparent_elsewhere() -> None:
    values = np.full((7, 7), -1.0, np.float32)
    values[1, 5] = 4.0  # one hot cell, top right
    rgba = map_rgba(values, 224, 224)
    assert rgba.shape == (224, 224, 4) and rgba.dtype == np.uint8
    alpha = rgba[:, :, 3]
    assert alpha[: 224 // 7 * 2, 224 // 7 * 5 :].max() > 100  # opaque over the hot cell
    assert alpha[150:, :80].max() == 0  # transparent far from it: negative values are not drawn
    assert map_rgba(np.full((7, 7), -2.0, np.float32), 50, 50)[:, :, 3].max() == 0
    assert map_rgba(np.full((7, 7), np.nan, np.float32), 50, 50)[:, :, 3].max() == 0
    url = map_data_url(values, 28, 28)
    png = base64.b64decode(url.removeprefix("data:image/png;base64,"))
    decoded = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    assert decoded.shape == (224, 224, 4)  # small frames get a map drawn large enough not to be blocky
    with pytest.raises(ValueError, match="2-D"):
        map_rgba(np.zeros((2, 2, 2), np.float32), 10, 10)


def test_a_large_frame_is_downscaled_to_800_pixels_and_a_gray_one_kept_gray() -> None:
    url, h, w = frame_data_url(image(4, (1200, 1600, 3)))
    assert (h, w) == (600, 800)
    decoded = cv2.imdecode(np.frombuffer(base64.b64decode(url.split(",", 1)[1]), np.uint8), cv2.IMREAD_UNCHANGED)
    assert decoded.shape == (600, 800, 3)
    url, h, w = frame_data_url(image(5, (28, 28)))
    decoded = cv2.imdecode(np.frombuffer(base64.b64decode(url.split(",", 1)[1]), np.uint8), cv2.IMREAD_UNCHANGED)
    assert (h, w) == (28, 28) and decoded.shape == (28, 28)
    # Red stays red: frames are RGB, OpenCV encodes BGR.
    red = np.zeros((16, 16, 3), np.uint8)
    red[..., 0] = 255
    decoded = cv2.imdecode(np.frombuffer(base64.b64decode(frame_data_url(red)[0].split(",", 1)[1]), np.uint8), 1)
    assert decoded[8, 8, 2] > 200 and decoded[8, 8, 0] < 50
    with pytest.raises(ValueError, match="uint8"):
        frame_data_url(np.zeros((4, 4), np.float32))


def test_the_low_part_of_a_map_is_transparent_so_the_anatomy_shows() -> None:
    # A ramp from 0 to the peak along the width: the overlay starts only at MAP_FLOOR of the peak and is most
    # opaque (MAP_ALPHA) at it, so a diffuse CAM does not paint the whole frame.
    ramp = np.tile(np.linspace(0.0, 1.0, 101, dtype=np.float32), (5, 1))
    alpha = map_rgba(ramp, 5, 101)[2, :, 3].astype(int)
    assert alpha[: round(MAP_FLOOR * 100)].max() == 0
    assert alpha[round(MAP_FLOOR * 100) + 5] > 0
    assert alpha[-1] == int(MAP_ALPHA * 255) and np.all(np.diff(alpha) >= 0)
    # A map that is positive everywhere (a typical CAM) leaves most of the frame clear.
    diffuse = np.random.default_rng(0).uniform(0.0, 0.15, (7, 7)).astype(np.float32)
    diffuse[3, 3] = 1.0
    assert (map_rgba(diffuse, 224, 224)[:, :, 3] == 0).mean() > 0.8


def test_the_study_says_what_to_do_in_a_few_words_whatever_its_reason() -> None:
    long_reason = (
        "only 0 of 30 frames were usable, 3 are needed (30 did not look like the images the model was trained on: "
        "check the probe, body part and preset): record the study again"
    )
    study = TriageResult("recapture", long_reason, {"frames": 30, "valid_frames": 0})
    shown = frame_payload(result(6), study, show_name=False)["study"]
    assert shown["action"] == "record the study again" and shown["reason"] == long_reason
    assert study_payload(TriageResult("error", "no readable frame", {}))["action"] == "check the probe and record again"
    for level, action in ACTION.items():
        assert study_payload(TriageResult(level, "r", {}))["action"] == action  # type: ignore[arg-type]
