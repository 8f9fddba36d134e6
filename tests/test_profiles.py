"""Device profiles: the shipped ones validate, and a malformed one gets an error naming the field and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgemed.cli import main
from edgemed.config import load_profile
from edgemed.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
PROFILES = sorted((ROOT / "firmware_configs").glob("*.yaml"))


def test_there_is_a_profile_for_each_target_device() -> None:
    names = {p.stem for p in PROFILES}
    assert {
        "rpi4-coral-usb",
        "coral-devboard",
        "jetson-orin-nano",
        "x86_64-cpu",
        "dermatoscope-example",
        "ultrasound-probe-example",
    } <= names


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
def test_shipped_profiles_validate(path: Path) -> None:
    profile = load_profile(path)
    text = path.read_text()
    # Hardware that was not exercised says so, in the data and in a comment.
    if not profile.validated:
        assert "NOT VALIDATED" in text or "not validated" in text.lower()
    # No committed profile holds an inline password.
    assert profile.mqtt is None or profile.mqtt.password_env or profile.mqtt.password_file
    assert profile.model.path is not None and profile.model.path.is_absolute()


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return path


def test_unknown_key_is_named(tmp_path: Path) -> None:
    path = _write(tmp_path, "profile: t\ndevice: {id: d1}\ninference: {acelerator: edgetpu}\n")
    with pytest.raises(ConfigError, match=r"inference\.acelerator: unknown key"):
        load_profile(path)


def test_missing_required_field_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"device\.id: required field is missing"):
        load_profile(_write(tmp_path, "profile: t\ndevice: {site: s}\n"))


def test_bad_device_id_is_explained(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"device\.id: .*must be 1-64 letters"):
        load_profile(_write(tmp_path, "profile: t\ndevice: {id: 'ward 3/bed 2'}\n"))


def test_not_yaml_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_profile(_write(tmp_path, "profile: [unclosed\n"))


def test_inline_password_is_not_a_field(tmp_path: Path) -> None:
    path = _write(tmp_path, "profile: t\ndevice: {id: d1}\nmqtt: {url: 'mqtts://b:8883', password: hunter2}\n")
    with pytest.raises(ConfigError, match=r"mqtt\.password: unknown key"):
        load_profile(path)


def test_relative_paths_are_relative_to_the_profile(tmp_path: Path) -> None:
    sub = tmp_path / "bundle"
    sub.mkdir()
    path = sub / "p.yaml"
    path.write_text("profile: t\ndevice: {id: d1}\nmodel: {path: models/m_int8.tflite}\nsource: {uri: scans}\n")
    prof = load_profile(path)
    assert prof.model.path == sub / "models" / "m_int8.tflite"
    assert prof.source.uri == str(sub / "scans")


def test_profile_check_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile-check", *map(str, PROFILES)]) == 0
    out = capsys.readouterr().out
    assert out.count("ok  ") == len(PROFILES) and "not validated on real hardware" in out


def test_profile_check_command_fails_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, "profile: t\ndevice: {id: d1}\nquality: {min_blur: -1, bogus: 1}\n")
    assert main(["profile-check", str(path)]) == 2
    err = capsys.readouterr().err
    assert "quality.bogus: unknown key" in err
