"""Device profiles: the shipped ones validate, and a malformed one gets an error naming the field and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgemed.cli import main
from edgemed.config import load_profile, merge_broker, merge_overrides, override_broker
from edgemed.errors import BrokerRefusedError, ConfigError
from edgemed.publish.config import MqttConfig

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
    # No committed profile holds an inline password (the schema has no field for one); a broker that is not on
    # this machine is reached with a password from a file or the environment.
    assert (
        profile.mqtt is None
        or profile.mqtt.password_env
        or profile.mqtt.password_file
        or (profile.mqtt.broker.loopback and not profile.mqtt.username)
    )
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


def test_a_misspelt_key_gets_the_nearest_valid_key(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "profile: t\ndevice: {id: d1}\ntriage:\n  rules:\n    malignant: {level: urgent, min_probabilty: 0.3}\n",
    )
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    message = str(info.value)
    assert "triage.rules.malignant.min_probabilty: unknown key; did you mean `min_probability`?" in message
    assert "valid keys here: level, min_probability, reason" in message
    # The reference the message points at exists.
    assert "(see firmware_configs/README.md)" in message and (ROOT / "firmware_configs" / "README.md").is_file()


def test_a_key_with_no_near_match_lists_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_profile(_write(tmp_path, "profile: t\ndevice: {id: d1}\nhealth: {zzz: 1}\n"))
    assert "health.zzz: unknown key; valid keys here: interval_s" in str(info.value)
    assert "did you mean" not in str(info.value)


@pytest.mark.parametrize(
    "text",
    [
        "profile: t\ndevice: {id: d1}\nmqtt: {url: 'mqtt://127.0.0.1:1883', tls: {}}\n",  # a model validator
        "profile: t\ndevice: {id: 'ward 3'}\n",  # a field validator
        "profile: t\ndevice: {id: d1}\ninference: {accelerator: tpu, threads: 0}\n",  # pydantic's own checks
        "profile: t\ndevice: {id: d1}\nmqtt: {url: 'mqtt://127.0.0.1:1883', username: u}\n",
    ],
)
def test_profile_errors_carry_no_pydantic_boilerplate_and_no_python_none(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_profile(_write(tmp_path, text))
    message = str(info.value)
    for boilerplate in ("Value error", "Input should be", "Extra inputs", "Assertion failed", "None", "[type="):
        assert boilerplate not in message, message


def test_pydantic_checks_read_as_must_with_the_value_given(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_profile(_write(tmp_path, "profile: t\ndevice: {id: d1}\ninference: {accelerator: tpu}\n"))
    assert "inference.accelerator: must be 'cpu', 'edgetpu' or 'gpu' (got 'tpu')" in str(info.value)


def test_profile_check_reports_every_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad_one = _write(tmp_path, "profile: t\ndevice: {id: d1}\nquality: {bogus: 1}\n")
    bad_two = tmp_path / "q.yaml"
    bad_two.write_text("profile: t\ndevice: {id: d1}\ninference: {threads: 0}\n")
    good = ROOT / "firmware_configs" / "x86_64-cpu.yaml"
    assert main(["profile-check", str(bad_one), str(good), str(bad_two)]) == 2
    captured = capsys.readouterr()
    assert "quality.bogus: unknown key" in captured.err
    assert "inference.threads: must be greater than or equal to 1 (got 0)" in captured.err
    assert f"ok  {good}" in captured.out  # the good file after the first bad one is still checked
    assert "2 of 3 profiles are invalid" in captured.err


def test_home_relative_paths_are_in_the_users_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = _write(tmp_path, "profile: t\ndevice: {id: d1, data_dir: ~/edgemed/data}\nsource: {uri: ~/edgemed/images}\n")
    prof = load_profile(path)
    assert prof.device.data_dir == tmp_path / "home" / "edgemed" / "data"
    assert prof.source.uri == str(tmp_path / "home" / "edgemed" / "images")
    watch = load_profile(_write(tmp_path, "profile: t\ndevice: {id: d1}\nsource: {uri: 'watch:~/inbox'}\n"))
    assert watch.source.uri == f"watch:{tmp_path / 'home' / 'inbox'}"


TLS_MQTT = {"url": "mqtts://broker.example.org:8883", "tls": {"ca_file": "/etc/edgemed/ca.pem"}}


@pytest.mark.parametrize("url", ["mqtt://127.0.0.1:18830", "mqtt://localhost:1883", "mqtt://[::1]:1883"])
def test_a_plaintext_local_broker_drops_the_profiles_tls_with_one_warning(url: str) -> None:
    mqtt, warning = override_broker(TLS_MQTT, url)
    assert mqtt == {"url": url}  # the TLS settings no longer apply, so none is kept
    assert warning is not None and "mqtt.tls" in warning and "plaintext to this machine" in warning
    MqttConfig.model_validate(mqtt)


@pytest.mark.parametrize("url", ["mqtt://10.0.0.5:1883", "mqtt://broker.example.org:1883", "mqtt://192.168.1.2"])
def test_a_plaintext_remote_broker_stays_refused_for_a_tls_profile(url: str) -> None:
    # The check itself, before any socket exists: nothing here connects anywhere.
    with pytest.raises(BrokerRefusedError, match=r"refusing --broker .* plaintext to another machine") as info:
        override_broker(TLS_MQTT, url)
    assert info.value.exit_code == 5 and "use mqtts://" in str(info.value)


def test_a_broker_override_keeps_what_still_applies() -> None:
    assert override_broker(TLS_MQTT, "mqtts://127.0.0.1:8883") == ({**TLS_MQTT, "url": "mqtts://127.0.0.1:8883"}, None)
    assert override_broker(None, "mqtt://127.0.0.1:1883") == ({"url": "mqtt://127.0.0.1:1883"}, None)
    with_user = {"url": "mqtt://127.0.0.1:1", "username": "u", "password_env": "PW"}
    assert override_broker(with_user, "mqtt://127.0.0.1:2") == ({**with_user, "url": "mqtt://127.0.0.1:2"}, None)
    opted_in = {**TLS_MQTT, "allow_plaintext_remote": True}
    mqtt, warning = override_broker(opted_in, "mqtt://10.0.0.5:1883")
    assert "tls" not in mqtt and warning is not None and "allow_plaintext_remote" in warning
    with pytest.raises(ConfigError, match="must start with mqtt://"):
        override_broker(TLS_MQTT, "http://127.0.0.1:1883")


def test_merge_overrides_sets_plain_values_over_a_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sub").mkdir()
    path = _write(tmp_path / "sub", "profile: t\ndevice: {id: d1, site: s1}\ninference: {threads: 4}\n")
    profile = load_profile(path)
    monkeypatch.chdir(tmp_path)
    overrides = {"device.id": "d2", "inference.threads": None, "model.path": Path("m.tflite"), "run.max_frames": 5}
    merged = merge_overrides(profile, overrides | {"source.uri": "scans"}, origin=path)
    assert (merged.device.id, merged.device.site) == ("d2", "s1")  # the profile's other values stay
    assert merged.inference.threads == 4  # None sets nothing
    assert merged.run.max_frames == 5
    # Paths given as overrides are relative to the working directory, not to the profile's folder (sub/).
    assert merged.model.path == tmp_path / "m.tflite"
    assert merged.source.uri == str(tmp_path / "scans")
    assert merge_overrides(profile, {"source.uri": "camera:0"}, origin=path).source.uri == "camera:0"
    assert profile.device.id == "d1"  # the loaded profile is not changed


def test_merge_overrides_names_the_flag_that_set_a_bad_value(tmp_path: Path) -> None:
    path = _write(tmp_path, "profile: t\ndevice: {id: d1}\n")
    profile = load_profile(path)
    names = {"device.id": "--device-id", "device.site": "--site", "mqtt.url": "--broker", "mqtt.username": "--user"}
    with pytest.raises(ConfigError, match=r"^the command line is invalid: --device-id \(device.id\): 'a b' must be"):
        merge_overrides(None, {"device.id": "a b"}, names=names)
    with pytest.raises(ConfigError, match=rf"^profile {path} is invalid: --site \(device.site\): 'x/y' must be"):
        merge_overrides(profile, {"device.site": "x/y"}, names=names, origin=path)
    with pytest.raises(ConfigError, match=r"is invalid: inference.threads: must be greater than or equal to 1"):
        merge_overrides(profile, {"inference.threads": 0}, names=names, origin=path)  # no name: the key
    with pytest.raises(ConfigError, match=r"^--user set broker options but no broker: pass --broker mqtt://HOST"):
        merge_overrides(profile, {"mqtt.username": "u"}, names=names)
    with pytest.raises(ConfigError, match=r"^mqtt.username set broker options but no broker: set mqtt.url as well"):
        merge_overrides(profile, {"mqtt.username": "u"})


def test_merge_broker_drops_tls_for_a_local_plaintext_broker(caplog: pytest.LogCaptureFixture) -> None:
    tls = MqttConfig.model_validate(TLS_MQTT | {"username": "u", "password_env": "PW"})
    local = merge_broker(tls, "mqtt://127.0.0.1:1883")
    assert (local.url, local.tls, local.username, local.password_env) == ("mqtt://127.0.0.1:1883", None, "u", "PW")
    assert sum("mqtt.tls" in r.getMessage() for r in caplog.records) == 1  # said once
    assert merge_broker(None, "mqtts://127.0.0.1:8883").url == "mqtts://127.0.0.1:8883"
    with pytest.raises(BrokerRefusedError, match="plaintext to another machine"):
        merge_broker(tls, "mqtt://10.0.0.5:1883")
    with pytest.raises(ConfigError, match=r"^broker URL 'http://127.0.0.1:1883' must start with mqtt://"):
        merge_broker(tls, "http://127.0.0.1:1883")
