"""The ``edgemed`` command. Thin: it parses arguments and calls library functions.

Exit codes (kept stable; the README's table is the reference):
    0  done: the source is exhausted and every result was acknowledged by the broker (with delivery.consumer:
       receipted by the consumer of record)
    2  usage or configuration error (bad flag, malformed profile, data directory owned by another process,
       convert extra missing)
    3  model or manifest unusable (missing, altered, or rejected by the acceptance gate)
    4  source unusable (missing path, camera or stream that cannot be opened)
    5  the broker refused us (wrong password, unknown CA, missing client certificate, plaintext to a remote broker)
    6  the intended accelerator is absent and the profile refuses CPU fallback
    7  the data directory cannot be written (outbox, results.jsonl or device secret: disk full, permissions), or
       the outbox was found damaged at start (what could be read was recovered)
    10 finished, but results are still on disk (not yet acknowledged, or awaiting the consumer's receipt; sent by
       the next run or `edgemed flush`)
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from edgemed import __version__
from edgemed import cli_options as options
from edgemed.cli_options import LOG_LEVEL_HELP, LOG_LEVELS, build_profile
from edgemed.errors import EXIT_CONFIG, EdgemedError

CONVERT_INSTALL = "pip install 'edgemed[convert]'"


def cmd_run(args: argparse.Namespace) -> int:
    """``edgemed run``: process a source and publish the results."""
    profile = build_profile(args)  # a bad flag, profile or missing source stops here, before anything is opened
    import cv2

    from edgemed.runtime import Device, install_signal_handlers

    # The pipeline already keeps both cores busy (capture thread, inference, delivery): OpenCV's own thread
    # pool on top only adds contention. Measured on the cine benchmark: 3-15% more frames per second with one.
    cv2.setNumThreads(1)
    from edgemed.stderr_filter import RUN_NOTICES, filtered_stderr

    # For the whole run, not around single calls: libjpeg prints its warnings from the capture thread's decoder.
    with filtered_stderr(RUN_NOTICES), Device(profile, study_id=args.study_id) as device:
        install_signal_handlers(device)
        summary = device.run(from_start=args.from_start)
    print(summary.line(), file=sys.stderr)
    for study in summary.studies:
        print(f"edgemed: study decision: {study.level.upper()}: {study.reason}", file=sys.stderr)
    if summary.pending:
        print(
            f"edgemed: {summary.pending} results are still pending in {device.data_dir} ({summary.backlog}); "
            "they are sent on the next run or with `edgemed flush`",
            file=sys.stderr,
        )
    return summary.exit_code


def cmd_flush(args: argparse.Namespace) -> int:
    """``edgemed flush``: send what is pending in a data directory's outbox."""
    from edgemed.config import default_data_dir, load_profile, merge_broker
    from edgemed.errors import ConfigError
    from edgemed.outbox import OUTBOX_FILENAME
    from edgemed.publish.consumer import ConsumerRoute
    from edgemed.publish.delivery import flush_outbox

    profile = load_profile(args.profile) if args.profile is not None else None
    cfg = profile.mqtt if profile is not None else None
    if args.broker is not None:
        cfg = merge_broker(cfg, args.broker)
    if cfg is None:
        where = f"profile {args.profile} has no mqtt section" if profile is not None else "flush needs a broker"
        raise ConfigError(f"{where}: pass --broker mqtt://HOST:PORT or a --profile with an mqtt section")
    data_dir = Path(args.data_dir or (profile.device.data_dir if profile is not None else None) or default_data_dir())
    if not (data_dir / OUTBOX_FILENAME).is_file():
        # A mistyped --data-dir would otherwise "send 0 results" and leave an empty folder behind.
        raise ConfigError(
            f"{data_dir} holds no outbox ({OUTBOX_FILENAME}), so there is nothing to send; pass the data directory "
            "the device runs with (--data-dir, or the profile's device.data_dir)"
        )
    # flush_outbox locks the data directory itself: a running `edgemed run` keeps it (exit 2, with the reason).
    result = flush_outbox(
        data_dir,
        cfg,
        timeout_s=args.timeout,
        timeout_name="--timeout",
        outbox_cfg=profile.outbox if profile is not None else None,
        route=ConsumerRoute(profile.delivery, profile.device.site, profile.device.id) if profile is not None else None,
        batch=profile.publish.batch if profile is not None else None,
    )
    left = f" ({result.backlog.describe()})" if result.remaining else ""
    print(
        f"edgemed: sent {result.sent} results; {result.remaining} results still pending in {data_dir}{left}",
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
    """The full argument parser: each command's options from ``cli_options``, and its handler here.

    Args:
        argv: the command line; the options of train, convert and dashboard are loaded only when it names them.

    Returns:
        The parser.
    """
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
    named = _command_of(argv or [])
    options.add_converter_commands(sub, load=named in ("train", "convert"))
    options.add_run(sub).set_defaults(func=cmd_run)
    options.add_flush(sub).set_defaults(func=cmd_flush)
    options.add_doctor(sub).set_defaults(func=cmd_doctor)
    options.add_dashboard(sub, load=named == "dashboard")
    options.add_profile_check(sub).set_defaults(func=cmd_profile_check)
    options.add_bundle(sub).set_defaults(func=cmd_bundle)
    options.add_verify_bundle(sub).set_defaults(func=cmd_verify_bundle)
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
