"""The ``edgemed`` command. Thin: it parses arguments and calls library functions.

Exit codes (kept stable; documented in the README):
    0  done: the source is exhausted and every result was acknowledged by the broker
    2  usage or configuration error (bad flag, malformed profile, data directory owned by another process)
    3  model or manifest unusable (missing, altered, or rejected by the acceptance gate)
    4  source unusable (missing path, camera or stream that cannot be opened)
    5  the broker refused us (wrong password, unknown CA, plaintext to a remote broker)
    6  the intended accelerator is absent and the profile refuses CPU fallback
    7  the durable outbox cannot be written (disk full, permissions)
    10 finished, but results are still pending on disk (sent by the next run or `edgemed flush`)
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgemed import __version__
from edgemed.errors import EXIT_CONFIG, EdgemedError

CONVERT_INSTALL = "pip install 'edgemed[convert]'"

EPILOG_RUN = """\
examples:
  edgemed run --model out/breast_int8.tflite --source scans/ --broker mqtt://127.0.0.1:1883 --device-id us-01
  edgemed run --profile firmware_configs/x86_64-cpu.yaml --source watch:/var/lib/probe/export
  edgemed run --model m_int8.tflite --source cine.dcm --device-id us-01      (offline: results stay on disk)

sources: a folder of images (natural order: img2 before img10), an image, a video file, a DICOM file or folder,
camera:N, rtsp://..., http(s)://..., watch:DIR (new files as a device writes them).
Command-line flags override the profile. Results go to edgemed/{site}/{device_id}/results (QoS 1) and to
DATA_DIR/results.jsonl; nothing that identifies a patient (file names, study ids, images) is published.
exit codes: 0 all delivered, 2 usage/config, 3 model, 4 source, 5 broker refused, 6 accelerator refused,
7 outbox unwritable, 10 finished with results still pending on disk."""


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
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


def _set(raw: dict[str, Any], section: str, key: str, value: Any) -> None:
    if value is not None:
        raw.setdefault(section, {})[key] = value


def build_profile(args: argparse.Namespace) -> Any:
    """Merge ``--profile`` (if any) with command-line overrides into a validated DeviceProfile."""
    from edgemed.config import load_profile, parse_profile

    if args.profile is not None:
        raw: dict[str, Any] = load_profile(args.profile).model_dump(exclude_unset=True, mode="json")
        origin = args.profile
    else:
        raw = {"profile": "command-line"}
        origin = Path("<command line>")
        if args.device_id is None:
            from edgemed.errors import ConfigError

            raise ConfigError("--device-id is required without --profile (e.g. --device-id us-01)")
    _set(raw, "device", "id", args.device_id)
    _set(raw, "device", "site", args.site)
    _set(raw, "device", "data_dir", str(args.data_dir.resolve()) if args.data_dir else None)
    _set(raw, "model", "path", str(args.model.resolve()) if args.model else None)
    _set(raw, "model", "manifest", str(args.manifest.resolve()) if args.manifest else None)
    _set(raw, "source", "uri", args.source)
    _set(raw, "source", "fps_cap", args.fps_cap)
    _set(raw, "source", "loop", args.loop)
    _set(raw, "inference", "accelerator", args.accelerator)
    _set(raw, "inference", "allow_cpu_fallback", args.fallback)
    _set(raw, "inference", "threads", args.threads)
    _set(raw, "run", "max_frames", args.max_frames)
    _set(raw, "run", "drain_timeout_s", args.drain_timeout)
    _set(raw, "health", "interval_s", args.health_interval)
    if args.quiet:
        _set(raw, "run", "print_results", False)
    if args.broker is not None:
        _set(raw, "mqtt", "url", args.broker)
    password_file = str(args.password_file.resolve()) if args.password_file else None
    mqtt_overrides = (
        ("username", args.username),
        ("protocol", args.mqtt_protocol),
        ("password_env", args.password_env),
        ("password_file", password_file),
    )
    for key, value in mqtt_overrides:
        if value is not None:
            _set(raw, "mqtt", key, value)
    if args.ca_file is not None:
        raw.setdefault("mqtt", {}).setdefault("tls", {})["ca_file"] = str(args.ca_file.resolve())
    return parse_profile(raw, origin)


def cmd_run(args: argparse.Namespace) -> int:
    """``edgemed run``: process a source and publish the results."""
    from edgemed.runtime import Device, install_signal_handlers

    profile = build_profile(args)
    import cv2

    # The pipeline already keeps both cores busy (capture thread, inference, delivery): OpenCV's own thread
    # pool on top only adds contention. Measured on the cine benchmark: 3-15% more frames per second with one.
    cv2.setNumThreads(1)
    with Device(profile, study_id=args.study_id) as device:
        install_signal_handlers(device)
        summary = device.run(from_start=args.from_start)
    levels = ", ".join(f"{k} {v}" for k, v in sorted(summary.levels.items())) or "none"
    print(f"edgemed: {summary.frames} frames ({levels}); pending {summary.pending}", file=sys.stderr)
    for study in summary.studies:
        print(f"edgemed: study decision: {study.level.upper()}: {study.reason}", file=sys.stderr)
    if summary.pending:
        print(
            f"edgemed: {summary.pending} results are still pending in {device.data_dir}; they are sent on the "
            "next run or with `edgemed flush`",
            file=sys.stderr,
        )
    return summary.exit_code


def cmd_flush(args: argparse.Namespace) -> int:
    """``edgemed flush``: send what is pending in a data directory's outbox."""
    from edgemed.config import load_profile
    from edgemed.publish.config import MqttConfig
    from edgemed.publish.delivery import flush

    if args.profile is not None:
        profile = load_profile(args.profile)
        if profile.mqtt is None:
            from edgemed.errors import ConfigError

            raise ConfigError(f"profile {args.profile} has no mqtt section; pass --broker URL")
        cfg = profile.mqtt if args.broker is None else profile.mqtt.model_copy(update={"url": args.broker})
        data_dir = args.data_dir or profile.device.data_dir
    else:
        cfg = MqttConfig(url=args.broker)
        data_dir = args.data_dir
    if data_dir is None:
        from edgemed.config import default_data_dir

        data_dir = default_data_dir()
    remaining = flush(Path(data_dir), cfg, timeout_s=args.timeout)  # locks the data directory itself
    print(f"edgemed: {remaining} results still pending", file=sys.stderr)
    return 0 if remaining == 0 else 10


def cmd_doctor(args: argparse.Namespace) -> int:
    """``edgemed doctor``: check interpreter, delegates, source, broker and disk."""
    from edgemed.doctor import doctor

    return doctor(
        profile_path=args.profile, source=args.source, broker=args.broker, data_dir=args.data_dir, model=args.model
    )


def cmd_profile_check(args: argparse.Namespace) -> int:
    """``edgemed profile-check``: validate device profiles."""
    from edgemed.config import load_profile

    for path in args.files:
        prof = load_profile(path)
        note = "" if prof.validated else "  (not validated on real hardware)"
        print(
            f"ok  {path}: {prof.profile}, accelerator {prof.inference.accelerator}, "
            f"fallback {'allowed' if prof.inference.allow_cpu_fallback else 'refused'}{note}"
        )
    return 0


def cmd_bundle(args: argparse.Namespace) -> int:
    """``edgemed bundle``: check a profile and its model, write one archive to copy onto a device."""
    from edgemed.bundle import build_bundle

    result = build_bundle(
        args.profile,
        args.out,
        model=args.model,
        device_id=args.device_id,
        site=args.site,
        wheels=args.wheels,
        install_prefix=args.prefix,
        sign_key=args.sign_key,
    )
    for warning in result.warnings:
        print(f"edgemed: warning: {warning}", file=sys.stderr)
    print(f"bundle  {result.path}  ({len(result.files)} files)")
    print(f"next:   copy it to the device, then: tar xzf {result.path.name} && sudo ./{result.name}/install.sh")
    return 0


def cmd_verify_bundle(args: argparse.Namespace) -> int:
    """``edgemed verify-bundle``: check an unpacked bundle with the code already installed here."""
    from edgemed.bundle import verify_bundle

    meta = verify_bundle(args.folder, args.key)
    model = meta["model"]
    signed = f"signature verified with {meta['signature']}" if meta["signature"] else "not signed-checked (no key)"
    print(
        f"ok  {meta['name']}: device {meta['device']['id']}, model {model['name']} v{model['version']} "
        f"({model['target']}, gate {model['gate']}); checksums match; {signed}"
    )
    return 0


def _converter_command(name: str) -> int:
    try:
        spec = importlib.util.find_spec("tensorflow")
    except (ImportError, ValueError):  # a broken or blocked installation counts as absent
        spec = None
    if spec is None:
        print(
            f"edgemed {name} needs TensorFlow, which is not installed. Install it with:\n  {CONVERT_INSTALL}",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    return -1


def _command_of(argv: Sequence[str]) -> str | None:
    """The sub-command named on a command line, skipping top-level options and their values."""
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--log-level":
            skip = True
        elif not arg.startswith("-"):
            return arg
    return None


def make_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The full argument parser (the converter's options are defined by ``converters.commands``)."""
    parser = argparse.ArgumentParser(
        prog="edgemed",
        description="Take a trained medical-imaging CNN to a point-of-care device and bring its results home.",
        epilog="workflow: edgemed train -> edgemed convert -> edgemed run (on the device) -> dashboard.\n"
        "Run `edgemed COMMAND --help` for each command's options and examples.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"edgemed {__version__}")
    parser.add_argument(
        "--log-level",
        default="WARNING",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log verbosity on stderr (default WARNING)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    raw_fmt = argparse.RawDescriptionHelpFormatter

    # The converter's options live in converters.commands (argparse only, no TensorFlow), imported only when
    # the command line names train or convert: the device path never imports the converters package.
    wants_converter = _command_of(argv or []) in ("train", "convert")
    for name, helptext in (
        ("train", "train a model on your images (host; needs the convert extra)"),
        ("convert", "quantize a trained model for the device (host; needs the convert extra)"),
    ):
        if wants_converter:
            from converters import commands as conv

            p = sub.add_parser(
                name,
                help=helptext,
                formatter_class=raw_fmt,
                description=getattr(conv, f"{name.upper()}_DESCRIPTION", helptext),
                epilog=getattr(conv, f"{name.upper()}_EPILOG", None),
            )
            getattr(conv, f"add_{name}_arguments")(p)
        else:
            p = sub.add_parser(name, help=helptext)
        p.set_defaults(func=None, converter=name)

    p = sub.add_parser(
        "run",
        help="run the device pipeline on a source and publish results",
        description="Capture frames, check their quality, classify them on the device, triage "
        "them, and deliver every result durably over MQTT.",
        epilog=EPILOG_RUN,
        formatter_class=raw_fmt,
    )
    _add_run_arguments(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "flush",
        help="send results still pending in a data directory",
        description="Send every result still pending in DATA_DIR's outbox, then exit 0 when "
        "nothing is left (10 when some remain after --timeout).",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        help="the device's data directory (default from the profile, else ~/.local/share/edgemed)",
    )
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--broker", help="mqtt://HOST:PORT or mqtts://HOST:PORT")
    target.add_argument("--profile", type=Path, help="use the profile's broker, TLS and credentials")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for acknowledgements")
    p.set_defaults(func=cmd_flush)

    p = sub.add_parser(
        "doctor",
        help="check interpreter, accelerators, model, source, broker and disk",
        description="Print a table of what this device can and cannot do, with the fix for each "
        "problem. Exit 0 when everything the profile needs works.",
        epilog="examples:\n"
        "  edgemed doctor --profile firmware_configs/rpi4-coral-usb.yaml\n"
        "  edgemed doctor --model out/breast_int8.tflite --source camera:0 --broker mqtt://127.0.0.1:1883",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--profile", type=Path, help="check what this profile needs")
    p.add_argument(
        "--model",
        type=Path,
        help="check this model (manifest, sha256, gate verdict, one timed invoke on the profile's accelerator); "
        "default the profile's model.path",
    )
    p.add_argument("--source", help="also try to read one frame from this source")
    p.add_argument("--broker", help="also try to connect to this broker")
    p.add_argument("--data-dir", type=Path, help="data directory to check for space and permissions")
    p.set_defaults(func=cmd_doctor)

    helptext = "central side: ingest results from the broker and serve the fleet dashboard"
    if _command_of(argv or []) == "dashboard":
        from edgemed import dashboard  # the device path never imports the dashboard

        p = sub.add_parser("dashboard", help=helptext, description=dashboard.__doc__, formatter_class=raw_fmt)
        dashboard.add_arguments(p)
        p.set_defaults(func=dashboard.run)
    else:
        sub.add_parser("dashboard", help=helptext)

    p = sub.add_parser(
        "profile-check",
        help="validate device profile files",
        description="Validate device profiles; every problem names the field and the fix.",
    )
    p.add_argument("files", nargs="+", type=Path, help="profile YAML files")
    p.set_defaults(func=cmd_profile_check)

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
        "on the device:  tar xzf NAME.tar.gz && sudo ./NAME/install.sh",
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    p.set_defaults(func=cmd_bundle)

    p = sub.add_parser(
        "verify-bundle",
        help="check an unpacked bundle (checksums, signature, model) before installing it",
        description="Check an unpacked bundle with the edgemed installed here: every file against SHA256SUMS, no "
        "unlisted file, the signature against a trusted public key, and the bundled profile against its model. "
        "Run it before a bundle's own install.sh when the bundle did not come from you.",
        epilog="example:\n  tar xzf NAME.tar.gz && /opt/edgemed/venv/bin/edgemed verify-bundle NAME "
        "&& sudo ./NAME/install.sh",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("folder", type=Path, help="the unpacked bundle folder")
    p.add_argument(
        "--key", type=Path, help="trusted public key (default /etc/edgemed/bundle-signing.pub when it exists)"
    )
    p.set_defaults(func=cmd_verify_bundle)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``edgemed`` console script; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="edgemed: %(levelname)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return EXIT_CONFIG
    try:
        if getattr(args, "converter", None):
            code = _converter_command(args.converter)
            if code >= 0:
                return code
            from converters import commands as conv

            runner = conv.run_train if args.converter == "train" else conv.run_convert
            return int(runner(args))
        return int(args.func(args))
    except EdgemedError as exc:
        print(f"edgemed: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("edgemed: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
