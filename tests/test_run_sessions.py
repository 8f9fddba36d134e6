"""`edgemed run` as a device lives it: cine studies, offline work, flush, SIGTERM, refusal, one owner per data dir."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
from broker_fixtures import Mosquitto
from helpers import Collector, run_edgemed

from edgemed.envelope import result_schema, study_schema

CINE = "examples_ybr_color.dcm"  # 30-frame JPEG-baseline ultrasound cine


def test_cine_gives_30_results_and_one_study_decision(
    int8_model: Path, data_dir: Path, broker: Mosquitto, tmp_path: Path
) -> None:
    collector = Collector(broker.port)
    try:
        proc = run_edgemed(
            "run",
            "--model",
            str(int8_model),
            "--source",
            str(data_dir / "dicom" / CINE),
            "--broker",
            broker.url,
            "--device-id",
            "us-01",
            "--data-dir",
            str(tmp_path / "d"),
            "--quiet",
        )
        assert proc.returncode == 0, proc.stderr
        results = collector.wait_results(30)
        deadline = time.monotonic() + 5
        while not collector.by_topic.get("studies") and time.monotonic() < deadline:
            time.sleep(0.05)
        studies = collector.by_topic.get("studies", [])
    finally:
        collector.close()
    assert len(results) == 30
    assert sorted(r["source"]["index"] for r in results) == list(range(30))
    for r in results:
        jsonschema.validate(r, result_schema())
        assert r["source"]["kind"] == "dicom"
    # One pseudonymous session for the whole cine; the StudyInstanceUID itself never leaves the device.
    import pydicom

    uid = str(pydicom.dcmread(data_dir / "dicom" / CINE, stop_before_pixels=True).StudyInstanceUID)
    sessions = {r["session_id"] for r in results}
    assert len(sessions) == 1 and None not in sessions
    assert uid not in json.dumps(results) and uid not in json.dumps(studies)
    assert len(studies) == 1
    jsonschema.validate(studies[0], study_schema())
    assert studies[0]["session_id"] in sessions and studies[0]["triage"]["frames"] == 30
    assert studies[0]["first_seq"] == min(r["seq"] for r in results)
    assert studies[0]["last_seq"] == max(r["seq"] for r in results)
    assert "study decision" in proc.stderr


def test_offline_run_keeps_results_then_flush_sends_them(
    int8_model: Path, data_dir: Path, mosquitto_factory: type[Mosquitto], tmp_path: Path
) -> None:
    device = tmp_path / "device"
    source = data_dir / "dicom" / CINE
    proc = run_edgemed(
        "run",
        "--model",
        str(int8_model),
        "--source",
        str(source),
        "--device-id",
        "us-01",
        "--data-dir",
        str(device),
        "--quiet",
    )
    assert proc.returncode == 10, proc.stderr
    assert "no broker configured: working offline" in proc.stderr
    assert "31 results are still pending" in proc.stderr  # 30 frames and the study decision
    broker = mosquitto_factory().start()
    collector = Collector(broker.port)
    try:
        flush = run_edgemed("flush", "--data-dir", str(device), "--broker", broker.url, "--timeout", "20")
        assert flush.returncode == 0, flush.stderr
        assert len(collector.wait_results(30)) == 30
        # Nothing left: a second flush has nothing to send.
        again = run_edgemed("flush", "--data-dir", str(device), "--broker", broker.url, "--timeout", "5")
        assert again.returncode == 0 and "0 results still pending" in again.stderr
    finally:
        collector.close()


def test_unreachable_broker_is_not_an_error_and_loses_nothing(
    int8_model: Path, data_dir: Path, mosquitto_factory: type[Mosquitto], tmp_path: Path
) -> None:
    dead = mosquitto_factory()  # configured, never started: its port refuses connections
    device = tmp_path / "device"
    proc = run_edgemed(
        "run",
        "--model",
        str(int8_model),
        "--source",
        str(data_dir / "dicom" / CINE),
        "--broker",
        dead.url,
        "--device-id",
        "us-01",
        "--data-dir",
        str(device),
        "--quiet",
        "--drain-timeout",
        "1",
    )
    assert proc.returncode == 10, proc.stderr
    dead.start()
    collector = Collector(dead.port)
    try:
        # The next start replays what is pending before anything new.
        proc = run_edgemed(
            "run",
            "--model",
            str(int8_model),
            "--source",
            str(data_dir / "dicom" / "US1_UNCR.dcm"),
            "--broker",
            dead.url,
            "--device-id",
            "us-01",
            "--data-dir",
            str(device),
            "--quiet",
        )
        assert proc.returncode == 0, proc.stderr
        results = collector.wait_results(31)
    finally:
        collector.close()
    assert len({r["result_id"] for r in results}) == 31
    assert sorted(r["seq"] for r in results) == sorted({r["seq"] for r in results})


def test_wrong_password_exits_5_and_keeps_results(
    int8_model: Path, data_dir: Path, mosquitto_factory: type[Mosquitto], tmp_path: Path
) -> None:
    device = tmp_path / "device"
    cine = str(data_dir / "dicom" / CINE)
    # Results produced offline first: a later refused connection must not lose them.
    offline = run_edgemed(
        "run",
        "--model",
        str(int8_model),
        "--source",
        cine,
        "--device-id",
        "us-01",
        "--data-dir",
        str(device),
        "--quiet",
    )
    assert offline.returncode == 10, offline.stderr
    broker = mosquitto_factory(users={"us-01": "right-password"}).start()
    pw = tmp_path / "pw"
    pw.write_text("wrong-password\n")
    pw.chmod(0o600)
    proc = run_edgemed(
        "run",
        "--model",
        str(int8_model),
        "--source",
        cine,
        "--broker",
        broker.url,
        "--device-id",
        "us-01",
        "--data-dir",
        str(device),
        "--username",
        "us-01",
        "--password-file",
        str(pw),
        "--quiet",
    )
    assert proc.returncode == 5, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("edgemed: error:") and "password" in last.lower()
    lines = (device / "results.jsonl").read_text().splitlines()
    assert len(lines) >= 30
    # Fix the password file and flush with the profile's credentials: everything arrives.
    pw.write_text("right-password\n")
    profile = tmp_path / "p.yaml"
    profile.write_text(
        f"profile: t\ndevice: {{id: us-01, data_dir: {device}}}\n"
        f"mqtt: {{url: '{broker.url}', username: us-01, password_file: {pw}}}\n"
    )
    collector = Collector(broker.port, username="us-01", password="right-password")
    try:
        flush = run_edgemed("flush", "--profile", str(profile), "--timeout", "20")
        assert flush.returncode == 0, flush.stderr
        results = collector.wait_results(len(lines))
    finally:
        collector.close()
    assert {r["result_id"] for r in results} >= {json.loads(x)["result_id"] for x in lines}


def test_second_process_on_the_same_data_dir_exits_2(int8_model: Path, data_dir: Path, tmp_path: Path) -> None:
    device = tmp_path / "device"
    args = [
        sys.executable,
        "-m",
        "edgemed",
        "run",
        "--model",
        str(int8_model),
        "--source",
        str(data_dir / "dicom" / CINE),
        "--loop",
        "200",
        "--device-id",
        "us-01",
        "--data-dir",
        str(device),
        "--quiet",
    ]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (device / "results.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        second = subprocess.run(args, capture_output=True, text=True, timeout=60)
        assert second.returncode == 2, second.stderr
        assert str(first.pid) in second.stderr
    finally:
        first.kill()
        first.wait(10)


def test_sigterm_stops_capture_drains_and_says_offline(
    int8_model: Path, data_dir: Path, broker: Mosquitto, tmp_path: Path
) -> None:
    collector = Collector(broker.port)
    device = tmp_path / "device"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgemed",
            "run",
            "--model",
            str(int8_model),
            "--source",
            str(data_dir / "dicom" / CINE),
            "--loop",
            "1000",
            "--fps-cap",
            "200",
            "--broker",
            broker.url,
            "--device-id",
            "us-01",
            "--data-dir",
            str(device),
            "--quiet",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        while len(collector.results()) < 50 and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=40)
        assert proc.returncode == 0, err
        produced = len((device / "results.jsonl").read_text().splitlines())
        assert 50 <= produced < 30_000  # stopped early, not at the end of the source
        results = collector.wait_results(produced)
        assert len({r["result_id"] for r in results}) == produced
        deadline = time.monotonic() + 5
        while (
            collector.retained.get("edgemed/default/us-01/status", {}).get("state") != "offline"
            and time.monotonic() < deadline
        ):
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
        collector.close()
    late = Collector(broker.port)
    try:
        deadline = time.monotonic() + 5
        while "edgemed/default/us-01/status" not in late.retained and time.monotonic() < deadline:
            time.sleep(0.05)
        assert late.retained["edgemed/default/us-01/status"]["state"] == "offline"
    finally:
        late.close()
    assert "SIGTERM" in err
