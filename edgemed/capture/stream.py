"""Live sources: network streams (RTSP, HTTP MJPEG/HLS) and V4L2 cameras, read through OpenCV.

A live source never ends on its own: when the connection drops, reads fail, or the picture freezes, it
reconnects with capped exponential backoff (``reconnect_initial_s`` doubling up to ``reconnect_max_s``) and
reports ``state == "reconnecting"`` meanwhile. It never yields a frame that is not real: all-black frames
(decoder warm-up, a dead camera) and repeats of the previous frame are dropped; a stream that sends nothing
new for ``stale_timeout_s`` counts as lost.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from edgemed.capture._base import BaseSource, Item
from edgemed.capture.files import to_rgb_uint8
from edgemed.errors import CaptureError

if TYPE_CHECKING:
    import numpy as np

    from edgemed.capture import CaptureConfig
    from edgemed.types import SourceKind

log = logging.getLogger("edgemed.capture")


def video_capture(target: str | int, api: int, params: list[int]) -> Any:
    """Open an OpenCV capture; the single seam tests replace to fake a camera."""
    import cv2

    return cv2.VideoCapture(target, api, params)


def redact(url: str) -> str:
    """The URL without ``user:password@``, safe to log."""
    return re.sub(r"//[^/@]*@", "//***@", url)


class _LiveSource(BaseSource):
    """Reconnect, backoff, stale and black-frame handling shared by streams and cameras."""

    finite = False

    def __init__(self, cfg: CaptureConfig, stop: threading.Event) -> None:
        super().__init__(cfg, stop)
        self._cap: Any = None

    def _open_capture(self) -> Any:
        """Return an opened OpenCV capture, or None when it cannot be opened now."""
        raise NotImplementedError

    def describe(self) -> str:
        """How the source is named in messages (credentials removed)."""
        raise NotImplementedError

    def _items(self) -> Iterator[Item]:
        backoff_s = self.cfg.reconnect_initial_s
        down_since: float | None = None
        while not self._stopped():
            got_frame = False
            if self._cap is None:
                self._cap = self._open_capture()
            if self._cap is not None:
                self.state = "open"
                for item in self._read_until_lost():
                    if not got_frame:
                        # The source counts as back only once real frames flow: a server that accepts and then
                        # drops at once must neither be hammered nor escape reconnect_give_up_s.
                        backoff_s = self.cfg.reconnect_initial_s
                        down_since = None
                        got_frame = True
                    yield item
                self._release()
                if self._stopped():
                    return
                self.reconnects += 1
            self.state = "reconnecting"
            if got_frame:
                continue  # it was working: try again at once
            now = time.monotonic()
            down_since = now if down_since is None else down_since
            self._give_up_if_down_too_long(now - down_since)
            log.warning("%s: not available, retrying in %.1f s", self.describe(), backoff_s)
            if self.stop.wait(backoff_s):
                return
            backoff_s = min(backoff_s * 2.0, self.cfg.reconnect_max_s)

    def _give_up_if_down_too_long(self, down_s: float) -> None:
        give_up_s = self.cfg.reconnect_give_up_s
        if give_up_s is not None and down_s >= give_up_s:
            self.state = "failed"
            raise CaptureError(
                f"{self.describe()}: no connection for {give_up_s:.0f} s; check the device, the network and the "
                "URL, or raise capture.reconnect_give_up_s"
            )

    def _read_until_lost(self) -> Iterator[Item]:
        previous: np.ndarray | None = None
        last_new = time.monotonic()
        name = self.describe()
        while not self._stopped():
            ok, image = self._cap.read()
            now = time.monotonic()
            if not ok or image is None or image.size == 0:
                log.warning("%s: read failed, reconnecting", name)
                return
            # Subsampled checks keep the per-frame cost tiny; sensor noise alone changes many sampled pixels.
            probe = image[::4, ::4]
            if int(probe.max()) <= self.cfg.black_level or (previous is not None and _same(probe, previous)):
                if now - last_new >= self.cfg.stale_timeout_s:
                    log.warning("%s: no new picture for %.1f s, reconnecting", name, now - last_new)
                    return
                continue
            previous = probe.copy()
            last_new = now
            yield Item(to_rgb_uint8(image), None, name)

    def _release(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool((a == b).all())


class StreamSource(_LiveSource):
    """An RTSP or HTTP(S) stream opened with OpenCV's FFmpeg backend.

    Opening never raises for a server that is down: the stream keeps retrying (state ``reconnecting``) until
    ``stop`` is set or ``reconnect_give_up_s`` has passed.
    """

    kind: SourceKind = "stream"

    def __init__(self, url: str, cfg: CaptureConfig, stop: threading.Event) -> None:
        super().__init__(cfg, stop)
        self.url = url
        self.state = "connecting"

    def describe(self) -> str:
        """The stream URL without credentials."""
        return redact(self.url)

    def _open_capture(self) -> Any:
        import cv2

        params = [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
            int(self.cfg.open_timeout_s * 1000),
            cv2.CAP_PROP_READ_TIMEOUT_MSEC,
            int(self.cfg.read_timeout_s * 1000),
        ]
        cap = video_capture(self.url, cv2.CAP_FFMPEG, params)
        if not cap.isOpened():
            cap.release()
            return None
        return cap


class CameraSource(_LiveSource):
    """A V4L2 camera by index (``camera:0`` is ``/dev/video0``).

    Raises:
        CaptureError: at construction when the camera cannot be opened at all.
    """

    kind: SourceKind = "camera"

    def __init__(self, index: int, cfg: CaptureConfig, stop: threading.Event) -> None:
        super().__init__(cfg, stop)
        self.index = index
        self._cap = self._open_capture()
        if self._cap is None:
            raise CaptureError(
                f"camera:{index}: cannot open /dev/video{index}; check that the camera is plugged in "
                "(`ls /dev/video*`), that this user is in the `video` group and that no other program uses it"
            )

    def describe(self) -> str:
        """``camera:N``."""
        return f"camera:{self.index}"

    def _open_capture(self) -> Any:
        import cv2

        params: list[int] = []
        if self.cfg.camera_width:
            params += [cv2.CAP_PROP_FRAME_WIDTH, self.cfg.camera_width]
        if self.cfg.camera_height:
            params += [cv2.CAP_PROP_FRAME_HEIGHT, self.cfg.camera_height]
        cap = video_capture(self.index, cv2.CAP_V4L2, params)
        if not cap.isOpened():
            cap.release()
            return None
        return cap
