"""Load medical images as 8-bit RGB PIL images: PNG, JPEG, TIFF, and DICOM through pydicom.

One loader for training, evaluation and chat. DICOM: rescale slope/intercept (modality LUT); then the
caller's window (centre/width, or a named preset: lung, mediastinum, bone, brain, abdomen, ...), else the
file's VOI LUT Sequence or non-linear VOILUTFunction applied by pydicom's `apply_voi_lut`, else the file's
linear window, else min-max; MONOCHROME1 inversion; multi-frame volumes (middle frame by default, decoded alone
where the transfer syntax allows). A window may stack three windows as the R, G, B channels (`wide+mediastinum+brain`,
`medgemma_ct`). Slice references of series and volumes ('vol.nii.gz#slice=K') load through medllava.volumes. The pixel limit is checked from the header, before any pixel is decoded. High-bit-depth PNG/TIFF are mapped to 8 bits by min-max (or a window). Every failure is an
`ImageError` whose `kind` names what went wrong, so callers can report and count it.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

DICOM_SUFFIXES = {".dcm", ".dicom", ".dic"}
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb threshold


class ImageError(ValueError):
    """An image cannot be used. `kind` is one of: missing_image, empty_file, unreadable_image,
    unsupported_format, image_too_large, no_pixel_data, bad_frame."""

    def __init__(self, kind: str, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.kind = kind
        self.path = path
        self.reason = reason


# Common CT display windows (centre, width) in Hounsfield units.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600, 1500),
    "mediastinum": (50, 350),
    "bone": (400, 1800),
    "brain": (40, 80),
    "subdural": (75, 215),
    "stroke": (40, 40),
    "abdomen": (40, 400),
    "soft_tissue": (40, 400),
    "liver": (60, 160),
    "wide": (0, 2048),  # -1024..1024 HU, MedGemma's first CT channel
}
# Several windows stacked as the R, G, B channels (`a+b+c` in a window option, or a name here).
WINDOW_STACKS: dict[str, str] = {
    # MedGemma's CT notebook: wide (-1024..1024), soft tissue / mediastinum (-135..215), brain (0..80) HU
    "medgemma_ct": "0,2048+40,350+40,80",
}


@dataclass(frozen=True)
class Window:
    """A display window (DICOM VOI): values outside [center - width/2, center + width/2] saturate. With
    `channels`, several windows (center, width) make the R, G, B channels of one image (center and width are then
    the first's)."""

    center: float
    width: float
    channels: tuple[tuple[float, float], ...] = ()

    @classmethod
    def parse(cls, text: str) -> Window:
        """Parse a preset name (lung, mediastinum, bone, brain, abdomen, wide, ...), 'CENTER,WIDTH' (e.g. '40,400'),
        or three of them joined by '+' for the three channels ('wide+mediastinum+brain', or medgemma_ct)."""
        text = WINDOW_STACKS.get(text.strip().lower(), text)
        if "+" in text:
            parts = [cls.parse(part) for part in text.split("+")]
            if len(parts) != 3 or any(part.channels for part in parts):
                raise ValueError(f"window {text!r}: stacked windows make the three channels: give three, joined by '+'")
            return cls(parts[0].center, parts[0].width, tuple((w.center, w.width) for w in parts))
        preset = WINDOW_PRESETS.get(text.strip().lower())
        if preset is not None:
            return cls(*preset)
        try:
            center, width = (float(x) for x in text.split(","))
        except ValueError:
            raise ValueError(f"window {text!r}: expected CENTER,WIDTH such as 40,400, or one of "
                             f"{', '.join(WINDOW_PRESETS)}") from None
        if width <= 0:
            raise ValueError(f"window {text!r}: width must be positive")
        return cls(center, width)


def apply_window(values: np.ndarray, window: Window) -> np.ndarray:
    """DICOM linear VOI function (PS3.3 C.11.2.1.2) to 8-bit."""
    c, w = window.center, window.width
    if w <= 1:
        return np.where(values > c - 0.5, 255, 0).astype(np.uint8)
    scaled = ((values - (c - 0.5)) / (w - 1) + 0.5) * 255.0
    return np.clip(scaled, 0, 255).astype(np.uint8)


def windowed(values: np.ndarray, window: Window) -> np.ndarray:
    """`values` through the window: 8-bit gray, or with stacked windows an 8-bit [H, W, 3] array, one per channel."""
    if window.channels:
        return np.stack([apply_window(values, Window(c, w)) for c, w in window.channels], axis=-1)
    return apply_window(values, window)


def minmax_to_uint8(values: np.ndarray) -> np.ndarray:
    """Map the full value range of an array to 0..255 (a constant image maps to 0)."""
    values = values.astype(np.float64)
    lo, hi = float(np.min(values)), float(np.max(values))
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.clip((values - lo) / (hi - lo) * 255.0, 0, 255).round().astype(np.uint8)


def is_dicom(path: Path) -> bool:
    """DICOM by suffix, or by the 'DICM' magic at byte 128 (DICOM files often have no suffix)."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _first_value(value: Any) -> float:
    """Window centre/width may be multi-valued in DICOM; the first pair is the default view."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


def voi_output_range(ds: Any) -> tuple[float, float]:
    """The range of pydicom's `apply_voi_lut` output for this file: a VOI LUT's entry range, or for a window the
    range PS3.3 C.11.2.1.2 defines (stored bits, through the modality rescale)."""
    if "VOILUTSequence" in ds:
        return 0.0, float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
    bits = int(ds.BitsStored)
    if ds.get("ModalityLUTSequence"):
        y_min, y_max = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    elif int(getattr(ds, "PixelRepresentation", 0)) == 0:
        y_min, y_max = 0.0, float(2**bits - 1)
    else:
        y_min, y_max = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    if ds.get("RescaleSlope") is not None and ds.get("RescaleIntercept") is not None:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        y_min, y_max = y_min * slope + intercept, y_max * slope + intercept
    return y_min, y_max


def _uses_pydicom_voi(ds: Any) -> bool:
    """A VOI LUT Sequence, or a window with a non-linear VOILUTFunction: pydicom applies both by the standard."""
    if "VOILUTSequence" in ds:
        return True
    function = str(ds.get("VOILUTFunction", "LINEAR")).upper()
    return function != "LINEAR" and "WindowCenter" in ds and "WindowWidth" in ds


def load_dicom(path: Path, *, window: Window | None = None, frame: int | None = None,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode a DICOM file to 8-bit RGB (see module docstring for the steps)."""
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
        from pydicom.pixels import pixel_array as decode_pixels
    except ImportError:
        raise ImageError("unsupported_format", str(path), "DICOM needs pydicom: pip install 'medllava[dicom]'") from None
    try:
        ds = pydicom.dcmread(str(path))
    except (pydicom.errors.InvalidDicomError, OSError, ValueError, EOFError) as err:
        raise ImageError("unreadable_image", str(path), f"not a readable DICOM file ({err})") from None
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageError("no_pixel_data", str(path), "DICOM file has no pixel data")
    check_size((int(ds.get("Columns", 0) or 0), int(ds.get("Rows", 0) or 0)), str(path), max_pixels)  # header only

    samples = int(getattr(ds, "SamplesPerPixel", 1))
    n_frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    index = None
    if n_frames > 1:
        index = n_frames // 2 if frame is None else frame
        if not 0 <= index < n_frames:
            raise ImageError("bad_frame", str(path), f"frame {index} out of range (file has {n_frames} frames)")
    elif frame not in (None, 0):
        raise ImageError("bad_frame", str(path), f"frame {frame} out of range (file has 1 frame)")
    try:  # a volume decodes only the frame it uses (pydicom reads that frame's bytes where the syntax allows)
        pixels = decode_pixels(ds, index=index) if index is not None else ds.pixel_array
    except (ValueError, RuntimeError, NotImplementedError, AttributeError, KeyError) as err:
        raise ImageError("unreadable_image", str(path), f"cannot decode DICOM pixel data ({err})") from None

    photometric = str(getattr(ds, "PhotometricInterpretation", ""))
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        pixels, samples = apply_color_lut(pixels, ds), 3
    if samples == 3:  # pydicom already returns YBR data converted to RGB
        if pixels.dtype != np.uint8:
            bits = int(getattr(ds, "BitsStored", 8 * pixels.dtype.itemsize))
            if photometric == "PALETTE COLOR":
                bits = 16 if pixels.max() > 255 else 8
            pixels = np.clip(pixels.astype(np.float64) / (2**bits - 1) * 255.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(np.ascontiguousarray(pixels))

    values = apply_modality_lut(pixels, ds).astype(np.float64)
    if window is None and _uses_pydicom_voi(ds):
        lo, hi = voi_output_range(ds)
        out = apply_voi_lut(values, ds).astype(np.float64)
        gray = np.clip((out - lo) / (hi - lo) * 255.0, 0, 255).round().astype(np.uint8)
        if photometric == "MONOCHROME1":
            gray = 255 - gray
        return Image.fromarray(gray).convert("RGB")
    if window is None and "WindowCenter" in ds and "WindowWidth" in ds:
        window = Window(_first_value(ds.WindowCenter), _first_value(ds.WindowWidth))
    gray = windowed(values, window) if window is not None else minmax_to_uint8(values)
    if photometric == "MONOCHROME1":
        gray = 255 - gray  # MONOCHROME1: low values are displayed white
    return Image.fromarray(np.ascontiguousarray(gray)).convert("RGB")


def _to_rgb(img: Image.Image, window: Window | None) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; high-bit-depth grayscale goes through min-max or the window."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(img).astype(np.float64)
        gray = windowed(values, window) if window is not None else minmax_to_uint8(values)
        return Image.fromarray(np.ascontiguousarray(gray)).convert("RGB")
    if img.mode in ("RGBA", "LA", "P", "PA"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")


def load_image(
    source: str | Path | Image.Image | bytes | dict,
    *,
    window: Window | None = None,
    frame: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Load one image as RGB. `source`: a path, raw bytes, a PIL image, or a `datasets` image dict.

    Raises ImageError (kind = missing_image, empty_file, unreadable_image, unsupported_format,
    image_too_large, no_pixel_data, bad_frame).
    """
    if isinstance(source, Image.Image):
        return _to_rgb(source, window)
    volume, index = _volume_source(source)
    if volume is not None:
        from medllava.volumes import load_nifti_slice

        return load_nifti_slice(source, window=window, max_pixels=max_pixels)  # type: ignore[arg-type]
    if index is not None:  # a frame of a multi-frame file: 'FILE#slice=K'
        source, frame = volume_file(source), index  # type: ignore[arg-type]
    name, opener, dicom = _open_source(source)
    if dicom is not None:
        return load_dicom(dicom, window=window, frame=frame, max_pixels=max_pixels)
    with _pil_errors(name, "decode image"), warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with opener() as fh, Image.open(fh) as img:
            check_size(img.size, name, max_pixels)
            if frame:
                if frame >= getattr(img, "n_frames", 1):
                    raise ImageError("bad_frame", name, f"frame {frame} out of range")
                img.seek(frame)
            img.load()
            return _to_rgb(img, window)


def decode_each(refs: Iterable[Any], window: Window | None = None) -> list[Image.Image | ImageError]:
    """A batch of images, each decoded by `load_image` or replaced by the ImageError it raised (the caller skips,
    counts and names those), so a batch is decoded when it runs and never the whole set at once."""
    out: list[Image.Image | ImageError] = []
    for ref in refs:
        try:
            out.append(load_image(ref, window=window))
        except ImageError as err:
            out.append(err)
    return out


def _volume_source(source: Any) -> tuple[str | None, int | None]:
    """(the NIfTI path or None, the slice index or None) of a slice reference 'PATH#slice=K' or a NIfTI path."""
    if not isinstance(source, (str, Path)):
        return None, None
    from medllava.volumes import is_nifti, split_slice_ref

    path, index = split_slice_ref(source)
    return (path if is_nifti(path) else None), index


def volume_file(source: str | Path) -> str:
    """The file of a slice reference ('vol.nii.gz#slice=3' -> 'vol.nii.gz'; any other path as is)."""
    from medllava.volumes import split_slice_ref

    return split_slice_ref(source)[0]


def _open_source(source: str | Path | bytes | dict) -> tuple[str, Callable[[], Any], Path | None]:
    """(name, opener, DICOM path or None) for a path, raw bytes or a `datasets` image dict; raises ImageError for
    a missing or empty one."""
    if isinstance(source, dict):  # datasets Image feature: {"bytes": ..., "path": ...}
        if source.get("bytes"):
            source = source["bytes"]
        elif source.get("path"):
            source = source["path"]
        else:
            raise ImageError("missing_image", "<record>", "image entry has neither bytes nor path")
    if isinstance(source, (bytes, bytearray)):
        if len(source) == 0:
            raise ImageError("empty_file", "<bytes>", "image data is empty (0 bytes)")
        data = bytes(source)
        return "<bytes>", lambda: io.BytesIO(data), None
    path = Path(source)
    if path.is_dir():
        raise ImageError("unsupported_format", str(path), "a folder (a DICOM series?) where one image was expected: "
                         "series are expanded to their slices first (medllava.volumes.expand_series)")
    if not path.is_file():
        raise ImageError("missing_image", str(path), "image file not found")
    if path.stat().st_size == 0:
        raise ImageError("empty_file", str(path), "image file is empty (0 bytes)")
    return str(path), lambda: path.open("rb"), path if is_dicom(path) else None


@contextlib.contextmanager
def _pil_errors(name: str, action: str) -> Iterator[None]:
    """PIL's exceptions as ImageErrors naming the image."""
    try:
        yield
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError("image_too_large", name, f"image too large (decompression bomb guard): {err}") from None
    except UnidentifiedImageError:
        raise ImageError("unsupported_format", name, "not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageError("unreadable_image", name, f"cannot {action} ({err})") from None


def probe_image(source: str | Path | Image.Image | bytes | dict, *,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """The checks that need no pixel decoding: the file exists and is not empty, its header is a recognised image
    (or DICOM with pixel data) and its size is within the pixel limit. About 50 microseconds a JPEG, against a
    millisecond or more to decode it; `load_image` still raises for a file whose pixel data is corrupt.
    Returns the (width, height) the header states. Raises ImageError like `load_image`."""
    if isinstance(source, Image.Image):
        check_size(source.size, "<image>", max_pixels)
        return source.size
    volume, index = _volume_source(source)
    if volume is not None:
        from medllava.volumes import nifti_slice_size

        return nifti_slice_size(source, max_pixels)  # type: ignore[arg-type]
    if index is not None:
        source = volume_file(source)  # type: ignore[arg-type]
    name, opener, dicom = _open_source(source)
    if dicom is not None:
        return _probe_dicom(dicom, max_pixels)
    with _pil_errors(name, "read the image header"), opener() as fh, Image.open(fh) as img:
        check_size(img.size, name, max_pixels)
        return img.size


def image_size(source: str | Path | Image.Image | bytes | dict) -> tuple[int, int]:
    """(width, height) of an image or DICOM file from its header alone (see probe_image)."""
    return probe_image(source)


def _probe_dicom(path: Path, max_pixels: int) -> tuple[int, int]:
    try:
        import pydicom
    except ImportError:
        raise ImageError("unsupported_format", str(path), "DICOM needs pydicom: pip install 'medllava[dicom]'") from None
    try:  # large values (the pixel data) are left unread
        ds = pydicom.dcmread(str(path), defer_size="4 KB")
    except (pydicom.errors.InvalidDicomError, OSError, ValueError, EOFError) as err:
        raise ImageError("unreadable_image", str(path), f"not a readable DICOM file ({err})") from None
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageError("no_pixel_data", str(path), "DICOM file has no pixel data")
    size = (int(ds.get("Columns", 0) or 0), int(ds.get("Rows", 0) or 0))
    check_size(size, str(path), max_pixels)
    return size


def check_size(size: tuple[int, int], name: str, max_pixels: int) -> None:
    """An image of `size` (width, height) has pixels and is within the pixel limit (ImageError otherwise)."""
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageError("unreadable_image", name, f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(
            "image_too_large", name, f"image is {width}x{height} = {width * height:,} pixels (limit {max_pixels:,})"
        )


def embedded_bytes(image: Any) -> tuple[bytes, str]:
    """The encoded bytes and a file suffix of an in-memory image: a `datasets` image dict ({bytes, path}) or raw
    bytes kept verbatim (DICOM included), a PIL image written as PNG (in its own mode where PNG has it)."""
    if isinstance(image, dict) and image.get("bytes"):
        data = bytes(image["bytes"])
        suffix = Path(image.get("path") or "").suffix
    elif isinstance(image, (bytes, bytearray)):
        data, suffix = bytes(image), ""
    elif isinstance(image, Image.Image):
        buffer = io.BytesIO()
        img = image if image.mode in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA") else image.convert("RGB")
        img.save(buffer, format="PNG")
        return buffer.getvalue(), ".png"
    elif isinstance(image, dict) and image.get("path"):
        raise ImageError("missing_image", str(image["path"]), "embedded image has no bytes, only a path")
    else:
        raise ImageError("unsupported_format", "<record>", f"unsupported embedded image ({type(image).__name__})")
    if not suffix:
        suffix = ".dcm" if data[128:132] == b"DICM" else ".png" if data[:8] == b"\x89PNG\r\n\x1a\n" else \
            ".jpg" if data[:3] == b"\xff\xd8\xff" else ".img"
    return data, suffix


def store_image(image: Any, folder: str | Path, prefix: str = "") -> str:
    """Write an in-memory image (see `embedded_bytes`) to `folder` under a name made from its content (prefix +
    sha256), so several splits or sources written into one folder never overwrite a different image and an image
    shared by records is stored once. Returns the file name (relative to `folder`)."""
    import hashlib

    data, suffix = embedded_bytes(image)
    name = f"{prefix}{'_' if prefix else ''}{hashlib.sha256(data).hexdigest()[:20]}{suffix}"
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    if not target.is_file():  # same name = same content: nothing to overwrite
        staging = target.with_name(f"{target.name}.{os.getpid()}.partial")
        staging.write_bytes(data)
        staging.replace(target)
    return name


def blank_like(img: Image.Image, color: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
    """A uniform image of the same size (for the image-reliance check)."""
    return Image.new("RGB", img.size, color)
