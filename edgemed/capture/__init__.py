"""Capture sources: every way a point-of-care device hands us images, behind one small protocol.

``open_source(uri, cfg)`` picks the source from the URI and, for local paths, from the file's *content*
(a DICOM file named ``scan.jpg`` is still read as DICOM):

    PATH           an image file, a folder (images and DICOM files, natural sort), a video file, a DICOM file
    camera:N       a V4L2 camera by index
    rtsp://...     a network stream (also http://, https://): reconnects with capped exponential backoff
    watch:DIR      a folder a device writes into: new files are read once their size has settled

Every source yields :class:`edgemed.types.Frame` objects: ``image`` is uint8 ``(H, W)`` gray or ``(H, W, 3)``
RGB, ``index`` counts from 0 across the whole run (and across ``loop`` replays). An input that cannot be read
becomes a frame with ``image=None`` and ``error`` set, keeping its index, so one bad file never stops a run.
OpenCV and pydicom are imported inside the functions that need them, so ``import edgemed.capture`` stays cheap.
``edgemed.capture.prefetch.read_ahead(source, stop)`` reads and decodes a source on a capture thread, a few frames
ahead of the runtime.

DICOM needs the ``dicom`` extra (``pip install edgemed[dicom]``: pydicom and Pillow). That decodes
uncompressed, RLE, JPEG baseline/extended and JPEG 2000; JPEG Lossless and JPEG-LS need
``pip install pylibjpeg pylibjpeg-libjpeg``, and a file that needs a missing codec becomes an error frame that
says so.

Live sources (streams, cameras) never yield a frame that is not real: all-black frames and repeats of the
previous frame are dropped, and a source that delivers nothing new for ``stale_timeout_s`` is reconnected.
``watch:DIR`` reads files that appear after it starts (``watch_existing`` to include the ones already there),
each once, in natural order, after its size and mtime have been stable for ``watch_settle_s``. A file still empty
after that is reported as empty, and read again if the device writes it after all. With the ledger of processed
inputs attached (``attach_ledger``; the runtime does it, see ``edgemed.ledger``) "once" holds across restarts:
files that arrived while edgemed was not running are read at the next start, and file sources resume an
interrupted pass after the last frame with a committed result.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from pydantic import Field, model_validator

from edgemed.errors import CaptureError
from edgemed.validation import StrictModel

if TYPE_CHECKING:
    from collections.abc import Mapping

    from edgemed.capture._base import LedgerChanges
    from edgemed.types import CaptureState, Frame, InputDone, SourceKind

IMAGE_EXTENSIONS = [
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".tif",
    ".tiff",
    ".webp",
    ".pgm",
    ".ppm",
    ".dcm",
    ".dicom",
]


class CaptureConfig(StrictModel):
    """How frames are taken from a source; every default is safe for an unattended device."""

    fps_cap: float | None = Field(
        None,
        gt=0,
        description="maximum frames per second delivered; None delivers frames as fast as possible",
    )
    roi: tuple[int, int, int, int] | None = Field(
        None,
        description="x, y, width, height (pixels) cropped from every frame, e.g. to drop ultrasound overlays",
    )
    loop: int = Field(1, ge=1, description="play a finite source (file, folder, video) this many times")
    reconnect_initial_s: float = Field(0.5, gt=0, description="first wait before reconnecting a lost stream")
    reconnect_max_s: float = Field(30.0, gt=0, description="longest wait between stream reconnection attempts")
    reconnect_give_up_s: float | None = Field(
        None,
        gt=0,
        description="give up on a stream down this long (state 'failed'); None retries until stopped",
    )
    stale_timeout_s: float = Field(
        5.0, gt=0, description="a stream that repeats the same frame (or sends none) this long is reconnected"
    )
    open_timeout_s: float = Field(10.0, gt=0, description="how long to wait for a stream or camera to open")
    read_timeout_s: float = Field(5.0, gt=0, description="how long to wait for one frame from a stream or camera")
    black_level: int = Field(
        4,
        ge=0,
        le=255,
        description="a stream frame whose brightest pixel is at or below this is not a real frame",
    )
    watch_poll_s: float = Field(0.5, gt=0, description="how often watch:DIR looks for new files")
    watch_settle_s: float = Field(
        1.0, ge=0, description="a watched file is read once its size and mtime have not changed for this long"
    )
    watch_existing: bool = Field(
        False, description="watch:DIR also reads the files already present when watching starts"
    )
    recursive: bool = Field(False, description="folders and watch:DIR also read their sub-folders")
    extensions: list[str] = Field(
        default_factory=lambda: list(IMAGE_EXTENSIONS),
        description="file extensions read from folders (a DICOM file without one is found by content)",
    )
    camera_width: int | None = Field(None, gt=0, description="requested camera frame width in pixels")
    camera_height: int | None = Field(None, gt=0, description="requested camera frame height in pixels")

    @model_validator(mode="after")
    def _check(self) -> CaptureConfig:
        if self.roi is not None and (self.roi[0] < 0 or self.roi[1] < 0 or self.roi[2] <= 0 or self.roi[3] <= 0):
            raise ValueError(f"roi {self.roi} must be x>=0, y>=0, width>0, height>0 (pixels)")
        if self.reconnect_max_s < self.reconnect_initial_s:
            raise ValueError("reconnect_max_s must be at least reconnect_initial_s")
        self.extensions = [e.lower() if e.startswith(".") else "." + e.lower() for e in self.extensions]
        return self


class FrameSource(Protocol):
    """What the runtime reads frames from.

    Iteration ends when the source is exhausted, when ``stop`` is set, or after ``close()``.
    File sources (``keeps_ledger``) can resume from the ledger of processed inputs: ``ledger_key`` names the
    source there (its absolute path), and ``attach_ledger`` must be called before iterating.

    ``state`` is published as ``source_state`` on every heartbeat (``idle`` there before a source is open). A
    source is in exactly one of these states:

    ``connecting``
        a stream that has not delivered its first connection yet (streams start here; others start ``open``);
    ``open``
        frames can be read: a file source, or a stream or camera that is connected;
    ``reconnecting``
        a stream or camera lost its connection (or never got one) and is retrying with back-off;
    ``ended``
        every frame was read (a finite source, all ``loop`` passes);
    ``stopped``
        iteration ended early because ``stop`` was set (SIGTERM) before the source ended;
    ``failed``
        the source gave up and raised ``CaptureError`` or ``ConfigError`` (a stream down longer than
        ``reconnect_give_up_s``, a watched folder that became unreadable, a region of interest that does not
        fit the first frame);
    ``closed``
        ``close()`` was called (the runtime closes every source at the end of a run; a failed source stays
        ``failed``).

    ``reconnects`` counts the times a live source lost its connection and began reconnecting (0 for files); it is
    published as ``source_reconnects`` on every heartbeat.
    """

    kind: SourceKind
    state: CaptureState
    reconnects: int
    keeps_ledger: bool
    ledger_key: str | None
    #: False for a live source and for ``watch:`` (it never ends)
    finite: bool
    #: the region of interest has fitted a frame (only then may a frame it does not fit be one error result)
    roi_fitted: bool

    @property
    def roi(self) -> tuple[int, int, int, int] | None: ...

    def __iter__(self) -> Iterator[Frame]: ...

    def close(self) -> None: ...

    def attach_ledger(self, done: Mapping[str, InputDone], *, history: bool) -> LedgerChanges: ...


def open_source(uri: str, cfg: CaptureConfig | None = None, *, stop: threading.Event | None = None) -> FrameSource:
    """Open a capture source from a URI or a local path.

    Args:
        uri: ``PATH`` (image, folder, video or DICOM file; told apart by content), ``camera:N``, ``rtsp://...``,
            ``http(s)://...`` or ``watch:DIR``.
        cfg: capture settings; defaults when None.
        stop: when set, iteration ends promptly (SIGTERM handling).

    Returns:
        A source to iterate for frames; call ``close()`` when done.

    Raises:
        CaptureError: the source as a whole is unusable (missing path, empty folder, unopenable video or
            camera); the message names the source and the fix.
    """
    cfg = cfg or CaptureConfig()
    stop = stop or threading.Event()
    lowered = uri.lower()
    if lowered.startswith(("rtsp://", "rtsps://", "http://", "https://")):
        from edgemed.capture.stream import StreamSource

        return StreamSource(uri, cfg, stop)
    if lowered.startswith("camera:"):
        from edgemed.capture.stream import CameraSource

        index_text = uri.split(":", 1)[1]
        if not index_text.isdigit():
            raise CaptureError(f"{uri}: camera index must be a number such as camera:0 (see `ls /dev/video*`)")
        return CameraSource(int(index_text), cfg, stop)
    if lowered.startswith("watch:"):
        from edgemed.capture.files import WatchSource

        return WatchSource(Path(uri.split(":", 1)[1]), cfg, stop)
    return _open_path(Path(uri), cfg, stop)


def _open_path(path: Path, cfg: CaptureConfig, stop: threading.Event) -> FrameSource:
    from edgemed.capture import files

    if not path.exists():
        raise CaptureError(f"{path}: no such file or folder; check the --source path")
    if path.is_dir():
        return files.FolderSource(path, cfg, stop)
    content = files.sniff(path)
    if content == "dicom":
        return files.FileSource(path, "dicom", cfg, stop)
    if content == "image":
        return files.FileSource(path, "image", cfg, stop)
    # Named as an image or DICOM file but holding neither (empty, damaged): one error result that says which,
    # not an attempt to open it as a video.
    suffix = path.suffix.lower()
    if suffix in cfg.extensions:
        return files.FileSource(path, "dicom" if suffix in (".dcm", ".dicom") else "image", cfg, stop)
    return files.VideoSource(path, cfg, stop)


__all__ = ["IMAGE_EXTENSIONS", "CaptureConfig", "FrameSource", "open_source"]
