"""The device pipeline: capture -> quality -> preprocess -> inference -> triage -> outbox -> publish.

This is the one place that wires the parts together. The inference thread never waits for the network: a result
is committed to the durable outbox and the delivery thread publishes it. Frames are read and decoded by a capture
thread (the image decoders release the GIL), so decoding the next frame overlaps quality gate, inference, triage
and outbox on this one.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any, TypeVar

import numpy as np

from edgemed.capture import FrameSource, open_source
from edgemed.config import DeviceProfile, default_data_dir
from edgemed.datadir import open_private
from edgemed.envelope import EnvelopeContext, build_result, build_study, encode, new_result_id
from edgemed.errors import EXIT_OK, EXIT_OUTBOX, EXIT_PENDING, ModelError, OutboxError
from edgemed.health import HealthMonitor
from edgemed.identity import check_id, clock_synced, load_or_create_secret, pseudonym
from edgemed.inference import Backend, make_backend
from edgemed.inference.probe import runtime_version
from edgemed.lock import DataDirLock
from edgemed.manifest import Artifact, Manifest, verify_model
from edgemed.outbox import Outbox
from edgemed.preprocess import Preprocessor, probabilities, to_colour_mode
from edgemed.quality import check_quality
from edgemed.sessions import ClosedStudy, StudyTracker
from edgemed.triage import triage, triage_error, triage_recapture, validate_policy
from edgemed.types import Frame, InputDone, Prediction, QualityReport, TriageResult

log = logging.getLogger("edgemed.runtime")

T = TypeVar("T")
_END = object()


@dataclass
class RunSummary:
    """What a run did, for the exit code and the closing line."""

    frames: int = 0
    errors: int = 0
    recaptures: int = 0
    pending: int = 0
    levels: dict[str, int] = field(default_factory=dict)
    studies: list[TriageResult] = field(default_factory=list)
    stopped_by_signal: bool = False
    #: the outbox was found damaged at start: what was recovered and what was not (the run went on)
    outbox_damage: str | None = None

    @property
    def exit_code(self) -> int:
        """0 when every result was acknowledged, 10 when some are still pending on disk, 7 when the outbox was
        found damaged at start (whatever could be read was recovered and sent; the rest may be lost)."""
        if self.outbox_damage is not None:
            return EXIT_OUTBOX
        return EXIT_OK if self.pending == 0 else EXIT_PENDING


def prefetch(items: Iterable[T], stop: threading.Event, depth: int = 4) -> Generator[T, None, None]:
    """Iterate ``items`` on a background thread, ``depth`` items ahead; exceptions re-raise in the consumer.

    Closing the generator (or leaving it by an exception, once it is closed) stops the thread and joins it: a
    capture thread still inside a decoder when the process exits can abort it from C++ ("terminate called
    without an active exception", seen once when a refused broker ended a run mid-frame).
    """
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    done = threading.Event()

    def put(item: Any) -> bool:
        while not (stop.is_set() or done.is_set()):
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer thread, which re-raises it
            put(exc)
            return
        put(_END)

    thread = threading.Thread(target=produce, name="edgemed-capture", daemon=True)
    thread.start()
    try:
        while True:
            try:
                item = q.get(timeout=0.1)
            except queue.Empty:
                if not thread.is_alive() and q.empty():
                    return  # stopped: the producer gave up putting
                continue
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        done.set()
        # Longer than a source's own open and read timeouts (10 s by default), which bound how long the thread can
        # be inside a decoder or a stream open after it was told to stop.
        thread.join(timeout=30.0)
        if thread.is_alive():
            log.warning("the capture thread did not stop within 30 s; the source may be hung")


class Classifier:
    """Backend plus the manifest's pre- and post-processing: uint8 frame in, class probabilities out."""

    def __init__(self, backend: Backend, manifest: Manifest, artifact: Artifact) -> None:
        self.backend = backend
        self.labels = tuple(manifest.labels)
        self.preprocess = Preprocessor(manifest.input, backend.input_spec)
        self.gray = manifest.input.colour_mode == "gray"
        self._logits = artifact.output_kind == "logits"
        expected = (1, manifest.input.height, manifest.input.width, manifest.input.channels)
        if tuple(backend.input_spec.shape) != expected:
            raise ModelError(
                f"model input {backend.input_spec.shape} does not match its manifest {expected}; "
                "re-run `edgemed convert` so model and manifest come from the same conversion"
            )
        if backend.output_spec.shape[-1] != len(self.labels):
            raise ModelError(
                f"model has {backend.output_spec.shape[-1]} outputs but the manifest lists "
                f"{len(self.labels)} labels; re-run `edgemed convert`"
            )

    def scores(self, raw: np.ndarray) -> Prediction:
        """Dequantize the raw output (and apply softmax when the model emits logits)."""
        return Prediction(self.labels, probabilities(raw, self.backend.output_spec, logits=self._logits))


class Device:
    """A configured device, ready to process a source. Use as a context manager."""

    def __init__(self, profile: DeviceProfile, *, study_id: str | None = None, out: IO[str] | None = None) -> None:
        self.profile = profile
        self.study_id = study_id
        self.out = out if out is not None else sys.stdout
        self.device_id = check_id("device id", profile.device.id)
        self.site = check_id("site", profile.device.site)
        self.data_dir = Path(profile.device.data_dir or default_data_dir())
        self.topic_base = f"edgemed/{self.site}/{self.device_id}"
        self.stop = threading.Event()
        self.health = HealthMonitor()
        self._closers: list[Any] = []
        self.link: Any = None
        self.delivery: Any = None
        self._source: FrameSource | None = None
        self._clock: tuple[float, bool | None] = (0.0, None)
        self._studies = StudyTracker(profile.triage, study_id)
        self.studies: list[TriageResult] = []
        self._print_names = shows_names(profile.privacy.print_source_names, self.out)
        self._ledger_key: str | None = None
        self._pseudonyms: dict[str, str] = {}
        self._ended_by: BaseException | None = None  # what ended the run, when it was not a clean end

    # -- set-up -----------------------------------------------------------------------------------------------
    def __enter__(self) -> Device:
        lock = DataDirLock(self.data_dir)  # creates the data directory, 0700
        lock.__enter__()
        self._closers.append(lambda: lock.__exit__(None, None, None))
        try:
            self._load_model()
            self.secret = load_or_create_secret(self.data_dir)
            self.outbox = Outbox(self.data_dir / "outbox.sqlite3", self.profile.outbox)
            self._closers.append(self.outbox.close)
            self._jsonl = self._open_jsonl()
            self._start_delivery()
        except BaseException as exc:
            self._ended_by = exc
            self.close()
            raise
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        self._ended_by = exc
        self.close()

    def _load_model(self) -> None:
        if self.profile.model.path is None:
            raise ModelError("no model given: pass --model FILE.tflite or set model.path in the profile")
        model_path = Path(self.profile.model.path)
        self.manifest, self.artifact = verify_model(model_path, self.profile.model.manifest)
        fallback = None
        if self.artifact.twin:
            twin = model_path.parent / Path(self.artifact.twin).name
            verify_model(twin, self.profile.model.manifest)
            fallback = twin
        validate_policy(self.profile.triage, list(self.manifest.labels))
        self.backend = make_backend(model_path, self.profile.inference, fallback_model=fallback, manifest=self.manifest)
        self._closers.append(self.backend.close)
        self.classifier = Classifier(self.backend, self.manifest, self.artifact)
        self.ctx = EnvelopeContext(
            device_id=self.device_id,
            site=self.site,
            model={
                "name": self.manifest.name,
                "version": self.manifest.version,
                "sha256": self.artifact.sha256,
                "target": self.artifact.target,
            },
            preprocess_sha256=self.manifest.preprocess_sha256(),
            backend=self.backend.backend,
            delegate=self.backend.delegate,
            degraded=self.backend.degraded,
            publish_source_names=self.profile.privacy.publish_source_names,
            backend_version=runtime_version(self.backend.backend),
        )
        # A fallback was logged once by make_backend; it is stamped on every result and heartbeat.

    def _open_jsonl(self) -> IO[str] | None:
        if not self.profile.run.results_jsonl:
            return None
        path = self.data_dir / "results.jsonl"
        try:
            fd = open_private(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        except OSError as exc:
            raise OutboxError(f"cannot open {path}: {exc.strerror}; free disk space or fix its permissions") from exc
        fh = os.fdopen(fd, "a", encoding="utf-8")
        self._closers.append(fh.close)
        return fh

    def _local_copy(self, payload: bytes | None) -> None:
        """Append one envelope to results.jsonl (``None``: flush what is buffered).

        Raises:
            OutboxError: the disk refused the write (full, read-only): exit 7 as for the outbox on the same disk.
        """
        if self._jsonl is None:
            return
        try:
            if payload is None:
                self._jsonl.flush()
            else:
                self._jsonl.write(payload.decode("utf-8") + "\n")
        except OSError as exc:
            raise OutboxError(
                f"cannot write {self.data_dir / 'results.jsonl'}: {exc.strerror}; free disk space in the data "
                "directory (the results themselves are in the outbox)"
            ) from exc

    def _start_delivery(self) -> None:
        if self.profile.mqtt is None:
            log.warning(
                "no broker configured: working offline; results stay in %s until `edgemed flush`",
                self.data_dir / "outbox.sqlite3",
            )
            return
        from edgemed.publish.delivery import Delivery
        from edgemed.publish.mqtt import MqttLink

        self.link = MqttLink(
            self.profile.mqtt,
            status_topic=f"{self.topic_base}/status",
            client_id=self.profile.mqtt.client_id or f"edgemed-{self.site}-{self.device_id}",
            status_extra=self._status_extra(),
        )
        self.link.start()
        self._closers.append(self._stop_link)
        self.delivery = Delivery(self.outbox, self.link)
        self.delivery.start()
        self._closers.append(self.delivery.stop)
        self._heartbeat = threading.Thread(target=self._heartbeat_loop, name="edgemed-health", daemon=True)
        self._heartbeat.start()

    def _stop_link(self) -> None:
        # The offline status says whether the run ended cleanly and how many results it left on disk, so that the
        # dashboard does not show "stopped" and no backlog after a crash. Only the exception's class is
        # published: its message may name a file.
        try:
            extra = {"pending": self.outbox.pending_count()}
        except Exception:  # the outbox is what failed (disk full, damaged file): say the rest anyway
            log.warning("could not count the pending results for the offline status", exc_info=True)
            extra = {}
        ended = self._ended_by
        self.link.stop(timeout_s=5.0, abnormal=type(ended).__name__ if ended is not None else None, extra=extra)

    def _status_extra(self) -> dict[str, Any]:
        from edgemed import __version__

        return {
            "device_id": self.device_id,
            "site": self.site,
            "delegate": self.backend.delegate,
            "degraded": self.backend.degraded,
            "model": self.ctx.model["name"],
            "model_sha256": self.artifact.sha256,
            "edgemed": __version__,
        }

    # -- health -----------------------------------------------------------------------------------------------
    def health_payload(self) -> dict[str, Any]:
        """The current heartbeat: counters, latency, delegate, pending results, disk and temperature."""
        return self.health.snapshot(
            data_dir=self.data_dir,
            device_id=self.device_id,
            site=self.site,
            delegate=self.backend.delegate,
            degraded=self.backend.degraded,
            degraded_reason=self.backend.degraded_reason,
            pending=self.outbox.pending_count(),
            oldest_pending_s=self.outbox.oldest_pending_s(),
            outbox_full=self.outbox.is_full(),
            source_state=self._source.state if self._source is not None else "idle",
            connected=bool(self.link is not None and self.link.connected),
        )

    def _heartbeat_loop(self) -> None:
        interval = self.profile.health.interval_s
        # A first heartbeat as soon as the link is up, not one interval later: the dashboard then knows the
        # backlog of a run that ends (or is killed) before its first interval.
        if self.link.wait_connected(min(interval, 10.0)) and not self.stop.is_set():
            self.publish_health()
        while not self.stop.wait(interval):
            self.publish_health()

    def publish_health(self) -> None:
        """Publish one heartbeat now (not retained; QoS 0: a missed heartbeat is replaced by the next)."""
        if self.link is None:
            return
        payload = json.dumps(self.health_payload(), separators=(",", ":")).encode()
        self.link.publish(f"{self.topic_base}/health", payload, qos=0, retain=False, on_ack=None)

    # -- the loop ---------------------------------------------------------------------------------------------
    def _clock_synced(self) -> bool | None:
        checked, value = self._clock
        now = time.monotonic()
        if now - checked > 60.0:
            value = clock_synced()
            self._clock = (now, value)
        return value

    def _session_id(self, study: str | None) -> str | None:
        # Every frame of a cine carries the same study id: compute its HMAC once, not once per frame.
        if not study:
            return None
        if study not in self._pseudonyms:
            if len(self._pseudonyms) > 1024:
                self._pseudonyms.clear()
            self._pseudonyms[study] = pseudonym(self.secret, study)
        return self._pseudonyms[study]

    @staticmethod
    def _captured(source: FrameSource) -> Iterator[tuple[Frame, float]]:
        # Runs on the capture thread (see prefetch), so the capture time is the time the source took to read and
        # decode the frame, not the time this thread waited for it. The quality gate and preprocessing stay on
        # the inference thread: with them on the capture thread the cine benchmark ran 13% slower (the capture
        # thread became the bottleneck).
        frames = iter(source)
        while True:
            t0 = time.perf_counter()
            frame = next(frames, None)
            if frame is None:
                return
            yield frame, (time.perf_counter() - t0) * 1e3

    def process(self, frame: Frame, capture_ms: float = 0.0) -> dict[str, Any]:
        """Turn one frame into a committed result envelope (durable once this returns and the batch commits)."""
        lat: dict[str, float] = {"capture": capture_ms, "quality": 0.0}
        quality: QualityReport | None = None
        prediction: Prediction | None = None
        if frame.image is None:
            msg = frame.error or "input could not be read"
            if frame.name:  # the local name can carry patient identifiers: never publish it
                msg = msg.replace(frame.name, "input")
            result = triage_error(msg)
        else:
            t0 = time.perf_counter()
            image = frame.image
            if self.classifier.gray and image.ndim == 3:
                # Once for both: the gate measures a gray frame exactly as it measures the RGB one it came from.
                image = to_colour_mode(image, "gray")
            quality = check_quality(image, self.profile.quality) if self.profile.quality.enabled else None
            t1 = time.perf_counter()
            lat["quality"] = (t1 - t0) * 1e3
            if quality is not None and not quality.passed:
                result = triage_recapture(quality)
            else:
                x = self.classifier.preprocess(image)
                t2 = time.perf_counter()
                raw = self.backend.invoke(x)
                t3 = time.perf_counter()
                prediction = self.classifier.scores(raw)
                result = triage(prediction, self.profile.triage)
                lat["preprocess"] = (t2 - t1) * 1e3
                lat["inference"] = (t3 - t2) * 1e3
                lat["triage"] = (time.perf_counter() - t3) * 1e3
        lat.setdefault("preprocess", 0.0)
        lat.setdefault("inference", 0.0)
        closed = self._studies.before(frame)
        if closed is not None:
            self._emit_study(closed)  # a new study began within the source (e.g. the next DICOM in a folder)
        study = self._studies.study_of(frame)
        lat["total"] = sum(lat.values())
        env = build_result(
            self.ctx,
            frame=frame,
            seq=self.outbox.next_seq(),
            created_at=time.time(),
            clock_synced=self._clock_synced(),
            session_id=self._session_id(study),
            quality=quality,
            prediction=prediction,
            triage=result,
            latency_ms=lat,
            result_id=new_result_id(),
        )
        payload = encode(env)
        # Published once committed: the outbox wakes the delivery thread on each commit.
        done = None
        if self._ledger_key is not None and frame.input is not None:
            ref = frame.input
            row = InputDone(ref.path, ref.size, ref.mtime_ns, ref.sha256, frame.input_frame + 1, ref.frames_total)
            done = (self._ledger_key, row)
        self.outbox.put(env["result_id"], f"{self.topic_base}/results", payload, seq=env["seq"], done=done)
        self._local_copy(payload)
        self.health.record(lat["total"], result.level)
        self._studies.add(frame, env["seq"], result, prediction)
        return env

    def _emit_study(self, closed: ClosedStudy) -> None:
        """Commit the decision over a study's frames to the outbox.

        It takes the next ``seq`` of the one counter that also numbers frame results, so a consumer of all
        topics sees every number once and a gap means a lost message (see the README's envelope section).
        """
        self.studies.append(closed.decision)
        env = build_study(
            self.ctx,
            seq=self.outbox.next_seq(),
            created_at=time.time(),
            clock_synced=self._clock_synced(),
            session_id=self._session_id(closed.study),
            source_kind=self._source.kind if self._source is not None else "folder",
            first_seq=closed.first_seq,
            last_seq=closed.last_seq,
            decision=closed.decision,
        )
        self.outbox.put(env["result_id"], f"{self.topic_base}/studies", encode(env), seq=env["seq"])

    def _print(self, frame: Frame, env: dict[str, Any]) -> None:
        tri = env["triage"]
        pred = env["prediction"]
        what = f"{pred['label']} ({pred['probabilities'][pred['label']]:.0%})" if pred else "-"
        name = f" {frame.name}" if frame.name and self._print_names else ""
        self.out.write(f"#{frame.index:<5}{name}  {what}  -> {tri['level'].upper()}: {tri['reason']}\n")

    def run(
        self, source_uri: str | None = None, *, max_frames: int | None = None, from_start: bool = False
    ) -> RunSummary:
        """Process every frame of the source, then wait (bounded) for the broker to acknowledge the results.

        Args:
            source_uri: overrides the profile's ``source.uri``.
            max_frames: stop after this many frames (overrides ``run.max_frames``).
            from_start: process a file source again from its start even when its last run on this data
                directory was interrupted (``--from-start``); for ``watch:``, read every file in the folder again.
        """
        uri = source_uri or self.profile.source.uri
        if uri is None:
            raise ModelError("no source given: pass --source PATH or set source.uri in the profile")
        max_frames = max_frames or self.profile.run.max_frames
        summary = RunSummary()
        self._source = open_source(uri, self.profile.source, stop=self.stop)
        self._closers.append(self._source.close)
        self._ledger_key = self._attach_ledger(self._source, from_start=from_start)
        frames = prefetch(self._captured(self._source), self.stop)
        exhausted = False
        try:
            for frame, capture_ms in frames:
                if self.link is not None:
                    self.link.check()
                    self.delivery.check()
                self._wait_for_room()
                if self.stop.is_set():
                    break
                env = self.process(frame, capture_ms)
                level = env["triage"]["level"]
                summary.frames += 1
                summary.levels[level] = summary.levels.get(level, 0) + 1
                if self.profile.run.print_results:
                    self._print(frame, env)
                if max_frames is not None and summary.frames >= max_frames:
                    break
            else:
                exhausted = True
            if exhausted and self._ledger_key is not None and self._source.state == "ended":
                # Committed with the last results: the next run processes this source again from its start.
                self.outbox.end_source(self._ledger_key)
            # Only frames of one study form a study (edgemed/sessions.py): a folder of unrelated images gets none.
            closed = self._studies.close()
            if closed is not None:
                self._emit_study(closed)
        finally:
            self.stop.set()
            frames.close()  # joins the capture thread before anything is torn down
            self.outbox.flush()
            self._local_copy(None)
        summary.errors = summary.levels.get("error", 0)
        summary.recaptures = summary.levels.get("recapture", 0)
        summary.studies = list(self.studies)
        summary.pending = self._drain()
        if self.outbox.recovery is not None:
            summary.outbox_damage = self.outbox.recovery.describe()
            log.error("%s", summary.outbox_damage)  # said at start too; repeated where the run's outcome is read
        return summary

    def _attach_ledger(self, source: FrameSource, *, from_start: bool) -> str | None:
        """Tell a file source what the ledger of processed inputs knows (see edgemed/ledger.py); returns its key.

        A folder or file resumes only after an interrupted pass; ``watch:`` always takes up where it stopped. A
        looped run (``--loop``) keeps no ledger and leaves none behind to resume from.
        """
        key = source.ledger_key
        if not source.keeps_ledger or key is None:
            return None
        if self.profile.source.loop > 1:
            self.outbox.forget_source(key)
            return None
        watch = source.kind == "watch"
        state, rows = self.outbox.source_ledger(key)
        resume = not from_start and (state == "interrupted" or (watch and state == "complete"))
        changes = source.attach_ledger(rows if resume else {}, history=from_start or state != "new")
        self.outbox.start_source(key, keep=resume, add=changes.add, drop=changes.forget)
        finished = sum(1 for row in rows.values() if row.finished and row.frames_total)
        if resume and not watch and finished:
            # The source is not named: its path may carry a patient's name, and this line reaches the journal.
            log.warning(
                "resuming where the interrupted run on this data directory stopped: %d files that already have "
                "results are skipped (pass --from-start to process them again)",
                finished,
            )
        return key

    def _wait_for_room(self) -> None:
        # The outbox cap is a policy, not a loss: with on_full=block the device stops taking frames and says so
        # on the health topic until the broker has acknowledged enough to make room.
        alerted = 0.0
        while self.outbox.is_full() and not self.stop.is_set():
            if time.monotonic() - alerted > 10.0:
                log.error(
                    "outbox full (%d results pending): not accepting frames until the broker catches up",
                    self.outbox.pending_count(),
                )
                self.publish_health()
                alerted = time.monotonic()
            self.stop.wait(0.5)

    def _drain(self) -> int:
        if self.delivery is None:
            return self.outbox.pending_count()
        # Drain in short slices so that a broker refusal (wrong password, bad certificate) that arrives after the
        # last frame still ends the run with exit 5 instead of waiting out the whole timeout.
        timeout_s = self.profile.run.drain_timeout_s
        deadline = time.monotonic() + timeout_s
        pending = self.outbox.pending_count()
        if pending and timeout_s > 0 and not self.link.connected:
            log.warning(
                "%d results pending: waiting up to %g s for the broker (run.drain_timeout_s)", pending, timeout_s
            )
        while True:
            remaining: int = self.delivery.drain(min(0.25, max(0.0, deadline - time.monotonic())))
            self.link.check()
            self.delivery.check()
            if remaining == 0 or time.monotonic() >= deadline:
                break
        self.publish_health()
        return remaining

    def close(self) -> None:
        """Release everything in reverse order of acquisition; safe to call twice."""
        self.stop.set()
        while self._closers:
            closer = self._closers.pop()
            try:
                closer()
            except Exception as exc:
                # One line for the operator (a full disk makes closing results.jsonl fail); the traceback at DEBUG.
                log.error("while shutting down: %s", exc)
                log.debug("shutdown error", exc_info=True)


def shows_names(setting: str, out: IO[str]) -> bool:
    """Whether the printout may show file names (``privacy.print_source_names``).

    ``auto`` shows them only when ``out`` is a terminal, where a person reads them. Under a service manager
    stdout is not a terminal (systemd's is the journal, which keeps it and may forward it), nor is it when piped
    to a file or a log collector: a file name can carry a medical record number, so none is written there unless
    the profile says ``always``.
    """
    if setting != "auto":
        return setting == "always"
    try:
        return bool(out.isatty())
    except (AttributeError, ValueError, OSError):  # a closed or unusual stream: not a terminal
        return False


def install_signal_handlers(device: Device) -> None:
    """SIGTERM/SIGINT stop capture; the run then drains (bounded), publishes offline and exits cleanly."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        log.warning("received %s: stopping capture, draining pending results", signal.Signals(signum).name)
        device.stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
