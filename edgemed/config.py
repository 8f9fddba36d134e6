"""Device profiles: one YAML file that says everything about a device, validated before anything runs.

Each part of the runtime owns its own config model (``CaptureConfig``, ``QualityConfig``, ``BackendConfig``,
``TriagePolicy``, ``MqttConfig``, ``OutboxConfig``); :class:`DeviceProfile` composes them. Unknown keys are
rejected everywhere, so a typo in a field name is an error that names the field, not a silently ignored setting.
Relative paths in a profile are taken relative to the profile's own folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edgemed.capture import CaptureConfig
from edgemed.errors import ConfigError
from edgemed.identity import ID_PATTERN
from edgemed.inference import BackendConfig
from edgemed.outbox import OutboxConfig
from edgemed.publish.config import MqttConfig
from edgemed.quality import QualityConfig
from edgemed.triage import TriagePolicy


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DeviceConfig(_Strict):
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


class ModelConfig(_Strict):
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


class HealthConfig(_Strict):
    """The heartbeat on edgemed/{site}/{device_id}/health."""

    interval_s: float = Field(30.0, gt=0, description="seconds between heartbeats")


class PrivacyConfig(_Strict):
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


class RunConfig(_Strict):
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


class DeviceProfile(_Strict):
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
    mqtt: MqttConfig | None = Field(
        None, description="broker connection; absent = offline (results stay in the outbox until `edgemed flush`)"
    )
    outbox: OutboxConfig = OutboxConfig()
    health: HealthConfig = HealthConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    run: RunConfig = RunConfig()


def _format_error(path: Path, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling against firmware_configs/README.md)"
        elif err["type"] == "missing":
            msg = "required field is missing"
        lines.append(f"{where}: {msg}")
    more = f" (+{len(exc.errors()) - 5} more)" if len(exc.errors()) > 5 else ""
    return f"profile {path} is invalid: " + "; ".join(lines) + more


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    # Relative paths are relative to the profile file, so a bundle can be copied anywhere as one folder.
    def fix(section: str, key: str) -> None:
        sec = raw.get(section)
        if isinstance(sec, dict) and isinstance(sec.get(key), str) and not Path(sec[key]).is_absolute():
            sec[key] = str(base / sec[key])

    for section, key in (("model", "path"), ("model", "manifest"), ("device", "data_dir")):
        fix(section, key)
    mqtt = raw.get("mqtt")
    if isinstance(mqtt, dict):
        if isinstance(mqtt.get("password_file"), str) and not Path(mqtt["password_file"]).is_absolute():
            mqtt["password_file"] = str(base / mqtt["password_file"])
        tls = mqtt.get("tls")
        if isinstance(tls, dict):
            for key in ("ca_file", "cert_file", "key_file"):
                if isinstance(tls.get(key), str) and not Path(tls[key]).is_absolute():
                    tls[key] = str(base / tls[key])
    src = raw.get("source")
    if isinstance(src, dict) and isinstance(src.get("uri"), str):
        uri = src["uri"]
        if "://" not in uri and not uri.startswith(("camera:", "watch:")) and not Path(uri).is_absolute():
            src["uri"] = str(base / uri)


def parse_profile(raw: Any, path: Path) -> DeviceProfile:
    """Validate an already-parsed profile mapping; ``path`` is used for messages and relative paths.

    Raises:
        ConfigError: naming each bad field and what to do.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"profile {path} must be a YAML mapping (key: value), not {type(raw).__name__}")
    _resolve_paths(raw, Path(path).resolve().parent)
    try:
        return DeviceProfile.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_error(path, exc)) from exc


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
        raise ConfigError(f"profile {path} is not valid YAML: {exc}".replace("\n", " ")) from exc
    return parse_profile(raw, path)


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/edgemed`` or ``~/.local/share/edgemed``."""
    import os

    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "edgemed"
