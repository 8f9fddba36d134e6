"""The nurse's screen end to end: a real ``edgemed run --screen`` watching a folder, in headless Chromium at 800x480.

Files land in the watched folder one at a time, as a probe's export writes them; after each the test waits (bounded)
for the page to show a new frame (``body[data-seq]``) and checks what a nurse would read: a malignant BreastMNIST
image the device triages urgent (chosen by the device's own classifier in this process), a blurred copy the quality
gate refuses, an ISIC dermoscopy photo the out-of-distribution check flags, and the ultrasound cine DICOM's running
study decision. The GAP model's class activation map is drawn over the frame with its legend; the reference model
(no GAP head) offers the occlusion map instead. The page must fit 800x480 and a 1280x800 tablet, log no console
error or CSP violation, and ask nothing of anyone but its own origin.

Screenshots go to tmp_path, and with ``EDGEMED_SCREENSHOTS=DIR`` also to DIR (the README's come from
``EDGEMED_SCREENSHOTS=docs/images``).
"""

from __future__ import annotations

import math
import re
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from gap_model import gap_model_fixture
from screen_rig import CINE, TABLET, URGENT_REASON, Page, Picks, ScreenRun, drop, pick_images, png_bytes

__all__ = ["gap_model_fixture"]

CAM_LEGEND = "Class activation map: regions that raised the score for malignant. Not an explanation of the decision."
LEVELS = {"urgent", "routine", "no_finding", "inconclusive", "recapture", "error"}


@pytest.fixture(scope="module")
def picks(gap_model: Path) -> Picks:
    return pick_images(gap_model)


def _fits(page: Page, what: str) -> None:
    problems = page.fit_problems()
    assert not problems, f"{what}: {problems}"


def _in_view(page: Page, element_id: str) -> bool:
    """Whether the element's top edge is inside the viewport without scrolling anything (prominent, not buried)."""
    value = page.browser.evaluate(
        f"(() => {{ const r = document.getElementById('{element_id}').getBoundingClientRect();"
        " return r.height > 0 && r.top >= 0 && r.top < window.innerHeight && r.left >= 0; })()"
    )
    return bool(value)


def test_the_page_shows_each_case_a_nurse_meets(tmp_path: Path, gap_model: Path, picks: Picks) -> None:
    with ExitStack() as stack:  # the run and the browser are stopped whatever fails, even while starting
        run = ScreenRun(tmp_path, gap_model)
        stack.callback(run.stop)
        page = Page(tmp_path, run)
        stack.callback(page.close)
        # The first status (about one a second) names the model.
        state = page.wait("the waiting state", lambda s: s["model"]["text"].startswith("breast_gap v"), 30)
        assert state["seq"] == "" and not state["missing"], state
        assert state["level"]["data"] == "waiting" and state["level"]["text"] == "Waiting for the first image"
        assert not state["frame"]["shown"] and not state["map"]["shown"]
        assert state["connection"]["state"] == "none"  # no broker configured
        assert state["delegate"]["degraded"] == "false"
        _fits(page, "waiting")

        # Urgent, with the class activation map over the frame.
        drop(run.watched, "img1.png", png_bytes(picks.urgent))
        state = page.wait_new_frame(state["seq"])
        state = page.wait("the CAM overlay", lambda s: s["map"]["shown"], 15)
        assert state["level"]["data"] == "urgent" and state["level"]["text"] == "URGENT", state
        assert state["reason"]["text"] == URGENT_REASON
        assert state["action"]["shown"] and state["action"]["text"].lower() == "refer now"
        percent = picks.urgent_p * 100  # rounded by the page: either neighbour of the device's probability
        assert state["confidence"]["text"] in (f"malignant {math.floor(percent)}%", f"malignant {math.ceil(percent)}%")
        assert state["quality"]["passed"] == "true"
        assert not state["recapture"]["shown"] and not state["ood-warning"]["shown"] and not state["study"]["shown"]
        assert state["frame"]["src"].startswith("data:image/jpeg;base64,")
        assert state["map"]["src"].startswith("data:image/png;base64,")
        assert state["map-legend"]["shown"] and state["map-legend"]["text"] == CAM_LEGEND
        assert not state["occlusion-button"]["shown"]  # the model has a CAM: no occlusion offered
        _fits(page, "urgent")
        page.screenshot("urgent")
        page.click("map-toggle")  # the nurse can take the map away, and bring it back
        off = page.wait("the map toggled off", lambda s: not s["map"]["shown"], 5)
        assert not off["map-legend"]["shown"] and off["seq"] == state["seq"]
        page.click("map-toggle")
        page.wait("the map toggled on", lambda s: s["map"]["shown"], 5)

        # Blurred: the gate refuses it and the page asks for a recapture, prominently.
        drop(run.watched, "img2.png", png_bytes(picks.blurred))
        state = page.wait_new_frame(state["seq"])
        assert state["level"]["data"] == "recapture" and state["level"]["text"] == "RECAPTURE", state
        assert state["recapture"]["shown"] and state["recapture"]["text"] == f"Recapture the image: {picks.blur_reason}"
        assert state["quality"]["passed"] == "false" and not state["confidence"]["shown"]
        assert not state["map"]["shown"]  # no prediction, no map
        assert _in_view(page, "recapture")
        _fits(page, "recapture")
        page.screenshot("recapture")

        # Dermoscopy photo on a breast-ultrasound model: out of distribution.
        drop(run.watched, "img3.jpg", picks.isic)
        state = page.wait_new_frame(state["seq"])
        assert state["level"]["data"] == "inconclusive" and state["level"]["text"] == "INCONCLUSIVE", state
        assert (
            state["ood-warning"]["shown"]
            and "does not look like the images the model was trained on" in (state["ood-warning"]["text"])
        )
        assert not state["recapture"]["shown"] and state["action"]["shown"] and state["action"]["text"]
        # No map over a frame unlike the training images (edgemed/screen/screen.py): its scores are not evidence.
        assert not state["map"]["shown"] and not state["map-legend"]["shown"], state
        assert _in_view(page, "ood-warning")
        _fits(page, "ood")
        page.screenshot("ood")

        # The ultrasound cine: its frames form a study, and the running decision goes with each frame.
        drop(run.watched, "cine.dcm", CINE)
        state = page.wait("the study panel", lambda s: s["study"]["shown"] and s["study-frames"]["text"], 40)
        assert state["study-level"]["data"] in LEVELS, state
        assert re.fullmatch(r"\d+ frames?, \d+ usable", state["study-frames"]["text"]), state["study-frames"]
        assert state["study-reason"]["text"]
        assert _in_view(page, "study")
        _fits(page, "study")
        page.screenshot("study")
        # The device numbers the three images 0-2 and the cine's 30 frames 3-32; the page ends on the last frame,
        # still with its study's running decision over all 30.
        final = page.wait("the last cine frame", lambda s: s["seq"] == "32", 60)
        assert final["study"]["shown"] and final["study-frames"]["text"].startswith("30 frames, "), final

        # The same page on a 1280x800 tablet.
        page.set_viewport(*TABLET)
        time.sleep(0.3)
        _fits(page, "tablet")
        page.screenshot("tablet", export=False)

        assert not page.problems()
    assert "Traceback" not in run.stderr(), run.stderr()
    # The running decision the page showed at the cine's last frame is the study decision the device printed at the
    # end (its summary line; the study envelope itself waits in the outbox: no broker here).
    printed = re.search(r"^edgemed: study decision: ([A-Z ]+):", run.stderr(), re.MULTILINE)
    assert printed, run.stderr()
    assert printed.group(1).lower().replace(" ", "_") == final["study-level"]["data"], (printed.group(0), final)


def _wait_map(page: Page, seq: str) -> dict[str, Any]:
    return page.wait("the occlusion map", lambda s: s["map"]["shown"] and s["seq"] == seq, 60)


def test_occlusion_map_and_hold_on_a_model_without_cam(tmp_path: Path, int8_model: Path) -> None:
    picks = pick_images(int8_model)
    with ExitStack() as stack:
        run = ScreenRun(tmp_path, int8_model)
        stack.callback(run.stop)
        page = Page(tmp_path, run)
        stack.callback(page.close)
        state = page.wait("the waiting state", lambda s: s["level"]["data"] == "waiting", 30)
        drop(run.watched, "img1.png", png_bytes(picks.urgent))
        state = page.wait_new_frame(state["seq"])
        state = page.wait("the occlusion button", lambda s: s["occlusion-button"]["shown"], 10)
        assert state["level"]["data"] == "urgent" and not state["map"]["shown"], state
        assert not state["map-legend"]["shown"]
        enabled = page.browser.evaluate("!document.getElementById('occlusion-button').disabled")
        assert enabled
        page.click("occlusion-button")
        state = _wait_map(page, state["seq"])
        assert state["map"]["src"].startswith("data:image/png;base64,")
        legend = state["map-legend"]["text"]
        assert state["map-legend"]["shown"] and legend.startswith("Occlusion map: "), state
        assert "for malignant" in legend and legend.endswith("Not an explanation of the decision."), legend
        _fits(page, "occlusion")
        page.screenshot("occlusion")

        # Hold: the display freezes on this frame while the device goes on triaging.
        page.click("hold-button")
        drop(run.watched, "img2.png", png_bytes(picks.ordinary))
        page.wait_pending(2)  # the device triaged it (the status bar goes on while the image is held)
        page.wait_frame_received(int(state["seq"]) + 1)  # the page's stream carried the new frame...
        time.sleep(0.3)  # ...and the page had time to draw it, had it not been held
        held = page.state()
        assert held["seq"] == state["seq"] and held["map"]["shown"], held  # ...and it kept the held one
        page.click("hold-button")
        page.wait_new_frame(state["seq"], 10)
        assert not page.problems()
    assert "Traceback" not in run.stderr(), run.stderr()


def test_the_readme_shows_the_screen_at_800x480() -> None:
    """Every screenshot of the screen the README shows exists, is a PNG and is 800x480 (the panel it is laid out for),
    and the urgent, recapture, out-of-distribution and study cases are all among them."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## The nurse's screen") :]
    section = section[: section.index("\n## ", 1)]
    shown = re.findall(r"!\[[^\]]+\]\((docs/images/screen-[a-z-]+\.png)\)", section)
    assert {f"docs/images/screen-{case}.png" for case in ("urgent", "recapture", "ood", "study")} <= set(shown), shown
    for link in shown:
        header = (Path(__file__).resolve().parent.parent / link).read_bytes()[:24]
        assert header[:8] == b"\x89PNG\r\n\x1a\n", link
        size = (int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big"))
        assert size == (800, 480), (link, size)
