"""``edgemed bundle``: one checked, self-describing archive a field engineer copies onto a device.

A bundle holds what a device needs besides the edgemed package: the device profile (rewritten so that its model
path points inside the bundle), the model with its manifest (and the CPU int8 twin of an Edge TPU model), the
broker's CA certificate when the profile names one that exists here, a systemd unit, an install script, a
``BUNDLE.json`` that says what is inside, and ``SHA256SUMS``. Optionally the wheels to install offline.

Nothing secret and nothing about patients goes in: passwords, client keys and certificates are provisioned on
each device separately (the install notes list where the profile expects them), and no image is ever bundled.

The bundle is checked before it is written: the profile validates, the model matches its manifest and was not
rejected by the acceptance gate, the triage policy names only the model's labels, and the profile, read back
from the staged bundle, finds its model there.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgemed import __version__
from edgemed.errors import ConfigError
from edgemed.manifest import Manifest, sha256_file

# Sources that never end: the only kind a service that restarts on failure should run (a finite folder would be
# processed again after every restart).
_ENDLESS_PREFIXES = ("watch:", "camera:", "rtsp://", "rtsps://", "http://", "https://")
# Exit codes a restart cannot fix (configuration, model, broker refusal, accelerator refused): systemd stops.
_NO_RESTART_CODES = "2 3 5 6"


@dataclass(frozen=True)
class BundleResult:
    """What ``build_bundle`` wrote."""

    path: Path
    name: str
    files: tuple[str, ...]
    warnings: tuple[str, ...]


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
        install_prefix: where ``install.sh`` puts things on the device by default.
        sign_key: a PEM private key (RSA or EC) to sign ``SHA256SUMS`` with, via the ``openssl`` command. A device
            holding the public key in ``/etc/edgemed/bundle-signing.pub`` installs only bundles it verifies.

    Returns:
        The archive's path and name, the files inside, and warnings for the person building it.

    Raises:
        ConfigError: the profile is invalid, names no model, a wheels folder holds no wheel, or signing failed.
        ModelError: the model is missing, altered, its tensors differ from its manifest, or it does not fit the
            profile's triage policy.
        ModelRejectedError: the acceptance gate rejected the model and nobody signed a waiver.
    """
    import yaml

    from edgemed.config import load_profile, parse_profile
    from edgemed.manifest import find_manifest, verify_model
    from edgemed.triage import validate_policy

    profile_path = Path(profile_path)
    profile = load_profile(profile_path)
    raw: dict[str, Any] = yaml.safe_load(profile_path.read_text(encoding="utf-8"))
    if device_id is not None:
        raw.setdefault("device", {})["id"] = device_id
    if site is not None:
        raw.setdefault("device", {})["site"] = site
    model_path = Path(model) if model is not None else profile.model.path
    if model_path is None:
        raise ConfigError(
            f"profile {profile_path} names no model: pass --model FILE.tflite or set model.path in the profile"
        )
    model_path = model_path.resolve()
    # The profile's explicit manifest belongs to the profile's model, not to one given with --model.
    manifest_path = (profile.model.manifest if model is None else None) or find_manifest(model_path)
    manifest, art = verify_model(model_path, manifest_path)
    validate_policy(profile.triage, list(manifest.labels))
    model_files = [model_path]
    if art.twin:
        twin = model_path.parent / Path(art.twin).name
        verify_model(twin, manifest_path)
        model_files.append(twin)
    check_models_load(model_files, manifest)

    warnings: list[str] = []
    if device_id is not None and profile.mqtt is not None and profile.mqtt.username == profile.device.id:
        warnings.append(
            f"mqtt.username is still {profile.mqtt.username!r}, the profile's own device id: give device "
            f"{device_id} its own broker account and set mqtt.username in its profile"
        )
    if not profile.validated:
        warnings.append(f"profile {profile.profile} is not validated on real hardware (validated: false)")
    if art.verdict == "waived" and art.waiver is not None:
        warnings.append(f"{model_path.name} ships under a gate waiver by {art.waiver.by}: {art.waiver.reason}")
    uri = profile.source.uri
    if uri is None or not uri.startswith(_ENDLESS_PREFIXES):
        what = f"source {uri!r} ends" if uri is not None else "the profile sets no source.uri"
        warnings.append(
            f"{what}: the systemd service restarts edgemed on failure and would process a finite "
            "source again; use watch:DIR, camera:N or a stream for a service"
        )
    wheel_files = sorted(wheels.glob("*.whl")) if wheels is not None else []
    if wheels is not None and not wheel_files:
        raise ConfigError(f"no *.whl files in {wheels}; build them with: pip wheel '.[device]' -w {wheels}")

    _refuse_relative_device_paths(raw, profile_path)
    device = raw.get("device", {})
    # The build time makes every bundle's name unique, so installing a rebuilt bundle never overwrites the one
    # a device may need to roll back to.
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    name = _safe_name(
        f"edgemed-{profile.profile}-{device.get('id', profile.device.id)}-{manifest.name}-v{manifest.version}-{stamp}"
    )
    raw["model"] = {"path": f"model/{model_path.name}", "manifest": f"model/{Path(manifest_path).name}"}
    provision: list[str] = []
    mqtt = raw.get("mqtt")
    if isinstance(mqtt, dict) and profile.mqtt is not None:
        tls = profile.mqtt.tls
        raw_tls = mqtt.get("tls") or {}
        if tls is not None and tls.ca_file is not None and Path(tls.ca_file).is_file():
            mqtt.setdefault("tls", {})["ca_file"] = "tls/ca.pem"  # public: safe to ship
        elif tls is not None and tls.ca_file is not None:
            provision.append(f"the broker's CA certificate at {raw_tls.get('ca_file')}")
        if tls is not None and tls.cert_file is not None:
            provision.append(
                f"this device's client certificate at {raw_tls.get('cert_file')} and its key at "
                f"{raw_tls.get('key_file')} (readable by the edgemed user only)"
            )
        if profile.mqtt.password_file is not None:
            provision.append(
                f"the broker password for user {profile.mqtt.username!r} in {mqtt.get('password_file')} "
                "(chmod 600, owned by the edgemed user)"
            )
        if profile.mqtt.password_env is not None:
            provision.append(f"the broker password in the environment variable {profile.mqtt.password_env}")

    with tempfile.TemporaryDirectory(prefix="edgemed-bundle-") as tmp:
        stage = Path(tmp) / name
        (stage / "model").mkdir(parents=True)
        for f in [*model_files, Path(manifest_path)]:
            shutil.copy2(f, stage / "model" / Path(f).name)
        report = model_path.parent / "report.html"
        if report.is_file():
            shutil.copy2(report, stage / "model" / "report.html")
        if isinstance(mqtt, dict) and mqtt.get("tls", {}).get("ca_file") == "tls/ca.pem":
            assert profile.mqtt is not None and profile.mqtt.tls is not None and profile.mqtt.tls.ca_file
            (stage / "tls").mkdir()
            shutil.copy2(profile.mqtt.tls.ca_file, stage / "tls" / "ca.pem")
        header = (
            f"# Device profile from {profile_path.name}, bundled by edgemed {__version__} on "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.\n"
            "# Paths are relative to this file. Edit here, or rebuild the bundle from the original profile.\n"
        )
        (stage / "profile.yaml").write_text(header + yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
        # Read the staged profile back: the bundle must be consistent on its own, not only on this machine.
        staged = parse_profile(yaml.safe_load((stage / "profile.yaml").read_text(encoding="utf-8")), stage / "x")
        assert staged.model.path is not None
        verify_model(staged.model.path, staged.model.manifest)
        if wheel_files:
            (stage / "wheels").mkdir()
            for w in wheel_files:
                shutil.copy2(w, stage / "wheels" / w.name)
        drain = float(staged.run.drain_timeout_s)
        (stage / "edgemed.service").write_text(_unit(profile.profile, drain), encoding="utf-8")
        install = stage / "install.sh"
        install.write_text(_install_script(name, install_prefix), encoding="utf-8")
        install.chmod(0o755)
        meta = {
            "schema": "edgemed.bundle/1",
            "name": name,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "edgemed_version": __version__,
            "profile": {"name": profile.profile, "validated": profile.validated, "source": profile_path.name},
            "device": {"id": staged.device.id, "site": staged.device.site},
            "model": {
                "name": manifest.name,
                "version": manifest.version,
                "file": model_path.name,
                "target": art.target,
                "sha256": art.sha256,
                "gate": art.verdict,
                "twin": Path(art.twin).name if art.twin else None,
            },
            "accelerator": staged.inference.accelerator,
            "provision_on_device": provision,
            "warnings": warnings,
        }
        (stage / "BUNDLE.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        (stage / "README.txt").write_text(_readme(meta, install_prefix), encoding="utf-8")
        files = sorted(p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file())
        sums = "".join(f"{sha256_file(stage / f)}  {f}\n" for f in files)
        (stage / "SHA256SUMS").write_text(sums, encoding="utf-8")
        files.append("SHA256SUMS")
        if sign_key is not None:
            _sign(stage / "SHA256SUMS", Path(sign_key))
            files.append("SHA256SUMS.sig")
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        archive = out_dir / f"{name}.tar.gz"
        partial = archive.with_suffix(".partial")
        with tarfile.open(partial, "w:gz") as tar:
            tar.add(stage, arcname=name, filter=_owned_by_root)
        partial.replace(archive)  # never leave a half-written bundle under the final name
    return BundleResult(archive, name, tuple(files), tuple(warnings))


DEFAULT_TRUSTED_KEY = Path("/etc/edgemed/bundle-signing.pub")


def verify_bundle(folder: Path, key: Path | None = None) -> dict[str, Any]:
    """Check a bundle with the edgemed already on the device, before running its ``install.sh``.

    The bundle's own script checks the bundle too, but a bundle from an untrusted source could ship a script that
    does not: this is the check to trust.

    Args:
        folder: the unpacked bundle (the folder holding ``SHA256SUMS``), or its ``.tar.gz``, which is then
            unpacked beside it by :func:`edgemed.bundle_tree.extract_bundle` (and removed again if refused).
        key: public key the bundle must be signed with; default ``/etc/edgemed/bundle-signing.pub`` when that
            file exists (else the signature is not required).

    Returns:
        The bundle's ``BUNDLE.json``, plus ``signature``: the key it was verified with, or None; and
        ``unpacked``: the folder an archive was unpacked into, or None.

    Raises:
        ConfigError: the bundle holds a symbolic link, hard link, device file or a path outside it, a file
            differs from or is missing in ``SHA256SUMS``, an unlisted file is present, the signature is missing or
            does not verify, or the profile and model inside do not agree.
        ModelError: the bundled model is not the one its manifest describes (altered, or its tensors differ).
    """
    from edgemed.bundle_tree import extract_bundle

    folder = Path(folder)
    if not folder.is_file():
        return {**_verify_folder(folder, key), "unpacked": None}
    unpacked = extract_bundle(folder, folder.parent)
    try:
        meta = _verify_folder(unpacked, key)
    except BaseException:
        shutil.rmtree(unpacked, ignore_errors=True)  # what was refused is not left behind to be installed
        raise
    return {**meta, "unpacked": str(unpacked)}


def _verify_folder(folder: Path, key: Path | None) -> dict[str, Any]:
    from edgemed.bundle_tree import refuse_unsafe_entries
    from edgemed.config import load_profile
    from edgemed.manifest import verify_model

    sums = folder / "SHA256SUMS"
    if not sums.is_file():
        raise ConfigError(
            f"{folder} is not an edgemed bundle (no SHA256SUMS); pass the NAME.tar.gz or the folder it unpacks to"
        )
    refuse_unsafe_entries(folder)
    if key is None and DEFAULT_TRUSTED_KEY.is_file():
        key = DEFAULT_TRUSTED_KEY
    if key is not None:
        if not Path(key).is_file():
            raise ConfigError(f"trusted key {key} not found; pass the owner's public key with --key")
        sig = folder / "SHA256SUMS.sig"
        if not sig.is_file():
            raise ConfigError(f"{folder.name} is unsigned; only bundles signed for {key} are accepted")
        if shutil.which("openssl") is None:
            raise ConfigError("verifying a bundle signature needs the openssl command: apt-get install openssl")
        proc = subprocess.run(
            ["openssl", "dgst", "-sha256", "-verify", str(key), "-signature", str(sig), str(sums)],
            capture_output=True,
            timeout=60,
        )
        if proc.returncode != 0:
            raise ConfigError(f"{folder.name}: the signature does not match {key}: not built by that key, or altered")
    listed: dict[str, str] = {}
    for line in sums.read_text(encoding="utf-8").splitlines():
        digest, _, rel = line.partition("  ")
        if not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ConfigError(f"{folder.name}: SHA256SUMS has a malformed line {line!r}; copy the bundle again")
        listed[rel] = digest
    present = {
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.name not in ("SHA256SUMS", "SHA256SUMS.sig")
    }
    if present - set(listed):
        raise ConfigError(f"{folder.name}: files not listed in SHA256SUMS: {', '.join(sorted(present - set(listed)))}")
    for rel, digest in listed.items():
        if not (folder / rel).is_file():
            raise ConfigError(f"{folder.name}: {rel} is missing; copy the bundle again")
        if sha256_file(folder / rel) != digest:
            raise ConfigError(f"{folder.name}: {rel} differs from SHA256SUMS: damaged or edited; copy it again")
    meta: dict[str, Any] = json.loads((folder / "BUNDLE.json").read_text(encoding="utf-8"))
    profile = load_profile(folder / "profile.yaml")
    if profile.model.path is None:
        raise ConfigError(f"{folder.name}: its profile names no model")
    for path in (profile.model.path, profile.model.manifest):
        if path is not None and not Path(path).resolve().is_relative_to(folder.resolve()):
            raise ConfigError(f"{folder.name}: its profile points at {path}, outside the bundle; rebuild the bundle")
    manifest, art = verify_model(profile.model.path, profile.model.manifest)
    twin = [profile.model.path.parent / Path(art.twin).name] if art.twin else []
    check_models_load([profile.model.path, *twin], manifest)
    if art.sha256 != meta.get("model", {}).get("sha256"):
        raise ConfigError(f"{folder.name}: BUNDLE.json and the bundled model disagree; rebuild the bundle")
    meta["signature"] = str(key) if key is not None else None
    return meta


def check_models_load(files: list[Path], manifest: Manifest) -> None:
    """Load each model on the CPU and check its real tensors against the manifest, as the device does at start.

    A model compiled for the Edge TPU runs only with libedgetpu: its CPU twin, which it was compiled from and
    shares its input and output with, is the one checked here (the device checks the compiled file at load).

    Raises:
        ModelError: a model cannot be loaded, or its tensors or output op differ from its manifest entry.
        ConfigError: no TensorFlow Lite interpreter is installed here.
    """
    from edgemed.inference import BackendConfig, make_backend
    from edgemed.inference.backends import is_edgetpu_compiled

    for path in files:
        if not is_edgetpu_compiled(path):
            make_backend(path, BackendConfig(threads=1), manifest=manifest).close()


def _refuse_relative_device_paths(raw: dict[str, Any], profile_path: Path) -> None:
    # A relative path resolves against the profile's folder: on the device that is inside the root-owned, replaced
    # on every upgrade bundle folder. The outbox or a secret must not live there.
    def get(*keys: str) -> Any:
        node: Any = raw
        for key in keys:
            node = node.get(key) if isinstance(node, dict) else None
        return node

    relative = []
    for keys in (
        ("device", "data_dir"),
        ("mqtt", "password_file"),
        ("mqtt", "tls", "cert_file"),
        ("mqtt", "tls", "key_file"),
    ):
        value = get(*keys)
        if value is not None and not Path(str(value)).is_absolute():
            relative.append(f"{'.'.join(keys)}: {value}")
    ca = get("mqtt", "tls", "ca_file")
    if ca is not None and not Path(str(ca)).is_absolute() and not (profile_path.parent / str(ca)).is_file():
        relative.append(f"mqtt.tls.ca_file: {ca}")  # an existing CA is bundled; a missing one is a device path
    uri = get("source", "uri")
    if isinstance(uri, str) and "://" not in uri and not uri.startswith("camera:"):
        path = uri.removeprefix("watch:")
        if not Path(path).is_absolute():
            relative.append(f"source.uri: {uri}")
    if relative:
        raise ConfigError(
            f"profile {profile_path}: relative paths would point inside the bundle folder on the device "
            f"({'; '.join(relative)}); give absolute device paths, e.g. /var/lib/edgemed or /etc/edgemed/mqtt.password"
        )


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
    # @PREFIX@ is filled in by install.sh, so the unit always runs what that install put in place.
    return f"""[Unit]
Description=edgemed point-of-care inference ({profile_name})
Documentation=file://@PREFIX@/current/README.txt
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
User=edgemed
Group=edgemed
# video: cameras (V4L2); plugdev: the Coral USB Accelerator.
SupplementaryGroups=video plugdev
# The data directory (outbox, device secret, results.jsonl) is /var/lib/edgemed, private to the service.
Environment=XDG_DATA_HOME=/var/lib
StateDirectory=edgemed
StateDirectoryMode=0700
ExecStart=@PREFIX@/venv/bin/edgemed run --profile @PREFIX@/current/profile.yaml
# SIGTERM stops capture, waits up to run.drain_timeout_s for acknowledgements, publishes offline, then exits.
KillSignal=SIGTERM
TimeoutStopSec={int(drain_timeout_s) + 15}
Restart=on-failure
RestartSec=5
# A configuration, model, broker-refusal or accelerator error does not fix itself: stop and let the journal say why.
RestartPreventExitStatus={_NO_RESTART_CODES}

[Install]
WantedBy=multi-user.target
"""


def _install_script(name: str, prefix: str) -> str:
    return f"""#!/bin/sh
# Install this edgemed bundle on a device. Run as root from the unpacked bundle:  sudo ./install.sh
#   --allow-unsigned             install although this device holds no trusted key to verify the bundle with
#   EDGEMED_PREFIX=DIR           where to install (default {prefix})
#   EDGEMED_TRUSTED_KEY=FILE     public key bundles must be signed with (default /etc/edgemed/bundle-signing.pub;
#                                when that file exists, unsigned or wrongly signed bundles are refused; when it
#                                does not, nothing is installed without --allow-unsigned)
#   EDGEMED_PIP_INDEX_URL=URL    your organisation's package index, when the bundle carries no wheels
#   EDGEMED_SKIP_VENV=1          do not create or update the virtual environment
#   EDGEMED_SKIP_SYSTEMD=1       do not install or start the systemd service
# This script checks the bundle against itself (checksums, signature, nothing but plain files). A bundle from an
# untrusted source could ship a different script: on a device that already runs edgemed, unpack and check it with
# the installed code instead of tar:  PREFIX/venv/bin/edgemed verify-bundle NAME.tar.gz
# Bundles are kept side by side under PREFIX/bundles; PREFIX/current points at the active one, so rolling
# back is:  ln -sfn bundles/OLD_NAME PREFIX/current && systemctl restart edgemed
set -eu
die() {{ echo "edgemed bundle: $*" >&2; exit 1; }}
ALLOW_UNSIGNED=0
for arg in "$@"; do
  case "$arg" in
    --allow-unsigned) ALLOW_UNSIGNED=1 ;;
    -h | --help) echo "usage: sudo ./install.sh [--allow-unsigned]  (settings: see the top of this file)"; exit 0 ;;
    *) die "unknown option $arg; usage: sudo ./install.sh [--allow-unsigned]" ;;
  esac
done
HERE=$(cd -P "$(dirname "$0")" && pwd -P)
PREFIX="${{EDGEMED_PREFIX:-{prefix}}}"
NAME="{name}"
VERSION="{__version__}"

# A bundle holds plain files and folders only. A symbolic link (wheels -> ../elsewhere) would bring in files that
# SHA256SUMS and its signature never saw; a hard link, device file or pipe is never part of a bundle.
refuse_odd_files() {{
  ODD=$(find . ! -type f ! -type d | sed 's|^\\./||' | head -n 5)
  [ -z "$ODD" ] || die "refusing the bundle: $(echo $ODD) is not a plain file or folder (a symbolic link, \\
device or pipe); a bundle holds only plain files: copy the original again"
  LINKED=$(find . -type f -links +1 | sed 's|^\\./||' | head -n 5)
  [ -z "$LINKED" ] || die "refusing the bundle: $(echo $LINKED) is hard-linked to another file; unpack the \\
original archive again"
}}

mkdir -p "$PREFIX/bundles"
PREFIX_REAL=$(cd -P "$PREFIX" && pwd -P)
case "$HERE/" in
  "$PREFIX_REAL"/*) die "run install.sh from the unpacked archive, not from the installed copy in $PREFIX" ;;
esac

if [ -n "${{EDGEMED_TRUSTED_KEY:-}}" ] && [ ! -f "$EDGEMED_TRUSTED_KEY" ]; then
  die "EDGEMED_TRUSTED_KEY=$EDGEMED_TRUSTED_KEY does not exist; fix the path (refusing to install unverified)"
fi
TRUSTED_KEY="${{EDGEMED_TRUSTED_KEY:-/etc/edgemed/bundle-signing.pub}}"

cd "$HERE"
refuse_odd_files
# Everything below is checked on a private copy in PREFIX and installed from that copy, so that nothing can be
# swapped between the check and its use (cp -P copies a link as a link, which the second check refuses).
STAGE="$PREFIX_REAL/bundles/.$NAME.checking"
LISTED=$(mktemp)
PRESENT=$(mktemp)
trap 'cd /; rm -rf "$STAGE"; rm -f "$LISTED" "$PRESENT"' EXIT
rm -rf "$STAGE"
cp -R -P "$HERE" "$STAGE"
cd "$STAGE"
refuse_odd_files
# Every name SHA256SUMS lists is a plain relative path inside the bundle.
if grep -Evq '^[0-9a-f]{{64}}  [A-Za-z0-9_.+-][A-Za-z0-9_.+/-]*$' SHA256SUMS ||
  grep -Eq '  (.*/)?[.][.](/|$)' SHA256SUMS; then
  die "SHA256SUMS names a path outside the bundle, or has a malformed line; copy the bundle again"
fi
if [ -f "$TRUSTED_KEY" ]; then
  # This device accepts only bundles signed by its owner's key.
  [ -f SHA256SUMS.sig ] || die "unsigned, and this device only installs bundles signed for $TRUSTED_KEY; \\
rebuild it with: edgemed bundle ... --sign-key KEY.pem"
  command -v openssl >/dev/null 2>&1 || die "verifying the signature needs openssl"
  openssl dgst -sha256 -verify "$TRUSTED_KEY" -signature SHA256SUMS.sig SHA256SUMS >/dev/null 2>&1 ||
    die "the signature does not match $TRUSTED_KEY: not built by a trusted key, or altered"
  echo "signature verified with $TRUSTED_KEY"
elif [ "$ALLOW_UNSIGNED" = 1 ]; then
  echo "edgemed bundle: this device holds no trusted key ($TRUSTED_KEY): installing unverified (--allow-unsigned)" >&2
else
  die "this device holds no trusted key ($TRUSTED_KEY) to verify the bundle with: install the owner's public key \\
there (or name it with EDGEMED_TRUSTED_KEY=FILE), or install unverified with: sudo ./install.sh --allow-unsigned"
fi
sha256sum --check --quiet SHA256SUMS || die "files differ from SHA256SUMS: the bundle is damaged or was edited; \\
copy it again"
# Nothing may ride along unchecked (an extra wheel would be installed as root).
sed 's/^[0-9a-f]*  //' SHA256SUMS | sort >"$LISTED"
find . -type f ! -name SHA256SUMS ! -name SHA256SUMS.sig | sed 's|^\\./||' | sort >"$PRESENT"
EXTRA=$(comm -13 "$LISTED" "$PRESENT")
[ -z "$EXTRA" ] || die "files not listed in SHA256SUMS: $EXTRA; copy the bundle again"
python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
  die "edgemed needs Python >= 3.10; this device has $(python3 --version 2>&1)"

BUNDLE="$PREFIX_REAL/bundles/$NAME"
if [ -d "$BUNDLE" ]; then
  cmp -s "$BUNDLE/SHA256SUMS" SHA256SUMS || die "$BUNDLE exists with other contents"
  echo "$NAME is already in $PREFIX/bundles"
else
  mv "$STAGE" "$BUNDLE"
fi
cd "$BUNDLE"

if [ "${{EDGEMED_SKIP_VENV:-0}}" != 1 ]; then
  [ -x "$PREFIX/venv/bin/python" ] || python3 -m venv "$PREFIX/venv"
  if "$PREFIX/venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('edgemed') != '$VERSION')" \\
      2>/dev/null; then
    echo "edgemed $VERSION is already installed in $PREFIX/venv"
  elif [ -d "$BUNDLE/wheels" ]; then
    "$PREFIX/venv/bin/pip" install --no-index --find-links "$BUNDLE/wheels" "edgemed[device]==$VERSION"
  elif [ -n "${{EDGEMED_PIP_INDEX_URL:-}}" ]; then
    "$PREFIX/venv/bin/pip" install --index-url "$EDGEMED_PIP_INDEX_URL" "edgemed[device]==$VERSION"
  else
    die "this bundle carries no wheels and edgemed $VERSION is not installed: rebuild it with --wheels DIR \\
(pip wheel '.[device]' -w DIR on a machine of this device's platform) or set EDGEMED_PIP_INDEX_URL"
  fi
fi

# Only now, with everything in place, does the device switch to this bundle.
ln -sfn "bundles/$NAME" "$PREFIX/current"
echo "installed $NAME in $PREFIX/bundles (active: $PREFIX/current)"

DOCTOR="$PREFIX/venv/bin/edgemed doctor --profile $PREFIX/current/profile.yaml"
if [ "${{EDGEMED_SKIP_SYSTEMD:-0}}" != 1 ] && command -v systemctl >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  id edgemed >/dev/null 2>&1 || useradd --system --home-dir /var/lib/edgemed --shell /usr/sbin/nologin edgemed
  sed "s|@PREFIX@|$PREFIX|g" "$PREFIX/current/edgemed.service" >/etc/systemd/system/edgemed.service
  chmod 0644 /etc/systemd/system/edgemed.service
  systemctl daemon-reload
  # Stopped while the doctor runs: the camera and the Edge TPU take one user at a time.
  systemctl stop edgemed.service 2>/dev/null || true
  if [ -x "$PREFIX/venv/bin/edgemed" ]; then
    mkdir -p /var/lib/edgemed && chown edgemed:edgemed /var/lib/edgemed && chmod 0700 /var/lib/edgemed
    runuser -u edgemed -- env XDG_DATA_HOME=/var/lib $DOCTOR ||
      echo "edgemed bundle: doctor found problems (above); the service starts anyway, fix them and restart" >&2
  fi
  systemctl enable edgemed.service
  systemctl start edgemed.service
  echo "service edgemed started: journalctl -u edgemed -f"
elif [ -x "$PREFIX/venv/bin/edgemed" ]; then
  $DOCTOR || echo "edgemed bundle: doctor found problems (above)" >&2
fi
"""


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
