"""CT/MR series and volumes as ordered slices: a DICOM series folder or a NIfTI file becomes a list of slice images.

A record's image may name a folder of DICOM files (one series) or a NIfTI volume (.nii, .nii.gz). `expand_series`
turns it into slice references, in anatomical order, chosen by `SliceSpec` (`data.slices: {count, spacing}`):
`count` slices spread evenly over the volume (`spacing: uniform`), or `count` slices `spacing` millimetres apart
around its middle. Each reference is one image from then on (checked, counted, windowed and tokenised like any
other image), so the same references serve training, evaluation, chat, serve and the web page.

Slice order comes from the geometry, never from file names: DICOM slices sort by their position along the slice
normal (ImagePositionPatient projected on the cross product of ImageOrientationPatient's row and column cosines;
ascending, so axial series run inferior to superior), then InstanceNumber for files without a position; a folder
holding several series (SeriesInstanceUID) or files with neither position nor number is refused by name; a
multi-frame file in a series folder gives its middle frame. NIfTI volumes are sliced along the voxel axis closest
to superior (nibabel's io_orientation of the affine: the closest canonical RAS+ orientation; axial slices,
inferior to superior, also of a sagittal or coronal acquisition), each slice shown the radiological way
(patient's right on the image's left, anterior at the top); only the slices taken are read from the file. A NIfTI slice reference is `PATH#slice=K` (K in the canonical volume); a DICOM
slice is its file. Intensities: DICOM slices go through `medllava.imaging.load_dicom` (rescale, window or the
file's own, MONOCHROME1); NIfTI slices through the scale nibabel applies (scl_slope / scl_inter), then the window,
else the header's cal_min..cal_max, else min-max per slice. Limits hold for the whole series: at most
`MAX_SERIES_FILES` files in a folder, and the chosen slices' pixels together within the pixel limit, both read from
headers before any pixel is decoded.
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from medllava.imaging import DEFAULT_MAX_PIXELS, ImageError, Window, check_size, is_dicom, minmax_to_uint8, windowed

NIFTI_SUFFIXES = (".nii", ".nii.gz")
SLICE_REF = re.compile(r"^(?P<path>.+)#slice=(?P<index>\d+)$")
MAX_SERIES_FILES = 4096
"""Files a series folder may hold (its headers are read to order the slices)."""


@dataclass(frozen=True)
class SliceSpec:
    """Which slices of a series or volume become images (`data.slices`)."""

    count: int = 8
    """Slices taken (all of them when the volume has fewer)."""
    spacing: Literal["uniform"] | float = "uniform"
    """uniform: spread evenly from the first slice to the last; a number: that many millimetres apart, centred on
    the volume's middle (positions past either end are left out, never repeated)."""

    def __post_init__(self) -> None:
        if int(self.count) < 1:
            raise ValueError(f"slices.count must be at least 1, got {self.count}")
        if self.spacing != "uniform" and not (isinstance(self.spacing, (int, float)) and 0 < self.spacing < math.inf):
            raise ValueError(f"slices.spacing must be 'uniform' or a positive number of millimetres, got {self.spacing!r}")


def is_nifti(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def is_series(ref: Any) -> bool:
    """A reference that expands to several slices: a folder (DICOM series) or a NIfTI file."""
    if not isinstance(ref, (str, Path)) or split_slice_ref(ref)[1] is not None:
        return False
    path = Path(ref)
    return path.is_dir() or is_nifti(path)


def split_slice_ref(ref: str | Path) -> tuple[str, int | None]:
    """('vol.nii.gz', 12) from 'vol.nii.gz#slice=12'; (ref, None) for anything else (an existing file named so
    included)."""
    text = str(ref)
    match = SLICE_REF.match(text)
    if match is None or Path(text).exists():
        return text, None
    return match["path"], int(match["index"])


def choose(positions: list[float], spec: SliceSpec) -> list[int]:
    """Indices (into `positions`, sorted ascending) of the slices `spec` takes, in order."""
    n = len(positions)
    if spec.count >= n and spec.spacing == "uniform":
        return list(range(n))
    if spec.count == 1:  # one slice: the middle one (as a volume read as one image gives)
        return [n // 2] if spec.spacing == "uniform" else [int(np.argmin(np.abs(np.asarray(positions) - (
            positions[0] + positions[-1]) / 2)))]
    if spec.spacing == "uniform":
        return sorted({int(round(x)) for x in np.linspace(0, n - 1, spec.count)})
    pos = np.asarray(positions, dtype=np.float64)
    middle = (pos[0] + pos[-1]) / 2
    step = float(spec.spacing)
    chosen: list[int] = []
    for j in range(spec.count):
        target = middle + (j - (spec.count - 1) / 2) * step
        if target < pos[0] - step / 2 or target > pos[-1] + step / 2:
            continue  # past an end of the volume
        k = int(np.argmin(np.abs(pos - target)))
        if k not in chosen:
            chosen.append(k)
    return sorted(chosen)


def _pydicom() -> Any:
    try:
        import pydicom
    except ImportError:
        raise ImageError("unsupported_format", "<series>", "DICOM series need pydicom: pip install 'medllava[dicom]'") from None
    return pydicom


def dicom_series_order(folder: Path) -> list[tuple[Path, float, Any]]:
    """The folder's DICOM files as (path, position along the normal, header), in slice order; headers only."""
    pydicom = _pydicom()
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")]
    if len(files) > MAX_SERIES_FILES:
        raise ImageError("image_too_large", str(folder), f"series folder holds {len(files)} files (limit {MAX_SERIES_FILES})")
    entries = []
    for path in files:
        if not is_dicom(path):
            continue
        try:
            ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        except (pydicom.errors.InvalidDicomError, OSError, ValueError, EOFError) as err:
            raise ImageError("unreadable_image", str(path), f"not a readable DICOM file in the series ({err})") from None
        if not ds.get("Rows") or not ds.get("Columns"):
            raise ImageError("unreadable_image", str(path), "a file of the series holds no image (no Rows/Columns)")
        entries.append((path, ds))
    if not entries:
        raise ImageError("missing_image", str(folder), "the series folder holds no DICOM file")
    series = {str(ds.get("SeriesInstanceUID", "")) for _, ds in entries}
    if len(series) > 1:
        raise ImageError("unreadable_image", str(folder), f"the folder holds {len(series)} series "
                         f"({', '.join(sorted(series)[:3])}...): one series per folder")
    keyed = []
    for path, ds in entries:
        ipp, iop = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
        number = ds.get("InstanceNumber")
        try:
            if ipp is not None and iop is not None and len(ipp) == 3 and len(iop) == 6:
                row, col = np.asarray(iop[:3], dtype=np.float64), np.asarray(iop[3:], dtype=np.float64)
                position = float(np.dot(np.asarray(ipp, dtype=np.float64), np.cross(row, col)))
            elif number is not None:
                position, number = float("nan"), int(number)
            else:
                position = None
        except (TypeError, ValueError) as err:
            raise ImageError("unreadable_image", str(path), f"a series slice with an unreadable position or number "
                             f"({err})") from None
        if position is None or not (np.isnan(position) or np.isfinite(position)):
            raise ImageError("unreadable_image", str(path), "a series slice without ImagePositionPatient/"
                             "ImageOrientationPatient or InstanceNumber: its place in the series is unknown "
                             "(file names are never used for order)")
        keyed.append((path, position, ds))
    with_position = [k for k in keyed if not np.isnan(k[1])]
    if with_position and len(with_position) != len(keyed):
        missing = next(k[0] for k in keyed if np.isnan(k[1]))
        raise ImageError("unreadable_image", str(missing), "some slices of the series have a position and this "
                         "one has none: they cannot be put in one order")
    if with_position:
        return sorted(keyed, key=lambda k: (k[1], _number(k[2])))
    by_number = sorted(keyed, key=lambda k: _number(k[2]))
    return [(path, float("nan"), ds) for path, _, ds in by_number]


def _number(ds: Any) -> int:
    try:
        return int(ds.get("InstanceNumber", 0) or 0)
    except (TypeError, ValueError):
        return 0


def _spacing_positions(ordered: list[tuple[Path, float, Any]]) -> list[float]:
    """Slice positions in millimetres: from the geometry, or InstanceNumber order times the slice spacing (or
    thickness, else 1 mm) when the slices have no position."""
    positions = [p for _, p, _ in ordered]
    if any(np.isnan(p) for p in positions):
        try:
            step = abs(float(ordered[0][2].get("SpacingBetweenSlices", ordered[0][2].get("SliceThickness", 1.0)) or 1.0))
        except (TypeError, ValueError):
            step = 1.0
        positions = [i * step for i in range(len(ordered))]
    return positions


@dataclass(frozen=True)
class _Volume:
    """A NIfTI volume read lazily (nibabel's array proxy: nothing decoded until a slice is taken), with the voxel
    axis and direction of each canonical RAS+ axis, from the header's affine."""

    image: Any
    axes: tuple[int, int, int]
    """The voxel axis along R, A and S."""
    flips: tuple[bool, bool, bool]
    """Whether that voxel axis runs opposite to R, A, S."""
    path: Path

    @property
    def shape(self) -> tuple[int, int, int]:
        """(R, A, S) sizes, from the header."""
        shape = self.image.shape
        return shape[self.axes[0]], shape[self.axes[1]], shape[self.axes[2]]

    @property
    def slice_thickness(self) -> float:
        zooms = self.image.header.get_zooms()
        return float(zooms[self.axes[2]]) if len(zooms) > self.axes[2] else 1.0

    def canonical_slice(self, index: int) -> np.ndarray:
        """Slice `index` along S (0 = most inferior) as [R, A] (both increasing toward R and A), scaled by the
        header's scl_slope / scl_inter; only this slice is read from the file."""
        nz = self.shape[2]
        voxel = nz - 1 - index if self.flips[2] else index
        slicer: list[Any] = [slice(None)] * len(self.image.shape)
        slicer[self.axes[2]] = voxel
        for extra in range(3, len(slicer)):
            slicer[extra] = 0  # a 4-D file with one volume
        try:
            data = np.asarray(self.image.dataobj[tuple(slicer)], dtype=np.float64)
        except (OSError, ValueError, EOFError, zlib.error) as err:
            raise ImageError("unreadable_image", str(self.path), f"cannot read slice {index} ({err})") from None
        rest = [a for a in range(3) if a != self.axes[2]]  # the voxel axes left in `data`, in order
        if rest.index(self.axes[0]) == 1:
            data = data.T
        if self.flips[0]:
            data = data[::-1, :]
        if self.flips[1]:
            data = data[:, ::-1]
        return data

    def checked(self, index: int | None, max_pixels: int) -> int:
        """The slice index (the middle slice for None) once it is in range and a slice is within the pixel limit,
        from the header alone; ImageError otherwise."""
        nx, ny, nz = self.shape
        index = nz // 2 if index is None else index
        if not 0 <= index < nz:
            raise ImageError("bad_frame", str(self.path), f"slice {index} out of range (volume has {nz} slices)")
        check_size((nx, ny), str(self.path), max_pixels)
        return index

    def displayed(self, index: int) -> np.ndarray:
        """Slice `index` as displayed: rows anterior to posterior, columns patient right to left."""
        return self.canonical_slice(index).T[::-1, ::-1]


def _nifti(path: Path) -> _Volume:
    try:
        import nibabel
    except ImportError:
        raise ImageError("unsupported_format", str(path), "NIfTI volumes need nibabel: pip install 'medllava[dicom]'") from None
    if not path.is_file():
        raise ImageError("missing_image", str(path), "volume file not found")
    try:
        img = nibabel.load(str(path))
        shape = tuple(int(s) for s in img.shape)
        orientation = nibabel.io_orientation(img.affine)
    except (nibabel.filebasedimages.ImageFileError, OSError, ValueError, EOFError, zlib.error) as err:
        raise ImageError("unreadable_image", str(path), f"not a readable NIfTI volume ({err})") from None
    if len(shape) < 3 or len(shape) > 4 or (len(shape) == 4 and shape[3] != 1):
        raise ImageError("unreadable_image", str(path), f"a NIfTI volume of shape {shape}: medllava reads 3-D volumes")
    axes, flips = [0, 0, 0], [False, False, False]
    for voxel_axis, (world_axis, direction) in enumerate(orientation[:3]):
        if np.isnan(world_axis):
            raise ImageError("unreadable_image", str(path), "the volume's affine gives no orientation")
        axes[int(world_axis)], flips[int(world_axis)] = voxel_axis, direction < 0
    return _Volume(img, tuple(axes), tuple(flips), path)  # type: ignore[arg-type]


def expand_series(ref: str | Path, spec: SliceSpec | None = None, *,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> list[str]:
    """The slice references of a series folder or NIfTI volume, in order (see the module docstring). Raises
    ImageError (missing, unreadable, several series, too many files, the chosen slices over the pixel limit)."""
    spec = spec or SliceSpec()
    path = Path(ref)
    if path.is_dir():
        ordered = dicom_series_order(path)
        chosen = [ordered[i] for i in choose(_spacing_positions(ordered), spec)]
        pixels = sum(int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0) for _, _, ds in chosen)  # one frame each
        _check_series_pixels(pixels, len(chosen), str(path), max_pixels)
        return [str(p) for p, _, _ in chosen]
    volume = _nifti(path)
    nx, ny, nz = volume.shape
    indices = choose([k * volume.slice_thickness for k in range(nz)], spec)
    _check_series_pixels(nx * ny * len(indices), len(indices), str(path), max_pixels)
    return [f"{path}#slice={k}" for k in indices]


def _check_series_pixels(pixels: int, n: int, name: str, max_pixels: int) -> None:
    if pixels > max_pixels:
        raise ImageError("image_too_large", name, f"the {n} chosen slices hold {pixels:,} pixels together "
                         f"(limit {max_pixels:,}): take fewer slices (data.slices.count)")


def nifti_slice_array(path: str | Path, index: int) -> tuple[np.ndarray, Any]:
    """Slice `index` along the canonical superior axis as displayed (rows anterior to posterior, columns patient
    right to left), in the file's scaled units, and the header. Only that slice is read."""
    volume = _nifti(Path(path))
    return volume.displayed(volume.checked(index, DEFAULT_MAX_PIXELS)), volume.image.header


def nifti_slice_size(ref: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) of a NIfTI slice as displayed, from the header."""
    path, index = split_slice_ref(ref)
    volume = _nifti(Path(path))
    volume.checked(index, max_pixels)
    return volume.shape[0], volume.shape[1]


def load_nifti_slice(ref: str | Path, *, window: Window | None = None,
                     max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """One NIfTI slice ('vol.nii.gz#slice=K'; the middle one for a bare path) as 8-bit RGB; the file is opened once
    (header, checks, that slice's data)."""
    path, index = split_slice_ref(ref)
    volume = _nifti(Path(path))
    values, header = volume.displayed(volume.checked(index, max_pixels)), volume.image.header
    if window is None:
        lo, hi = float(header.get("cal_min", 0) or 0), float(header.get("cal_max", 0) or 0)
        if hi > lo:
            window = Window((lo + hi) / 2, hi - lo)
    pixels = windowed(values, window) if window is not None else minmax_to_uint8(values)
    return Image.fromarray(np.ascontiguousarray(pixels)).convert("RGB")


def expand_images(refs: list[Any], spec: SliceSpec | None = None, *,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[list[Any], list[int]]:
    """A record's image references with each series or volume replaced by its slices, and how many images each
    reference became (1 for a plain image). Raises ImageError for a series that cannot be read or ordered."""
    out: list[Any] = []
    counts: list[int] = []
    for ref in refs:
        if is_series(ref):
            slices = expand_series(ref, spec, max_pixels=max_pixels)
            out.extend(slices)
            counts.append(len(slices))
        else:
            out.append(ref)
            counts.append(1)
    return out, counts


def load_images(source: Any, *, window: Window | None = None, frame: int | None = None,
                slices: SliceSpec | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                max_images: int | None = None) -> list[Image.Image]:
    """What one user-given image source shows, as RGB images: a series folder or NIfTI volume as its chosen slices
    (in order), anything else as the one image `medllava.imaging.load_image` makes of it (`frame`: a multi-frame
    file's frame). The one loader of chat, serve and the web page. `max_images`: refuse a series that would make
    more images than that (ImageError image_too_large), before any pixel is decoded."""
    from medllava.imaging import load_image

    if not is_series(source):
        return [load_image(source, window=window, frame=frame, max_pixels=max_pixels)]
    refs = expand_series(source, slices, max_pixels=max_pixels)
    if max_images is not None and len(refs) > max_images:
        raise ImageError("image_too_large", str(source), f"the series makes {len(refs)} slice images; at most "
                         f"{max_images} are taken here (fewer slices: --slices)")
    return [load_image(ref, window=window, max_pixels=max_pixels) for ref in refs]
