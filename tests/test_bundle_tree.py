"""A bundle is plain files in one folder: links, devices and paths outside it are refused when unpacking, by
`edgemed verify-bundle` and by the bundle's own install.sh (run into a temporary prefix).

The attack from the audit: a signed bundle unpacked with a sibling `EVIL/` folder and `NAME/wheels -> ../EVIL`
keeps SHA256SUMS and the signature valid; install.sh then ran pip as root on EVIL's wheel. pip itself is the
seam here: a stand-in in PREFIX/venv/bin records whether and on what it would have been run.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from edgemed.cli import main

WHEEL = "edgemed-0.1.0-py3-none-any.whl"


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    """The owner's private key and the public key a device trusts."""
    private, public = tmp_path / "owner.pem", tmp_path / "trusted.pub"
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(private))
    _openssl("pkey", "-in", str(private), "-pubout", "-out", str(public))
    return private, public


def _bundle(tmp_path: Path, model: Path, *extra: str) -> Path:
    profile = tmp_path / "probe.yaml"
    profile.write_text(
        "profile: probe-test\ndevice: {id: us-probe-01, site: clinic-north}\n"
        f"model: {{path: {model}}}\nsource: {{uri: 'watch:/srv/probe'}}\n"
        "triage: {rules: {malignant: {level: urgent, min_probability: 0.4}}}\n"
    )
    assert main(["bundle", "--profile", str(profile), "--out", str(tmp_path / "out"), *extra]) == 0
    return next((tmp_path / "out").glob("*.tar.gz"))


def _gnu_untar(archive: Path, into: Path) -> Path:
    """Unpack as the README tells a field engineer to (tar xzf), which keeps symbolic links."""
    into.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "xzf", str(archive), "-C", str(into)], check=True, capture_output=True, timeout=60)
    return into / archive.name.removesuffix(".tar.gz")


def _install(root: Path, prefix: Path, *flags: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "EDGEMED_PREFIX": str(prefix), "EDGEMED_SKIP_SYSTEMD": "1", **env}
    return subprocess.run(
        ["sh", str(root / "install.sh"), *flags], env=full, capture_output=True, text=True, timeout=60
    )


def _stand_in_venv(prefix: Path) -> Path:
    """A venv whose python says edgemed is not installed and whose pip only writes down how it was called."""
    bin_dir = prefix / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    log = prefix / "pip-calls.log"
    (bin_dir / "python").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "pip").write_text(f'#!/bin/sh\necho "$@" >>"{log}"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return log


def test_a_linked_folder_beside_a_signed_bundle_is_refused_everywhere(
    tmp_path: Path, int8_model: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    private, public = keys
    archive = _bundle(tmp_path, int8_model, "--sign-key", str(private))
    root = _gnu_untar(archive, tmp_path / "build")
    (tmp_path / "build" / "EVIL").mkdir()
    (tmp_path / "build" / "EVIL" / WHEEL).write_bytes(b"an attacker's wheel")
    (root / "wheels").symlink_to("../EVIL")
    evil = tmp_path / "mail" / archive.name
    evil.parent.mkdir()
    with tarfile.open(evil, "w:gz") as tar:
        tar.add(root, arcname=root.name)  # the link is stored as a link
        tar.add(tmp_path / "build" / "EVIL", arcname="EVIL")

    # Unpacked by the device's edgemed: refused before anything is written.
    assert main(["verify-bundle", str(evil), "--key", str(public)]) == 2
    assert f"{root.name}/wheels is a symbolic link (to ../EVIL)" in capsys.readouterr().err
    assert sorted(p.name for p in evil.parent.iterdir()) == [evil.name]

    # Unpacked with tar: the signature and SHA256SUMS still hold, but the link is refused by both checks.
    device = _gnu_untar(evil, tmp_path / "device")
    assert (device / "wheels").is_symlink()
    assert main(["verify-bundle", str(device), "--key", str(public)]) == 2
    assert "wheels is a symbolic link (to ../EVIL); a bundle holds only plain files" in capsys.readouterr().err
    prefix = tmp_path / "opt-edgemed"
    pip_log = _stand_in_venv(prefix)
    proc = _install(device, prefix, EDGEMED_TRUSTED_KEY=str(public))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "refusing the bundle: wheels is not a plain file or folder" in proc.stderr
    assert not pip_log.exists()  # pip never ran
    assert not (prefix / "current").exists() and os.listdir(prefix / "bundles") == []


def test_paths_outside_the_bundle_hard_links_and_devices_are_refused(
    tmp_path: Path, int8_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    archive = _bundle(tmp_path, int8_model)
    name = archive.name.removesuffix(".tar.gz")

    def crafted(label: str, member: tarfile.TarInfo, data: bytes = b"") -> Path:
        out = tmp_path / label / archive.name
        out.parent.mkdir()
        with tarfile.open(archive) as src, tarfile.open(out, "w:gz") as dst:
            for m in src.getmembers():
                dst.addfile(m, src.extractfile(m) if m.isfile() else None)
            dst.addfile(member, io.BytesIO(data) if member.isfile() else None)
        return out

    climb = tarfile.TarInfo(f"{name}/../outside.txt")
    climb.size = 4
    hard = tarfile.TarInfo(f"{name}/model/copy.tflite")
    hard.type, hard.linkname = tarfile.LNKTYPE, "/etc/passwd"
    device = tarfile.TarInfo(f"{name}/dev-sda")
    device.type, device.devmajor, device.devminor = tarfile.CHRTYPE, 8, 0
    for label, member, expected in (
        ("climb", climb, f"'{name}/../outside.txt' points outside the bundle's folder"),
        ("hard", hard, f"{name}/model/copy.tflite is a hard link (to /etc/passwd)"),
        ("device", device, f"{name}/dev-sda is a device file or pipe"),
    ):
        bad = crafted(label, member, b"evil")
        assert main(["verify-bundle", str(bad)]) == 2, label
        assert expected in capsys.readouterr().err
        assert sorted(p.name for p in bad.parent.iterdir()) == [bad.name], label  # nothing unpacked

    # In an unpacked folder: a SHA256SUMS line that climbs out (with the file there and its digest right), a file
    # hard-linked to one outside, and a pipe standing in for a device file (mknod needs root).
    root = _gnu_untar(archive, tmp_path / "unpacked")
    (root.parent / "outside.txt").write_text("planted\n")
    sums = root / "SHA256SUMS"
    original = sums.read_text()
    planted = hashlib.sha256(b"planted\n").hexdigest()
    sums.write_text(original + f"{planted}  ../outside.txt\n")
    proc = _install(root, tmp_path / "p1", "--allow-unsigned", EDGEMED_SKIP_VENV="1")
    assert proc.returncode == 1 and "SHA256SUMS names a path outside the bundle" in proc.stderr
    assert main(["verify-bundle", str(root)]) == 2 and "malformed line" in capsys.readouterr().err
    sums.write_text(original)

    outside = tmp_path / "profile-elsewhere.yaml"
    os.replace(root / "profile.yaml", outside)
    os.link(outside, root / "profile.yaml")  # same bytes, so SHA256SUMS still matches
    proc = _install(root, tmp_path / "p2", "--allow-unsigned", EDGEMED_SKIP_VENV="1")
    assert proc.returncode == 1 and "refusing the bundle: profile.yaml is hard-linked" in proc.stderr
    assert main(["verify-bundle", str(root)]) == 2
    assert "profile.yaml is hard-linked to another file (2 names)" in capsys.readouterr().err
    (root / "profile.yaml").unlink()
    os.replace(outside, root / "profile.yaml")

    os.mkfifo(root / "model" / "feed")
    proc = _install(root, tmp_path / "p3", "--allow-unsigned", EDGEMED_SKIP_VENV="1")
    assert proc.returncode == 1 and "refusing the bundle: model/feed is not a plain file or folder" in proc.stderr
    assert main(["verify-bundle", str(root)]) == 2
    assert "model/feed is a device file, pipe or socket" in capsys.readouterr().err
    for prefix in ("p1", "p2", "p3"):
        assert not (tmp_path / prefix / "current").exists()


def test_a_device_without_a_trusted_key_installs_only_with_allow_unsigned(
    tmp_path: Path, int8_model: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    archive = _bundle(tmp_path, int8_model)
    # The device's edgemed unpacks it safely beside the archive and checks it.
    assert main(["verify-bundle", str(archive)]) == 0
    out = capsys.readouterr().out
    root = archive.parent / archive.name.removesuffix(".tar.gz")
    assert f"unpacked into {root}" in out and "checksums match" in out
    no_key = {"EDGEMED_SKIP_VENV": "1"}  # and no /etc/edgemed/bundle-signing.pub on this machine
    refused = _install(root, tmp_path / "p", **no_key)
    assert refused.returncode == 1
    assert "holds no trusted key" in refused.stderr and "sudo ./install.sh --allow-unsigned" in refused.stderr
    assert not (tmp_path / "p" / "current").exists()
    typo = _install(root, tmp_path / "p", "--allow-unsgned", **no_key)
    assert typo.returncode == 1 and "unknown option --allow-unsgned" in typo.stderr
    allowed = _install(root, tmp_path / "p", "--allow-unsigned", **no_key)
    assert allowed.returncode == 0, allowed.stderr
    assert "installing unverified (--allow-unsigned)" in allowed.stderr
    assert (tmp_path / "p" / "current" / "profile.yaml").is_file()
    assert not list((tmp_path / "p" / "bundles").glob(".*"))  # no staging copy left behind

    # A signed bundle is no better on a device that cannot check the signature.
    private, _ = keys
    (tmp_path / "s").mkdir()
    signed = _gnu_untar(_bundle(tmp_path / "s", int8_model, "--sign-key", str(private)), tmp_path / "s-unpacked")
    unverified = _install(signed, tmp_path / "p4", **no_key)
    assert unverified.returncode == 1 and "holds no trusted key" in unverified.stderr


def test_an_archive_that_fails_halfway_through_unpacking_leaves_nothing_behind(
    tmp_path: Path, int8_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edgemed.bundle.tree import extract_bundle
    from edgemed.errors import ConfigError

    archive = _bundle(tmp_path, int8_model)
    name = archive.name.removesuffix(".tar.gz")
    # Every member is a plain file or folder inside the bundle, but a folder is then replaced by a file: the
    # unpacking fails after the bundle's files are already written.
    bad = tmp_path / "bad" / archive.name
    bad.parent.mkdir()
    with tarfile.open(archive) as src, tarfile.open(bad, "w:gz") as dst:
        for m in src.getmembers():
            dst.addfile(m, src.extractfile(m) if m.isfile() else None)
        clash = tarfile.TarInfo(f"{name}/model")  # model/ is a folder of the bundle
        clash.size = 4
        dst.addfile(clash, io.BytesIO(b"evil"))
    into = tmp_path / "into"
    into.mkdir()
    for _ in range(2):  # and the second try says the same, not "exists; remove it"
        with pytest.raises(ConfigError, match="cannot unpack the bundle"):
            extract_bundle(bad, into)
        assert list(into.iterdir()) == []
    assert main(["verify-bundle", str(bad)]) == 2
    assert "cannot unpack the bundle" in capsys.readouterr().err
    assert sorted(p.name for p in bad.parent.iterdir()) == [bad.name]
