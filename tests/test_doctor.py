"""`edgemed doctor`: a table that says what works here and how to fix what does not."""

from __future__ import annotations

from pathlib import Path

import pytest
from broker_fixtures import Mosquitto

from edgemed.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_doctor_on_this_machine(
    tmp_path: Path, data_dir: Path, broker: Mosquitto, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["doctor", "--source", str(data_dir / "isic_samples"), "--broker", broker.url, "--data-dir", str(tmp_path)]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "ok    interpreter       ai_edge_litert" in out
    assert "ok    source            folder: first frame (767, 1022, 3)" in out
    assert f"ok    broker            connected to {broker.url}" in out
    # No Edge TPU here: reported with the package to install, but not fatal for the default CPU profile.
    assert "warn  delegate edgetpu" in out and "libedgetpu1-std" in out


def test_doctor_fails_when_the_profile_needs_a_missing_accelerator(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    profile = tmp_path / "p.yaml"
    profile.write_text("profile: t\ndevice: {id: d1}\ninference: {accelerator: edgetpu, allow_cpu_fallback: false}\n")
    code = main(["doctor", "--profile", str(profile), "--data-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 2
    assert "FAIL  delegate edgetpu" in out


def test_doctor_reports_an_unreadable_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["doctor", "--source", str(tmp_path / "missing"), "--data-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 2 and "FAIL  source" in out


def test_doctor_checks_the_model_and_times_one_invoke(
    tmp_path: Path, int8_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["doctor", "--model", str(int8_model), "--data-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    line = next(x for x in out.splitlines() if x.startswith("ok    model"))
    assert "int8 28x28 gray" in line and "sha256 matches, gate accepted" in line and "ms on cpu" in line
    assert "out-of-distribution check features, threshold" in line and "(manifest)" in line


def test_doctor_refuses_a_profile_ood_method_the_model_lacks(
    tmp_path: Path, int8_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json
    import shutil

    copy = tmp_path / "m"
    shutil.copytree(int8_model.parent, copy)
    (manifest,) = copy.glob("*.manifest.json")
    raw = json.loads(manifest.read_text())
    raw["artifacts"][0]["ood"]["energy"] = None  # a model converted with the feature score only
    manifest.write_text(json.dumps(raw))
    profile = tmp_path / "p.yaml"
    profile.write_text(
        f"profile: t\ndevice: {{id: d1}}\nmodel: {{path: {copy / int8_model.name}}}\nood: {{method: energy}}\n"
    )
    assert main(["doctor", "--profile", str(profile), "--data-dir", str(tmp_path)]) == 2
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("FAIL  model"))
    assert "ood.method is energy" in line and "features" in line


def test_doctor_fails_an_altered_model_and_a_policy_for_labels_it_lacks(
    tmp_path: Path, int8_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    copy = tmp_path / "m"
    shutil.copytree(int8_model.parent, copy)
    profile = tmp_path / "p.yaml"
    model = copy / int8_model.name
    profile.write_text(
        f"profile: t\ndevice: {{id: d1}}\nmodel: {{path: {model}}}\n"
        "triage: {rules: {melanoma: {level: urgent, min_probability: 0.3}}}\n"
    )
    assert main(["doctor", "--profile", str(profile), "--data-dir", str(tmp_path)]) == 2
    out = capsys.readouterr().out
    assert "FAIL  model" in out and "melanoma" in out
    model.write_bytes(model.read_bytes()[:-1] + b"\0")
    assert main(["doctor", "--model", str(model), "--data-dir", str(tmp_path)]) == 2
    out = capsys.readouterr().out
    assert "FAIL  model" in out and "does not match its manifest" in out


def test_doctor_names_a_bad_broker_url_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--broker", "http://127.0.0.1:1883", "--data-dir", str(tmp_path)]) == 2
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "broker" in x)
    assert line.startswith("FAIL  broker") and "broker URL 'http://127.0.0.1:1883' must start with mqtt://" in line
    assert "Value error" not in out and "validation error" not in out


def test_doctor_checks_a_local_plaintext_broker_over_a_tls_profile_as_run_would(
    tmp_path: Path, broker: Mosquitto, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    profile = tmp_path / "p.yaml"
    profile.write_text(
        "profile: t\ndevice: {id: d1}\n"
        "mqtt: {url: 'mqtts://broker.example.org:8883', tls: {ca_file: /etc/edgemed/ca.pem}}\n"
    )
    assert main(["doctor", "--profile", str(profile), "--broker", broker.url, "--data-dir", str(tmp_path)]) == 0
    assert f"ok    broker            connected to {broker.url}" in capsys.readouterr().out
    assert any("TLS settings (mqtt.tls) are not used" in r.getMessage() for r in caplog.records)


def test_the_broker_check_leaves_nothing_on_the_broker(
    tmp_path: Path, broker: Mosquitto, capsys: pytest.CaptureFixture[str]
) -> None:
    import time

    from broker_fixtures import Subscriber

    for protocol in ("auto", "3.1.1"):
        profile = tmp_path / f"p-{protocol}.yaml"
        mqtt = f"{{url: '{broker.url}', protocol: '{protocol}'}}"
        profile.write_text(f"profile: t\ndevice: {{id: d1, site: s1}}\nmqtt: {mqtt}\n")
        main(["doctor", "--profile", str(profile), "--data-dir", str(tmp_path)])
        assert f"ok    broker            connected to {broker.url}" in capsys.readouterr().out
    # Nothing retained under any topic (a retained status listed a device "doctor" on the dashboard for ever) ...
    sub = Subscriber(broker.port, "#")
    try:
        time.sleep(1.0)
        assert sub.retained == {}
    finally:
        sub.close()
    # ... and no session kept for the doctor's client id: both connections asked for a clean start.
    doctor_lines = [
        x for x in broker.log_path.read_text().splitlines() if "New client connected" in x and "doctor" in x
    ]
    assert len(doctor_lines) == 2 and all(", c1," in x for x in doctor_lines), doctor_lines


def test_doctor_does_not_wait_for_a_file_in_an_empty_watch_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A watch: source yields only files that arrive later: doctor must check the folder, not wait for a frame."""
    import threading
    import time

    watched = tmp_path / "incoming"
    watched.mkdir()
    codes: list[int] = []
    started = time.monotonic()
    worker = threading.Thread(
        target=lambda: codes.append(
            main(["doctor", "--source", f"watch:{watched}", "--data-dir", str(tmp_path / "d")])
        ),
        daemon=True,
    )
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "doctor blocked on an empty watch: folder"
    out = capsys.readouterr().out
    assert codes == [0], out
    assert f"ok    source            watch folder {watched} is readable" in out
    assert time.monotonic() - started < 30


def test_doctor_says_a_clinically_weak_model_is_only_a_faithful_conversion(
    int8_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The test model passes the gate against its float twin but misses most malignant cases (issue 9 item 10)."""
    code = main(["doctor", "--model", str(int8_model), "--data-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    model_row = next(line for line in out.splitlines() if line.split()[1:2] == ["model"])
    assert "faithful conversion, clinically weak" in model_row and "malignant" in model_row, model_row


def test_doctor_creates_the_data_directory_private_as_run_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    import logging
    import os
    import stat

    data = tmp_path / "home" / ".local" / "share" / "edgemed"
    old = os.umask(0o022)
    try:
        main(["doctor", "--data-dir", str(data)])
    finally:
        os.umask(old)
    assert "ok    data dir" in capsys.readouterr().out
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    # The first `edgemed run` afterwards has nothing to warn about.
    from edgemed.datadir import private_dir

    caplog.clear()
    caplog.set_level(logging.WARNING)
    private_dir(data)
    assert not [r for r in caplog.records if "open to other users" in r.getMessage()]


def test_a_refused_broker_check_stops_its_connection(
    tmp_path: Path,
    mosquitto_factory: type[Mosquitto],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import threading
    import time

    broker = mosquitto_factory(users={"dev": "right"}).start()
    monkeypatch.setenv("EDGEMED_TEST_PW", "wrong")
    profile = tmp_path / "p.yaml"
    mqtt = f"{{url: '{broker.url}', username: dev, password_env: EDGEMED_TEST_PW, reconnect_max_s: 0.5}}"
    profile.write_text(f"profile: t\ndevice: {{id: d1}}\nmqtt: {mqtt}\n")
    assert main(["doctor", "--profile", str(profile), "--data-dir", str(tmp_path)]) == 2
    assert "FAIL  broker            broker " in capsys.readouterr().out
    assert [t.name for t in threading.enumerate() if t.name == "edgemed-mqtt"] == []

    def attempts() -> int:
        return sum("New connection from" in x for x in broker.log_path.read_text().splitlines())

    seen = attempts()
    time.sleep(2.0)  # four reconnect delays
    assert attempts() == seen, "the doctor's link went on reconnecting after the check"
