"""File-based sources: one image or DICOM file, a folder, a video file, and a folder watched for new files."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from edgemed.capture._base import BaseSource, Item, LedgerChanges
from edgemed.errors import CaptureError
from edgemed.types import InputDone, InputRef

if TYPE_CHECKING:
    from collections.abc import Mapping

    import numpy as np

    from edgemed.capture import CaptureConfig
    from edgemed.types import SourceKind

Content = Literal["dicom", "image", "other", "empty"]

log = logging.getLogger("edgemed.capture")

# Magic numbers of the image formats OpenCV decodes; anything else is tried as a video.
_IMAGE_MAGIC = (
    b"\xff\xd8\xff",
    b"\x89PNG\r\n\x1a\n",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
    b"P5",
    b"P6",
    b"P2",
    b"P3",
)


def sniff(path: Path) -> Content:
    """Tell a file's format from its first bytes (not its name).

    Returns:
        ``dicom`` for a DICOM Part 10 file (``DICM`` at byte 128), ``image`` for JPEG, PNG, BMP, TIFF, WebP
        and PNM, ``other`` for anything else (including unreadable and empty files).
    """
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return "other"
    return sniff_bytes(head)


def sniff_bytes(head: bytes) -> Content:
    """:func:`sniff` on the first 132 (or more) bytes of a file already read."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(_IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return "image"
    return "other"


def natural_key(name: str) -> list[Any]:
    """Sort key that orders ``img2`` before ``img10`` (digit runs compare as numbers)."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part.lower()) for part in re.split(r"(\d+)", name)]


def _cv2() -> Any:
    import cv2

    return cv2


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """An OpenCV-decoded image (gray, BGR or BGRA; 8 or 16 bit) as uint8 gray or RGB."""
    import numpy as np

    cv2 = _cv2()
    if image.dtype != np.uint8:
        # 16-bit or float: stretch min..max to 0..255 (no window is known for a plain image file).
        lo, hi = float(image.min()), float(image.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        image = np.clip((image.astype(np.float32) - lo) * scale + 0.5, 0, 255).astype(np.uint8)
    if image.ndim == 3 and image.shape[2] == 1:
        return image[:, :, 0]
    if image.ndim == 3 and image.shape[2] == 4:
        return np.asarray(cv2.cvtColor(image, cv2.COLOR_BGRA2RGB))
    if image.ndim == 3:
        # In place: a full-resolution photo is converted without allocating a second buffer.
        cv2.cvtColor(image, cv2.COLOR_BGR2RGB, dst=image)
    return image


def decode_image(data: bytes, name: str) -> Item:
    """Decode one image file's bytes; an undecodable or truncated image becomes an error item that says so."""
    import numpy as np

    cv2 = _cv2()
    # OpenCV 4 decodes a JPEG cut short by a failing card or an unfinished copy, filling the rest with gray; a
    # complete JPEG ends with the EOI marker (a few padding bytes may follow it).
    if data.startswith(b"\xff\xd8\xff") and b"\xff\xd9" not in data[-1024:]:
        return Item(None, f"{name}: the JPEG file is truncated; copy it again from the device", name)
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_ANYCOLOR | cv2.IMREAD_ANYDEPTH)
        if image is not None and image.size > 0:
            return Item(to_rgb_uint8(image), None, name)
    except cv2.error as exc:  # OpenCV's own asserts on a malformed header: an undecodable image like any other
        log.debug("OpenCV refused an image: %s", type(exc).__name__)
    return Item(
        None,
        f"{name}: the image cannot be decoded (corrupt or truncated); copy it again from the device or "
        "re-export it as PNG or JPEG",
        name,
    )


def read_file(path: Path, rel: str | None = None, done: InputDone | None = None) -> Iterator[Item]:
    """Every frame of one file, chosen by content: DICOM (all frames) or a single image.

    A file that cannot be used becomes one error item whose advice fits what the file is: empty, unreadable,
    a damaged DICOM file, or something that is not an image at all.

    Args:
        path: the file.
        rel: its path relative to the source: every item then carries an ``InputRef`` for the ledger, with the
            SHA-256 of the bytes read for decoding (no second read of an image; a DICOM file is hashed, then
            parsed from the same open file). None: no ledger, no hash.
        done: the ledger's row for this file from an earlier run. When the file is unchanged (same size, and
            the same mtime or the same content hash) its first ``done.frames_done`` frames are skipped: one
            ``skip`` item stands for them.
    """
    name = path.name
    try:
        with path.open("rb") as fh:
            st = os.fstat(fh.fileno())
            head = fh.read(132)
            content = sniff_bytes(head) if head else "empty"
            # An image is decoded from these bytes; anything else is read whole only to be hashed for the ledger.
            keep = content == "image" or (rel is not None and content != "dicom")
            data = head + fh.read() if keep else head
            digest = None
            if rel is not None:
                if content == "dicom":
                    fh.seek(0)
                    digest = hashlib.file_digest(fh, "sha256").hexdigest()
                else:
                    digest = hashlib.sha256(data).hexdigest()
            ref = None if rel is None else InputRef(rel, st.st_size, st.st_mtime_ns, digest, 1)
            skip = _already_done(done, st, digest)
            if skip:
                yield Item(None, name=name, skip=skip)
            if content == "dicom":
                from edgemed.capture.dicom import read_dicom

                fh.seek(0)
                yield from read_dicom(fh, name, skip=skip, ref=ref)
                return
    except OSError as exc:
        yield Item(None, f"{name}: cannot be read ({exc.strerror}); check the file and its permissions", name)
        return
    if skip:
        return  # its one frame has a result already
    if content == "image":
        item = decode_image(data, name)
    elif content == "empty":
        item = Item(None, f"{name}: the file is empty (0 bytes); copy it again from the device", name)
    else:
        item = Item(None, _not_media(path), name)
    yield item._replace(input=ref)


def _already_done(done: InputDone | None, st: os.stat_result, digest: str | None) -> int:
    """How many leading frames of this file the ledger shows as done, if it is the same file as then."""
    if done is None or done.size != st.st_size:
        return 0
    same = done.mtime_ns == st.st_mtime_ns or (digest is not None and done.sha256 == digest)
    return done.frames_done if same else 0


def unchanged(path: Path, done: InputDone) -> bool:
    """True when ``path`` still has the size and mtime the ledger recorded (so it need not be read to tell)."""
    try:
        st = path.stat()
    except OSError:
        return False
    return st.st_size == done.size and st.st_mtime_ns == done.mtime_ns


def _not_media(path: Path) -> str:
    """Advice for a file whose content is neither DICOM nor an image format, by what its name says it should be."""
    suffix = path.suffix.lower()
    if suffix in (".dcm", ".dicom", ""):
        return (
            f"{path.name}: not a readable DICOM file (no DICOM header: damaged, or not DICOM at all); "
            "export it again from the device as DICOM"
        )
    return (
        f"{path.name}: not a readable image (its content is not JPEG, PNG, BMP, TIFF, WebP or PNM); "
        "re-export it as PNG or JPEG"
    )


class FileSource(BaseSource):
    """A single image or DICOM file (a multi-frame DICOM yields all its frames)."""

    def __init__(self, path: Path, kind: Literal["image", "dicom"], cfg: CaptureConfig, stop: threading.Event):
        super().__init__(cfg, stop)
        self.kind = kind
        self.path = path
        self.ledger_key = str(path.resolve())

    keeps_ledger = True

    def _items(self) -> Iterator[Item]:
        name = self.path.name
        yield from read_file(self.path, name if self.ledger else None, self._done.get(name))


def list_folder(
    folder: Path, extensions: list[str], *, recursive: bool = False, skip: set[str] | None = None
) -> list[Path]:
    """The folder's image and DICOM files in natural order; hidden files and DICOMDIR indexes are skipped.

    A file counts when its extension is listed, or when it has no extension and holds DICOM (devices often
    write DICOM files without one).

    Args:
        folder: the folder to list.
        extensions: lower-case extensions with the dot.
        recursive: also list sub-folders (exported DICOM studies are often nested); order is by relative path.
        skip: relative paths (as strings) to leave out before any file is opened (watch mode's seen files).
    """
    picked = []
    entries = folder.rglob("*") if recursive else folder.iterdir()
    for entry in entries:
        rel = entry.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or entry.name.upper() == "DICOMDIR":
            continue
        if (skip is not None and str(rel) in skip) or not entry.is_file():
            continue
        suffix = entry.suffix.lower()
        if suffix in extensions or (not suffix and sniff(entry) == "dicom"):
            picked.append(entry)
    return sorted(picked, key=lambda p: natural_key(str(p.relative_to(folder))))


class FolderSource(BaseSource):
    """The images and DICOM files of a folder, in natural order (``img2`` before ``img10``)."""

    kind: SourceKind = "folder"

    def __init__(self, folder: Path, cfg: CaptureConfig, stop: threading.Event) -> None:
        super().__init__(cfg, stop)
        self.folder = folder
        self.ledger_key = str(folder.resolve())
        try:
            self.paths = list_folder(folder, cfg.extensions, recursive=cfg.recursive)
        except OSError as exc:
            raise CaptureError(f"{folder}: cannot list the folder ({exc.strerror}); check its permissions") from exc
        if not self.paths:
            raise CaptureError(
                f"{folder}: no image or DICOM files found (looked for {', '.join(cfg.extensions)}); "
                "point --source at the folder that holds the images"
            )
        if all(p.suffix.lower() in (".dcm", ".dicom", "") for p in self.paths):
            self.kind = "dicom"

    keeps_ledger = True

    def _items(self) -> Iterator[Item]:
        for path in self.paths:
            if self._stopped():
                return
            if not self.ledger:
                yield from read_file(path)
                continue
            rel = str(path.relative_to(self.folder))
            done = self._done.get(rel)
            if done is not None and done.finished and unchanged(path, done):
                yield Item(None, skip=done.frames_done)  # done by the interrupted run: not even opened
                continue
            yield from read_file(path, rel, done)


class VideoSource(BaseSource):
    """A video file decoded by OpenCV's FFmpeg backend."""

    kind: SourceKind = "video"

    def __init__(self, path: Path, cfg: CaptureConfig, stop: threading.Event) -> None:
        super().__init__(cfg, stop)
        self.path = path
        self.ledger_key = str(path.resolve())
        self._cap: Any = None
        self._cap = self._open()

    def _open(self) -> Any:
        cv2 = _cv2()
        try:
            empty = self.path.stat().st_size == 0
        except OSError as exc:
            raise CaptureError(
                f"{self.path}: cannot be read ({exc.strerror}); check the file and its permissions"
            ) from exc
        if empty:
            raise CaptureError(f"{self.path}: the file is empty (0 bytes); copy it again from the device")
        cap = cv2.VideoCapture(str(self.path), cv2.CAP_FFMPEG)
        if not cap.isOpened():
            cap.release()
            raise CaptureError(
                f"{self.path}: not a readable image, DICOM or video file; convert it to MP4 (H.264), JPEG/PNG or DICOM"
            )
        return cap

    keeps_ledger = True

    def _items(self) -> Iterator[Item]:
        if self._cap is None:
            self._cap = self._open()
        name = self.path.name
        ref = self._input_ref() if self.ledger else None
        position = self._resume_at(ref)
        if position:
            yield Item(None, skip=position)
        while not self._stopped():
            ok, image = self._cap.read()
            if not ok or image is None:
                break
            yield Item(to_rgb_uint8(image), None, name, input=ref, input_frame=position)
            position += 1
        self._release()

    def _input_ref(self) -> InputRef:
        # Hashed once per pass, on the capture thread, reading the file in chunks (OpenCV decodes from the path).
        try:
            with self.path.open("rb") as fh:
                st = os.fstat(fh.fileno())
                digest = hashlib.file_digest(fh, "sha256").hexdigest()
        except OSError as exc:
            raise CaptureError(f"{self.path}: cannot be read ({exc.strerror}); check the file") from exc
        return InputRef(self.path.name, st.st_size, st.st_mtime_ns, digest, None)

    def _resume_at(self, ref: InputRef | None) -> int:
        """Skip the frames an interrupted run already has results for (decoded, not converted); returns how many."""
        done = self._done.get(self.path.name)
        if ref is None or done is None or (done.size, done.sha256) != (ref.size, ref.sha256):
            return 0
        skipped = 0
        while skipped < done.frames_done and not self._stopped() and self._cap.grab():
            skipped += 1
        return skipped

    def _release(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


class WatchSource(BaseSource):
    """A folder a device writes into: each new file is read once its size and mtime have settled.

    Iteration ends only when ``stop`` is set (or ``close()`` is called).
    """

    kind: SourceKind = "watch"
    finite = False

    def __init__(self, folder: Path, cfg: CaptureConfig, stop: threading.Event) -> None:
        super().__init__(cfg, stop)
        if not folder.is_dir():
            raise CaptureError(f"watch:{folder}: no such folder; create it or fix the watch: path")
        self.folder = folder
        self.ledger_key = f"watch:{folder.resolve()}"
        self._seen: set[str] = set()
        self._empty: dict[str, Path] = {}  # reported as empty; read again if the device writes them after all
        if not cfg.watch_existing:
            listed = list_folder(folder, cfg.extensions, recursive=cfg.recursive)
            self._seen = {str(p.relative_to(folder)) for p in listed}

    def _items(self) -> Iterator[Item]:
        # relative path -> (size, mtime_ns, when this size and mtime were first seen)
        pending: dict[str, tuple[int, int, float]] = {}
        while not self._stopped():
            self._recheck_empty()
            for key, path, size in self._ready(pending):
                self._seen.add(key)
                pending.pop(key, None)
                if size == 0:
                    # Reported as empty once it has settled; if the device writes it after all, it is read again.
                    self._empty[key] = path
                yield from read_file(path, key if self.ledger else None, self._done.pop(key, None))
            if self.stop.wait(self.cfg.watch_poll_s):
                return

    keeps_ledger = True

    def attach_ledger(self, done: Mapping[str, InputDone], *, history: bool) -> LedgerChanges:
        """Take up where the last run stopped: every file not done yet is read, also those that arrived while
        edgemed was not running.

        On the first start for this folder (no history) the files already there are noted as seen (unless
        ``watch_existing``), so that a later start can tell them from files that arrived meanwhile.
        """
        super().attach_ledger(done, history=history)
        if not history:
            add = []
            for key in sorted(self._seen):
                try:
                    st = (self.folder / key).stat()
                except OSError:
                    continue
                add.append(InputDone(key, st.st_size, st.st_mtime_ns, None, 0, 0))
            return LedgerChanges(add, [])
        present = {str(p.relative_to(self.folder)) for p in self._list()}
        gone = [key for key in self._done if key not in present]
        for key in gone:
            del self._done[key]
        # Files finished and unchanged are not looked at again; the others (new, changed, half done) are read
        # once settled, and read_file skips what an unchanged half-done file already has.
        self._seen = {key for key, row in self._done.items() if row.finished and unchanged(self.folder / key, row)}
        self._empty = {key: self.folder / key for key in self._seen if self._done[key].size == 0}
        arrived = len(present - set(self._done))
        if arrived:
            log.warning("watch: reading %d files that arrived while edgemed was not running", arrived)
        return LedgerChanges([], gone)

    def _list(self, skip: set[str] | None = None) -> list[Path]:
        try:
            return list_folder(self.folder, self.cfg.extensions, recursive=self.cfg.recursive, skip=skip)
        except OSError as exc:
            self.state = "failed"
            raise CaptureError(f"watch:{self.folder}: folder became unreadable ({exc}); check the mount") from exc

    def _ready(self, pending: dict[str, tuple[int, int, float]]) -> list[tuple[str, Path, int]]:
        """The new files whose size and mtime have not changed for ``watch_settle_s``, in natural order."""
        now = time.monotonic()
        ready = []
        for path in self._list(skip=self._seen):
            key = str(path.relative_to(self.folder))
            try:
                st = path.stat()
            except OSError:
                continue  # removed between listing and stat: it is not ready, look again next poll
            signature = (st.st_size, st.st_mtime_ns)
            seen = pending.get(key)
            if seen is None or seen[:2] != signature:
                pending[key] = (*signature, now)
            elif now - seen[2] >= self.cfg.watch_settle_s:
                ready.append((key, path, st.st_size))
        return ready

    def _recheck_empty(self) -> None:
        for key, path in list(self._empty.items()):
            try:
                still_empty = path.stat().st_size == 0
            except OSError:
                still_empty = False  # removed: a new file of that name is a new input
            if not still_empty:
                del self._empty[key]
                self._seen.discard(key)
