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

from edgemed import __version__
from edgemed.errors import EXIT_CONFIG, EdgemedError
from edgemed.run_options import EPILOG_RUN, add_run_arguments, build_profile, with_broker

CONVERT_INSTALL = "pip install 'edgemed[convert]'"


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
    from edgemed.errors import ConfigError
    from edgemed.publish.delivery import flush_outbox

    profile = load_profile(args.profile) if args.profile is not None else None
    cfg = profile.mqtt if profile is not None else None
    if args.broker is not None:
        cfg = with_broker(cfg, args.broker)
    if cfg is None:
        where = f"profile {args.profile} has no mqtt section" if profile is not None else "flush needs a broker"
        raise ConfigError(f"{where}: pass --broker mqtt://HOST:PORT or a --profile with an mqtt section")
    data_dir = args.data_dir or (profile.device.data_dir if profile is not None else None)
    if data_dir is None:
        from edgemed.config import default_data_dir

        data_dir = default_data_dir()
    from edgemed.outbox import OUTBOX_FILENAME

    if not (Path(data_dir) / OUTBOX_FILENAME).is_file():
        # A mistyped --data-dir would otherwise "send 0 results" and leave an empty folder behind.
        raise ConfigError(
            f"{data_dir} holds no outbox ({OUTBOX_FILENAME}), so there is nothing to send; pass the data directory "
            "the device runs with (--data-dir, or the profile's device.data_dir)"
        )
    # flush_outbox locks the data directory itself: a running `edgemed run` keeps it (exit 2, with the reason).
    result = flush_outbox(Path(data_dir), cfg, timeout_s=args.timeout, timeout_name="--timeout")
    print(
        f"edgemed: sent {result.sent} results; {result.remaining} results still pending in {data_dir}",
        file=sys.stderr,
    )
    return 0 if result.remaining == 0 else 10


def cmd_doctor(args: argparse.Namespace) -> int:
    """``edgemed doctor``: check interpreter, delegates, source, broker and disk."""
    from edgemed.doctor import doctor

    return doctor(
        profile_path=args.profile, source=args.source, broker=args.broker, data_dir=args.data_dir, model=args.model
    )


def cmd_profile_check(args: argparse.Namespace) -> int:
    """``edgemed profile-check``: validate device profiles, each one, and report every file."""
    from edgemed.config import load_profile

    bad = 0
    for path in args.files:
        try:
            prof = load_profile(path)
        except EdgemedError as exc:
            bad += 1
            print(f"edgemed: error: {exc}", file=sys.stderr)
            continue
        note = "" if prof.validated else "  (not validated on real hardware)"
        print(
            f"ok  {path}: {prof.profile}, accelerator {prof.inference.accelerator}, "
            f"fallback {'allowed' if prof.inference.allow_cpu_fallback else 'refused'}{note}"
        )
    if bad:
        print(f"edgemed: {bad} of {len(args.files)} profiles are invalid", file=sys.stderr)
        return EXIT_CONFIG
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
    unsigned = "" if args.sign_key else " --allow-unsigned"  # unsigned: only a device without a trusted key takes it
    print(
        f"next:   copy it to the device, then: tar xzf {result.path.name} && sudo ./{result.name}/install.sh{unsigned}"
    )
    return 0


def cmd_verify_bundle(args: argparse.Namespace) -> int:
    """``edgemed verify-bundle``: check an unpacked bundle with the code already installed here."""
    from edgemed.bundle import verify_bundle

    meta = verify_bundle(args.folder, args.key)
    model = meta["model"]
    signed = f"signature verified with {meta['signature']}" if meta["signature"] else "not signed-checked (no key)"
    unpacked = f"; unpacked into {meta['unpacked']}" if meta.get("unpacked") else ""
    print(
        f"ok  {meta['name']}: device {meta['device']['id']}, model {model['name']} v{model['version']} "
        f"({model['target']}, gate {model['gate']}); checksums match; {signed}{unpacked}"
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


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_LEVEL_HELP = "log verbosity on stderr (default WARNING); DEBUG also shows the libraries' own notices"


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
    parser.add_argument("--log-level", default="WARNING", choices=LOG_LEVELS, help=LOG_LEVEL_HELP)
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
    add_run_arguments(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "flush",
        help="send results still pending in a data directory",
        description="Send every result still pending in DATA_DIR's outbox, say how many were sent and how many "
        "remain, then exit 0 when nothing is left (10 when some remain after --timeout). Give --broker, --profile "
        "or both.",
        epilog="examples:\n"
        "  edgemed flush --profile firmware_configs/first-run.yaml\n"
        "  edgemed flush --data-dir /var/lib/edgemed --broker mqtts://broker.example.org:8883 --timeout 300",
        formatter_class=raw_fmt,
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        help="the device's data directory (default from the profile, else ~/.local/share/edgemed)",
    )
    p.add_argument("--broker", help="mqtt://HOST:PORT or mqtts://HOST:PORT (overrides the profile's broker)")
    p.add_argument("--profile", type=Path, help="use the profile's broker, TLS, credentials and data directory")
    p.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="longest wait for the broker and its acknowledgements (default %(default)g)",
    )
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
        "on the device:  tar xzf NAME.tar.gz && sudo ./NAME/install.sh  (add --allow-unsigned where the device\n"
        "holds no trusted key; with --sign-key, devices holding its public key verify the bundle)",
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
        epilog="example:\n  /opt/edgemed/venv/bin/edgemed verify-bundle NAME.tar.gz && sudo ./NAME/install.sh",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "folder",
        type=Path,
        help="the bundle: NAME.tar.gz (unpacked here, refusing links, devices and paths outside it) or its folder",
    )
    p.add_argument(
        "--key", type=Path, help="trusted public key (default /etc/edgemed/bundle-signing.pub when it exists)"
    )
    p.set_defaults(func=cmd_verify_bundle)
    for command in sub.choices.values():
        # Also accepted after the command (`edgemed run ... --log-level DEBUG`); SUPPRESS keeps the top-level
        # value when it is not given here.
        command.add_argument("--log-level", default=argparse.SUPPRESS, choices=LOG_LEVELS, help=LOG_LEVEL_HELP)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``edgemed`` console script; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="edgemed: %(levelname)s: %(message)s")
    from edgemed.stderr_filter import quiet_opencv

    quiet_opencv()  # before any command imports OpenCV; --log-level DEBUG keeps its warnings
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
        if not getattr(exc, "reported", False):  # an error already logged (a broker refusal) is shown once
            print(f"edgemed: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("edgemed: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
