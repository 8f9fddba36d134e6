"""The options of every ``edgemed`` command, one ``add_*`` function per command, and the profile ``run``'s make.

``cli.make_parser`` calls each ``add_*`` and attaches the command's handler; nothing here runs a command. Every
flag of ``edgemed run`` that sets a profile key is listed once (``RUN_FLAGS``), so that a bad value names the flag
that set it (``--device-id (device.id): ...``). The merging itself, ``--broker`` included, is
``config.merge_overrides``: ``build_profile`` only turns the parsed command line into plain keys and values.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgemed.config import DeviceProfile

    # argparse's own name for what add_subparsers() returns (generic only in the type stubs)
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

RAW = argparse.RawDescriptionHelpFormatter
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_LEVEL_HELP = "log verbosity on stderr (default WARNING); DEBUG also shows the libraries' own notices"


def add_converter_commands(sub: Subparsers, *, load: bool) -> None:
    """``edgemed train`` and ``edgemed convert``, with their options when ``load`` (the command line names one)."""
    # The converter's options live in converters.commands (argparse only, no TensorFlow), imported only when
    # the command line names train or convert: the device path never imports the converters package.
    for name, helptext in (
        ("train", "train a model on your images (host; needs the convert extra)"),
        ("convert", "quantize a trained model for the device (host; needs the convert extra)"),
    ):
        if load:
            from converters import commands as conv

            p = sub.add_parser(
                name,
                help=helptext,
                formatter_class=RAW,
                description=getattr(conv, f"{name.upper()}_DESCRIPTION", helptext),
                epilog=getattr(conv, f"{name.upper()}_EPILOG", None),
            )
            getattr(conv, f"add_{name}_arguments")(p)
        else:
            p = sub.add_parser(name, help=helptext)
        p.set_defaults(func=None, converter=name)


EPILOG_RUN = """\
examples:
  edgemed run --model out/breast_int8.tflite --source scans/ --broker mqtt://127.0.0.1:1883 --device-id us-01
  edgemed run --profile firmware_configs/x86_64-cpu.yaml --source watch:/var/lib/probe/export
  edgemed run --model m_int8.tflite --source cine.dcm --device-id us-01      (offline: results stay on disk)
  edgemed run --profile firmware_configs/ultrasound-probe-example.yaml --screen
      then on the device's display: chromium --kiosk http://127.0.0.1:8780/

sources: a folder of images (natural order: img2 before img10), an image, a video file, a DICOM file or folder,
camera:N, rtsp://..., http(s)://..., watch:DIR (new files as a device writes them).
triage without --profile: no label has a rule, so a confident result is ROUTINE ("no triage rule for this
finding in the device profile: refer for review") and a top probability under 0.60, or under 0.10 ahead of the
next class, is INCONCLUSIVE; URGENT and NO_FINDING need triage.rules in a profile (see
examples/breast-ultrasound-triage.yaml and docs/triage.md).
Command-line flags override the profile. Results go to edgemed/{site}/{device_id}/results (QoS 1) and to
DATA_DIR/results.jsonl; nothing that identifies a patient (file names, study ids, images) is published.
exit codes: 0 all delivered, 2 usage/config, 3 model, 4 source, 5 broker refused, 6 accelerator refused,
7 data directory unwritable or outbox found damaged (what could be read was recovered), 10 finished with
results still pending on disk.
the screen (--screen): a page on 127.0.0.1 only, at most screen.max_fps frames a second (default 15) whatever
the source's rate, with the class activation map of models that end in global average pooling (an occlusion
map on request for others). Frames and maps never leave the device: not published, not written to disk."""


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Add the options of ``edgemed run`` to its parser (each one that sets a profile key is in ``RUN_FLAGS``)."""
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
    p.add_argument(
        "--screen",
        action="store_true",
        default=None,
        help="serve the nurse's screen on http://127.0.0.1:PORT/ for the device's own display (kiosk browser): "
        "each image, its triage in large type, what to do next, and where the model looked; loopback only, "
        "nothing shown there is published or stored (also: screen.enabled in the profile)",
    )
    p.add_argument(
        "--screen-port",
        type=int,
        metavar="PORT",
        help="port of the screen on 127.0.0.1 (default 8780; 0: any free port, logged at start); needs --screen",
    )


def add_run(sub: Subparsers) -> argparse.ArgumentParser:
    """``edgemed run`` and its options."""
    p = sub.add_parser(
        "run",
        help="run the device pipeline on a source and publish results",
        description="Capture frames, check their quality, classify them on the device, triage "
        "them, and deliver every result durably over MQTT.",
        epilog=EPILOG_RUN,
        formatter_class=RAW,
    )
    add_run_arguments(p)
    return p


def add_flush(sub: Subparsers) -> argparse.ArgumentParser:
    """``edgemed flush`` and its options."""
    p = sub.add_parser(
        "flush",
        help="send results still pending in a data directory",
        description="Send every result still pending in DATA_DIR's outbox, say how many were sent and how many "
        "remain, then exit 0 when nothing is left (10 when some remain after --timeout). Give --broker, --profile "
        "or both.",
        epilog="examples:\n"
        "  edgemed flush --profile firmware_configs/first-run.yaml\n"
        "  edgemed flush --data-dir /var/lib/edgemed --broker mqtts://broker.example.org:8883 --timeout 300",
        formatter_class=RAW,
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        help="the device's data directory (default from the profile, else ~/.local/share/edgemed)",
    )
    p.add_argument("--broker", help="mqtt://HOST:PORT or mqtts://HOST:PORT (overrides the profile's broker)")
    p.add_argument(
        "--profile",
        type=Path,
        help="use the profile's broker, TLS, credentials, data directory and outbox settings",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="longest wait for the broker and its acknowledgements (default %(default)g)",
    )
    return p


def add_doctor(sub: Subparsers) -> argparse.ArgumentParser:
    """``edgemed doctor`` and its options."""
    p = sub.add_parser(
        "doctor",
        help="check interpreter, accelerators, model, source, broker and disk",
        description="Print a table of what this device can and cannot do, with the fix for each "
        "problem. Exit 0 when everything the profile needs works.",
        epilog="examples:\n"
        "  edgemed doctor --profile firmware_configs/rpi4-coral-usb.yaml\n"
        "  edgemed doctor --model out/breast_int8.tflite --source camera:0 --broker mqtt://127.0.0.1:1883",
        formatter_class=RAW,
    )
    p.add_argument("--profile", type=Path, help="check what this profile needs")
    p.add_argument(
        "--model",
        type=Path,
        help="check this model (manifest, sha256, gate verdict, one timed invoke on the profile's accelerator); "
        "default the profile's model.path",
    )
    p.add_argument("--source", help="also try to read one frame from this source")
    p.add_argument("--broker", help="also try to connect to this broker (overrides the profile's broker)")
    p.add_argument("--data-dir", type=Path, help="data directory to check for space and permissions")
    return p


def add_dashboard(sub: Subparsers, *, load: bool) -> None:
    """``edgemed dashboard``, with its options and handler when ``load`` (the command line names it)."""
    helptext = "central side: ingest results from the broker and serve the fleet dashboard"
    if not load:
        sub.add_parser("dashboard", help=helptext)
        return
    from edgemed import dashboard  # the device path never imports the dashboard

    p = sub.add_parser("dashboard", help=helptext, description=dashboard.__doc__, formatter_class=RAW)
    dashboard.add_arguments(p)
    p.set_defaults(func=dashboard.run)


def add_profile_check(sub: Subparsers) -> argparse.ArgumentParser:
    """``edgemed profile-check`` and its options."""
    p = sub.add_parser(
        "profile-check",
        help="validate device profile files",
        description="Validate device profiles; every problem names the field and the fix. Every file is checked "
        "and reported; the exit code is 2 when any of them is invalid.",
        epilog="examples:\n"
        "  edgemed profile-check firmware_configs/*.yaml\n"
        "  edgemed profile-check my-probe.yaml      (every key: firmware_configs/README.md)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("files", nargs="+", type=Path, help="profile YAML files")
    return p


def add_bundle(sub: Subparsers) -> argparse.ArgumentParser:
    """``edgemed bundle`` and its options."""
    p = sub.add_parser(
        "bundle",
        help="pack a profile and its model into an archive to install on a device",
        description="Check a device profile and its model (manifest, sha256, gate verdict, triage labels), then "
        "write OUT/NAME.tar.gz with the profile (model path pointing inside the bundle), the model, its manifest "
        "and CPU twin, the broker CA if the profile names one that exists here, a systemd unit, install.sh, "
        "BUNDLE.json and SHA256SUMS. Passwords, client keys and images are never bundled.",
        epilog="examples:\n"
        "  edgemed bundle --profile firmware_configs/rpi4-coral-usb.yaml --model out/breast_edgetpu.tflite "
        "--device-id rpi4-coral-07 --out bundles/\n"
        "  edgemed bundle --profile my-probe.yaml --out bundles/ --wheels wheels-aarch64/\n\n"
        "on the device:  tar xzf NAME.tar.gz && sudo ./NAME/install.sh  (add --allow-unsigned where the device\n"
        "holds no trusted key; with --sign-key, devices holding its public key verify the bundle)",
        formatter_class=RAW,
    )
    p.add_argument("--profile", type=Path, required=True, help="the device profile, e.g. firmware_configs/x.yaml")
    p.add_argument("--out", type=Path, required=True, help="folder for the archive, e.g. --out bundles/")
    p.add_argument("--model", type=Path, help="the .tflite to ship (default: the profile's model.path)")
    p.add_argument("--device-id", help="override device.id, e.g. one bundle per device of a fleet")
    p.add_argument("--site", help="override device.site")
    p.add_argument(
        "--wheels", type=Path, help="folder of *.whl built for the device, for an install without network access"
    )
    p.add_argument("--prefix", default="/opt/edgemed", help="install location on the device (default /opt/edgemed)")
    p.add_argument(
        "--sign-key",
        type=Path,
        help="PEM private key (RSA or EC) to sign the bundle with; devices holding the public key in "
        "/etc/edgemed/bundle-signing.pub refuse anything else",
    )
    return p


def add_verify_bundle(sub: Subparsers) -> argparse.ArgumentParser:
    """``edgemed verify-bundle`` and its options."""
    p = sub.add_parser(
        "verify-bundle",
        help="check an unpacked bundle (checksums, signature, model) before installing it",
        description="Check an unpacked bundle with the edgemed installed here: every file against SHA256SUMS, no "
        "unlisted file, the signature against a trusted public key, and the bundled profile against its model. "
        "Run it before a bundle's own install.sh when the bundle did not come from you.",
        epilog="example:\n  /opt/edgemed/venv/bin/edgemed verify-bundle NAME.tar.gz && sudo ./NAME/install.sh",
        formatter_class=RAW,
    )
    p.add_argument(
        "folder",
        type=Path,
        help="the bundle: NAME.tar.gz (unpacked here, refusing links, devices and paths outside it) or its folder",
    )
    p.add_argument(
        "--key", type=Path, help="trusted public key (default /etc/edgemed/bundle-signing.pub when it exists)"
    )
    return p


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
    ("screen", "screen.enabled", "--screen"),
    ("screen_port", "screen.port", "--screen-port"),
)
FLAG_NAMES: dict[str, str] = {key: flag for _attr, key, flag in RUN_FLAGS} | {
    "mqtt.url": "--broker",
    "run.print_results": "--quiet",
}


def build_profile(args: argparse.Namespace) -> DeviceProfile:
    """The profile ``edgemed run`` runs with: ``--profile`` (if any) with the flags set over it.

    Args:
        args: the parsed ``edgemed run`` command line.

    Returns:
        The validated profile.

    Raises:
        ConfigError: a bad flag or profile value (the message names the flag or key and the fix), or no source.
        BrokerRefusedError: ``--broker`` is plaintext to another machine for a profile whose broker uses TLS.
    """
    from edgemed.config import load_profile, merge_overrides
    from edgemed.errors import ConfigError

    if args.profile is None and args.device_id is None:
        raise ConfigError("--device-id is required without --profile (e.g. --device-id us-01)")
    profile = load_profile(args.profile) if args.profile is not None else None
    overrides = {key: getattr(args, attr) for attr, key, _flag in RUN_FLAGS}
    overrides["run.print_results"] = False if args.quiet else None
    merged = merge_overrides(profile, overrides, broker=args.broker, names=FLAG_NAMES, origin=args.profile)
    if args.screen_port is not None and not merged.screen.enabled:
        raise ConfigError(
            "--screen-port sets the port of the screen, which is off: add --screen (or screen.enabled: true in the "
            "profile)"
        )
    if merged.source.uri is None:
        # Checked before anything is opened: a run without a source is a usage error (exit 2), not a model one.
        raise ConfigError("no source given: pass --source PATH or set source.uri in the profile")
    return merged
