"""Device profiles: one YAML file that says everything about a device, validated before anything runs.

Each part of the runtime owns its own config model (``CaptureConfig``, ``QualityConfig``, ``BackendConfig``,
``TriagePolicy``, ``OodSetting``, ``MqttConfig``, ``OutboxConfig``, ``DeliveryConfig``, ``PublishConfig``);
:class:`DeviceProfile` composes them. Unknown keys are rejected everywhere, so a typo in a field name is an error
that names the field, not a silently ignored setting. Relative paths in a profile are taken relative to the
profile's own folder.
``merge_overrides`` sets values over a profile (the command line over ``--profile``), and ``merge_broker`` points
its broker settings elsewhere, both validated again as a whole.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from edgemed.capture import CaptureConfig
from edgemed.errors import BrokerRefusedError, ConfigError
from edgemed.identity import ID_PATTERN
from edgemed.inference import BackendConfig
from edgemed.ood import OodSetting
from edgemed.outbox import OutboxConfig
from edgemed.publish.config import DeliveryConfig, MqttConfig, PublishConfig, parse_broker_url
from edgemed.quality import QualityConfig
from edgemed.triage import TriagePolicy
from edgemed.validation import StrictModel, describe

log = logging.getLogger(__name__)


class DeviceConfig(StrictModel):
    """Who the device is and where it keeps its state."""

    id: str = Field(description="device id, part of every MQTT topic: 1-64 of [A-Za-z0-9_-]")
    site: str = Field("default", description="clinic or site name, part of every MQTT topic: 1-64 of [A-Za-z0-9_-]")
    data_dir: Path | None = Field(
        None, description="where the outbox, device secret and results.jsonl live; default ~/.local/share/edgemed"
    )

    @field_validator("id", "site")
    @classmethod
    def _topic_safe(cls, value: str) -> str:
        if not ID_PATTERN.match(value):
            raise ValueError(f"{value!r} must be 1-64 letters, digits, '_' or '-' (it becomes part of MQTT topics)")
        return value


class ModelConfig(StrictModel):
    """Which converted model the device runs."""

    path: Path | None = Field(
        None,
        description="the .tflite written by `edgemed convert` (int8, float16 or "
        "edgetpu); its manifest must sit beside it",
    )
    manifest: Path | None = Field(None, description="explicit manifest path, when it is not beside the model")


class SourceConfig(CaptureConfig):
    """Where frames come from, plus how they are captured."""

    uri: str | None = Field(
        None, description="PATH (image, folder, video, DICOM), camera:N, rtsp://..., http(s)://..., or watch:DIR"
    )


class HealthConfig(StrictModel):
    """The heartbeat on edgemed/{site}/{device_id}/health."""

    interval_s: float = Field(30.0, gt=0, description="seconds between heartbeats")


class PrivacyConfig(StrictModel):
    """What may leave the device. Everything identifying is off unless set here explicitly."""

    publish_source_names: bool = Field(
        False, description="put the input's file name into results (off: names can contain patient identifiers)"
    )
    print_source_names: Literal["auto", "always", "never"] = Field(
        "auto",
        description="whether the one line per result printed on stdout shows the input's file name: 'auto' only "
        "when stdout is a terminal, so a service (the systemd journal, a pipe, a log file) never gets file names; "
        "'always' also there; 'never' not even on a terminal (names can contain a medical record number)",
    )


class RunConfig(StrictModel):
    """How a run ends and what it keeps locally."""

    drain_timeout_s: float = Field(
        30.0,
        ge=0,
        description="seconds to wait for broker acknowledgements once the "
        "source is exhausted; pending results stay on disk",
    )
    max_frames: int | None = Field(None, ge=1, description="stop after this many frames")
    results_jsonl: bool = Field(True, description="append every result to DATA_DIR/results.jsonl")
    print_results: bool = Field(True, description="print one line per result for the person at the device")


class ScreenConfig(StrictModel):
    """The nurse's screen: a page on the device's own display (``edgemed run --screen``, ``edgemed.screen``).

    It is served on 127.0.0.1 only, for a kiosk browser on the device itself: frames and maps are shown there and
    are never published or written to disk.
    """

    enabled: bool = Field(False, description="serve the screen while running (also: edgemed run --screen)")
    port: int = Field(
        8780, ge=0, le=65535, description="TCP port on 127.0.0.1 (0: any free port; the URL is logged at start)"
    )
    max_fps: float = Field(
        15.0, gt=0, le=30, description="most frames per second pushed to the page, whatever the source's rate"
    )
    class_map: Literal["cam", "off"] = Field(
        "cam",
        description="'cam': compute the class activation map of every frame for models that have one (the "
        "converter records it for models ending in global average pooling); 'off': never compute maps",
    )

    @field_validator("class_map", mode="before")
    @classmethod
    def _yaml_off(cls, value: object) -> object:
        # YAML 1.1 reads a bare `off` (and `on`) as a boolean: `class_map: off` must mean what it says.
        if value is False:
            return "off"
        if value is True:
            return "cam"
        return value


class DeviceProfile(StrictModel):
    """A complete device profile (see ``firmware_configs/`` for real ones)."""

    profile: str = Field(description="profile name, e.g. rpi4-coral-usb")
    description: str = Field("", description="what device and use this profile is for")
    validated: bool = Field(False, description="true only when this profile ran on the named hardware")
    device: DeviceConfig
    model: ModelConfig = ModelConfig()
    source: SourceConfig = SourceConfig()
    quality: QualityConfig = QualityConfig()
    inference: BackendConfig = BackendConfig()
    triage: TriagePolicy = TriagePolicy()
    ood: OodSetting = OodSetting()
    mqtt: MqttConfig | None = Field(
        None, description="broker connection; absent = offline (results stay in the outbox until `edgemed flush`)"
    )
    outbox: OutboxConfig = OutboxConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    publish: PublishConfig = PublishConfig()
    health: HealthConfig = HealthConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    run: RunConfig = RunConfig()
    screen: ScreenConfig = ScreenConfig()

    @field_validator("ood")
    @classmethod
    def _threshold_names_its_score(cls, ood: OodSetting) -> OodSetting:
        # A threshold is on one score's scale (energy is negative, the feature score about 0..10): under auto it
        # would follow whichever method the next converted model names as default, and could flag every frame or
        # none without a word.
        if ood.threshold is not None and ood.method == "auto":
            raise ValueError(
                "ood.threshold is on the scale of one score: set ood.method to energy or features with it (auto "
                "follows the model's default method, which a model converted again may change)"
            )
        if ood.threshold is not None and ood.method == "none":
            raise ValueError("ood.threshold has no effect with ood.method none: remove ood.threshold, or set a method")
        return ood


REFERENCE = "firmware_configs/README.md"
"""Where every profile key is documented (generated from these models by ``scripts/profile-reference``)."""


def _format_error(path: Path | None, exc: ValidationError, flags: Mapping[str, str] | None) -> str:
    what = "the command line is invalid" if path is None else f"profile {path} is invalid"
    return f"{what}: " + describe(exc, DeviceProfile, flags=flags, reference=REFERENCE)


def override_broker(mqtt: Mapping[str, Any] | None, url: str) -> tuple[dict[str, Any], str | None]:
    """A profile's ``mqtt`` section with its URL replaced by ``--broker URL``.

    A template profile speaks TLS to a remote broker; a first test is often against a plaintext broker on this
    machine. A plaintext ``--broker`` to this machine therefore drops the profile's ``mqtt.tls`` (it cannot
    apply) with a warning; to another machine it is refused, as plaintext to a remote broker always is.

    Args:
        mqtt: the profile's ``mqtt`` mapping, or None when it has none.
        url: the ``--broker`` value.

    Returns:
        The new ``mqtt`` mapping and the warning to show (None when nothing was dropped).

    Raises:
        ConfigError: the URL is malformed.
        BrokerRefusedError: plaintext to another machine for a profile whose broker uses TLS.
    """
    broker = parse_broker_url(url)
    section = dict(mqtt or {})
    section["url"] = url
    if broker.tls or section.get("tls") is None:
        return section, None
    if not broker.loopback and not section.get("allow_plaintext_remote", False):
        raise BrokerRefusedError(
            f"refusing --broker {url}: it is plaintext to another machine, but this profile's broker uses TLS "
            "(mqtt.tls), and results and the password would cross the network unencrypted; use "
            f"mqtts://{broker.host}:8883 (or a broker on this machine)"
        )
    del section["tls"]
    where = "this machine" if broker.loopback else f"{broker.host} (mqtt.allow_plaintext_remote)"
    return section, f"--broker {url} is plaintext to {where}: the profile's TLS settings (mqtt.tls) are not used"


def _local_path(value: str, base: Path) -> str:
    # "~" is the home of the user running edgemed (a first-run profile keeps its data there); other relative
    # paths are relative to the profile file, so a bundle can be copied anywhere as one folder.
    expanded = os.path.expanduser(value)
    return expanded if Path(expanded).is_absolute() else str(base / expanded)


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    def fix(section: Any, key: str) -> None:
        if isinstance(section, dict) and isinstance(section.get(key), str):
            section[key] = _local_path(section[key], base)

    for section, key in (("model", "path"), ("model", "manifest"), ("device", "data_dir")):
        fix(raw.get(section), key)
    mqtt = raw.get("mqtt")
    if isinstance(mqtt, dict):
        fix(mqtt, "password_file")
        for key in ("ca_file", "cert_file", "key_file"):
            fix(mqtt.get("tls"), key)
    src = raw.get("source")
    if isinstance(src, dict) and isinstance(src.get("uri"), str):
        src["uri"] = _source_uri(src["uri"], base)


def _source_uri(uri: str, base: Path) -> str:
    if uri.startswith("watch:"):
        return "watch:" + os.path.expanduser(uri[len("watch:") :])
    if "://" in uri or uri.startswith("camera:"):
        return uri
    return _local_path(uri, base)


def parse_profile(raw: Any, path: Path | None, *, flags: Mapping[str, str] | None = None) -> DeviceProfile:
    """Validate an already-parsed profile mapping.

    Args:
        raw: the profile as a mapping (YAML or flags merged into it).
        path: the profile file, for messages and relative paths; None for a profile made of command-line flags
            only (relative paths are then relative to the working directory).
        flags: dotted keys set by command-line flags and the flag that set each (``{"device.id": "--device-id"}``),
            so that an error names the flag.

    Returns:
        The validated profile.

    Raises:
        ConfigError: naming each bad field (or flag) and what to do.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"profile {path} must be a YAML mapping (key: value), not {type(raw).__name__}")
    _resolve_paths(raw, Path(path).resolve().parent if path is not None else Path.cwd())
    try:
        return DeviceProfile.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_error(path, exc, flags)) from exc


def load_profile(path: Path) -> DeviceProfile:
    """Read and validate a YAML device profile.

    Raises:
        ConfigError: the file is missing, is not YAML, or fails validation (the message names the field).
    """
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read profile {path}: {exc.strerror}; check the path") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        from edgemed.validation import describe_yaml_error

        raise ConfigError(f"profile {path} is not valid YAML: {describe_yaml_error(exc)}") from exc
    return parse_profile(raw, path)


def merge_overrides(
    profile: DeviceProfile | None,
    overrides: Mapping[str, Any],
    *,
    broker: str | None = None,
    names: Mapping[str, str] | None = None,
    origin: Path | None = None,
) -> DeviceProfile:
    """A profile with values set over it (the command line over ``--profile``), validated as a whole again.

    Args:
        profile: the loaded profile, or None to make one of the overrides alone (``device.id`` is then needed).
        overrides: dotted profile keys and their values, e.g. ``{"device.id": "us-01", "inference.threads": 2}``;
            a None value sets nothing. A ``Path``, and a file or folder as ``source.uri``, is taken relative to
            the working directory, not to the profile's folder.
        broker: a broker URL to use instead of the profile's, with the rule of :func:`override_broker` (a
            plaintext broker on this machine drops the profile's TLS settings with a warning).
        names: what sets each key, e.g. ``{"device.id": "--device-id", "mqtt.url": "--broker"}``; a bad value
            set by an override is reported under that name, and a missing broker is asked for by it.
        origin: the profile's file, named in messages (None: the overrides alone are "the command line").

    Returns:
        The validated profile.

    Raises:
        ConfigError: a bad value (the message names the key, or the name that set it, and the fix), or broker
            options without a broker.
        BrokerRefusedError: ``broker`` is plaintext to another machine for a profile whose broker uses TLS.
    """
    names = names or {}
    raw: dict[str, Any] = (
        profile.model_dump(exclude_unset=True, mode="json") if profile is not None else {"profile": "command-line"}
    )
    set_here: list[str] = []
    if broker is not None:
        raw["mqtt"] = _broker_section(raw.get("mqtt"), broker)
        set_here.append("mqtt.url")
    for key, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, Path):
            value = str(value.resolve())
        elif key == "source.uri" and isinstance(value, str):  # the one path that is a string (it may be a URL)
            value = _source_uri(value, Path.cwd())
        _set(raw, key, value)
        set_here.append(key)
    mqtt = raw.get("mqtt")
    if isinstance(mqtt, dict) and "url" not in mqtt:
        given = ", ".join(names.get(key, key) for key in set_here if key.startswith("mqtt."))
        ask = f"pass {names['mqtt.url']} mqtt://HOST:PORT" if "mqtt.url" in names else "set mqtt.url"
        raise ConfigError(f"{given} set broker options but no broker: {ask} as well")
    # Only a key set here is reported under the name that set it; one from the profile file under its own key.
    flags = {key: names[key] for key in set_here if key in names}
    return parse_profile(raw, origin, flags=flags)


def _set(raw: dict[str, Any], key: str, value: Any) -> None:
    *sections, name = key.split(".")
    node = raw
    for section in sections:
        if not isinstance(node.get(section), dict):  # absent, or `mqtt: null` in the profile
            node[section] = {}
        node = node[section]
    node[name] = value


def _broker_section(mqtt: Mapping[str, Any] | None, url: str) -> dict[str, Any]:
    """``override_broker``, with its warning logged (once, here) rather than returned."""
    section, warning = override_broker(mqtt, url)
    if warning:
        log.warning("%s", warning)
    return section


def merge_broker(cfg: MqttConfig | None, url: str) -> MqttConfig:
    """Broker settings (or none) pointed at ``--broker URL``, by the rule of :func:`override_broker`.

    Args:
        cfg: the profile's broker settings, or None when it has none.
        url: the new broker URL.

    Returns:
        The validated settings.

    Raises:
        ConfigError: the URL is malformed or does not fit the rest of the settings.
        BrokerRefusedError: plaintext to another machine for settings that use TLS.
    """
    current = cfg.model_dump(exclude_unset=True, mode="json") if cfg is not None else None
    section = _broker_section(current, url)
    try:
        return MqttConfig.model_validate(section)
    except ValidationError as exc:
        raise ConfigError(f"--broker {url} does not fit the profile: {describe(exc, MqttConfig)}") from exc


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/edgemed`` or ``~/.local/share/edgemed``."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "edgemed"
