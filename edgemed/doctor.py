"""``edgemed doctor``: one table that tells a field engineer what works on this device and how to fix what does not."""

from __future__ import annotations

import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgemed import __version__
from edgemed.errors import EdgemedError

if TYPE_CHECKING:
    from edgemed.config import DeviceProfile
    from edgemed.ood import OodDetector
    from edgemed.publish.config import MqttConfig


@dataclass(frozen=True)
class Check:
    """One row of the doctor's table."""

    name: str
    ok: bool
    detail: str
    required: bool = True
    used: bool = True  # False: the profile does not use this part (an accelerator it does not ask for)


def _interpreter() -> Check:
    from edgemed.inference import interpreter_module
    from edgemed.inference.probe import runtime_version

    try:
        name, _module = interpreter_module()
    except EdgemedError as exc:
        return Check("interpreter", False, str(exc))
    return Check("interpreter", True, f"{name} {runtime_version(name)}")


def _delegates(profile: DeviceProfile | None) -> list[Check]:
    from edgemed.inference import BackendConfig
    from edgemed.inference.probe import probe_delegates

    cfg = profile.inference if profile is not None else BackendConfig()
    rows = []
    for status in probe_delegates(cfg):
        needed = status.name == cfg.accelerator and not cfg.allow_cpu_fallback
        # With a profile, an accelerator it does not ask for is not a problem: "n/a", not "warn".
        used = profile is None or status.name in (cfg.accelerator, "cpu")
        rows.append(Check(f"delegate {status.name}", status.available, status.detail, required=needed, used=used))
    return rows


def _model(path: Path, profile: DeviceProfile | None, *, from_profile: bool = True) -> Check:
    """Manifest, sha256 and gate verdict, the triage policy's labels, then a timed invoke on the real backend."""
    import statistics

    import numpy as np

    from edgemed.deploy import check_deployable
    from edgemed.inference import BackendConfig

    try:
        # The profile's explicit manifest belongs to the profile's model, not to one given with --model.
        manifest_path = profile.model.manifest if profile is not None and from_profile else None
        checked = check_deployable(path, manifest_path, profile.triage if profile is not None else None)
        manifest, art = checked.manifest, checked.artifact
        backend = checked.open_backend(profile.inference if profile is not None else BackendConfig())
        try:
            from edgemed.inference.classify import Classifier

            # The profile's ood: section against this model, as `edgemed run` builds it: a method the model lacks
            # fails here, not at the first run.
            detector = Classifier(backend, manifest, art, ood=profile.ood if profile is not None else None).ood
            x = np.zeros(backend.input_spec.shape, dtype=backend.input_spec.dtype)
            times = []
            for _ in range(23):
                t0 = time.perf_counter()
                backend.invoke(x)
                times.append((time.perf_counter() - t0) * 1e3)
            invoke_ms = statistics.median(times[3:])  # the first calls allocate and warm caches
            where = backend.delegate + (f" (DEGRADED: {backend.degraded_reason})" if backend.degraded else "")
        finally:
            backend.close()
    except EdgemedError as exc:
        return Check("model", False, str(exc))
    except (RuntimeError, ValueError, OSError) as exc:  # the interpreter or accelerator failed while invoking
        return Check("model", False, f"{path.name} loaded but could not run: {exc}; check the accelerator")
    spec = manifest.input
    verdict = art.verdict + (f" by {art.waiver.by}" if art.waiver is not None else "")
    if art.clinically_weak:
        # The gate proves a faithful conversion, not a good model: say so where the field engineer looks.
        verdict += f" (faithful conversion, clinically weak: {'; '.join(art.clinically_weak)})"
    return Check(
        "model",
        True,
        f"{path.name}: {manifest.name} {manifest.version}, {art.target} {spec.height}x{spec.width} "
        f"{spec.colour_mode}, labels {', '.join(manifest.labels)}; sha256 matches, gate {verdict}; "
        f"invoke {invoke_ms:.2f} ms on {where}; {_ood_words(detector)}",
    )


def _ood_words(detector: OodDetector | None) -> str:
    """The out-of-distribution check the device will run, in a few words."""
    if detector is None:
        return "no out-of-distribution check (the model has no statistics: convert it again)"
    if detector.method == "none":
        return "out-of-distribution check off (profile)"
    return f"out-of-distribution check {detector.method}, threshold {detector.threshold:.4g} ({detector.source})"


def _source(uri: str) -> Check:
    from edgemed.capture import open_source

    try:
        src = open_source(uri)
        if src.kind == "watch":
            # A watched folder yields only files that arrive after it starts: reading a frame would wait for the
            # device to write one. Opening it already checked that the folder exists and can be listed.
            src.close()
            return Check(
                "source", True, f"watch folder {uri.split(':', 1)[1]} is readable; new files are read as they arrive"
            )
        try:
            for frame in src:
                if frame.image is None:
                    return Check("source", False, f"first input unreadable: {frame.error}")
                return Check("source", True, f"{src.kind}: first frame {frame.image.shape}")
            return Check("source", False, "source opened but yielded no frame")
        finally:
            src.close()
    except EdgemedError as exc:
        return Check("source", False, str(exc))


def _source_roi(uri: str, cfg: Any) -> Check:
    """Whether the profile's ``source.roi`` fits the source's first readable frame, as ``edgemed run`` checks it.

    Read with the profile's own capture settings; a live source gets a bounded wait for its first frame and a
    ``watch:`` folder is not read (its first file may not exist yet).
    """
    import threading

    from edgemed.capture import open_source

    if uri.lower().startswith("watch:"):
        return Check("source roi", True, "checked on the first file that arrives (watch: folder)", required=False)
    stop = threading.Event()
    timer = threading.Timer(15.0, stop.set)
    timer.start()
    try:
        src = open_source(uri, cfg, stop=stop)
        try:
            for frame in src:
                if frame.image is not None:
                    x, y, w, h = cfg.roi
                    return Check("source roi", True, f"source.roi x={x} y={y} w={w} h={h} fits the first frame")
            return Check("source roi", False, "no readable frame to check source.roi against", required=False)
        finally:
            src.close()
    except EdgemedError as exc:
        return Check("source roi", False, str(exc))
    finally:
        timer.cancel()


def _broker_override(mqtt_cfg: MqttConfig | None, url: str) -> Check:
    """``--broker``: the profile's settings pointed at it by the rule ``run`` and ``flush`` use, then connect."""
    from edgemed.config import merge_broker

    try:
        cfg = merge_broker(mqtt_cfg, url)
    except EdgemedError as exc:
        return Check("broker", False, str(exc))
    return _broker(cfg)


def _broker(cfg: MqttConfig) -> Check:
    from edgemed.publish.mqtt import MqttLink

    url = cfg.url
    try:
        # No status topic (so no retained status and no last will) and a clean session: the check must leave
        # nothing on the broker. A retained status under edgemed/ made the dashboard list a device "doctor".
        link = MqttLink(cfg, status_topic=None, client_id=f"edgemed-doctor-{os.getpid()}", persistent=False)
        link.start()
        try:
            deadline = time.monotonic() + 5.0
            while not link.connected and time.monotonic() < deadline:
                link.check()
                time.sleep(0.05)
            link.check()
            ok = bool(link.connected)
        finally:
            # Also after a refusal: otherwise the link's thread goes on reconnecting until the process ends.
            link.stop(timeout_s=2.0)
    except EdgemedError as exc:
        return Check("broker", False, str(exc))
    return Check(
        "broker",
        ok,
        f"connected to {url}" if ok else f"no answer from {url} within 5 s (results would queue on disk)",
        required=False,
    )


def _disk(data_dir: Path) -> Check:
    from edgemed.datadir import private_dir

    try:
        # Created the way `edgemed run` creates it (0700): a folder made 0755 here made every later run warn.
        private_dir(data_dir)
        with tempfile.NamedTemporaryFile(dir=data_dir):
            pass
    except OSError as exc:
        return Check("data dir", False, f"{data_dir} not writable ({exc.strerror}); pass --data-dir or fix permissions")
    free_mb = shutil.disk_usage(data_dir).free / 1e6
    return Check(
        "data dir",
        free_mb > 100,
        f"{data_dir}: {free_mb:,.0f} MB free" + ("" if free_mb > 100 else " (under 100 MB: the outbox may fill)"),
    )


def doctor(
    *,
    profile_path: Path | None,
    source: str | None,
    broker: str | None,
    data_dir: Path | None,
    model: Path | None = None,
) -> int:
    """Run every check and print the table.

    Args:
        profile_path: a device profile; its accelerator, model, source, broker and data directory are checked.
        source: a source to read one frame from (instead of the profile's).
        broker: a broker to connect to, by the rule ``edgemed run --broker`` uses over the profile's settings.
        data_dir: the data directory to check (instead of the profile's, else the default).
        model: a model to check (instead of the profile's model.path).

    Returns:
        0 when every required check passes, else 2.
    """
    from edgemed.config import default_data_dir, load_profile
    from edgemed.identity import clock_synced

    rows = [
        Check(
            "edgemed",
            True,
            f"{__version__} on Python {platform.python_version()} ({platform.machine()}, {sys.platform})",
        )
    ]
    profile = None
    if profile_path is not None:
        try:
            profile = load_profile(profile_path)
            rows.append(
                Check(
                    "profile",
                    True,
                    f"{profile.profile}" + ("" if profile.validated else " (not validated on real hardware)"),
                )
            )
        except EdgemedError as exc:
            rows.append(Check("profile", False, str(exc)))
    rows.append(_interpreter())
    rows.extend(_delegates(profile))
    model_path = model or (profile.model.path if profile is not None else None)
    if model_path is not None:
        rows.append(_model(Path(model_path), profile, from_profile=model is None))
    src = source or (profile.source.uri if profile is not None else None)
    if src:
        rows.append(_source(src))
        if profile is not None and profile.source.roi is not None:
            rows.append(_source_roi(src, profile.source))
    mqtt = profile.mqtt if profile is not None else None
    if broker:
        rows.append(_broker_override(mqtt, broker))
    elif mqtt is not None:
        rows.append(_broker(mqtt))
    ddir = data_dir or (profile.device.data_dir if profile is not None else None) or default_data_dir()
    rows.append(_disk(Path(ddir)))
    synced = clock_synced()
    rows.append(
        Check(
            "clock",
            synced is not False,
            {
                True: "synchronised",
                None: "unknown",
                False: "not synchronised: results carry clock_synced=false; enable NTP (timedatectl set-ntp true)",
            }[synced],
            required=False,
        )
    )
    width = max(len(r.name) for r in rows)
    for r in rows:
        mark = "ok  " if r.ok else ("FAIL" if r.required else ("warn" if r.used else "n/a "))
        print(f"{mark}  {r.name:<{width}}  {r.detail}")
    failed = [r for r in rows if r.required and not r.ok]
    return 0 if not failed else 2
