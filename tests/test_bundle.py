"""`edgemed bundle`: a checked archive for a device, installed by its own script and run against a real broker."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from broker_fixtures import Mosquitto, Subscriber

from edgemed.cli import main
from edgemed.config import load_profile
from edgemed.manifest import verify_model

CA_PEM = "-----BEGIN CERTIFICATE-----\nMIIB (a public CA certificate stands here)\n-----END CERTIFICATE-----\n"


def _profile(tmp_path: Path, model: Path, *, mqtt: str = "", labels_rule: str = "malignant") -> Path:
    (tmp_path / "ca.pem").write_text(CA_PEM)
    path = tmp_path / "probe.yaml"
    path.write_text(
        "profile: probe-test\n"
        "validated: false\n"
        "device: {id: us-probe-01, site: clinic-north}\n"
        f"model: {{path: {model}}}\n"
        "source: {uri: 'watch:/srv/probe'}\n"
        f"triage: {{rules: {{{labels_rule}: {{level: urgent, min_probability: 0.4}}}}}}\n" + mqtt
    )
    return path


def _unpack(archive: Path, into: Path) -> Path:
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        assert all(m.uid == 0 and m.uname == "root" for m in tar.getmembers())
        tar.extractall(into, filter="data")
    return into / names[0].split("/")[0]


def test_bundle_holds_a_consistent_profile_model_and_checksums_and_no_secret(
    tmp_path: Path, int8_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "mqtt.password").write_text("s3cret-password\n")
    mqtt = (
        "mqtt:\n  url: mqtts://broker.example.org:8883\n  username: us-probe-01\n"
        f"  password_file: {tmp_path / 'mqtt.password'}\n  tls: {{ca_file: ca.pem}}\n"
    )
    profile = _profile(tmp_path, int8_model, mqtt=mqtt)
    code = main(["bundle", "--profile", str(profile), "--out", str(tmp_path / "out"), "--device-id", "us-probe-07"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    archive = next((tmp_path / "out").glob("*.tar.gz"))
    assert re.fullmatch(r"edgemed-probe-test-us-probe-07-breast-v1-\d{8}-\d{6}\.tar\.gz", archive.name), archive.name
    assert not list((tmp_path / "out").glob("*.partial"))
    # The person building it is told what is unusual about this bundle.
    assert "not validated on real hardware" in captured.err and "mqtt.username is still 'us-probe-01'" in captured.err

    root = _unpack(archive, tmp_path / "device")
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert files == sorted(
        [
            "BUNDLE.json",
            "README.txt",
            "SHA256SUMS",
            "edgemed.service",
            "install.sh",
            "model/breast.manifest.json",
            f"model/{int8_model.name}",
            "model/report.html",
            "profile.yaml",
            "tls/ca.pem",
        ]
    )
    for line in (root / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ", 1)
        assert hashlib.sha256((root / name).read_bytes()).hexdigest() == digest, name
    # The bundled profile stands on its own: model inside the bundle, sha256 verified, CA beside it.
    prof = load_profile(root / "profile.yaml")
    assert prof.device.id == "us-probe-07" and prof.device.site == "clinic-north"
    assert prof.model.path == (root / "model" / int8_model.name).resolve()
    manifest, art = verify_model(prof.model.path, prof.model.manifest)
    assert art.verdict == "accepted" and manifest.name == "breast"
    assert prof.mqtt is not None and prof.mqtt.tls is not None and prof.mqtt.tls.ca_file == root / "tls" / "ca.pem"
    # Nothing secret travels: the password stays on the builder's machine and is listed for provisioning.
    everything = b"".join((root / f).read_bytes() for f in files)
    assert b"s3cret-password" not in everything
    meta = json.loads((root / "BUNDLE.json").read_text())
    assert meta["model"]["sha256"] == art.sha256 and meta["model"]["gate"] == "accepted"
    password_note = f"the broker password for user 'us-probe-01' in {tmp_path / 'mqtt.password'}"
    assert meta["provision_on_device"] == [password_note + " (chmod 600, owned by the edgemed user)"]
    unit = (root / "edgemed.service").read_text()
    assert "ExecStart=@PREFIX@/venv/bin/edgemed run --profile @PREFIX@/current/profile.yaml" in unit
    assert "RestartPreventExitStatus=2 3 5 6" in unit and "TimeoutStopSec=45" in unit
    assert subprocess.run(["bash", "-n", str(root / "install.sh")]).returncode == 0


def test_installed_bundle_runs_on_real_images_and_delivers_to_a_real_broker(
    tmp_path: Path, int8_model: Path, data_dir: Path, broker: Mosquitto
) -> None:
    profile = _profile(tmp_path, int8_model, mqtt=f"mqtt:\n  url: {broker.url}\n")
    assert main(["bundle", "--profile", str(profile), "--out", str(tmp_path / "out")]) == 0
    root = _unpack(next((tmp_path / "out").glob("*.tar.gz")), tmp_path / "unpacked")
    prefix = tmp_path / "opt-edgemed"
    env = {**os.environ, "EDGEMED_PREFIX": str(prefix), "EDGEMED_SKIP_VENV": "1", "EDGEMED_SKIP_SYSTEMD": "1"}
    proc = subprocess.run(
        ["sh", str(root / "install.sh"), "--allow-unsigned"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert (prefix / "current").resolve() == (prefix / "bundles" / root.name).resolve()

    sub = Subscriber(broker.port, "edgemed/clinic-north/us-probe-01/results", client_id="bundle-dashboard")
    try:
        args = ["--profile", str(prefix / "current" / "profile.yaml"), "--source", str(data_dir / "isic_samples")]
        run = subprocess.run(
            [sys.executable, "-m", "edgemed", "run", *args, "--data-dir", str(tmp_path / "data"), "--quiet"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr
        assert sub.wait_for(12, 15) == 12  # the 12 real dermoscopy photographs, one result each
    finally:
        sub.close()


def _refused_as_edited(root: Path, tmp_path: Path) -> None:
    env = {**os.environ, "EDGEMED_PREFIX": str(tmp_path / "p"), "EDGEMED_SKIP_VENV": "1", "EDGEMED_SKIP_SYSTEMD": "1"}
    proc = subprocess.run(
        ["sh", str(root / "install.sh"), "--allow-unsigned"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1
    assert "the bundle is damaged or was edited; copy it again" in proc.stderr
    assert not (tmp_path / "p" / "current").exists()


def test_a_damaged_bundle_refuses_to_install(tmp_path: Path, int8_model: Path) -> None:
    assert main(["bundle", "--profile", str(_profile(tmp_path, int8_model)), "--out", str(tmp_path / "out")]) == 0
    root = _unpack(next((tmp_path / "out").glob("*.tar.gz")), tmp_path / "unpacked")
    model = root / "model" / int8_model.name
    model.write_bytes(model.read_bytes()[:-1] + b"\0")
    _refused_as_edited(root, tmp_path)


def test_an_edited_ood_threshold_in_the_bundled_manifest_refuses_to_install(tmp_path: Path, int8_model: Path) -> None:
    # The out-of-distribution statistics and thresholds live in the manifest, not in the model file: the bundle's
    # checksums over every file (the manifest included) are what keep a raised threshold from being slipped in.
    assert main(["bundle", "--profile", str(_profile(tmp_path, int8_model)), "--out", str(tmp_path / "out")]) == 0
    root = _unpack(next((tmp_path / "out").glob("*.tar.gz")), tmp_path / "unpacked")
    (manifest,) = (root / "model").glob("*.manifest.json")
    raw = json.loads(manifest.read_text())
    ood = raw["artifacts"][0]["ood"]
    ood["features"]["threshold"] = ood["features"]["threshold"] * 100  # would let every unfamiliar image through
    manifest.write_text(json.dumps(raw))
    _refused_as_edited(root, tmp_path)


def test_no_bundle_for_a_rejected_model_or_a_policy_the_model_cannot_meet(
    tmp_path: Path, int8_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rejected = tmp_path / "rejected"
    shutil.copytree(int8_model.parent, rejected)
    manifest_path = next(rejected.glob("*.manifest.json"))
    manifest = json.loads(manifest_path.read_text())
    for art in manifest["artifacts"]:
        art["verdict"], art["failed_criteria"] = "rejected", ["top-1 agreement 0.81 < 0.98"]
    manifest_path.write_text(json.dumps(manifest))
    out = tmp_path / "out"
    assert main(["bundle", "--profile", str(_profile(tmp_path, rejected / int8_model.name)), "--out", str(out)]) == 3
    assert "rejected by the acceptance gate (top-1 agreement 0.81 < 0.98)" in capsys.readouterr().err

    bad_policy = _profile(tmp_path, int8_model, labels_rule="melanoma")
    assert main(["bundle", "--profile", str(bad_policy), "--out", str(out)]) == 2
    assert "melanoma" in capsys.readouterr().err
    assert not out.exists() or not list(out.iterdir())


def test_a_device_with_a_trusted_key_installs_only_bundles_signed_with_it(tmp_path: Path, int8_model: Path) -> None:
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    for who in ("owner", "stranger"):
        openssl(
            "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(tmp_path / f"{who}.pem")
        )
    openssl("pkey", "-in", str(tmp_path / "owner.pem"), "-pubout", "-out", str(tmp_path / "trusted.pub"))
    profile = _profile(tmp_path, int8_model)

    def build_and_install(name: str, *extra: str) -> subprocess.CompletedProcess[str]:
        assert main(["bundle", "--profile", str(profile), "--out", str(tmp_path / name), *extra]) == 0
        root = _unpack(next((tmp_path / name).glob("*.tar.gz")), tmp_path / f"{name}-unpacked")
        env = {
            **os.environ,
            "EDGEMED_PREFIX": str(tmp_path / f"{name}-prefix"),
            "EDGEMED_SKIP_VENV": "1",
            "EDGEMED_SKIP_SYSTEMD": "1",
            "EDGEMED_TRUSTED_KEY": str(tmp_path / "trusted.pub"),
        }
        return subprocess.run(["sh", str(root / "install.sh")], env=env, capture_output=True, text=True, timeout=60)

    ok = build_and_install("signed", "--sign-key", str(tmp_path / "owner.pem"))
    assert ok.returncode == 0 and "signature verified" in ok.stdout, ok.stderr
    stranger = build_and_install("stranger", "--sign-key", str(tmp_path / "stranger.pem"))
    assert stranger.returncode == 1 and "signature does not match" in stranger.stderr
    unsigned = build_and_install("unsigned")
    assert unsigned.returncode == 1 and "unsigned, and this device only installs bundles signed" in unsigned.stderr
    assert not (tmp_path / "stranger-prefix" / "current").exists()
    assert not (tmp_path / "unsigned-prefix" / "current").exists()

    # Someone who edits a file and recomputes SHA256SUMS still cannot forge the owner's signature.
    root = tmp_path / "signed-unpacked" / next((tmp_path / "signed-unpacked").iterdir()).name
    (root / "profile.yaml").write_text((root / "profile.yaml").read_text().replace("0.4", "0.99"))
    sums = "".join(
        f"{hashlib.sha256((root / n).read_bytes()).hexdigest()}  {n}\n"
        for n in (line.split("  ", 1)[1] for line in (root / "SHA256SUMS").read_text().splitlines())
    )
    (root / "SHA256SUMS").write_text(sums)
    env = {**os.environ, "EDGEMED_PREFIX": str(tmp_path / "p2"), "EDGEMED_SKIP_VENV": "1"}
    env |= {"EDGEMED_SKIP_SYSTEMD": "1", "EDGEMED_TRUSTED_KEY": str(tmp_path / "trusted.pub")}
    forged = subprocess.run(["sh", str(root / "install.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert forged.returncode == 1 and "signature does not match" in forged.stderr


def _install(root: Path, prefix: Path, *flags: str, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EDGEMED_PREFIX": str(prefix), "EDGEMED_SKIP_VENV": "1", "EDGEMED_SKIP_SYSTEMD": "1", **extra}
    return subprocess.run(["sh", str(root / "install.sh"), *flags], env=env, capture_output=True, text=True, timeout=60)


def test_install_refuses_unlisted_files_a_missing_trusted_key_and_running_from_the_installed_copy(
    tmp_path: Path, int8_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bundle", "--profile", str(_profile(tmp_path, int8_model)), "--out", str(tmp_path / "out")]) == 0
    root = _unpack(next((tmp_path / "out").glob("*.tar.gz")), tmp_path / "unpacked")
    prefix = tmp_path / "prefix"
    missing_key = _install(root, prefix, EDGEMED_TRUSTED_KEY=str(tmp_path / "typo.pub"))
    assert missing_key.returncode == 1 and "typo.pub does not exist" in missing_key.stderr

    assert _install(root, prefix, "--allow-unsigned").returncode == 0
    again = _install(root, prefix, "--allow-unsigned")  # the same bundle twice: nothing is replaced, the link stays
    assert again.returncode == 0 and "already in" in again.stdout
    from_installed = _install(prefix / "current", prefix, "--allow-unsigned")
    assert from_installed.returncode == 1 and "not from the installed copy" in from_installed.stderr
    assert (prefix / "current" / "profile.yaml").is_file()  # still intact

    # A file smuggled in beside the checked ones (here a wheel root would install) is refused, by the bundle's
    # script and by the device's own edgemed.
    (root / "wheels").mkdir()
    (root / "wheels" / "edgemed-0.1.0-py3-none-any.whl").write_bytes(b"not what it seems")
    smuggled = _install(root, tmp_path / "p2", "--allow-unsigned")
    assert smuggled.returncode == 1 and "files not listed in SHA256SUMS: wheels/edgemed-0.1.0" in smuggled.stderr
    assert main(["verify-bundle", str(root), "--key", str(tmp_path / "none.pub")]) == 2
    assert "none.pub not found" in capsys.readouterr().err
    assert main(["verify-bundle", str(root)]) == 2
    assert "files not listed in SHA256SUMS: wheels/edgemed-0.1.0-py3-none-any.whl" in capsys.readouterr().err
    shutil.rmtree(root / "wheels")
    assert main(["verify-bundle", str(root)]) == 0
    assert "checksums match" in capsys.readouterr().out


def test_relative_device_paths_are_refused_when_bundling(
    tmp_path: Path, int8_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    profile = _profile(
        tmp_path, int8_model, mqtt="mqtt:\n  url: mqtt://127.0.0.1:1883\n  username: u\n  password_file: secrets/pw\n"
    )
    profile.write_text(
        profile.read_text().replace("device: {id: us-probe-01", "device: {data_dir: state, id: us-probe-01")
    )
    assert main(["bundle", "--profile", str(profile), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "device.data_dir: state" in err and "mqtt.password_file: secrets/pw" in err and "absolute" in err


def test_an_install_prefix_that_is_not_a_plain_absolute_path_is_refused(
    tmp_path: Path, int8_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The prefix lands between double quotes in a script that runs as root: a quote would end the string there.
    profile = _profile(tmp_path, int8_model)
    for prefix in ('/opt/x"; touch /tmp/edgemed-pwned; "', "opt/edgemed", "/opt/$(id)"):
        out = tmp_path / "out"
        assert main(["bundle", "--profile", str(profile), "--out", str(out), "--prefix", prefix]) == 2
        assert "is not a plain absolute path" in capsys.readouterr().err
        assert not out.exists()
    assert main(["bundle", "--profile", str(profile), "--out", str(tmp_path / "ok"), "--prefix", "/srv/edge-med"]) == 0


def test_a_profile_with_tls_null_bundles_without_a_ca(tmp_path: Path, int8_model: Path) -> None:
    profile = _profile(tmp_path, int8_model, mqtt="mqtt:\n  url: mqtt://127.0.0.1:1883\n  tls: null\n")
    assert main(["bundle", "--profile", str(profile), "--out", str(tmp_path / "out")]) == 0
    root = _unpack(next((tmp_path / "out").glob("*.tar.gz")), tmp_path / "unpacked")
    assert not (root / "tls").exists()
    prof = load_profile(root / "profile.yaml")
    assert prof.mqtt is not None and prof.mqtt.tls is None


def test_a_file_named_like_the_checksums_in_a_subfolder_is_still_an_unlisted_file(
    tmp_path: Path, int8_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Only the top-level SHA256SUMS and SHA256SUMS.sig are not listed in SHA256SUMS; the check compared base
    # names, so wheels/SHA256SUMS (a wheel would do as well, under that name) rode along unchecked.
    assert main(["bundle", "--profile", str(_profile(tmp_path, int8_model)), "--out", str(tmp_path / "out")]) == 0
    root = _unpack(next((tmp_path / "out").glob("*.tar.gz")), tmp_path / "unpacked")
    for smuggled in ("wheels/SHA256SUMS", "model/SHA256SUMS.sig"):
        path = root / smuggled
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"not listed anywhere")
        installed = _install(root, tmp_path / f"prefix-{path.parent.name}", "--allow-unsigned")
        assert installed.returncode == 1, installed.stdout + installed.stderr
        assert f"files not listed in SHA256SUMS: {smuggled}" in installed.stderr
        assert main(["verify-bundle", str(root)]) == 2
        assert f"files not listed in SHA256SUMS: {smuggled}" in capsys.readouterr().err
        path.unlink()
    assert main(["verify-bundle", str(root)]) == 0  # the top-level ones are, of course, not listed in themselves
    capsys.readouterr()
