"""DICOM files to uint8 frames: single- and multi-frame, grayscale, RGB, YBR and palette colour.

pydicom decodes uncompressed and RLE data with numpy alone, JPEG baseline and JPEG 2000 with Pillow (the
``dicom`` extra: ``pip install edgemed[dicom]``). A transfer syntax whose decoder is missing becomes one error
item that names the pip package to install, and the run goes on with the next input.

Pixel rules: more than 8 bits (or signed, or MONOCHROME1, or a VOI window) goes through the modality rescale
and the file's first VOI window (or min..max when it has none) to 0..255; MONOCHROME1 is inverted so that
bright means dense as in MONOCHROME2; palette colour is applied (16-bit tables are reduced to 8 bits); YBR is
converted to RGB.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import replace
from typing import Any, BinaryIO

from edgemed.capture._base import Item
from edgemed.errors import CodecUnavailableError
from edgemed.types import InputRef

# Transfer syntax UID -> the pip requirement that adds a decoder for it (pydicom's pylibjpeg plugins).
_CODEC_PACKAGES = {
    "1.2.840.10008.1.2.4.50": "Pillow",
    "1.2.840.10008.1.2.4.51": "pylibjpeg pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.57": "pylibjpeg pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.70": "pylibjpeg pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.80": "pylibjpeg pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.81": "pylibjpeg pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.90": "pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.91": "pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.201": "pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.202": "pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.203": "pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.5": "pylibjpeg pylibjpeg-rle",
}


def read_dicom(fh: BinaryIO, name: str, *, skip: int = 0, ref: InputRef | None = None) -> Iterator[Item]:
    """Yield every frame of a DICOM file as a uint8 item; problems become one error item naming file and fix.

    Args:
        fh: the file, open for binary reading at its start.
        name: the file's name, for messages.
        skip: leave out the first ``skip`` frames (they have results from an earlier run); JPEG frames are not
            even decoded.
        ref: the file as the ledger knows it; every item carries it, with the file's frame count.

    Yields:
        One item per frame (``study_uid`` from StudyInstanceUID), or a single error item. A file that breaks
        part-way (truncated pixel data) yields the frames before the break, then one error item.
    """
    items = _read(fh, name, skip)
    if ref is None:
        yield from (item for item, _ in items)
        return
    position = skip
    tagged = ref
    for item, total in items:
        # An error ends the file: count it as its last frame, so a resumed run does not report it twice.
        frames = position + 1 if item.error is not None else total
        if tagged.frames_total != frames:  # once per file, not once per frame
            tagged = replace(ref, frames_total=frames)
        yield item._replace(input=tagged, input_frame=position)
        position += 1


def _read(fh: BinaryIO, name: str, skip: int) -> Iterator[tuple[Item, int]]:
    """The items of :func:`read_dicom`, each with the file's frame count."""
    try:
        import pydicom
    except ImportError:
        yield Item(None, f"{name}: reading DICOM needs pydicom; install it with: pip install edgemed[dicom]", name), 1
        return
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(fh)
    except Exception as exc:  # noqa: BLE001 - see _why: a damaged file raises almost any type from pydicom
        yield Item(None, f"{name}: not a readable DICOM file ({_why(exc)}); export it again from the device", name), 1
        return
    if any("End of file" in str(w.message) for w in caught):
        # pydicom drops an element cut off by the end of the file and only warns: say what happened.
        yield Item(None, f"{name}: the file is truncated (it ends inside its data); re-copy or re-export it", name), 1
        return
    study_uid = str(ds.get("StudyInstanceUID", "")) or None
    try:
        problem = _check_decodable(ds, name)
        count = int(ds.get("NumberOfFrames", 1) or 1)
    except Exception as exc:  # noqa: BLE001 - a damaged header element is parsed only when first read
        problem = f"{name}: DICOM header is damaged ({_why(exc)}); export it again from the device"
    if problem is not None:
        yield Item(None, problem, name, study_uid), 1
        return
    try:
        for image in _frames(ds, skip):
            yield Item(image, None, name, study_uid), count
    except Exception as exc:  # noqa: BLE001 - truncated or inconsistent pixel data: the file, not the run, is at fault
        yield (
            Item(
                None,
                f"{name}: pixel data cannot be decoded ({_why(exc)}); the file may be truncated, re-export or re-copy "
                "it",
                name,
                study_uid,
            ),
            count,
        )


def _why(exc: BaseException) -> str:
    """A short, single-line reason from a decoder's exception, for an error result.

    pydicom parses the file's bytes lazily and, on damaged input, raises nearly any type: fuzzing the files in
    data/dicom gave InvalidDicomError, BytesLengthException, NotImplementedError (an unknown VR), TypeError (a
    damaged palette depth), ValueError, KeyError, struct.error and EOFError. So the boundary catches them all
    and keeps one line of the message, never a traceback. pydicom reads from the open file object, so its
    messages carry no path.
    """
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _check_decodable(ds: Any, name: str) -> str | None:
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        return f"{name}: DICOM file holds no image (no Pixel Data); export the image series, not a report"
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric.startswith("YBR_PARTIAL"):
        return (
            f"{name}: colour encoding {photometric} is not supported; export the images as RGB, YBR_FULL or "
            "JPEG from the device"
        )
    from pydicom.pixels.decoders.base import get_decoder

    uid = ds.file_meta.get("TransferSyntaxUID")
    if uid is None:
        return f"{name}: DICOM file has no transfer syntax; re-export it from the device as a Part 10 file"
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        return (
            f"{name}: transfer syntax {uid.name} ({uid}) has no decoder; export the images uncompressed "
            "or as JPEG from the device"
        )
    if not decoder.is_available:
        package = _CODEC_PACKAGES.get(str(uid), "pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg")
        return str(CodecUnavailableError(name, f"{uid.name} ({uid})", package))
    return None


# DICOM PS3.3 C.7.6.3.1.2, YBR_FULL to RGB, as one affine map (last column: the -128 chroma offsets).
_YBR_FULL_TO_RGB = (
    (1.0, 0.0, 1.402, -1.402 * 128),
    (1.0, -0.344136, -0.714136, (0.344136 + 0.714136) * 128),
    (1.0, 1.772, 0.0, -1.772 * 128),
)


_JPEG_BASELINE = "1.2.840.10008.1.2.4.50"


def _jpeg_baseline_colour_frames(ds: Any, skip: int) -> Iterator[Any]:
    """Colour JPEG-baseline frames decoded by OpenCV's libjpeg-turbo straight to RGB.

    Portable ultrasound cine loops are mostly this. pydicom's path (Pillow to YBR, then a colour transform) holds
    the GIL for most of a frame; this one is 2.7x faster on the 30-frame cine here and gives the same pixels
    within 1 level (tests/test_dicom.py).
    """
    import cv2
    import numpy as np
    from pydicom.encaps import generate_frames

    count = int(ds.get("NumberOfFrames", 1) or 1)
    for index, fragment in enumerate(generate_frames(ds.PixelData, number_of_frames=count)):
        if index < skip:
            continue  # done by an earlier run: not decoded
        # Fragments are padded to even length; a JPEG that does not end in EOI was cut short, and libjpeg would
        # fill the missing rows with grey without an error.
        if not bytes(fragment[-3:]).rstrip(b"\0").endswith(b"\xff\xd9"):
            raise ValueError(f"JPEG frame {index + 1} of {count} is truncated")
        bgr = cv2.imdecode(np.frombuffer(fragment, np.uint8), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError(f"JPEG frame {index + 1} of {count} is not a decodable JPEG")
        yield np.asarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


def _frames(ds: Any, skip: int = 0) -> Iterator[Any]:
    from pydicom.pixels.utils import iter_pixels

    # Frames left out (done by an earlier run) are not decoded: pydicom decodes only the indices asked for.
    indices = range(skip, int(ds.get("NumberOfFrames", 1) or 1)) if skip else None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if (
        str(ds.file_meta.get("TransferSyntaxUID", "")) == _JPEG_BASELINE
        and photometric in ("YBR_FULL", "YBR_FULL_422")
        and int(ds.get("SamplesPerPixel", 1)) == 3
        and int(ds.get("BitsAllocated", 8)) == 8
    ):
        yield from _jpeg_baseline_colour_frames(ds, skip)
        return
    if photometric in ("YBR_FULL", "YBR_FULL_422") and int(ds.get("BitsAllocated", 8)) == 8:
        # pydicom's own YBR->RGB conversion is numpy float arithmetic (about 1 ms per 320x240 frame, two thirds
        # of the decode time); one OpenCV affine transform gives the same pixels (within 1 level) in 0.05 ms.
        import cv2
        import numpy as np

        matrix = np.array(_YBR_FULL_TO_RGB, dtype=np.float32)
        for ybr in iter_pixels(ds, raw=True, indices=indices):
            yield np.asarray(cv2.transform(np.ascontiguousarray(ybr), matrix))
        return
    for pixels in iter_pixels(ds, indices=indices):
        yield to_uint8(pixels, ds, photometric)


def to_uint8(pixels: Any, ds: Any, photometric: str) -> Any:
    """One decoded DICOM frame to uint8 gray ``(H, W)`` or RGB ``(H, W, 3)`` following the module rules."""
    import numpy as np

    if photometric == "PALETTE COLOR":
        from pydicom.pixels.processing import apply_color_lut

        rgb = apply_color_lut(pixels, ds)
        # Palette tables hold 8- or 16-bit entries; keep the top 8 bits of 16-bit ones. Some devices declare
        # 16-bit tables but fill them with 0..255: those are already 8-bit values.
        if rgb.dtype.itemsize > 1 and int(rgb.max()) > 255:
            rgb = rgb >> 8
        return rgb.astype(np.uint8)
    if pixels.ndim == 3:
        # RGB, and YBR already converted to RGB by pydicom's decoders (raw=False).
        if pixels.dtype == np.uint8:
            return pixels
        return _stretch(pixels.astype(np.float32), float(pixels.min()), float(pixels.max()))
    monochrome1 = photometric == "MONOCHROME1"
    if pixels.dtype == np.uint8 and not monochrome1 and "WindowCenter" not in ds:
        return pixels
    from pydicom.pixels.processing import apply_modality_lut

    values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float32)
    window = _window(ds)
    if window is not None:
        centre, width = window
        # DICOM PS3.3 C.11.2.1.2 linear window: [c - 0.5 - (w-1)/2, c - 0.5 + (w-1)/2] -> [0, 255].
        lo = centre - 0.5 - (width - 1.0) / 2.0
        hi = centre - 0.5 + (width - 1.0) / 2.0
    else:
        lo, hi = float(values.min()), float(values.max())
    out = _stretch(values, lo, hi)
    return 255 - out if monochrome1 else out


def _window(ds: Any) -> tuple[float, float] | None:
    centre, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if centre is None or width is None:
        return None
    # Multi-valued windows are presets; the first is the default view.
    centre = centre[0] if hasattr(centre, "__len__") and not isinstance(centre, str) else centre
    width = width[0] if hasattr(width, "__len__") and not isinstance(width, str) else width
    if float(width) < 1.0:
        return None
    return float(centre), float(width)


def _stretch(values: Any, lo: float, hi: float) -> Any:
    import numpy as np

    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values - np.float32(lo)) * np.float32(255.0 / (hi - lo))
    return np.clip(scaled + 0.5, 0, 255).astype(np.uint8)
