"""The screen wired into the device (edgemed.runtime + edgemed.screen.feed): each result shown, the CAM timed as a
stage, occlusion on request under the runtime's invoke lock, and a screen that fails without stopping the run.

Logic with the fakes of tests/device_fakes.py; the CAM and occlusion on real LiteRT interpreters running real int8
models (gap_model: BreastMNIST, ends in global average pooling; int8_model: the reference CNN, no CAM).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from device_fakes import BRIGHT, DARK, AcknowledgingPublisher, BrightnessBackend, ListSource, fake_model, noise
from gap_model import gap_model_fixture
from screen_client import EventStream

from edgemed.cam import CamComputer
from edgemed.cli import main
from edgemed.clock import Clock
from edgemed.config import DeviceProfile
from edgemed.deploy import check_deployable
from edgemed.envelope import encode, result_envelope, result_schema
from edgemed.errors import ConfigError
from edgemed.inference.classify import Classifier
from edgemed.runtime import Device
from edgemed.screen import Screen
from edgemed.types import ClassMap, Frame, FrameResult, TriageResult

__all__ = ["gap_model_fixture"]  # the fixture is found by name

DATA = Path(__file__).resolve().parent.parent / "data"
TRIAGE = {"rules": {"malignant": {"level": "urgent", "min_probability": 0.5}, "benign": {"level": "no_finding"}}}
Shown = tuple[FrameResult, np.ndarray | None, TriageResult | None, ClassMap | None]


def _profile(data_dir: Path, screen: dict[str, Any] | None = None, **sections: Any) -> DeviceProfile:
    raw = {
        "profile": "screen-test",
        "device": {"id": "screen-01", "site": "ward", "data_dir": str(data_dir)},
        "triage": TRIAGE,
        "health": {"interval_s": 3600},
        "run": {"print_results": False},
        "screen": {"enabled": True, "port": 0, **(screen or {})},
        **sections,
    }
    return DeviceProfile.model_validate(raw)


def _frames(kind: str = "video") -> list[Frame]:
    images = [noise(*DARK, seed=0), noise(*BRIGHT, seed=1), np.full((64, 64), 120, np.uint8), None, noise(*BRIGHT, 4)]
    return [
        Frame(index=i, source_kind=kind, image=im, error=None if im is not None else "cannot be decoded")  # type: ignore[arg-type]
        for i, im in enumerate(images)
    ]


def _spy(device: Device) -> list[Shown]:
    """Record every hand-over to the device's screen (and still hand it over)."""
    assert device.screen is not None and device.screen.screen is not None
    screen = device.screen.screen
    shown: list[Shown] = []
    real = screen.show

    def show(result: FrameResult, image: Any, study: Any = None, class_map: Any = None) -> None:
        shown.append((result, image, study, class_map))
        real(result, image, study, class_map)

    screen.show = show  # type: ignore[method-assign]
    return shown


def _breast_test_images(n: int) -> list[np.ndarray]:
    with np.load(DATA / "breastmnist_28.npz") as data:
        return [np.asarray(im, np.uint8) for im in data["test_images"][:n]]


@pytest.fixture
def fake_device(tmp_path: Path) -> Iterator[Device]:
    device = Device(
        _profile(tmp_path),
        model=fake_model(),
        backend=BrightnessBackend(),
        source=ListSource(_frames()),
        publisher=AcknowledgingPublisher(),
        clock=Clock(now=lambda: 1.7e9, synced=lambda: True),
    )
    with device:
        yield device


# -- wiring, with fakes ---------------------------------------------------------------------------------------------
def test_a_device_with_the_screen_on_shows_each_result_with_its_running_study(fake_device: Device) -> None:
    shown = _spy(fake_device)
    summary = fake_device.run()
    assert summary.frames == 5
    frames = _frames()
    assert [r.seq for r, *_ in shown] == [0, 1, 2, 3, 4]
    assert [r.level for r, *_ in shown] == ["no_finding", "urgent", "recapture", "error", "urgent"]
    for (result, image, study, class_map), frame in zip(shown, frames, strict=True):
        assert (image is None) == (frame.image is None)
        if frame.image is not None:
            assert np.array_equal(image, frame.image)
        assert class_map is None  # the fake model has no CAM
        # Frames of one video form a study: its running decision goes with each frame, counting it.
        assert study is not None and study.extra["frames"] == result.frame.index + 1
    assert shown[-1][2] is not None and shown[-1][2].level == "urgent"
    assert fake_device.studies and fake_device.studies[0].decision.level == shown[-1][2].level


def test_a_folder_of_single_images_shows_no_study(tmp_path: Path) -> None:
    device = Device(
        _profile(tmp_path),
        model=fake_model(),
        backend=BrightnessBackend(),
        source=ListSource(_frames("folder"), kind="folder"),
    )
    with device:
        shown = _spy(device)
        device.run()
    assert len(shown) == 5 and all(study is None for _, _, study, _ in shown)


def test_the_status_bar_says_what_the_heartbeat_says(fake_device: Device) -> None:
    status = fake_device.screen_status()
    beat = fake_device.health_payload()
    assert status == {
        "connection": "connected",
        "pending": beat["pending"],
        "awaiting_receipt": None,
        "delegate": beat["delegate"],
        "degraded": beat["degraded"],
        "degraded_reason": beat["degraded_reason"],
        "source_state": beat["source_state"],
        "model": "fake",
        "model_version": "1",
    }


def test_an_offline_device_says_none_and_the_page_gets_each_frame_live(tmp_path: Path) -> None:
    with Device(_profile(tmp_path), model=fake_model(), backend=BrightnessBackend()) as device:
        assert device.screen is not None and device.screen.screen is not None
        stream = EventStream(device.screen.screen.port)
        try:
            status = stream.until("status")
            assert status["connection"] == "none" and status["class_map"] == "occlusion"
            for i, pixels in enumerate((noise(*BRIGHT, seed=9), noise(*DARK, seed=8))):
                result = device.process(Frame(index=i, source_kind="folder", image=pixels, name="MRN-123.png"))
                event = stream.until("frame", lambda d, seq=result.seq: d["seq"] == seq)
                assert event["level"] == result.level and event["reason"] == result.triage.reason
                assert event["name"] is None  # print_source_names is auto: not on the page
                assert event["frame"].startswith("data:image/jpeg;base64,")
        finally:
            stream.close()
    assert b"MRN-123" not in b"".join(stream.raw)


def test_frames_and_maps_go_to_the_page_only(tmp_path: Path, gap_model: Path) -> None:
    link = AcknowledgingPublisher()
    profile = _profile(tmp_path / "d", model={"path": str(gap_model)}, triage={}, run={"results_jsonl": True})
    with Device(profile, publisher=link) as device:
        assert device.screen is not None and device.screen.screen is not None
        stream = EventStream(device.screen.screen.port)
        try:
            stream.until("status")
            for i, pixels in enumerate(_breast_test_images(3)):
                result = device.process(Frame(index=i, source_kind="folder", image=pixels, name=f"MRN-{i}.png"))
                event = stream.until("frame", lambda d, seq=result.seq: d["seq"] == seq)
                assert event["frame"] and event["map"]  # the page did get both (so the checks below can fail)
        finally:
            stream.close()
        device.uplink.drain(10)
    sent = b"".join(m.payload for m in link.sent)
    assert sent.count(b'"schema"') >= 3  # the results were published
    for marker in (b"\xff\xd8\xff", b"\x89PNG", b"/9j/", b"iVBOR", b"data:image", b"MRN-"):
        assert marker not in sent, marker
    for path in (tmp_path / "d").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert b"\xff\xd8\xff" not in data and b"\x89PNG" not in data and b"/9j/" not in data, path.name


def test_a_failing_screen_is_logged_once_and_the_run_goes_on(
    fake_device: Device, caplog: pytest.LogCaptureFixture
) -> None:
    assert fake_device.screen is not None and fake_device.screen.screen is not None
    screen = fake_device.screen.screen
    port = screen.port
    calls = 0

    def broken(*_args: Any) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("the display is gone")

    screen.show = broken  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, logger="edgemed.screen"):
        summary = fake_device.run()
    assert summary.frames == 5 and summary.pending == 0 and summary.exit_code == 0  # every result delivered
    assert calls == 1  # switched off after the first failure
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == ["screen: stopped (RuntimeError: the display is gone); the run goes on without it"]
    assert fake_device.screen.screen is None
    with socket.socket() as probe:  # and its port is released
        assert probe.connect_ex(("127.0.0.1", port)) != 0


def test_a_frame_the_push_thread_cannot_encode_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import edgemed.screen.render as render

    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise ValueError("encoder refused")

    monkeypatch.setattr(render, "frame_data_url", refuse)
    device = Device(_profile(tmp_path), model=fake_model(), backend=BrightnessBackend())
    with caplog.at_level(logging.ERROR, logger="edgemed.screen"), device:
        assert device.screen is not None and device.screen.screen is not None
        stream = EventStream(device.screen.screen.port)
        try:
            stream.until("status")
            for i in range(4):
                device.process(Frame(index=i, source_kind="folder", image=noise(*BRIGHT, seed=i)))
                time.sleep(0.1)  # past the push period: each frame is attempted
            stream.until("status")  # the push thread still runs
        finally:
            stream.close()
        assert device.outbox.unsent_count() == 4
    errors = [r.getMessage() for r in caplog.records if r.name == "edgemed.screen"]
    assert errors == ["screen: could not update the page (ValueError: encoder refused); the run goes on"]


def test_a_port_in_use_stops_the_device_before_any_frame(tmp_path: Path) -> None:
    backend = BrightnessBackend()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        device = Device(_profile(tmp_path, {"port": port}), model=fake_model(), backend=backend)
        with pytest.raises(ConfigError, match=rf"screen port {port} is already in use.*--screen-port N"):
            device.__enter__()
    assert backend.inputs == [] and backend.closed


def test_the_screen_off_adds_nothing(tmp_path: Path) -> None:
    with Device(_profile(tmp_path, {"enabled": False}), model=fake_model(), backend=BrightnessBackend()) as device:
        result = device.process(Frame(index=0, source_kind="folder", image=noise(*BRIGHT, seed=1)))
    assert device.screen is None and "cam" not in result.latency_ms


# -- the CAM on a real GAP model -------------------------------------------------------------------------------------
def test_the_cam_is_computed_per_frame_and_timed_as_its_own_stage(tmp_path: Path, gap_model: Path) -> None:
    profile = _profile(tmp_path, model={"path": str(gap_model)}, triage={})
    results: list[FrameResult] = []
    with Device(profile) as device:
        assert device.screen is not None and device.screen.cam is not None
        shown = _spy(device)
        for i, pixels in enumerate(_breast_test_images(6)):
            results.append(device.process(Frame(index=i, source_kind="folder", image=pixels)))
        envelopes = [result_envelope(device.ctx, r) for r in results]
    model = check_deployable(gap_model, None, profile.triage)
    backend = model.open_backend(profile.inference)
    classifier = Classifier(backend, model.manifest, model.artifact)
    cam = CamComputer.build(classifier)
    assert cam is not None
    try:
        for (result, image, _study, class_map), envelope in zip(shown, envelopes, strict=True):
            assert result.prediction is not None and class_map is not None
            assert list(result.latency_ms) == ["capture", "quality", "preprocess", "inference", "ood", "cam",
                                               "triage", "total"]  # fmt: skip
            assert 0 < result.latency_ms["cam"] < result.latency_ms["total"]
            jsonschema.validate(json.loads(encode(envelope)), result_schema())
            assert class_map.kind == "cam" and class_map.seq == result.seq
            assert class_map.label == result.prediction.label
            # The map is the one of this frame's own invoke: the same as an independent interpreter's.
            backend.invoke(classifier.preprocess(image))
            expected = cam.compute(result.prediction.index, result.seq)
            np.testing.assert_allclose(class_map.values, expected.values, rtol=1e-5, atol=1e-5)
    finally:
        backend.close()
    assert len({m.values.tobytes() for *_, m in shown if m is not None}) == 6  # a map per frame, not one reused


def test_class_map_off_computes_no_cam(tmp_path: Path, gap_model: Path) -> None:
    profile = _profile(tmp_path, {"class_map": "off"}, model={"path": str(gap_model)}, triage={})
    with Device(profile) as device:
        assert device.screen is not None and device.screen.cam is None
        shown = _spy(device)
        result = device.process(Frame(index=0, source_kind="folder", image=_breast_test_images(1)[0]))
        assert device.screen.screen is not None and device.screen.screen.status_payload()["class_map"] == "off"
    assert "cam" not in result.latency_ms and shown[0][3] is None


def test_the_page_gets_the_cam_with_its_legend(tmp_path: Path, gap_model: Path) -> None:
    with Device(_profile(tmp_path, model={"path": str(gap_model)}, triage={})) as device:
        assert device.screen is not None and device.screen.screen is not None
        stream = EventStream(device.screen.screen.port)
        try:
            assert stream.until("status")["class_map"] == "cam"
            result = device.process(Frame(index=0, source_kind="folder", image=_breast_test_images(1)[0]))
            event = stream.until("frame", lambda d: d["seq"] == result.seq)
        finally:
            stream.close()
    assert result.prediction is not None
    assert event["map"].startswith("data:image/png;base64,") and event["map_kind"] == "cam"
    assert event["map_legend"].startswith(
        f"Class activation map: regions that raised the score for {event['map_label']}"
    )


# -- occlusion on the reference model (no CAM) -----------------------------------------------------------------------
def _post(port: int, token: str, seq: int) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    body = json.dumps({"seq": seq})
    headers = {"X-Edgemed-Screen": token, "Origin": f"http://127.0.0.1:{port}", "Content-Type": "application/json"}
    conn.request("POST", "/occlusion", body=body, headers=headers)
    response = conn.getresponse()
    answer = json.loads(response.read())
    conn.close()
    return response.status, answer


def test_an_occlusion_map_on_request_runs_under_the_invoke_lock(tmp_path: Path, int8_model: Path) -> None:
    with Device(_profile(tmp_path, model={"path": str(int8_model)}, triage={})) as device:
        assert device.screen is not None and device.screen.screen is not None and device.screen.cam is None
        screen: Screen = device.screen.screen
        stream = EventStream(screen.port)
        try:
            assert stream.until("status")["class_map"] == "occlusion"
            result = device.process(Frame(index=0, source_kind="folder", image=_breast_test_images(1)[0]))
            stream.until("frame", lambda d: d["seq"] == result.seq)
            # While the runtime thread holds the lock (an invoke in progress) the worker waits: a second request
            # meanwhile is told one is running.
            with device.invoke_lock:
                assert _post(screen.port, screen.token, result.seq)[0] == 202
                status, answer = _post(screen.port, screen.token, result.seq)
                assert status == 429 and "already" in answer["message"]
            event = stream.until("map", timeout_s=60)
            assert _post(screen.port, screen.token, result.seq + 100)[0] == 409  # not a frame it showed
        finally:
            stream.close()
    assert result.prediction is not None
    assert event["seq"] == result.seq and event["map_kind"] == "occlusion" and "error" not in event
    assert event["map_legend"].startswith("Occlusion map: regions where covering the image lowered the score for ")
    assert event["map"].startswith("data:image/png;base64,")


# -- the command line ------------------------------------------------------------------------------------------------
def test_edgemed_run_help_teaches_the_screen(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--screen " in text and "--screen-port PORT" in text
    assert "chromium --kiosk http://127.0.0.1:8780/" in text and "127.0.0.1 only" in text
    assert "Frames and maps never leave the device" in text


def test_screen_port_without_screen_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", "--device-id", "d1", "--source", str(tmp_path), "--screen-port", "0"])
    assert (
        code == 2 and "--screen-port sets the port of the screen, which is off: add --screen" in capsys.readouterr().err
    )


@pytest.mark.parametrize(("port", "says"), [("abc", "'abc' is not a port"), ("70000", "less than or equal to 65535")])
def test_a_bad_screen_port_says_what_a_port_is(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], port: str, says: str
) -> None:
    with pytest.raises(SystemExit) if port == "abc" else contextlib.nullcontext():
        assert main(["run", "--device-id", "d1", "--source", str(tmp_path), "--screen", "--screen-port", port]) == 2
    err = capsys.readouterr().err
    assert says in err and "--screen-port" in err, err


def test_edgemed_run_screen_logs_its_url_at_warning(tmp_path: Path, int8_model: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "edgemed", "run", "--screen", "--screen-port", "0", "--model", str(int8_model),
         "--source", str(DATA / "isic_samples"), "--max-frames", "1", "--device-id", "d1",
         "--data-dir", str(tmp_path / "d"), "--quiet"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 10, proc.stderr  # offline: the result stays pending
    lines = [line for line in proc.stderr.splitlines() if "screen:" in line]
    assert len(lines) == 1 and re.fullmatch(
        r"edgemed: WARNING: screen: http://127\.0\.0\.1:\d+/ \(open it in the device's kiosk browser\)", lines[0]
    ), proc.stderr


def test_a_bare_yaml_off_turns_the_maps_off(tmp_path: Path) -> None:
    # YAML 1.1 reads `off` as false: the profile must still mean "no maps", not fail or mean "cam".
    from edgemed.config import load_profile

    path = tmp_path / "p.yaml"
    path.write_text("profile: t\ndevice: {id: d1}\nscreen:\n  enabled: true\n  class_map: off\n", encoding="utf-8")
    assert load_profile(path).screen.class_map == "off"
    path.write_text("profile: t\ndevice: {id: d1}\nscreen: {class_map: on}\n", encoding="utf-8")
    assert load_profile(path).screen.class_map == "cam"
