"""The options of ``edgemed run`` and how command-line flags override a device profile.

Every flag that sets a profile key is listed once (``RUN_FLAGS``), so that a bad value names the flag that set it
(``--device-id (device.id): ...``) and ``--broker`` goes through ``config.override_broker`` in one place.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgemed.config import DeviceProfile
    from edgemed.publish.config import MqttConfig

EPILOG_RUN = """\
examples:
  edgemed run --model out/breast_int8.tflite --source scans/ --broker mqtt://127.0.0.1:1883 --device-id us-01
  edgemed run --profile firmware_configs/x86_64-cpu.yaml --source watch:/var/lib/probe/export
  edgemed run --model m_int8.tflite --source cine.dcm --device-id us-01      (offline: results stay on disk)

sources: a folder of images (natural order: img2 before img10), an image, a video file, a DICOM file or folder,
camera:N, rtsp://..., http(s)://..., watch:DIR (new files as a device writes them).
triage without --profile: no label has a rule, so a confident result is ROUTINE ("no triage rule for this
finding in the device profile: refer for review") and a top probability under 0.60, or under 0.10 ahead of the
next class, is INCONCLUSIVE; URGENT and NO_FINDING need triage.rules in a profile (see
examples/breast-ultrasound-triage.yaml and docs/triage.md).
Command-line flags override the profile. Results go to edgemed/{site}/{device_id}/results (QoS 1) and to
DATA_DIR/results.jsonl; nothing that identifies a patient (file names, study ids, images) is published.
exit codes: 0 all delivered, 2 usage/config, 3 model, 4 source, 5 broker refused, 6 accelerator refused,
7 outbox unwritable, 10 finished with results still pending on disk."""


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Add the options of ``edgemed run`` to its parser."""
    p.add_argument("--profile", type=Path, help="device profile YAML (see firmware_configs/); flags override it")
    p.add_argument("--model", type=Path, help="converted model (.tflite) with its manifest beside it")
    p.add_argument("--manifest", type=Path, help="manifest path when it is not beside the model")
    p.add_argument("--source", help="where frames come from (see below)")
    p.add_argument("--broker", help="mqtt://HOST:PORT or mqtts://HOST:PORT; omit to work offline")
    p.add_argument("--device-id", help="this device's id, [A-Za-z0-9_-]{1,64}")
    p.add_argument("--site", help="site name, [A-Za-z0-9_-]{1,64} (default: 'default')")
    p.add_argument(
        "--data-dir", type=Path, help="outbox, device secret and results.jsonl (default ~/.local/share/edgemed)"
    )
    p.add_argument("--max-frames", type=int, help="stop after N frames")
    p.add_argument(
        "--drain-timeout",
        type=float,
        metavar="SECONDS",
        help="wait this long for acknowledgements after the source ends (default 30)",
    )
    p.add_argument("--study-id", help="study id to pseudonymise into session_id (never published itself)")
    p.add_argument("--accelerator", choices=["cpu", "edgetpu", "gpu"], help="intended accelerator")
    fb = p.add_mutually_exclusive_group()
    fb.add_argument(
        "--allow-fallback",
        dest="fallback",
        action="store_true",
        default=None,
        help="run on CPU (degraded) when the accelerator is absent",
    )
    fb.add_argument(
        "--no-fallback", dest="fallback", action="store_false", help="exit 6 when the accelerator is absent"
    )
    p.add_argument("--threads", type=int, help="CPU inference threads")
    p.add_argument("--fps-cap", type=float, help="process at most this many frames per second")
    p.add_argument("--username", help="broker user name")
    p.add_argument("--password-env", metavar="VAR", help="environment variable holding the broker password")
    p.add_argument("--password-file", type=Path, help="file holding the broker password")
    p.add_argument("--ca-file", type=Path, help="CA certificate for mqtts:// brokers")
    p.add_argument(
        "--mqtt-protocol",
        choices=["auto", "5", "3.1.1"],
        help="MQTT version (default auto: 5, falling back to 3.1.1 when the broker refuses 5)",
    )
    p.add_argument("--health-interval", type=float, metavar="SECONDS", help="heartbeat period (default 30)")
    p.add_argument("--loop", type=int, metavar="N", help="play a finite source N times (benchmarks, soak tests)")
    p.add_argument(
        "--from-start",
        action="store_true",
        help="process the source again from its start, even if its last run on this data directory was "
        "interrupted (by default that run is resumed after its last committed result)",
    )
    p.add_argument("--quiet", action="store_true", help="do not print one line per result")


# Which profile key each flag of `edgemed run` sets (an error in that key then names the flag).
RUN_FLAGS: tuple[tuple[str, str, str], ...] = (
    ("device_id", "device.id", "--device-id"),
    ("site", "device.site", "--site"),
    ("data_dir", "device.data_dir", "--data-dir"),
    ("model", "model.path", "--model"),
    ("manifest", "model.manifest", "--manifest"),
    ("source", "source.uri", "--source"),
    ("fps_cap", "source.fps_cap", "--fps-cap"),
    ("loop", "source.loop", "--loop"),
    ("accelerator", "inference.accelerator", "--accelerator"),
    ("fallback", "inference.allow_cpu_fallback", "--allow-fallback/--no-fallback"),
    ("threads", "inference.threads", "--threads"),
    ("max_frames", "run.max_frames", "--max-frames"),
    ("drain_timeout", "run.drain_timeout_s", "--drain-timeout"),
    ("health_interval", "health.interval_s", "--health-interval"),
    ("username", "mqtt.username", "--username"),
    ("mqtt_protocol", "mqtt.protocol", "--mqtt-protocol"),
    ("password_env", "mqtt.password_env", "--password-env"),
    ("password_file", "mqtt.password_file", "--password-file"),
    ("ca_file", "mqtt.tls.ca_file", "--ca-file"),
)


def _flag_value(args: argparse.Namespace, attr: str) -> Any:
    value = getattr(args, attr)
    # Paths given on the command line are relative to the working directory, not to the profile.
    return str(value.resolve()) if isinstance(value, Path) else value


def build_profile(args: argparse.Namespace) -> DeviceProfile:
    """Merge ``--profile`` (if any) with the command-line overrides into a validated profile.

    Args:
        args: the parsed ``edgemed run`` command line.

    Returns:
        The validated profile.

    Raises:
        ConfigError: a bad flag or profile value (the message names the flag or key and the fix).
        BrokerRefusedError: ``--broker`` is plaintext to another machine for a profile whose broker uses TLS.
    """
    from edgemed.config import load_profile, override_broker, parse_profile
    from edgemed.errors import ConfigError

    if args.profile is not None:
        raw: dict[str, Any] = load_profile(args.profile).model_dump(exclude_unset=True, mode="json")
    else:
        raw = {"profile": "command-line"}
        if args.device_id is None:
            raise ConfigError("--device-id is required without --profile (e.g. --device-id us-01)")
    flags: dict[str, str] = {}
    if args.broker is not None:
        raw["mqtt"], warning = override_broker(raw.get("mqtt"), args.broker)
        flags["mqtt.url"] = "--broker"
        if warning:
            logging.getLogger("edgemed").warning("%s", warning)
    for attr, key, flag in RUN_FLAGS:
        value = _flag_value(args, attr)
        if value is None:
            continue
        *sections, name = key.split(".")
        node = raw
        for section in sections:
            if not isinstance(node.get(section), dict):  # absent, or `mqtt: null` in the profile
                node[section] = {}
            node = node[section]
        node[name] = value
        flags[key] = flag
    if args.quiet:
        raw.setdefault("run", {})["print_results"] = False
    mqtt = raw.get("mqtt")
    if isinstance(mqtt, dict) and "url" not in mqtt:
        given = ", ".join(flag for key, flag in flags.items() if key.startswith("mqtt."))
        raise ConfigError(f"{given} set broker options but no broker: pass --broker mqtt://HOST:PORT as well")
    return parse_profile(raw, args.profile, flags=flags)


def with_broker(cfg: MqttConfig | None, url: str) -> MqttConfig:
    """The profile's broker settings (or none) pointed at ``--broker URL`` (see ``config.override_broker``).

    Raises:
        ConfigError: the URL is malformed or does not fit the rest of the settings.
        BrokerRefusedError: plaintext to another machine for settings that use TLS.
    """
    from pydantic import ValidationError

    from edgemed.config import override_broker
    from edgemed.errors import ConfigError
    from edgemed.publish.config import MqttConfig
    from edgemed.validation import describe

    current = cfg.model_dump(exclude_unset=True, mode="json") if cfg is not None else None
    section, warning = override_broker(current, url)
    if warning:
        logging.getLogger("edgemed").warning("%s", warning)
    try:
        return MqttConfig.model_validate(section)
    except ValidationError as exc:
        raise ConfigError(f"--broker {url} does not fit the profile: {describe(exc, MqttConfig)}") from exc
