"""What a person reads on stderr: each message once, no Python ``None``, and never a silent wait.

Each test runs the real ``edgemed`` command in a child process, with the real int8 model, real images from data/
and, where a broker is involved, a real mosquitto on a free 127.0.0.1 port (or a free port nothing listens on).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from broker_fixtures import Mosquitto, free_port

from edgemed.cli import main

ROOT = Path(__file__).resolve().parent.parent
IMAGES = sorted((ROOT / "data" / "isic_samples").glob("*.jpg"))[:3]


def edgemed(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgemed", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for path in IMAGES:
        (folder / path.name).write_bytes(path.read_bytes())
    return folder


def run_args(model: Path, images: Path, data: Path, *extra: str) -> list[str]:
    return [
        "run",
        "--model",
        str(model),
        "--source",
        str(images),
        "--device-id",
        "msg-01",
        "--data-dir",
        str(data),
        "--quiet",
        *extra,
    ]


def test_a_broker_refusal_is_printed_once_and_names_the_password_source(
    int8_model: Path, images: Path, tmp_path: Path, mosquitto_factory: type[Mosquitto]
) -> None:
    broker = mosquitto_factory(tmp_path / "mq", users={"msg-01": "right"}).start()
    url = f"mqtt://127.0.0.1:{broker.port}"
    args = run_args(int8_model, images, tmp_path / "d", "--broker", url, "--username", "msg-01")
    proc = edgemed(*args, "--password-env", "MSG_PW", env={"MSG_PW": "wrong"})
    assert proc.returncode == 5, proc.stderr
    assert proc.stderr.count("refused the connection") == 1, proc.stderr
    assert "as user 'msg-01': Not authorized" in proc.stderr and "(env MSG_PW)" in proc.stderr
    assert "None" not in proc.stderr


def test_a_refusal_without_a_user_name_says_so_without_none(
    int8_model: Path, images: Path, tmp_path: Path, mosquitto_factory: type[Mosquitto]
) -> None:
    broker = mosquitto_factory(tmp_path / "mq", users={"msg-01": "right"}).start()
    proc = edgemed(*run_args(int8_model, images, tmp_path / "d", "--broker", f"mqtt://127.0.0.1:{broker.port}"))
    assert proc.returncode == 5, proc.stderr
    assert proc.stderr.count("refused the connection") == 1, proc.stderr
    assert "without a user name: Not authorized; the broker wants one: set mqtt.username" in proc.stderr
    assert "None" not in proc.stderr


def test_the_accelerator_fallback_is_reported_once(int8_model: Path, images: Path, tmp_path: Path) -> None:
    # A runtime library that exists nowhere: the fallback happens on every machine, with or without an Edge TPU.
    profile = tmp_path / "p.yaml"
    profile.write_text(
        "profile: t\ndevice: {id: msg-01}\n"
        "inference: {accelerator: edgetpu, edgetpu_library: /nonexistent/libedgetpu.so.1, allow_cpu_fallback: true}\n"
    )
    proc = edgemed(*run_args(int8_model, images, tmp_path / "d", "--profile", str(profile)))
    assert proc.returncode == 10, proc.stderr  # offline: results kept on disk
    assert proc.stderr.count("/nonexistent/libedgetpu.so.1 cannot be loaded") == 1, proc.stderr


def test_an_unreachable_broker_says_how_long_run_waits_for_it(int8_model: Path, images: Path, tmp_path: Path) -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"  # nothing listens there
    proc = edgemed(*run_args(int8_model, images, tmp_path / "d", "--broker", url, "--drain-timeout", "1.5"))
    assert proc.returncode == 10, proc.stderr
    assert "3 results pending: waiting up to 1.5 s for the broker (run.drain_timeout_s)" in proc.stderr


def test_flush_says_what_it_sent_and_what_remains(
    int8_model: Path, images: Path, tmp_path: Path, mosquitto_factory: type[Mosquitto]
) -> None:
    data = tmp_path / "d"
    assert edgemed(*run_args(int8_model, images, data)).returncode == 10  # offline: 3 results pending
    nobody = f"mqtt://127.0.0.1:{free_port()}"
    waited = edgemed("flush", "--data-dir", str(data), "--broker", nobody, "--timeout", "1.5")
    assert waited.returncode == 10, waited.stderr
    assert f"3 results pending: waiting up to 1.5 s for the broker {nobody} (--timeout)" in waited.stderr
    assert f"edgemed: sent 0 results; 3 results still pending in {data}" in waited.stderr
    broker = mosquitto_factory(tmp_path / "mq").start()
    sent = edgemed("flush", "--data-dir", str(data), "--broker", f"mqtt://127.0.0.1:{broker.port}")
    assert sent.returncode == 0, sent.stderr
    assert f"edgemed: sent 3 results; 0 results still pending in {data}" in sent.stderr
    assert "waiting up to" not in sent.stderr  # a broker that answers at once is not waited for


def test_flush_help_states_its_timeout_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["flush", "--help"])
    assert "(default 60)" in " ".join(capsys.readouterr().out.split())


def test_flush_errors_are_one_line_without_pydantic_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["flush", "--data-dir", str(tmp_path), "--broker", "http://127.0.0.1:1883"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edgemed: error: broker URL 'http://127.0.0.1:1883' must start with mqtt://")
    assert "Value error" not in err and "Traceback" not in err
    assert main(["flush", "--data-dir", str(tmp_path)]) == 2
    assert "flush needs a broker: pass --broker mqtt://HOST:PORT" in capsys.readouterr().err


def test_log_level_works_after_the_command(int8_model: Path, images: Path, tmp_path: Path) -> None:
    before = edgemed("--log-level", "ERROR", *run_args(int8_model, images, tmp_path / "a"))
    after = edgemed(*run_args(int8_model, images, tmp_path / "b"), "--log-level", "ERROR")
    default = edgemed(*run_args(int8_model, images, tmp_path / "c"))
    assert before.returncode == after.returncode == default.returncode == 10
    assert "no broker configured" in default.stderr  # a WARNING
    assert "no broker configured" not in before.stderr and "no broker configured" not in after.stderr


def test_a_bundle_without_a_source_is_warned_about_without_none(int8_model: Path, tmp_path: Path) -> None:
    profile = tmp_path / "p.yaml"
    profile.write_text("profile: no-source\nvalidated: true\ndevice: {id: d1, data_dir: /var/lib/edgemed}\n")
    proc = edgemed("bundle", "--profile", str(profile), "--model", str(int8_model), "--out", str(tmp_path / "b"))
    assert proc.returncode == 0, proc.stderr
    assert "edgemed: warning: the profile sets no source.uri: the systemd service" in proc.stderr
    assert "None" not in proc.stderr + proc.stdout


def test_manifest_and_dashboard_settings_errors_use_the_same_plain_wording(
    int8_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    model = tmp_path / int8_model.name
    model.write_bytes(int8_model.read_bytes())
    manifest = json.loads(next(int8_model.parent.glob("*.manifest.json")).read_text())
    manifest["labels"] = ["only-one"]
    (tmp_path / "breast.manifest.json").write_text(json.dumps(manifest))
    assert (
        main(["run", "--model", str(model), "--source", ".", "--device-id", "d1", "--data-dir", str(tmp_path / "d")])
        == 3
    )
    err = capsys.readouterr().err
    assert "is invalid: labels: must have at least 2 items, not 1; re-run `edgemed convert`" in err
    assert main(["dashboard", "--broker", "mqtt://127.0.0.1:1", "--username", "u", "--db", str(tmp_path / "f.db")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edgemed: error: dashboard broker settings: mqtt.username is set but no password source")
    for text in (err,):
        assert "Value error" not in text and "(top level)" not in text and "should have" not in text


def test_a_refusal_while_nothing_is_captured_is_logged_at_once_and_not_again_at_exit(
    int8_model: Path, tmp_path: Path, mosquitto_factory: type[Mosquitto]
) -> None:
    import signal
    import time

    broker = mosquitto_factory(tmp_path / "mq", users={"msg-01": "right"}).start()
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    args = ["run", "--model", str(int8_model), "--source", f"watch:{inbox}", "--device-id", "msg-01"]
    args += ["--data-dir", str(tmp_path / "d"), "--broker", f"mqtt://127.0.0.1:{broker.port}", "--quiet"]
    log = tmp_path / "stderr.txt"
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "edgemed", *args], stderr=err, cwd=ROOT)
        try:
            deadline = time.monotonic() + 30
            while "refused the connection" not in log.read_text() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert "refused the connection" in log.read_text()  # said while the folder is idle, not only at exit
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=60)
    assert code == 5
    assert log.read_text().count("refused the connection") == 1, log.read_text()


def test_a_tls_profile_runs_against_a_local_plaintext_broker_with_one_warning(
    int8_model: Path, images: Path, tmp_path: Path, mosquitto_factory: type[Mosquitto]
) -> None:
    broker = mosquitto_factory(tmp_path / "mq").start()
    profile = tmp_path / "tls.yaml"
    profile.write_text(
        "profile: t\ndevice: {id: msg-01}\n"
        "mqtt: {url: 'mqtts://broker.example.org:8883', tls: {ca_file: /etc/edgemed/ca.pem}}\n"
    )
    url = f"mqtt://127.0.0.1:{broker.port}"
    proc = edgemed(*run_args(int8_model, images, tmp_path / "d", "--profile", str(profile), "--broker", url))
    assert proc.returncode == 0, proc.stderr  # every result acknowledged by the local broker
    assert proc.stderr.count(f"--broker {url} is plaintext to this machine") == 1, proc.stderr
    assert "mqtt.tls" in proc.stderr and "3 frames" in proc.stderr
    # A remote plaintext broker stays refused: tested on the check itself (test_profiles.py), which never connects.


def test_broker_options_without_a_broker_name_the_missing_flag(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["run", "--model", "m.tflite", "--source", ".", "--device-id", "d1", "--username", "u"]
    assert main([*args, "--password-env", "PW"]) == 2
    err = capsys.readouterr().err
    assert "--username, --password-env set broker options but no broker: pass --broker mqtt://HOST:PORT" in err
    assert "mqtt.url: required field is missing" not in err


def test_flush_of_a_folder_without_an_outbox_says_so_and_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "typo"
    assert main(["flush", "--data-dir", str(missing), "--broker", f"mqtt://127.0.0.1:{free_port()}"]) == 2
    assert f"{missing} holds no outbox (outbox.sqlite3), so there is nothing to send" in capsys.readouterr().err
    assert not missing.exists()
