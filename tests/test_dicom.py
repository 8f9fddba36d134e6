"""DICOM capture over the real files in data/dicom, plus copies of them re-encoded or damaged in tmp_path."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import JPEGLossless, RLELossless, generate_uid

from edgemed.capture import open_source
from edgemed.types import Frame

DICOM = Path(__file__).resolve().parent.parent / "data" / "dicom"
# file -> (frames, rows, columns, channels)
EXPECTED = {
    "OBXXXX1A.dcm": (1, 600, 800, 3),  # palette colour -> RGB
    "US1_J2KR.dcm": (1, 480, 640, 3),  # JPEG 2000 lossless, YBR_RCT
    "US1_UNCR.dcm": (1, 480, 640, 3),  # RGB, uncompressed
    "examples_ybr_color.dcm": (30, 240, 320, 3),  # JPEG baseline cine, YBR_FULL_422
    "gdcm-US-ALOKA-16.dcm": (1, 480, 640, 3),  # 16-bit palette colour
}


def frames_of(path: Path | str) -> list[Frame]:
    return list(open_source(str(path)))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_real_dicom_yields_frames_of_the_right_size(name: str) -> None:
    n, rows, cols, channels = EXPECTED[name]
    frames = frames_of(DICOM / name)
    assert [f.error for f in frames] == [None] * n
    assert [f.index for f in frames] == list(range(n))
    for frame in frames:
        assert frame.image is not None
        assert frame.image.shape == (rows, cols, channels) and frame.image.dtype == np.uint8
        assert frame.source_kind == "dicom" and frame.name == name
        assert frame.study_uid == str(pydicom.dcmread(DICOM / name).StudyInstanceUID)
        assert frame.image.max() > frame.image.min()  # a real picture, not a constant


def test_folder_of_dicoms_numbers_all_34_frames_in_natural_order() -> None:
    frames = frames_of(DICOM)
    assert [f.index for f in frames] == list(range(34))
    assert all(f.error is None for f in frames)
    names = [f.name for f in frames]
    assert names[:30] == ["examples_ybr_color.dcm"] * 30
    assert names[30:] == ["gdcm-US-ALOKA-16.dcm", "OBXXXX1A.dcm", "US1_J2KR.dcm", "US1_UNCR.dcm"]


def test_jpeg2000_lossless_decodes_to_exactly_the_uncompressed_pixels() -> None:
    (j2k,) = frames_of(DICOM / "US1_J2KR.dcm")
    (raw,) = frames_of(DICOM / "US1_UNCR.dcm")
    assert j2k.image is not None and raw.image is not None
    assert np.array_equal(j2k.image, raw.image)


def test_ybr_cine_is_converted_to_rgb() -> None:
    # A grayscale ultrasound picture stored as YBR: once converted, R, G and B agree; unconverted, the two
    # chroma planes would sit near 128 while luma follows the picture.
    frames = frames_of(DICOM / "examples_ybr_color.dcm")
    image = frames[0].image
    assert image is not None
    means = image.reshape(-1, 3).mean(axis=0)
    assert np.ptp(means) < 3.0
    assert means.max() < 60


def test_palette_colour_is_applied_from_the_lookup_table() -> None:
    # Independent of pydicom's helper: read the three 16-bit tables by hand and keep their top 8 bits.
    ds = pydicom.dcmread(DICOM / "OBXXXX1A.dcm")
    entries, first, bits = (int(v) for v in ds.RedPaletteColorLookupTableDescriptor)
    assert (entries, first, bits) == (256, 0, 16)
    tables = [np.frombuffer(ds[f"{c}PaletteColorLookupTableData"].value, dtype="<u2") for c in ("Red", "Green", "Blue")]
    expected = np.stack([(t[ds.pixel_array] >> 8).astype(np.uint8) for t in tables], axis=-1)
    (frame,) = frames_of(DICOM / "OBXXXX1A.dcm")
    assert frame.image is not None and np.array_equal(frame.image, expected)


def test_sixteen_bit_palette_is_reduced_to_eight_bits_with_full_range() -> None:
    (frame,) = frames_of(DICOM / "gdcm-US-ALOKA-16.dcm")
    assert frame.image is not None and frame.image.dtype == np.uint8
    assert frame.image.max() >= 200 and frame.image.min() == 0


def test_truncated_dicom_becomes_an_error_frame_and_the_folder_goes_on(tmp_path: Path) -> None:
    data = (DICOM / "US1_UNCR.dcm").read_bytes()
    (tmp_path / "a1.dcm").write_bytes(data[: len(data) // 2])
    shutil.copy(DICOM / "OBXXXX1A.dcm", tmp_path / "a2.dcm")
    frames = frames_of(tmp_path)
    assert [f.index for f in frames] == [0, 1]
    assert frames[0].image is None and frames[0].error is not None
    assert frames[0].error.startswith("a1.dcm: ") and "truncated" in frames[0].error
    assert frames[1].error is None and frames[1].image is not None


def test_truncated_cine_inside_its_encapsulated_frames_is_an_error_frame(tmp_path: Path) -> None:
    data = (DICOM / "examples_ybr_color.dcm").read_bytes()
    bad = tmp_path / "cine.dcm"
    bad.write_bytes(data[: int(len(data) * 0.6)])
    frames = frames_of(bad)
    assert frames[-1].image is None and frames[-1].error is not None
    assert frames[-1].error.startswith("cine.dcm: ") and "truncated" in frames[-1].error
    assert [f.index for f in frames] == list(range(len(frames)))


def test_missing_codec_names_the_package_and_the_run_goes_on(tmp_path: Path) -> None:
    assert not get_decoder(JPEGLossless).is_available, "this test needs a machine without a JPEG Lossless decoder"
    ds = pydicom.dcmread(DICOM / "examples_ybr_color.dcm")
    ds.file_meta.TransferSyntaxUID = JPEGLossless
    ds.save_as(tmp_path / "b1.dcm")
    shutil.copy(DICOM / "US1_UNCR.dcm", tmp_path / "b2.dcm")
    frames = frames_of(tmp_path)
    assert [f.index for f in frames] == [0, 1]
    assert frames[0].image is None
    assert frames[0].error is not None and frames[0].error.startswith("b1.dcm: cannot decode JPEG Lossless")
    assert "pip install pylibjpeg pylibjpeg-libjpeg" in frames[0].error
    assert frames[1].image is not None


def test_rle_compressed_copy_decodes_to_the_same_pixels(tmp_path: Path) -> None:
    ds = pydicom.dcmread(DICOM / "US1_UNCR.dcm")
    ds.compress(RLELossless)
    ds.save_as(tmp_path / "rle.dcm")
    (rle,) = frames_of(tmp_path / "rle.dcm")
    (raw,) = frames_of(DICOM / "US1_UNCR.dcm")
    assert rle.image is not None and raw.image is not None
    assert np.array_equal(rle.image, raw.image)


def _write_gray(path: Path, pixels: np.ndarray, photometric: str, window: tuple[float, float] | None) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.6.1"  # ultrasound image storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = "1.2.3.4.5"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixels.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)


def _breast_12bit() -> np.ndarray:
    with np.load(DICOM.parent / "breastmnist_28.npz") as npz:
        image = npz["test_images"][0].astype(np.uint16)
    return image * 16 + 8  # a real ultrasound picture on a 12-bit scale


def test_sixteen_bit_monochrome2_without_window_is_stretched_min_to_max(tmp_path: Path) -> None:
    pixels = _breast_12bit()
    _write_gray(tmp_path / "m2.dcm", pixels, "MONOCHROME2", None)
    (frame,) = frames_of(tmp_path / "m2.dcm")
    assert frame.image is not None and frame.image.shape == pixels.shape and frame.image.dtype == np.uint8
    assert frame.image.min() == 0 and frame.image.max() == 255
    assert frame.study_uid == "1.2.3.4.5"
    expected = np.clip((pixels - pixels.min()) * (255.0 / np.ptp(pixels)) + 0.5, 0, 255).astype(np.uint8)
    assert np.abs(frame.image.astype(int) - expected).max() <= 1


def test_monochrome1_with_a_window_is_windowed_then_inverted(tmp_path: Path) -> None:
    pixels = _breast_12bit()
    centre, width = 2048.0, 2048.0
    _write_gray(tmp_path / "m1.dcm", pixels, "MONOCHROME1", (centre, width))
    _write_gray(tmp_path / "m2.dcm", pixels, "MONOCHROME2", (centre, width))
    (inverted,) = frames_of(tmp_path / "m1.dcm")
    (plain,) = frames_of(tmp_path / "m2.dcm")
    assert inverted.image is not None and plain.image is not None
    assert np.array_equal(inverted.image, 255 - plain.image)
    lo = centre - 0.5 - (width - 1) / 2
    expected = np.clip((pixels - lo) * (255.0 / (width - 1)) + 0.5, 0, 255).astype(np.uint8)
    assert np.abs(plain.image.astype(int) - expected).max() <= 1


def test_dicom_is_found_by_content_whatever_its_name(tmp_path: Path) -> None:
    shutil.copy(DICOM / "US1_UNCR.dcm", tmp_path / "looks_like.jpg")
    src = open_source(str(tmp_path / "looks_like.jpg"))
    assert src.kind == "dicom"
    (frame,) = list(src)
    assert frame.image is not None and frame.image.shape == (480, 640, 3)
    folder = tmp_path / "device"
    folder.mkdir()
    shutil.copy(DICOM / "US1_UNCR.dcm", folder / "IM000001")  # devices often write DICOM without extension
    (tmp_path / "device" / "notes").write_text("not an image")
    assert [f.name for f in frames_of(folder)] == ["IM000001"]


def test_dicom_without_pixel_data_is_an_error_frame(tmp_path: Path) -> None:
    ds = pydicom.dcmread(DICOM / "US1_UNCR.dcm")
    del ds.PixelData
    ds.save_as(tmp_path / "report.dcm")
    (frame,) = frames_of(tmp_path / "report.dcm")
    assert frame.image is None and frame.error is not None and "no image" in frame.error


def test_ybr_partial_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    ds = pydicom.dcmread(DICOM / "US1_UNCR.dcm")
    ds.PhotometricInterpretation = "YBR_PARTIAL_422"
    ds.save_as(tmp_path / "partial.dcm")
    (frame,) = frames_of(tmp_path / "partial.dcm")
    assert frame.image is None and frame.error is not None
    assert "YBR_PARTIAL_422 is not supported" in frame.error


def test_sixteen_bit_palette_table_holding_eight_bit_values_is_not_blackened(tmp_path: Path) -> None:
    ds = pydicom.dcmread(DICOM / "OBXXXX1A.dcm")
    for colour in ("Red", "Green", "Blue"):
        element = ds[f"{colour}PaletteColorLookupTableData"]
        element.value = (np.frombuffer(element.value, dtype="<u2") >> 8).astype("<u2").tobytes()
    ds.save_as(tmp_path / "eight_in_sixteen.dcm")
    (frame,) = frames_of(tmp_path / "eight_in_sixteen.dcm")
    (reference,) = frames_of(DICOM / "OBXXXX1A.dcm")
    assert frame.image is not None and reference.image is not None
    assert np.array_equal(frame.image, reference.image)


def test_fast_ybr_conversion_matches_pydicoms_own_within_one_level() -> None:
    from pydicom.pixels.utils import iter_pixels

    ds = pydicom.dcmread(DICOM / "examples_ybr_color.dcm")
    reference = np.stack(list(iter_pixels(ds)))  # pydicom converts YBR_FULL_422 to RGB itself
    ours = np.stack([f.image for f in frames_of(DICOM / "examples_ybr_color.dcm")])
    assert ours.shape == reference.shape == (30, 240, 320, 3)
    assert np.abs(ours.astype(int) - reference.astype(int)).max() <= 1


def test_uncompressed_ybr_full_is_converted_to_rgb(tmp_path: Path) -> None:
    from pydicom.pixels.processing import convert_color_space

    ds = pydicom.dcmread(DICOM / "US1_UNCR.dcm")
    rgb = ds.pixel_array
    ds.PixelData = convert_color_space(rgb, "RGB", "YBR_FULL").tobytes()
    ds.PhotometricInterpretation = "YBR_FULL"
    ds.save_as(tmp_path / "ybr.dcm")
    (frame,) = frames_of(tmp_path / "ybr.dcm")
    assert frame.image is not None and frame.image.shape == rgb.shape
    assert np.abs(frame.image.astype(int) - rgb.astype(int)).max() <= 2  # two 8-bit roundings
