"""The screen: what the runtime thread hands over, and the push thread that turns it into events for the page.

The runtime thread only calls :meth:`Screen.show`, which stores references to the latest result (O(1), no copy, no
encoding). The push thread wakes on it, at most ``max_fps`` times a second: frames that arrive faster replace one
another and only the latest is encoded, so a 200 fps source costs the screen what a 15 fps one does. With no page
connected nothing is encoded at all.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from edgemed.screen import events, render
from edgemed.screen.hub import Client, Hub
from edgemed.screen.security import new_token
from edgemed.screen.server import ScreenServer

if TYPE_CHECKING:
    from edgemed.config import ScreenConfig
    from edgemed.inference.classify import Classifier
    from edgemed.types import ClassMap, FrameResult, TriageResult

log = logging.getLogger("edgemed.screen")

#: A status event at least this often, and one as soon as the status changes (looked at every STATUS_POLL_S).
STATUS_INTERVAL_S = 1.0
STATUS_POLL_S = 0.25
#: Shown frames kept (references only) so that an occlusion map can be asked for a frame the nurse held.
_KEPT_FRAMES = 16

StatusFn = Callable[[], dict[str, Any]]


class ScreenClosed(Exception):
    """The screen was closed while an occlusion map was being computed: the map stops at its next invoke."""


class _StopAwareLock:
    """The invoke lock as the occlusion worker takes it: refused once the screen is closing, so that the worker
    never invokes a model the device is about to close (it stops between two invokes, not in the middle of one)."""

    def __init__(self, lock: threading.Lock, stopping: threading.Event) -> None:
        self._lock = lock
        self._stopping = stopping

    def __enter__(self) -> None:
        if self._stopping.is_set():
            raise ScreenClosed("the screen is closing")
        self._lock.acquire()
        if self._stopping.is_set():
            self._lock.release()
            raise ScreenClosed("the screen is closing")

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


@dataclass(frozen=True)
class _Shown:
    result: FrameResult
    image: np.ndarray | None
    study: TriageResult | None
    class_map: ClassMap | None


@dataclass(frozen=True)
class _Pushed:
    shown: _Shown
    height: int
    width: int


class Screen:
    """The nurse's screen (``edgemed run --screen``): a page on 127.0.0.1 with the latest frame and its triage.

    Use :meth:`start`, then :meth:`show` per result from the runtime thread, then :meth:`close`.
    """

    def __init__(
        self,
        config: ScreenConfig,
        *,
        status: StatusFn,
        classifier: Classifier | None = None,
        lock: threading.Lock | None = None,
        has_cam: bool = False,
        show_names: bool = False,
    ) -> None:
        """Args:
        config: the profile's ``screen:`` section (port, max_fps, class_map).
        status: the device's state for the status bar, called on the push thread about once a second.
        classifier: the model, for occlusion maps (None: no occlusion).
        lock: held around each invoke and output read of an occlusion map (the runtime thread holds it too).
        has_cam: the runtime computes a class activation map per frame (occlusion is then not offered).
        show_names: the page may show input file names (the profile allows it: ``privacy.print_source_names:
            always``).
        """
        self.config = config
        self.token = new_token()
        self.hub = Hub()
        self._status_fn = status
        self._classifier = classifier
        self._lock = lock if lock is not None else threading.Lock()
        self._has_cam = has_cam
        self._show_names = show_names
        self._period_s = 1.0 / config.max_fps
        self._latest: _Shown | None = None
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._server: ScreenServer | None = None
        self._pusher: threading.Thread | None = None
        self._recent: OrderedDict[int, _Pushed] = OrderedDict()
        self._recent_lock = threading.Lock()
        self._last_frame: bytes | None = None
        self._last_status: bytes | None = None
        self._occluding = threading.Lock()
        self._occluder: threading.Thread | None = None
        self._failed = False
        self.pushed_frames = 0  # frames encoded and sent (tests and benchmarks read it)

    # -- life -------------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Bind the port, start the server and the push thread, and log the URL.

        Raises:
            ConfigError: the port is in use (the message names it and ``--screen-port``).
        """
        self._server = ScreenServer(self, self.config.port)
        self._server.start()
        self._pusher = threading.Thread(target=self._push_loop, name="edgemed-screen-push", daemon=True)
        self._pusher.start()
        log.warning("screen: http://127.0.0.1:%d/ (open it in the device's kiosk browser)", self.port)

    @property
    def port(self) -> int:
        """The port the page is served on."""
        if self._server is None:
            raise RuntimeError("the screen is not started")
        return self._server.port

    @property
    def url(self) -> str:
        """The page's address."""
        return f"http://127.0.0.1:{self.port}/"

    def close(self) -> None:
        """Stop the push thread and any occlusion map, end the pages' streams, release the port, drop every frame.

        Safe to call twice. After it returns no thread of the screen invokes the model (the device closes it next)
        and the screen holds no frame, map or encoded image.
        """
        self._stopping.set()
        self._wake.set()
        if self._pusher is not None:
            self._pusher.join(timeout=5.0)
            self._pusher = None
        occluder = self._occluder
        if occluder is not None:
            # It stops before its next invoke (_StopAwareLock); one invoke of a small model is milliseconds.
            occluder.join(timeout=10.0)
            if occluder.is_alive():
                log.warning("screen: the occlusion map did not stop within 10 s of shutdown")
            self._occluder = None
        self.hub.close()
        if self._server is not None:
            self._server.close()
            self._server = None
        with self._recent_lock:
            self._recent.clear()  # no frame outlives the run in memory longer than needed
        self._latest = None
        self._last_frame = None  # the encoded JPEG of the last frame: a frame too

    # -- the runtime thread's side ----------------------------------------------------------------------------
    def show(
        self,
        result: FrameResult,
        image: np.ndarray | None,
        study: TriageResult | None = None,
        class_map: ClassMap | None = None,
    ) -> None:
        """Hand over the latest result: references only, the previous unsent one is dropped. O(1).

        Args:
            result: the frame's result.
            image: its pixels (``Frame.image``), or None for an unreadable input.
            study: the running study decision, when the frame belongs to a study.
            class_map: the frame's class activation map, when the runtime computed one.
        """
        if self._stopping.is_set():
            return  # closed: hold no frame past the screen's end
        self._latest = _Shown(result, image, study, class_map)  # one reference store: atomic under the GIL
        self._wake.set()

    # -- the push thread --------------------------------------------------------------------------------------
    def _push_loop(self) -> None:
        last_push = last_status = -1e9
        next_status = 0.0
        pushed: _Shown | None = None
        while not self._stopping.is_set():
            woke = self._wake.wait(timeout=max(0.0, next_status - time.monotonic()))
            if self._stopping.is_set():
                return
            if woke:
                gap = last_push + self._period_s - time.monotonic()
                if gap > 0 and self._stopping.wait(gap):
                    return
                self._wake.clear()  # before reading: a show() from now on wakes the next round
                shown = self._latest
                if shown is not None and shown is not pushed and self.hub.count() > 0:
                    self._guarded(self._push_frame, shown)
                    pushed, last_push = shown, time.monotonic()
            now = time.monotonic()
            if now >= next_status:
                # The callable's values are counters and flags: cheap enough to look at four times a second.
                if self._guarded(self._push_status, now - last_status >= STATUS_INTERVAL_S):
                    last_status = now
                next_status = now + STATUS_POLL_S

    def _guarded(self, fn: Callable[..., bool | None], *args: Any) -> bool | None:
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - the push thread outlives one bad frame (said once, below)
            # Once: a frame that cannot be encoded (or a status that cannot be read) must not flood the journal,
            # nor stop the run. The message names no frame or file.
            if not self._failed:
                self._failed = True
                log.error("screen: could not update the page (%s: %s); the run goes on", type(exc).__name__, exc)
            return None

    def _push_frame(self, shown: _Shown) -> None:
        payload = events.frame_payload(shown.result, shown.study, show_name=self._show_names)
        height = width = 0
        frame_url = None
        if shown.image is not None:
            frame_url, height, width = render.frame_data_url(shown.image)
        payload.update(frame=frame_url, width=width, height=height)
        payload.update(map=None, map_kind=None, map_label=None, map_legend=None)
        cmap = shown.class_map
        ood = shown.result.ood
        # No map over a frame unlike the training images: its scores are not evidence, and a heat map would read
        # as if they were.
        flagged = ood is not None and ood.flagged
        if cmap is not None and shown.image is not None and self.config.class_map != "off" and not flagged:
            payload.update(
                map=render.map_data_url(cmap.values, height, width),
                map_kind=cmap.kind,
                map_label=cmap.label,
                map_legend=events.map_legend(cmap.kind, cmap.label),
            )
        event = events.sse("frame", payload)
        self._last_frame = event
        if shown.result.prediction is not None and self._offers_occlusion():
            # Kept (references) only when an occlusion map can be asked for: else no frame is held past its push.
            with self._recent_lock:
                self._recent[shown.result.seq] = _Pushed(shown, height, width)
                while len(self._recent) > _KEPT_FRAMES:
                    self._recent.popitem(last=False)
        self.hub.broadcast(event)
        self.pushed_frames += 1

    def _offers_occlusion(self) -> bool:
        return self._classifier is not None and not self._has_cam and self.config.class_map != "off"

    def status_payload(self) -> dict[str, Any]:
        """The ``status`` event: the device's state and what the screen offers."""
        state = dict(self._status_fn())
        if self.config.class_map == "off":
            maps = "off"
        else:
            maps = "cam" if self._has_cam else ("occlusion" if self._classifier is not None else "off")
        state.update(class_map=maps, occlusion_running=self._occluding.locked())
        return state

    def _push_status(self, due: bool) -> bool:
        """Send the status when it changed or when ``due``; returns whether it was sent."""
        event = events.sse("status", self.status_payload())
        if not due and event == self._last_status:
            return False
        self._last_status = event
        self.hub.broadcast(event)
        return True

    # -- the server's side ------------------------------------------------------------------------------------
    def greet(self, client: Client) -> None:
        """A page just connected: send it the current status and frame, and have the latest one encoded."""
        status = self._last_status or events.sse("status", self.status_payload())
        client.put(status)
        if self._last_frame is not None:
            client.put(self._last_frame)
        self._wake.set()  # a result shown while no page was connected was not encoded: do it now

    def request_occlusion(self, seq: int | None) -> tuple[int, str]:
        """Start an occlusion map of a shown frame on a worker thread; its ``map`` event follows.

        Args:
            seq: the frame's seq (the one the page shows, also when held); None: the latest shown.

        Returns:
            ``(202, ...)`` when started, ``(409, why)`` when there is no such classified frame or maps are off,
            ``(429, ...)`` when one is already running.
        """
        if not self._offers_occlusion():
            if self._has_cam and self.config.class_map != "off":
                return 409, "this model's class activation map goes with every frame: no occlusion map is needed"
            return 409, "maps are off for this run (screen.class_map: off)"
        if self._stopping.is_set():
            return 409, "the screen is closing"
        with self._recent_lock:
            if seq is None and self._recent:
                seq = next(reversed(self._recent))
            target = self._recent.get(seq) if seq is not None else None
        if target is None:
            if seq is None:
                return 409, "no classified frame on the screen yet"
            return 409, f"image {seq} was not classified, or is no longer kept for a map: show a classified image"
        if not self._occluding.acquire(blocking=False):
            return 429, "an occlusion map is already being computed: wait for it"
        worker = threading.Thread(target=self._occlude, args=(target,), name="edgemed-screen-occlusion", daemon=True)
        self._occluder = worker
        worker.start()
        return 202, f"computing the occlusion map of frame {target.shown.result.seq}"

    def _occlude(self, target: _Pushed) -> None:
        from edgemed.cam import occlusion_map  # only this worker needs it

        shown = target.shown
        seq = shown.result.seq
        try:
            pred = shown.result.prediction
            classifier = self._classifier
            if pred is None or shown.image is None or classifier is None:
                raise ValueError("the frame was not classified")
            guard = _StopAwareLock(self._lock, self._stopping)
            cmap = occlusion_map(classifier, shown.image, pred.index, seq, lock=guard)
            payload: dict[str, Any] = {
                "seq": seq,
                "map": render.map_data_url(cmap.values, target.height, target.width),
                "map_kind": cmap.kind,
                "map_label": cmap.label,
                "map_legend": events.map_legend(cmap.kind, cmap.label),
            }
        except ScreenClosed:
            log.debug("screen: the occlusion map stopped: the screen is closing")
            return  # (the finally clause frees the slot) no event: the pages are being closed
        except Exception as exc:  # noqa: BLE001 - the page is told it failed; the run is not concerned
            log.error("screen: the occlusion map failed (%s: %s)", type(exc).__name__, exc)
            payload = {"seq": seq, "error": "the occlusion map could not be computed; see the device's log"}
        finally:
            self._occluding.release()
        self.hub.broadcast(events.sse("map", payload))
