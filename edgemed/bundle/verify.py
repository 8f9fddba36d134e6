"""``verify_bundle``: check a bundle with the edgemed already on the device, the check to trust.

In order: nothing but plain files (:mod:`edgemed.bundle.tree`), the signature when the device holds a trusted key,
every file against ``SHA256SUMS`` and nothing unlisted, then the profile, model and ``BUNDLE.json`` against each
other, with the model loaded as the device loads it (``edgemed.deploy.check_deployable``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from edgemed.errors import ConfigError
from edgemed.manifest import sha256_file

DEFAULT_TRUSTED_KEY = Path("/etc/edgemed/bundle-signing.pub")
_SUMS_FILES = ("SHA256SUMS", "SHA256SUMS.sig")


def verify_bundle(folder: Path, key: Path | None = None) -> dict[str, Any]:
    """Check a bundle with the edgemed already on the device, before running its ``install.sh``.

    The bundle's own script checks the bundle too, but a bundle from an untrusted source could ship a script that
    does not: this is the check to trust.

    Args:
        folder: the unpacked bundle (the folder holding ``SHA256SUMS``), or its ``.tar.gz``, which is then
            unpacked beside it by :func:`edgemed.bundle.tree.extract_bundle` (and removed again if refused).
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
    from edgemed.bundle.tree import extract_bundle

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
    from edgemed.bundle.tree import refuse_unsafe_entries

    sums = folder / "SHA256SUMS"
    if not sums.is_file():
        raise ConfigError(
            f"{folder} is not an edgemed bundle (no SHA256SUMS); pass the NAME.tar.gz or the folder it unpacks to"
        )
    refuse_unsafe_entries(folder)
    if key is None and DEFAULT_TRUSTED_KEY.is_file():
        key = DEFAULT_TRUSTED_KEY
    if key is not None:
        _check_signature(folder, sums, Path(key))
    _check_sums(folder, sums)
    meta: dict[str, Any] = json.loads((folder / "BUNDLE.json").read_text(encoding="utf-8"))
    _check_contents(folder, meta)
    meta["signature"] = str(key) if key is not None else None
    return meta


def _check_signature(folder: Path, sums: Path, key: Path) -> None:
    if not key.is_file():
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


def _check_sums(folder: Path, sums: Path) -> None:
    """Every listed file is present and unchanged, and no file rides along unlisted."""
    listed: dict[str, str] = {}
    for line in sums.read_text(encoding="utf-8").splitlines():
        digest, _, rel = line.partition("  ")
        if not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ConfigError(f"{folder.name}: SHA256SUMS has a malformed line {line!r}; copy the bundle again")
        listed[rel] = digest
    # Only the top-level SHA256SUMS and its signature are not listed in it: a file of that name in a subfolder
    # (wheels/SHA256SUMS) is an unlisted file like any other.
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - set(_SUMS_FILES)
    if present - set(listed):
        raise ConfigError(f"{folder.name}: files not listed in SHA256SUMS: {', '.join(sorted(present - set(listed)))}")
    for rel, digest in listed.items():
        if not (folder / rel).is_file():
            raise ConfigError(f"{folder.name}: {rel} is missing; copy the bundle again")
        if sha256_file(folder / rel) != digest:
            raise ConfigError(f"{folder.name}: {rel} differs from SHA256SUMS: damaged or edited; copy it again")


def _check_contents(folder: Path, meta: dict[str, Any]) -> None:
    """The profile finds its model inside the bundle, the model is its manifest's, and BUNDLE.json agrees."""
    from edgemed.config import load_profile
    from edgemed.deploy import check_deployable

    profile = load_profile(folder / "profile.yaml")
    if profile.model.path is None:
        raise ConfigError(f"{folder.name}: its profile names no model")
    for path in (profile.model.path, profile.model.manifest):
        if path is not None and not Path(path).resolve().is_relative_to(folder.resolve()):
            raise ConfigError(f"{folder.name}: its profile points at {path}, outside the bundle; rebuild the bundle")
    art = check_deployable(profile.model.path, profile.model.manifest, load=True).artifact
    if art.sha256 != meta.get("model", {}).get("sha256"):
        raise ConfigError(f"{folder.name}: BUNDLE.json and the bundled model disagree; rebuild the bundle")
