"""The command line: version, help, converter isolation, flush with a profile, one-line errors, stable exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from broker_fixtures import Mosquitto

from edgemed.cli import main
from edgemed.outbox import OUTBOX_FILENAME, Outbox, OutboxConfig

# Runs edgemed in a child interpreter where importing TensorFlow is impossible, as on a device without the
# convert extra, then reports which heavy packages the command loaded.
_BLOCKED = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            raise ModuleNotFoundError("No module named 'tensorflow' (blocked by test)")
        return None
if "--block-tf" in sys.argv:
    sys.argv.remove("--block-tf")
    sys.meta_path.insert(0, Block())
from edgemed.cli import main
try:
    code = main(sys.argv[1:])
finally:
    print("LOADED", sorted({"tensorflow", "keras", "converters"} & set(sys.modules)), file=sys.stderr)
sys.exit(code)
"""


def edgemed(*args: str, block_tf: bool = False, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-c", _BLOCKED, *(["--block-tf"] if block_tf else []), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=cwd)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("edgemed 0.1.0")


def test_run_help_teaches_sources_and_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    for needle in ("--model", "--source", "--broker", "camera:N", "watch:DIR", "exit codes", "10 finished"):
        assert needle in out


@pytest.mark.parametrize("command", ["train", "convert"])
def test_converter_commands_without_tensorflow_exit_2_with_install_line(command: str, tmp_path: Path) -> None:
    args = (
        ["--data", "x.npz", "--out", str(tmp_path)]
        if command == "train"
        else ["m.keras", "--calibration", "x.npz", "--out", str(tmp_path)]
    )
    proc = edgemed(command, *args, block_tf=True)
    assert proc.returncode == 2, proc.stderr
    assert "pip install 'edgemed[convert]'" in proc.stderr


def test_run_without_model_is_a_model_error(tmp_path: Path) -> None:
    proc = edgemed("run", "--device-id", "us-01", "--source", str(tmp_path), "--data-dir", str(tmp_path / "d"))
    assert proc.returncode == 3
    assert "edgemed: error: no model given: pass --model" in proc.stderr


def test_bad_device_id_is_a_config_error(tmp_path: Path) -> None:
    proc = edgemed("run", "--device-id", "bad/id", "--model", "m.tflite", "--source", ".")
    assert proc.returncode == 2
    assert "device.id" in proc.stderr and "1-64 letters" in proc.stderr


def test_device_path_never_loads_tensorflow_or_converters(int8_model: Path, tmp_path: Path, data_dir: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for name in ("ISIC_0000014.jpg", "ISIC_0000040.jpg"):
        (images / name).write_bytes((data_dir / "isic_samples" / name).read_bytes())
    proc = edgemed(
        "run",
        "--model",
        str(int8_model),
        "--source",
        str(images),
        "--device-id",
        "us-01",
        "--data-dir",
        str(tmp_path / "d"),
        block_tf=True,
    )
    assert proc.returncode == 10, proc.stderr  # offline: both results kept on disk
    assert "LOADED []" in proc.stderr
    assert "2 frames" in proc.stderr


def test_run_help_says_what_triage_applies_without_a_profile(capsys: pytest.CaptureFixture[str]) -> None:
    from edgemed.triage import NO_RULE_REASON, TriagePolicy

    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "triage without --profile" in out and "ROUTINE" in out and "INCONCLUSIVE" in out
    assert f'("{NO_RULE_REASON}")' in out
    defaults = TriagePolicy()
    # The numbers in the help are the policy's real defaults.
    assert f"under {defaults.min_confidence:.2f}, or under {defaults.min_margin:.2f} ahead" in out


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--device-id", "ward 3"], "the command line is invalid: --device-id (device.id): 'ward 3' must be 1-64"),
        (["--device-id", "d1", "--threads", "0"], "--threads (inference.threads): must be greater than or equal"),
        (["--device-id", "d1", "--fps-cap", "-1"], "--fps-cap (source.fps_cap): must be greater than 0 (got -1.0)"),
    ],
)
def test_a_bad_flag_is_named_in_the_error(flags: list[str], expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--model", "m.tflite", "--source", ".", *flags]) == 2
    err = capsys.readouterr().err
    assert expected in err and "<command line>" not in err and "Value error" not in err


def test_a_bad_flag_over_a_profile_is_named_too(capsys: pytest.CaptureFixture[str]) -> None:
    profile = Path(__file__).resolve().parent.parent / "firmware_configs" / "x86_64-cpu.yaml"
    assert main(["run", "--profile", str(profile), "--site", "ward/3"]) == 2
    assert f"profile {profile} is invalid: --site (device.site): 'ward/3' must be" in capsys.readouterr().err


def test_run_without_a_source_is_a_config_error_before_anything_is_opened(int8_model: Path, tmp_path: Path) -> None:
    data = tmp_path / "d"
    proc = edgemed("run", "--device-id", "us-01", "--model", str(int8_model), "--data-dir", str(data))
    assert proc.returncode == 2, proc.stderr
    assert "edgemed: error: no source given: pass --source PATH or set source.uri in the profile" in proc.stderr
    assert not data.exists()  # refused before the device opened its data directory


def _pending(data: Path, n: int) -> None:
    """``n`` committed results waiting in ``data``'s outbox, as an offline run leaves them."""
    outbox = Outbox(data / OUTBOX_FILENAME)
    try:
        for i in range(n):
            seq = outbox.next_seq()
            outbox.put(f"r{i}", "edgemed/default/flush-01/results", json.dumps({"seq": seq}).encode(), seq=seq)
    finally:
        outbox.close()


@pytest.mark.parametrize(
    ("outbox", "evidence", "replayable"),
    [
        ({"keep_acked": 0}, 0, 0),  # no acknowledgement log: nothing kept after delivery
        ({"replay_window_s": 600}, 3, 3),  # payloads kept, to be sent again after a broker crash
    ],
)
def test_flush_uses_the_profiles_outbox_settings(
    outbox: dict[str, float],
    evidence: int,
    replayable: int,
    broker: Mosquitto,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = tmp_path / "d"
    _pending(data, 3)
    profile = tmp_path / "device.yaml"
    profile.write_text(
        yaml.safe_dump(
            {"profile": "t", "device": {"id": "flush-01", "data_dir": str(data)}, "mqtt": {"url": broker.url}}
            | {"outbox": outbox}
        ),
        encoding="utf-8",
    )
    assert main(["flush", "--profile", str(profile), "--timeout", "20"]) == 0
    assert f"edgemed: sent 3 results; 0 results still pending in {data}" in capsys.readouterr().err
    reopened = Outbox(data / OUTBOX_FILENAME, OutboxConfig.model_validate(outbox))
    try:
        assert reopened.pending_count() == 0
        assert len(reopened.acked_ids()) == evidence
        assert len(reopened.replay_candidates()) == replayable
    finally:
        reopened.close()


def test_a_relative_source_flag_is_relative_to_the_working_directory_not_the_profile(
    int8_model: Path, tmp_path: Path, data_dir: Path
) -> None:
    # `edgemed run --profile firmware_configs/x.yaml --source scans/` (the README's example) means ./scans.
    work = tmp_path / "work"
    (work / "scans").mkdir(parents=True)
    for name in ("ISIC_0000014.jpg", "ISIC_0000040.jpg"):
        (work / "scans" / name).write_bytes((data_dir / "isic_samples" / name).read_bytes())
    profile = tmp_path / "profiles" / "device.yaml"
    profile.parent.mkdir()
    profile.write_text(f"profile: t\ndevice: {{id: d1, data_dir: {tmp_path / 'd'}}}\n")
    proc = edgemed("run", "--profile", str(profile), "--model", str(int8_model), "--source", "scans", cwd=work)
    assert proc.returncode == 10, proc.stderr  # offline: both results kept on disk
    assert "2 frames" in proc.stderr
