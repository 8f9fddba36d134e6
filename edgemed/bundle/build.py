"""``build_bundle``: check a profile and its model, stage the bundle's files, and write one archive.

The steps, in the order :func:`build_bundle` runs them: check the model the profile ships (:func:`_ship_model`),
collect warnings for the person building it, rewrite the profile for the device
(:mod:`edgemed.bundle.device_profile`), stage every file and read the staged profile back (:func:`_stage`),
write ``BUNDLE.json`` and ``README.txt``, then checksum, sign and archive.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgemed import __version__
from edgemed.bundle.device_profile import ProfileForDevice, profile_for_device, refuse_relative_device_paths
from edgemed.bundle.render import render_template
from edgemed.errors import EXIT_BROKER, EXIT_CONFIG, EXIT_DELEGATE, EXIT_MODEL, ConfigError
from edgemed.manifest import sha256_file

if TYPE_CHECKING:
    from edgemed.config import DeviceProfile
    from edgemed.manifest import Artifact, Manifest

# Sources that never end: the only kind a service that restarts on failure should run (a finite folder would be
# processed again after every restart).
_ENDLESS_PREFIXES = ("watch:", "camera:", "rtsp://", "rtsps://", "http://", "https://")
# Exit codes a restart cannot fix (configuration, model, broker refusal, accelerator refused): systemd stops.
_NO_RESTART_CODES = (EXIT_CONFIG, EXIT_MODEL, EXIT_BROKER, EXIT_DELEGATE)
# The install prefix is written into a shell script run as root, between double quotes: plain path characters only.
_PLAIN_PATH = re.compile(r"/[A-Za-z0-9_./+-]*")
# install.sh writes its own prefix into the unit when it installs it, so the unit runs what that install put there.
_FILLED_BY_INSTALL_SH = frozenset({"PREFIX"})


@dataclass(frozen=True)
class BundleResult:
    """What ``build_bundle`` wrote."""

    path: Path
    name: str
    files: tuple[str, ...]
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class _Shipped:
    """The checked model the bundle carries: its file, manifest, manifest entry, and every file to copy."""

    path: Path
    manifest_path: Path
    manifest: Manifest
    artifact: Artifact
    files: tuple[Path, ...]


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text).strip("-") or "bundle"


def build_bundle(
    profile_path: Path,
    out_dir: Path,
    *,
    model: Path | None = None,
    device_id: str | None = None,
    site: str | None = None,
    wheels: Path | None = None,
    install_prefix: str = "/opt/edgemed",
    sign_key: Path | None = None,
) -> BundleResult:
    """Check a profile and its model, then write ``OUT_DIR/NAME.tar.gz``.

    Args:
        profile_path: the device profile (YAML).
        out_dir: where the archive goes (created if missing).
        model: the model to ship; default the profile's ``model.path``.
        device_id: override ``device.id`` (one bundle per device of a fleet).
        site: override ``device.site``.
        wheels: a folder of ``*.whl`` files (edgemed and its ``device`` dependencies, built for the device's
            platform) to install without network access.
        install_prefix: where ``install.sh`` puts things on the device by default (an absolute path).
        sign_key: a PEM private key (RSA or EC) to sign ``SHA256SUMS`` with, via the ``openssl`` command. A device
            holding the public key in ``/etc/edgemed/bundle-signing.pub`` installs only bundles it verifies.

    Returns:
        The archive's path and name, the files inside, and warnings for the person building it.

    Raises:
        ConfigError: the profile is invalid, names no model, a wheels folder holds no wheel, the install prefix is
            not a plain absolute path, or signing failed.
        ModelError: the model is missing, altered, its tensors differ from its manifest, or it does not fit the
            profile's triage policy.
        ModelRejectedError: the acceptance gate rejected the model and nobody signed a waiver.
    """
    import yaml

    from edgemed.config import load_profile

    if not _PLAIN_PATH.fullmatch(install_prefix):
        raise ConfigError(
            f"install prefix {install_prefix!r} is not a plain absolute path; use letters, digits and / . _ + - "
            "only, e.g. --prefix /opt/edgemed"
        )
    profile_path = Path(profile_path)
    profile = load_profile(profile_path)
    raw: dict[str, Any] = yaml.safe_load(profile_path.read_text(encoding="utf-8"))
    if device_id is not None:
        raw.setdefault("device", {})["id"] = device_id
    if site is not None:
        raw.setdefault("device", {})["site"] = site
    shipped = _ship_model(profile, profile_path, model)
    warnings = _warnings(profile, shipped, device_id)
    wheel_files = sorted(wheels.glob("*.whl")) if wheels is not None else []
    if wheels is not None and not wheel_files:
        raise ConfigError(f"no *.whl files in {wheels}; build them with: pip wheel '.[device]' -w {wheels}")
    refuse_relative_device_paths(raw, profile_path)
    # The build time makes every bundle's name unique, so installing a rebuilt bundle never overwrites the one
    # a device may need to roll back to.
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    device_name = raw.get("device", {}).get("id", profile.device.id)
    manifest = shipped.manifest
    name = _safe_name(f"edgemed-{profile.profile}-{device_name}-{manifest.name}-v{manifest.version}-{stamp}")
    device = profile_for_device(raw, profile, shipped.path.name, shipped.manifest_path.name)

    with tempfile.TemporaryDirectory(prefix="edgemed-bundle-") as tmp:
        stage = Path(tmp) / name
        staged = _stage(stage, name, profile_path, profile, shipped, device, wheel_files, install_prefix)
        meta = _bundle_json(name, profile_path, profile, staged, shipped, device, warnings)
        (stage / "BUNDLE.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        (stage / "README.txt").write_text(_readme(meta, install_prefix), encoding="utf-8")
        files = _checksum(stage)
        if sign_key is not None:
            _sign(stage / "SHA256SUMS", Path(sign_key))
            files.append("SHA256SUMS.sig")
        archive = _archive(stage, Path(out_dir), name)
    return BundleResult(archive, name, tuple(files), tuple(warnings))


def _ship_model(profile: DeviceProfile, profile_path: Path, model: Path | None) -> _Shipped:
    """The model to ship (``model``, else the profile's), verified with its twin and loaded as the device will."""
    from edgemed.deploy import check_deployable

    model_path = Path(model) if model is not None else profile.model.path
    if model_path is None:
        raise ConfigError(
            f"profile {profile_path} names no model: pass --model FILE.tflite or set model.path in the profile"
        )
    model_path = model_path.resolve()
    # The profile's explicit manifest belongs to the profile's model, not to one given with --model.
    checked = check_deployable(model_path, profile.model.manifest if model is None else None, profile.triage, load=True)
    return _Shipped(model_path, checked.manifest_path, checked.manifest, checked.artifact, tuple(checked.files))


def _warnings(profile: DeviceProfile, shipped: _Shipped, device_id: str | None) -> list[str]:
    warnings: list[str] = []
    if device_id is not None and profile.mqtt is not None and profile.mqtt.username == profile.device.id:
        warnings.append(
            f"mqtt.username is still {profile.mqtt.username!r}, the profile's own device id: give device "
            f"{device_id} its own broker account and set mqtt.username in its profile"
        )
    if not profile.validated:
        warnings.append(f"profile {profile.profile} is not validated on real hardware (validated: false)")
    art = shipped.artifact
    if art.verdict == "waived" and art.waiver is not None:
        warnings.append(f"{shipped.path.name} ships under a gate waiver by {art.waiver.by}: {art.waiver.reason}")
    uri = profile.source.uri
    if uri is None or not uri.startswith(_ENDLESS_PREFIXES):
        what = f"source {uri!r} ends" if uri is not None else "the profile sets no source.uri"
        warnings.append(
            f"{what}: the systemd service restarts edgemed on failure and would process a finite "
            "source again; use watch:DIR, camera:N or a stream for a service"
        )
    return warnings


def _stage(
    stage: Path,
    name: str,
    profile_path: Path,
    profile: DeviceProfile,
    shipped: _Shipped,
    device: ProfileForDevice,
    wheel_files: list[Path],
    install_prefix: str,
) -> DeviceProfile:
    """Write the bundle's files (all but BUNDLE.json, README.txt and the sums) into ``stage``.

    Returns:
        The staged profile, read back from the stage: what the device will load.
    """
    import yaml

    from edgemed.config import parse_profile
    from edgemed.manifest import verify_model

    (stage / "model").mkdir(parents=True)
    for f in [*shipped.files, shipped.manifest_path]:
        shutil.copy2(f, stage / "model" / f.name)
    report = shipped.path.parent / "report.html"
    if report.is_file():
        shutil.copy2(report, stage / "model" / "report.html")
    if device.ca_file is not None:
        (stage / "tls").mkdir()
        shutil.copy2(device.ca_file, stage / "tls" / "ca.pem")
    header = (
        f"# Device profile from {profile_path.name}, bundled by edgemed {__version__} on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.\n"
        "# Paths are relative to this file. Edit here, or rebuild the bundle from the original profile.\n"
    )
    (stage / "profile.yaml").write_text(header + yaml.safe_dump(device.raw, sort_keys=False), encoding="utf-8")
    # Read the staged profile back: the bundle must be consistent on its own, not only on this machine.
    staged = parse_profile(yaml.safe_load((stage / "profile.yaml").read_text(encoding="utf-8")), stage / "x")
    if staged.model.path is None:
        raise ConfigError(f"the profile staged for {name} lost its model path; rebuild from {profile_path}")
    verify_model(staged.model.path, staged.model.manifest)
    if wheel_files:
        (stage / "wheels").mkdir()
        for w in wheel_files:
            shutil.copy2(w, stage / "wheels" / w.name)
    (stage / "edgemed.service").write_text(_unit(profile.profile, staged.run.drain_timeout_s), encoding="utf-8")
    install = stage / "install.sh"
    install.write_text(_install_script(name, install_prefix), encoding="utf-8")
    install.chmod(0o755)
    return staged


def _bundle_json(
    name: str,
    profile_path: Path,
    profile: DeviceProfile,
    staged: DeviceProfile,
    shipped: _Shipped,
    device: ProfileForDevice,
    warnings: list[str],
) -> dict[str, Any]:
    """What ``BUNDLE.json`` says is inside (``verify-bundle`` and the README read it back)."""
    art = shipped.artifact
    return {
        "schema": "edgemed.bundle/1",
        "name": name,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "edgemed_version": __version__,
        "profile": {"name": profile.profile, "validated": profile.validated, "source": profile_path.name},
        "device": {"id": staged.device.id, "site": staged.device.site},
        "model": {
            "name": shipped.manifest.name,
            "version": shipped.manifest.version,
            "file": shipped.path.name,
            "target": art.target,
            "sha256": art.sha256,
            "gate": art.verdict,
            "twin": Path(art.twin).name if art.twin else None,
        },
        "accelerator": staged.inference.accelerator,
        "provision_on_device": device.provision,
        "warnings": warnings,
    }


def _checksum(stage: Path) -> list[str]:
    """Write ``SHA256SUMS`` over every staged file; returns the files, ``SHA256SUMS`` last."""
    files = sorted(p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file())
    sums = "".join(f"{sha256_file(stage / f)}  {f}\n" for f in files)
    (stage / "SHA256SUMS").write_text(sums, encoding="utf-8")
    return [*files, "SHA256SUMS"]


def _archive(stage: Path, out_dir: Path, name: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    archive = out_dir / f"{name}.tar.gz"
    partial = archive.with_suffix(".partial")
    with tarfile.open(partial, "w:gz") as tar:
        tar.add(stage, arcname=name, filter=_owned_by_root)
    partial.replace(archive)  # never leave a half-written bundle under the final name
    return archive


def _sign(sums: Path, key: Path) -> None:
    # The openssl command is on every Linux the devices run, so the device verifies with the same tool and no
    # Python crypto package is needed on either side.
    if shutil.which("openssl") is None:
        raise ConfigError("signing a bundle needs the openssl command: apt-get install openssl")
    if not key.is_file():
        raise ConfigError(
            f"signing key {key} not found; make one with: openssl genpkey -algorithm EC "
            "-pkeyopt ec_paramgen_curve:P-256 -out bundle-signing.pem"
        )
    proc = subprocess.run(
        ["openssl", "dgst", "-sha256", "-sign", str(key), "-out", str(sums) + ".sig", str(sums)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if proc.returncode != 0:
        raise ConfigError(
            f"openssl could not sign with {key}: {proc.stderr.strip().splitlines()[-1] if proc.stderr else ''}; "
            "pass an unencrypted PEM RSA or EC private key"
        )


def _owned_by_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
    # The builder's user and group names mean nothing on the device.
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def _unit(profile_name: str, drain_timeout_s: float) -> str:
    """The systemd unit (``templates/edgemed.service.in``); ``@PREFIX@`` stays for install.sh to fill in."""
    if any(ord(c) < 32 for c in profile_name):
        raise ConfigError(f"profile name {profile_name!r} holds a control character; give it a one-line name")
    values = {
        # systemd expands %-specifiers in Description: a literal % is written %%.
        "PROFILE": profile_name.replace("%", "%%"),
        # Drain time plus the time to publish "offline" and close the outbox.
        "TIMEOUT_STOP_S": str(int(drain_timeout_s) + 15),
        "NO_RESTART_CODES": " ".join(str(code) for code in _NO_RESTART_CODES),
    }
    return render_template("edgemed.service", values, filled_on_device=_FILLED_BY_INSTALL_SH)


def _install_script(name: str, prefix: str) -> str:
    """The bundle's own installer (``templates/install.sh.in``); its sed line names ``@PREFIX@`` on purpose."""
    values = {"NAME": name, "DEFAULT_PREFIX": prefix, "VERSION": __version__}
    return render_template("install.sh", values, filled_on_device=_FILLED_BY_INSTALL_SH)


def _readme(meta: dict[str, Any], prefix: str) -> str:
    model = meta["model"]
    out = io.StringIO()
    out.write(f"{meta['name']}\n\n")
    out.write(f"edgemed {meta['edgemed_version']} bundle for device {meta['device']['id']} ")
    out.write(f"(site {meta['device']['site']}), profile {meta['profile']['name']}")
    out.write(" (validated on hardware)\n" if meta["profile"]["validated"] else " (NOT validated on hardware)\n")
    out.write(f"model {model['name']} v{model['version']}: {model['file']} ({model['target']}, gate {model['gate']})")
    out.write(f", sha256 {model['sha256']}\n\n")
    out.write(f"Install: copy this folder to the device, then run  sudo ./install.sh  (installs into {prefix};\n")
    out.write("  a device without a trusted key in /etc/edgemed/bundle-signing.pub needs  --allow-unsigned).\n")
    out.write("Check: edgemed doctor --profile PREFIX/current/profile.yaml;  logs: journalctl -u edgemed -f\n\n")
    if meta["provision_on_device"]:
        out.write("Provision on the device before starting (never bundled):\n")
        out.writelines(f"  - {item}\n" for item in meta["provision_on_device"])
        out.write("\n")
    if meta["warnings"]:
        out.write("Warnings:\n")
        out.writelines(f"  - {w}\n" for w in meta["warnings"])
    return out.getvalue()
