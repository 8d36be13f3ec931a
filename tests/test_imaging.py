"""Image loading: PNG/JPEG/TIFF (incl. 16-bit), and DICOM on the files pydicom ships."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medllava.imaging import ImageError, Window, apply_window, load_image, minmax_to_uint8

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.pixels import apply_modality_lut  # noqa: E402


def _gray(img: Image.Image) -> np.ndarray:
    arr = np.asarray(img)
    assert img.mode == "RGB" and arr.dtype == np.uint8
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    return arr[..., 0]


def test_ct_small_modality_lut_and_minmax() -> None:
    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    hu = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    img = load_image(path)
    assert img.size == (ds.Columns, ds.Rows) == (128, 128)
    gray = _gray(img)
    # No window in the file: the full (rescaled) range maps to 0..255.
    assert gray.min() == 0 and gray.max() == 255
    expected = np.clip((hu - hu.min()) / (hu.max() - hu.min()) * 255, 0, 255).round()
    assert np.abs(gray.astype(float) - expected).max() <= 1
    assert abs(gray.mean() - expected.mean()) < 0.5


def test_ct_window_from_caller_matches_the_dicom_formula() -> None:
    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    hu = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    gray = _gray(load_image(path, window=Window(40, 400)))
    lo, hi = 40 - 0.5 - (400 - 1) / 2, 40 - 0.5 + (400 - 1) / 2
    assert (gray[hu <= lo] == 0).all()
    assert (gray[hu > hi] == 255).all()
    inside = (hu > lo) & (hu <= hi)
    expected = ((hu[inside] - 39.5) / 399 + 0.5) * 255
    assert np.abs(gray[inside] - expected).max() <= 1


def test_mr_small_uses_the_file_window() -> None:
    path = get_testdata_file("MR_small.dcm")
    ds = pydicom.dcmread(path)
    assert float(ds.WindowCenter) == 600
    values = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    gray = _gray(load_image(path))
    np.testing.assert_array_equal(gray, apply_window(values, Window(float(ds.WindowCenter), float(ds.WindowWidth))))
    assert gray.shape == (64, 64) and 0 < gray.mean() < 255


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    path = tmp_path / "mono1.dcm"
    ds.save_as(path)
    normal = _gray(load_image(get_testdata_file("CT_small.dcm")))
    inverted = _gray(load_image(path))
    np.testing.assert_array_equal(inverted, 255 - normal)


def test_multiframe_middle_slice_by_default_and_frame_choice() -> None:
    path = get_testdata_file("rtdose.dcm")
    ds = pydicom.dcmread(path)
    frames = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    assert frames.shape[0] == 15
    np.testing.assert_array_equal(_gray(load_image(path)), minmax_to_uint8(frames[7]))
    np.testing.assert_array_equal(_gray(load_image(path, frame=2)), minmax_to_uint8(frames[2]))
    with pytest.raises(ImageError) as info:
        load_image(path, frame=15)
    assert info.value.kind == "bad_frame"


def test_colour_dicoms() -> None:
    rgb = load_image(get_testdata_file("SC_rgb_dcmtk_+eb+cr.dcm"))
    ybr = load_image(get_testdata_file("SC_rgb_dcmtk_+eb+cy+n1.dcm"))  # the same picture stored as YBR_FULL
    assert rgb.mode == ybr.mode == "RGB" and rgb.size == ybr.size == (100, 100)
    assert np.abs(np.asarray(rgb, float) - np.asarray(ybr, float)).mean() < 5
    video = load_image(get_testdata_file("examples_ybr_color.dcm"))  # 30 frames
    assert video.size == (320, 240)
    palette = load_image(get_testdata_file("examples_palette.dcm"))
    assert palette.mode == "RGB" and palette.size == (800, 350) and np.asarray(palette).std() > 0
    sixteen = np.asarray(load_image(get_testdata_file("SC_rgb_rle_16bit.dcm")), float)
    assert np.abs(sixteen - np.asarray(rgb, float)).mean() < 2  # 16-bit samples scaled by bit depth


@pytest.mark.parametrize(
    ("name", "kind"),
    [("reportsi.dcm", "no_pixel_data"), ("MR_truncated.dcm", "unreadable_image")],
)
def test_bad_dicoms_have_named_errors(name: str, kind: str) -> None:
    with pytest.raises(ImageError) as info:
        load_image(get_testdata_file(name))
    assert info.value.kind == kind


def test_dicom_without_suffix_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "IM0001"
    path.write_bytes(Path(get_testdata_file("MR_small.dcm")).read_bytes())
    assert load_image(path).size == (64, 64)


def test_sixteen_bit_png_and_tiff(tmp_path: Path) -> None:
    values = (np.arange(64 * 32, dtype=np.uint16).reshape(32, 64) * 30).astype(np.uint16)
    for name in ("a.png", "a.tiff"):
        Image.fromarray(values).save(tmp_path / name)
        gray = _gray(load_image(tmp_path / name))
        np.testing.assert_array_equal(gray, minmax_to_uint8(values))


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (lambda p: p.write_bytes(b""), "empty_file"),
        (lambda p: p.write_text("plain text", encoding="utf-8"), "unsupported_format"),
        (lambda p: None, "missing_image"),
    ],
)
def test_bad_files(tmp_path: Path, make, kind: str) -> None:
    path = tmp_path / "img.png"
    make(path)
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert info.value.kind == kind


def test_truncated_jpeg_and_pixel_limit(tmp_path: Path) -> None:
    Image.new("RGB", (64, 64), (10, 200, 30)).save(tmp_path / "ok.jpg", quality=90)
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError) as info:
        load_image(tmp_path / "cut.jpg")
    assert info.value.kind == "unreadable_image"
    with pytest.raises(ImageError) as info:
        load_image(tmp_path / "ok.jpg", max_pixels=1000)
    assert info.value.kind == "image_too_large"


def test_window_parse() -> None:
    assert Window.parse("40,400") == Window(40.0, 400.0)
    with pytest.raises(ValueError):
        Window.parse("widest")
    with pytest.raises(ValueError):
        Window.parse("40,-1")
