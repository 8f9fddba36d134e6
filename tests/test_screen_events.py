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

from edgemed.screen.events import frame_payload
from edgemed.screen.render import frame_data_url, map_data_url, map_rgba
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
