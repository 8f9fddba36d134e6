"""The device pipeline, wired in one place. One frame goes through:

    capture    edgemed.capture.prefetch         read and decoded on the capture thread, a few frames ahead
    quality    edgemed.quality.check_quality    too blurred, dark or clipped: a ``recapture`` result
    classify   edgemed.inference.classify       preprocess, invoke the backend, dequantize to probabilities
    ood        Classifier.check_ood             does it look like the training images (edgemed.ood)?
    triage     edgemed.triage.triage            the decision for the person at the device (triage_ood: flagged)
    result     edgemed.types.FrameResult        numbered, stamped, pseudonymised; its study tracked (sessions)
    screen     edgemed.screen.feed              with --screen: the class activation map, then the result handed
                                                to the local page (references only: edgemed.screen)
    outbox     edgemed.outbox.Outbox.put        committed to disk before it can be published
    publish    edgemed.publish.delivery         a background thread sends committed results, deletes on PUBACK
                                                (or, with delivery.consumer, on the consumer's receipt)

:meth:`Device.process` is the first six; :meth:`Device.run` loops over a source and drains at the end. The
runtime's thread never waits for the network: back-pressure, the final drain and the heartbeat are in
``edgemed.uplink``, the nurse's line in ``edgemed.printer``, which model may run in ``edgemed.deploy``.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import IO, TYPE_CHECKING, Any

from edgemed.capture import FrameSource, open_source
from edgemed.capture.prefetch import read_ahead
from edgemed.clock import Clock
from edgemed.config import DeviceProfile, default_data_dir
from edgemed.deploy import Deployable, check_deployable
from edgemed.envelope import EnvelopeContext, encode, new_result_id, result_envelope, study_envelope
from edgemed.errors import ConfigError, ModelError
from edgemed.health import HealthMonitor
from edgemed.identity import check_id, load_or_create_secret
from edgemed.inference.classify import Classifier
from edgemed.local_copy import LocalCopy
from edgemed.lock import DataDirLock
from edgemed.outbox import OUTBOX_FILENAME, Outbox
from edgemed.outbox.stream import sequence_stream
from edgemed.preprocess import to_colour_mode
from edgemed.printer import Printer, shows_names
from edgemed.publish.consumer import Backlog, Consumer, effective_outbox_config
from edgemed.publish.publisher import Listening
from edgemed.quality import check_quality
from edgemed.resume import Pass, attach_ledger, input_done
from edgemed.sessions import ClosedStudy, StudyTracker
from edgemed.summary import RunSummary
from edgemed.triage import triage, triage_error, triage_ood, triage_recapture, validate_policy
from edgemed.types import (
    ClassMap,
    Frame,
    FrameResult,
    OodCheck,
    Prediction,
    QualityReport,
    StudyResult,
    TriageResult,
)
from edgemed.uplink import Uplink

if TYPE_CHECKING:
    from edgemed.inference import Backend
    from edgemed.publish.delivery import Delivery
    from edgemed.publish.mqtt import MqttLink
    from edgemed.publish.publisher import Link
    from edgemed.screen.feed import ScreenFeed

log = logging.getLogger("edgemed.runtime")

__all__ = ["Classifier", "Device", "RunSummary", "install_signal_handlers", "shows_names"]


class Device:
    """A configured device, ready to process a source. Use as a context manager.

    Every part it talks to can be handed in instead of built from the profile: a logic test runs a device with
    a fake backend, source and publisher (``tests/device_fakes.py``). What is handed in belongs to the device
    from then on: it closes it, also when the device cannot be made or set up (a locked data directory, a triage
    policy the model does not fit) and when it is closed without a run.

    With ``profile.screen.enabled`` (``edgemed run --screen``) it also serves the nurse's screen (``self.screen``,
    ``edgemed.screen``): started last in set-up, stopped first; it only ever gets references to each result.
    """

    def __init__(
        self,
        profile: DeviceProfile,
        *,
        study_id: str | None = None,
        out: IO[str] | None = None,
        model: Deployable | None = None,
        backend: Backend | None = None,
        source: FrameSource | None = None,
        publisher: Link | None = None,
        clock: Clock | None = None,
    ) -> None:
        """Args:
        profile: the device profile.
        study_id: a study id for every frame of the run (``--study-id``).
        out: where the nurse's lines go (stdout).
        model: the checked model (default: ``check_deployable`` on the profile's model.path).
        backend: the loaded model (default: ``model.open_backend``); needs ``model``, which describes it.
        source: the frame source (default: opened from ``run()``'s URI or the profile's source.uri).
        publisher: the link to the broker (default: an ``MqttLink`` when the profile has an mqtt section).
        clock: the wall clock results are stamped with.

        Raises:
            ConfigError: the device id or site is not a valid topic segment, or ``backend`` comes without
                ``model``.
        """
        # What is handed in is the device's from the first line: closed by close(), also when set-up fails.
        self.stop = threading.Event()
        self._closers: list[Any] = [part.close for part in (backend, source) if part is not None]
        try:
            if backend is not None and model is None:
                raise ConfigError("a backend handed to Device needs the model it runs (model=Deployable(...))")
            self.device_id = check_id("device id", profile.device.id)
            self.site = check_id("site", profile.device.site)
        except BaseException:
            self.close()
            raise
        self.profile = profile
        self.study_id = study_id
        self.data_dir = Path(profile.device.data_dir or default_data_dir())
        self.topic_base = f"edgemed/{self.site}/{self.device_id}"
        self.health = HealthMonitor()
        self.clock = clock if clock is not None else Clock()
        out = out if out is not None else sys.stdout
        names = shows_names(profile.privacy.print_source_names, out)
        self.printer = Printer(out, show_names=names) if profile.run.print_results else None
        self.studies: list[StudyResult] = []
        self.link: Link | None = None
        self.delivery: Delivery | None = None
        self.local_copy: LocalCopy | None = None
        self.consumer: Consumer | None = None
        self._model, self._backend, self._source, self._publisher = model, backend, source, publisher
        self._pass: Pass | None = None  # the pass over a source that keeps a ledger (edgemed.resume)
        self._ended_by: BaseException | None = None  # what ended the run, when it was not a clean end
        self.screen: ScreenFeed | None = None
        # Held around each invoke and every read of its outputs: an occlusion map (the screen's worker thread)
        # invokes the same interpreter, whose output buffers belong to the last invoke. Uncontended without it.
        self.invoke_lock = threading.Lock()

    # -- set-up -----------------------------------------------------------------------------------------------
    def __enter__(self) -> Device:
        try:
            lock = DataDirLock(self.data_dir)  # creates the data directory, 0700
            lock.acquire()
            self._closers.append(lock.release)
            self.classifier = self._load_model()
            self.backend = self.classifier.backend
            secret = load_or_create_secret(self.data_dir)
            self.stream = sequence_stream(self.data_dir)  # before the outbox opens: it tells a new sequence
            self.ctx = EnvelopeContext.of(
                self.device_id,
                self.site,
                self.classifier,
                publish_source_names=self.profile.privacy.publish_source_names,
                stream=self.stream,
            )
            self.sessions = StudyTracker(self.profile.triage, secret, self.study_id)
            self.consumer = self._consumer()
            self.outbox = Outbox(
                self.data_dir / OUTBOX_FILENAME, effective_outbox_config(self.profile.outbox, self.consumer)
            )
            self._closers.append(self.outbox.close)
            if self.consumer is not None:  # evicted rows are announced lost, also while working offline
                self.outbox.set_lost_announcer(self.consumer.announce)
            if self.profile.run.results_jsonl:
                self.local_copy = LocalCopy(self.data_dir)
                self._closers.append(self.local_copy.close)
            self.uplink = Uplink(
                self.outbox,
                self.stop,
                health_topic=f"{self.topic_base}/health",
                heartbeat=self.health_payload,
                interval_s=self.profile.health.interval_s,
            )
            self._start_delivery()
            self._start_screen()
        except BaseException as exc:
            self._ended_by = exc
            self.close()
            raise
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        self._ended_by = exc
        self.close()

    def _load_model(self) -> Classifier:
        model = self._model
        if model is None:
            if self.profile.model.path is None:
                raise ModelError("no model given: pass --model FILE.tflite or set model.path in the profile")
            model = check_deployable(Path(self.profile.model.path), self.profile.model.manifest, self.profile.triage)
        else:
            validate_policy(self.profile.triage, list(model.manifest.labels))
        # A fallback to the CPU is logged once by make_backend; it is stamped on every result and heartbeat.
        backend = self._backend
        if backend is None:
            backend = model.open_backend(self.profile.inference)
            self._closers.append(backend.close)  # a handed-in one has its closer from __init__
        classifier = Classifier(backend, model.manifest, model.artifact, ood=self.profile.ood)
        _check_ood_setting(classifier, self.profile)
        return classifier

    def _start_screen(self) -> None:
        if not self.profile.screen.enabled:
            return
        from edgemed.screen.feed import ScreenFeed  # only a device with a screen loads the server

        self.screen = ScreenFeed.start(self.profile, self.classifier, self.invoke_lock, self.screen_status)
        self._closers.append(self.screen.close)

    def _consumer(self) -> Consumer | None:
        delivery = self.profile.delivery
        if delivery.consumer is None:
            return None
        return Consumer(
            delivery.consumer,
            site=self.site,
            device_id=self.device_id,
            stream=self.stream,
            receipt_timeout_s=delivery.receipt_timeout_s,
        )

    def _start_delivery(self) -> None:
        link = self._publisher if self._publisher is not None else self._mqtt_link()
        if link is None:
            log.warning(
                "no broker configured: working offline; results stay in %s until `edgemed flush`",
                self.data_dir / OUTBOX_FILENAME,
            )
            return
        from edgemed.publish.batching import Batcher
        from edgemed.publish.delivery import Delivery

        consumer = self.consumer
        if consumer is not None and self._publisher is not None:
            if not isinstance(link, Listening):
                raise ConfigError(
                    "delivery.consumer needs a link that receives (receipts, the consumer's state): the publisher "
                    "handed to Device has no listen(); use MqttLink or drop delivery.consumer"
                )
            link.listen(consumer.subscriptions, consumer.on_message, consumer.on_state)
        self.link = link
        self.link.start()
        self._closers.append(self._stop_link)
        batch = self.profile.publish.batch
        batcher = Batcher(batch, site=self.site, device_id=self.device_id) if batch.enabled else None
        self.delivery = Delivery(self.outbox, self.link, consumer=consumer, batch=batcher)
        self.delivery.start()
        self._closers.append(self.delivery.stop)
        self.uplink.attach(self.link, self.delivery)

    def _mqtt_link(self) -> MqttLink | None:
        """The link to the profile's broker, not yet started; None when the profile has no broker (offline)."""
        if self.profile.mqtt is None:
            return None
        from edgemed.publish.mqtt import MqttLink  # paho is needed only by a device that has a broker

        consumer = self.consumer
        return MqttLink(
            self.profile.mqtt,
            status_topic=f"{self.topic_base}/status",
            client_id=self.profile.mqtt.client_id or f"edgemed-{self.site}-{self.device_id}",
            status_extra=self._status_extra(),
            subscriptions=consumer.subscriptions if consumer is not None else (),
            on_message=consumer.on_message if consumer is not None else None,
            on_state=consumer.on_state if consumer is not None else None,
        )

    def _stop_link(self) -> None:
        # The offline status says whether the run ended cleanly and how many results it left on disk, so that the
        # dashboard does not show "stopped" and no backlog after a crash. Only the exception's class is
        # published: its message may name a file.
        try:
            extra = {"pending": self.outbox.unsent_count()}
            if self.consumer is not None:
                extra["awaiting_receipt"] = self.outbox.awaiting_count()
        except Exception:  # the outbox is what failed (disk full, damaged file): say the rest anyway
            log.warning("could not count the pending results for the offline status", exc_info=True)
            extra = {}
        ended = self._ended_by
        if self.link is not None:
            self.link.stop(timeout_s=5.0, abnormal=type(ended).__name__ if ended is not None else None, extra=extra)

    def _status_extra(self) -> dict[str, Any]:
        from edgemed import __version__

        manifest = self.classifier.manifest
        extra: dict[str, Any] = {
            "device_id": self.device_id,
            "site": self.site,
            "delegate": self.backend.delegate,
            "degraded": self.backend.degraded,
            "model": self.ctx.model["name"],
            "model_version": manifest.version,
            "model_sha256": self.classifier.artifact.sha256,
            "edgemed": __version__,
        }
        # What the model predicted on its held-out data (the converter's): the dashboard's drift view compares the
        # site's recent results with it. Older manifests have none.
        if manifest.reference is not None:
            extra["reference"] = manifest.reference.model_dump(mode="json")
        return extra

    def backlog(self) -> Backlog:
        """What the outbox still holds, by state, and whether the consumer (if any) is online."""
        if self.delivery is not None:
            return self.delivery.backlog()
        consumer = self.consumer
        return Backlog(
            unsent=self.outbox.unsent_count(),
            awaiting=self.outbox.awaiting_count(),
            consumer=consumer.consumer_id if consumer is not None else None,
            consumer_online=consumer.online if consumer is not None else None,
        )

    def screen_status(self) -> dict[str, Any]:
        """The screen's status bar: the heartbeat's device state without its measurements.

        Not ``health_payload``: that one measures disk space and the CPU used since the previous heartbeat (a
        reading the screen, asking every second, would steal from the published one).
        """
        source = self._source
        return {
            "connection": "none" if self.link is None else ("connected" if self.uplink.connected else "offline"),
            "pending": self.outbox.unsent_count(),
            "awaiting_receipt": self.outbox.awaiting_count() if self.consumer is not None else None,
            "delegate": self.backend.delegate,
            "degraded": self.backend.degraded,
            "degraded_reason": self.backend.degraded_reason,
            "source_state": source.state if source is not None else "idle",
            "model": self.ctx.model["name"],
            "model_version": self.classifier.manifest.version,
        }

    def health_payload(self) -> dict[str, Any]:
        """The current heartbeat (``edgemed.health`` lists its fields)."""
        source = self._source
        receipts: dict[str, Any] = {}
        if self.consumer is not None:
            receipts["consumer_online"] = self.consumer.online
        return self.health.snapshot(
            data_dir=self.data_dir,
            device_id=self.device_id,
            site=self.site,
            delegate=self.backend.delegate,
            degraded=self.backend.degraded,
            degraded_reason=self.backend.degraded_reason,
            pending=self.outbox.unsent_count(),
            awaiting_receipt=self.outbox.awaiting_count(),
            oldest_pending_s=self.outbox.oldest_unsent_s(),
            oldest_awaiting_s=self.outbox.oldest_awaiting_s(),
            **receipts,
            outbox_full=self.outbox.is_full(),
            source_state=source.state if source is not None else "idle",
            connected=self.uplink.connected,
            source_reconnects=source.reconnects if source is not None else 0,
            evicted_total=self.outbox.evicted_total,
        )

    # -- one frame --------------------------------------------------------------------------------------------
    def process(self, frame: Frame, capture_ms: float = 0.0) -> FrameResult:
        """Turn one frame into a result committed to the outbox (durable once its batch commits).

        A frame of a new study first ends the open one: that study's decision is committed before this result.

        Args:
            frame: the frame, readable or not.
            capture_ms: how long the source took to read and decode it.

        Returns:
            The result, as the envelope, the printer and the summary read it.

        Raises:
            OutboxError: the outbox (or results.jsonl) cannot be written: exit 7.
            OutboxFullError: the outbox is at its cap with ``on_full: block`` (the run loop waits for room first).
        """
        quality, prediction, ood, verdict, latency_ms, class_map = self._assess(frame, capture_ms)
        closed = self.sessions.before(frame)
        if closed is not None:
            self._commit_study(closed)  # a new study began within the source (e.g. the next DICOM in a folder)
        result = FrameResult(
            frame=frame,
            seq=self.outbox.next_seq(),
            result_id=new_result_id(),
            created_at=self.clock.now(),
            clock_synced=self.clock.synced(),
            session_id=self.sessions.session_id(frame),
            quality=quality,
            prediction=prediction,
            triage=verdict,
            latency_ms=latency_ms,
            ood=ood,
        )
        payload = encode(result_envelope(self.ctx, result))
        # Tracked before it is put: the pass state committed with the result already counts it in its study.
        self.sessions.add(result)
        if self._pass is not None:
            self._pass.advance(frame)
        # Published once committed: the outbox wakes the delivery thread on each commit.
        self.outbox.put(
            result.result_id,
            f"{self.topic_base}/results",
            payload,
            seq=result.seq,
            done=input_done(self._pass, frame),
            pass_state=self._pass_state(),
        )
        if self.local_copy is not None:
            self.local_copy.append(payload)
        self.health.record(latency_ms["total"], verdict.level)
        if self.screen is not None:
            # Open only while this frame's study is (a cine, a video, a DICOM series; never a folder of single
            # images): its running decision is a few counters, no I/O.
            study = self.sessions.aggregator.decision() if self.sessions.is_open else None
            self.screen.show(result, frame.image, study, class_map)
        return result

    def _pass_state(self) -> tuple[str, str] | None:
        return self._pass.state(self.sessions) if self._pass is not None else None

    def _assess(
        self, frame: Frame, capture_ms: float
    ) -> tuple[
        QualityReport | None, Prediction | None, OodCheck | None, TriageResult, dict[str, float], ClassMap | None
    ]:
        """Quality gate, classification, out-of-distribution check, class map (screen) and triage of one frame,
        each stage timed."""
        if frame.image is None:
            msg = frame.error or "input could not be read"
            if frame.name:  # the local name can carry patient identifiers: never publish it
                msg = msg.replace(frame.name, "input")
            return None, None, None, triage_error(msg), _latency_ms(capture_ms), None
        t0 = time.perf_counter()
        image = frame.image
        if self.classifier.gray and image.ndim == 3:
            # Once for both: the gate measures a gray frame exactly as it measures the RGB one it came from.
            image = to_colour_mode(image, "gray")
        quality = check_quality(image, self.profile.quality) if self.profile.quality.enabled else None
        t1 = time.perf_counter()
        if quality is not None and not quality.passed:
            recapture = triage_recapture(quality)
            return quality, None, None, recapture, _latency_ms(capture_ms, (t1 - t0) * 1e3), None
        x = self.classifier.preprocess(image)
        t2 = time.perf_counter()
        with self.invoke_lock:  # the invoke and every read of its outputs (an occlusion map invokes too)
            raw = self.backend.invoke(x)
            t3 = time.perf_counter()
            prediction = self.classifier.scores(raw)
            t4 = time.perf_counter()
            # Before any other invoke: the feature outputs are the backend's buffers of this frame. After the
            # scores, so that the softmax pass the energy score shares is counted where it was always (triage).
            ood = self.classifier.check_ood(raw)
            t5 = time.perf_counter()
            # The feature map is one of this invoke's buffers too; the map is of the top class (what is shown).
            class_map = self.screen.class_map(prediction.index) if self.screen is not None else None
            t6 = time.perf_counter()
        verdict = triage(prediction, self.profile.triage)
        if ood is not None and ood.flagged:
            verdict = triage_ood(verdict, prediction)  # the prediction is still recorded, for audit
        t7 = time.perf_counter()
        ood_ms = (t5 - t4) * 1e3 if ood is not None else None
        cam_ms = (t6 - t5) * 1e3 if class_map is not None else None
        stages = ((t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3, ((t4 - t3) + (t7 - t6)) * 1e3)
        return quality, prediction, ood, verdict, _latency_ms(capture_ms, *stages, ood=ood_ms, cam=cam_ms), class_map

    def _commit_study(self, closed: ClosedStudy) -> StudyResult:
        """Commit the decision over a study's frames to the outbox.

        It takes the next ``seq`` of the one counter that also numbers frame results, so a consumer of all
        topics sees every number once and a gap means a lost message (see the README's envelope section).
        """
        study = StudyResult(
            seq=self.outbox.next_seq(),
            result_id=new_result_id(),
            created_at=self.clock.now(),
            clock_synced=self.clock.synced(),
            session_id=closed.session_id,
            source_kind=self._source.kind if self._source is not None else "folder",
            first_seq=closed.first_seq,
            last_seq=closed.last_seq,
            decision=closed.decision,
        )
        self.studies.append(study)
        payload = encode(study_envelope(self.ctx, study))
        # With the pass state that no longer holds the study: a resumed run never decides on it a second time.
        self.outbox.put(
            study.result_id, f"{self.topic_base}/studies", payload, seq=study.seq, pass_state=self._pass_state()
        )
        return study

    # -- a whole source ---------------------------------------------------------------------------------------
    def run(
        self, source_uri: str | None = None, *, max_frames: int | None = None, from_start: bool = False
    ) -> RunSummary:
        """Process every frame of the source, then wait (bounded) for the broker to acknowledge the results.

        Args:
            source_uri: overrides the profile's ``source.uri`` (not with a source handed to the constructor).
            max_frames: stop after this many frames (overrides ``run.max_frames``).
            from_start: process a file source again from its start even when its last run on this data
                directory was interrupted (``--from-start``); for ``watch:``, read every file in the folder again.

        Returns:
            What the run did; ``exit_code`` is the process's.

        Raises:
            ConfigError: no source given, or a region of interest that does not fit the source.
            CaptureError: the source as a whole is unusable.
            BrokerRefusedError: the broker refused the device.
            OutboxError: the outbox cannot be written.
        """
        source = self._open_source(source_uri)
        self._pass = attach_ledger(
            source, self.outbox, self.sessions, loop=self.profile.source.loop, from_start=from_start
        )
        limit = max_frames or self.profile.run.max_frames
        summary = RunSummary()
        frames = read_ahead(source, self.stop)
        ended = False
        try:
            for frame, capture_ms in frames:
                self.uplink.check()  # a broker refusal or a failed delivery ends the run (exit 5 or 7)
                self.uplink.wait_for_room()  # the outbox at its cap with on_full=block: no frame until there is room
                if self.stop.is_set():
                    break
                result = self.process(frame, capture_ms)
                summary.add(result)
                if self.printer is not None:
                    self.printer.print(result)
                if limit is not None and summary.frames >= limit:
                    break
            else:
                ended = source.state == "ended"
                if self._pass is not None and ended:
                    # Committed with the last results: the next run processes this source again from its start.
                    self.outbox.end_source(self._pass.key)
            self._end_study(source, ended)
        finally:
            self.stop.set()
            frames.close()  # joins the capture thread before anything is torn down
            self.outbox.flush()
            if self.local_copy is not None:
                self.local_copy.flush()
        summary.studies = [study.decision for study in self.studies]
        summary.pending = self.uplink.drain(self.profile.run.drain_timeout_s)
        summary.backlog = self.backlog().describe() if summary.pending else None
        if self.outbox.recovery is not None:
            summary.outbox_damage = self.outbox.recovery.describe()
            log.error("%s", summary.outbox_damage)  # said at start too; repeated where the run's outcome is read
        return summary

    def _end_study(self, source: FrameSource, ended: bool) -> None:
        """Decide on the study open at the end of the run, unless the next run resumes it.

        Only frames of one study form a study (edgemed/sessions.py): a folder of unrelated images gets none. A
        source that keeps a ledger and stopped before its end (SIGTERM, ``--max-frames``) is resumed by the next
        run after its last committed frame; a decision now would cover part of the study, and the next run's a
        second part. The study stays open in the ledger instead, and the run that reaches its end decides over
        all of it. ``watch:`` never ends: there the study stays open only when the run stopped inside a file.
        """
        this_pass = self._pass
        if this_pass is not None and not ended and (source.finite or this_pass.mid_input):
            if self.sessions.is_open:
                log.warning(
                    "the study is not complete, so no study decision yet: the next run on this data directory "
                    "resumes it and decides over all its frames (--from-start processes it again)"
                )
            return
        closed = self.sessions.close()
        if closed is not None:
            self._commit_study(closed)

    def _open_source(self, source_uri: str | None) -> FrameSource:
        source = self._source
        if source is not None and source_uri is not None:
            raise ConfigError("this device was given its source when it was made: call run() without a source URI")
        if source is None:
            uri = source_uri or self.profile.source.uri
            if uri is None:
                raise ConfigError("no source given: pass --source PATH or set source.uri in the profile")
            source = open_source(uri, self.profile.source, stop=self.stop)
            self._closers.append(source.close)  # a handed-in one has its closer from __init__
        self._source = source
        return source

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


def _check_ood_setting(classifier: Classifier, profile: DeviceProfile) -> None:
    """Say at start what the profile's ``ood:`` section cannot get from this model.

    A method the model lacks is refused by ``OodDetector.build`` (through the Classifier); here: a model converted
    before the check existed (or with ``--ood none``) runs without it, with one warning, unless the profile sets
    a threshold, which would then silently do nothing.

    Raises:
        ConfigError: ``ood.threshold`` is set for a model without out-of-distribution statistics.
    """
    if classifier.ood is not None:
        return
    if profile.ood.threshold is not None:
        raise ConfigError(
            "ood.threshold is set but this model has no out-of-distribution statistics to compare it with; "
            "convert the model again with `edgemed convert` (--ood auto) or remove ood.threshold from the profile"
        )
    log.warning(
        "this model has no out-of-distribution statistics: images unlike its training images are not flagged; "
        "convert it again with `edgemed convert` (--ood auto, the default) to turn the check on, or set "
        "`ood: {method: none}` in the profile to silence this warning"
    )


def _latency_ms(
    capture: float,
    quality: float = 0.0,
    preprocess: float = 0.0,
    inference: float = 0.0,
    triage: float | None = None,
    *,
    ood: float | None = None,
    cam: float | None = None,
) -> dict[str, float]:
    # The envelope keeps this order; ``ood`` only for a checked frame, ``cam`` only for a frame whose class
    # activation map the screen computed, ``triage`` only for a classified frame.
    stages = {"capture": capture, "quality": quality, "preprocess": preprocess, "inference": inference}
    if ood is not None:
        stages["ood"] = ood
    if cam is not None:
        stages["cam"] = cam
    if triage is not None:
        stages["triage"] = triage
    stages["total"] = sum(stages.values())
    return stages


def install_signal_handlers(device: Device) -> None:
    """SIGTERM/SIGINT stop capture; the run then drains (bounded), publishes offline and exits cleanly."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        log.warning("received %s: stopping capture, draining pending results", signal.Signals(signum).name)
        device.stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
