"""The profile as the device will read it: model inside the bundle, CA bundled, secrets listed, paths absolute."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgemed.errors import ConfigError

if TYPE_CHECKING:
    from edgemed.config import DeviceProfile


@dataclass(frozen=True)
class ProfileForDevice:
    """The profile as the device will read it, and what goes with it."""

    raw: dict[str, Any]
    ca_file: Path | None  # the broker's CA certificate to bundle as tls/ca.pem
    provision: list[str]  # what the field engineer must put on the device (never bundled)


def profile_for_device(
    raw: dict[str, Any], profile: DeviceProfile, model_file: str, manifest_file: str
) -> ProfileForDevice:
    """Point the profile's model inside the bundle, bundle the broker's CA if it is here, list the secrets.

    Args:
        raw: the profile as read from its YAML (rewritten in place: model, and the CA when it is bundled).
        profile: the same profile, validated.
        model_file, manifest_file: the names the model and its manifest have in the bundle's ``model/``.
    """
    raw["model"] = {"path": f"model/{model_file}", "manifest": f"model/{manifest_file}"}
    ca_file: Path | None = None
    provision: list[str] = []
    mqtt = raw.get("mqtt")
    if not isinstance(mqtt, dict) or profile.mqtt is None:
        return ProfileForDevice(raw, ca_file, provision)
    tls = profile.mqtt.tls
    raw_tls = mqtt.get("tls") or {}
    if tls is not None and tls.ca_file is not None and Path(tls.ca_file).is_file():
        ca_file = Path(tls.ca_file)
        mqtt["tls"] = {**raw_tls, "ca_file": "tls/ca.pem"}  # public: safe to ship
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
    return ProfileForDevice(raw, ca_file, provision)


def refuse_relative_device_paths(raw: dict[str, Any], profile_path: Path) -> None:
    """Refuse device paths a bundle cannot carry: relative ones (data folder, secrets, source).

    Raises:
        ConfigError: naming every relative path and the fix.
    """

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
