"""CT/MR series and volumes as ordered slices: synthetic DICOM series (shuffled file names, gantry order, tilt,
MONOCHROME1, rescale) and NIfTI volumes, checked against expectations computed by hand; stacked windows; the
series in records (SFT, GRPO rows, evaluation) and the chat loader."""

from __future__ import annotations

import copy
import json
import math
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medllava.imaging import ImageError, Window, load_image, probe_image
from medllava.volumes import SliceSpec, choose, expand_series, load_images

pydicom = pytest.importorskip("pydicom")
nibabel = pytest.importorskip("nibabel")
from pydicom.data import get_testdata_file  # noqa: E402

SLOPE, INTERCEPT = 2.0, -1024.0
TILT = math.radians(15)  # gantry tilt: the slice normal is not the z axis


def _gray(img: Image.Image) -> np.ndarray:
    arr = np.asarray(img)
    assert img.mode == "RGB" and (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    return arr[..., 0]


def window_by_hand(hu: float, center: float, width: float) -> int:
    """DICOM PS3.3 C.11.2.1.2 linear window, written out."""
    if hu <= center - 0.5 - (width - 1) / 2:
        return 0
    if hu > center - 0.5 + (width - 1) / 2:
        return 255
    return int(((hu - (center - 0.5)) / (width - 1) + 0.5) * 255)


def stored_values(n: int) -> list[int]:
    """The stored value of slice k (in anatomical order): HU = 2 * v - 1024 runs -200, -150, ... (distinct)."""
    return [int((-200 + 50 * k - INTERCEPT) / SLOPE) for k in range(n)]


def write_series(folder: Path, n: int = 6, *, spacing: float = 2.5, monochrome1: bool = True,
                 series_uid: str = "1.2.3.4", drop: tuple[str, ...] = (), shuffle_seed: int = 0) -> list[Path]:
    """n slices of one series under random file names, written in a shuffled order, InstanceNumber running
    opposite to the position (head-first acquisition); returns the files in anatomical (ascending) order."""
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    row = np.array([1.0, 0.0, 0.0])
    col = np.array([0.0, math.cos(TILT), -math.sin(TILT)])
    normal = np.cross(row, col)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for k, value in enumerate(stored_values(n)):
        ds = copy.deepcopy(base)
        ds.PixelData = np.full((ds.Rows, ds.Columns), value, dtype=np.int16).tobytes()
        ds.RescaleSlope, ds.RescaleIntercept = SLOPE, INTERCEPT
        ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
        ds.SeriesInstanceUID = series_uid
        ds.ImageOrientationPatient = [float(x) for x in (*row, *col)]
        ds.ImagePositionPatient = [float(x) for x in np.array([-50.0, 20.0, 100.0]) + k * spacing * normal]
        ds.InstanceNumber = n - k  # gantry order: the scanner numbered them head first
        for tag in ("WindowCenter", "WindowWidth", *drop):
            if tag in ds:
                delattr(ds, tag)
        files.append(ds)
    names = [folder / f"{uuid.UUID(int=np.random.default_rng([shuffle_seed, k]).integers(2**62)).hex}.dcm"
             for k in range(n)]
    order = np.random.default_rng(shuffle_seed).permutation(n)
    for k in order:  # written shuffled: neither names nor write order tell the anatomy
        files[k].save_as(names[k])
    return names


def test_series_order_comes_from_the_geometry_not_names_or_numbers(tmp_path: Path) -> None:
    anatomical = write_series(tmp_path / "s")
    assert sorted(p.name for p in anatomical) != [p.name for p in anatomical]  # names do not sort anatomically
    refs = expand_series(tmp_path / "s", SliceSpec(count=10))
    assert [Path(r) for r in refs] == anatomical
    window = Window(-50, 400)
    for k, ref in enumerate(refs):
        hu = -200 + 50 * k
        expected = 255 - window_by_hand(hu, -50, 400)  # MONOCHROME1: low values white
        assert set(_gray(load_image(ref, window=window)).ravel().tolist()) == {expected}, (k, hu)


def test_slice_choice_uniform_and_by_spacing(tmp_path: Path) -> None:
    anatomical = write_series(tmp_path / "s", n=7, spacing=2.5)
    # uniform: linspace(0, 6, 3) = 0, 3, 6
    assert [Path(r) for r in expand_series(tmp_path / "s", SliceSpec(3))] == [anatomical[i] for i in (0, 3, 6)]
    # 5 mm apart around the middle slice (7.5 mm along the tilted normal): 2.5, 7.5, 12.5 mm -> slices 1, 3, 5
    assert [Path(r) for r in expand_series(tmp_path / "s", SliceSpec(3, 5.0))] == [anatomical[i] for i in (1, 3, 5)]
    # seven slices 4 mm apart around 6 mm: -6, -2, 2, 6, 10, 14, 18 mm; -6 and 18 lie past the ends (more than half
    # a step beyond 0 and 12) and are left out, none repeated: -2 -> 0, 2 -> 1 (2 mm), 6 -> 3, 10 -> 5, 14 -> 6
    assert choose([0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0], SliceSpec(7, 4.0)) == [0, 1, 3, 5, 6]
    assert choose([0.0, 2.5], SliceSpec(8)) == [0, 1]


def test_instance_number_orders_a_series_without_positions(tmp_path: Path) -> None:
    anatomical = write_series(tmp_path / "s", n=4, drop=("ImagePositionPatient", "ImageOrientationPatient"))
    refs = [Path(r) for r in expand_series(tmp_path / "s")]
    assert refs == list(reversed(anatomical))  # InstanceNumber n - k: the scanner's numbering, head first


def test_bad_series_are_refused_by_name(tmp_path: Path) -> None:
    write_series(tmp_path / "two", n=2, series_uid="1.1")
    write_series(tmp_path / "two", n=2, series_uid="1.2", shuffle_seed=5)
    with pytest.raises(ImageError, match="holds 2 series"):
        expand_series(tmp_path / "two")
    write_series(tmp_path / "unordered", n=2, drop=("ImagePositionPatient", "InstanceNumber"))
    with pytest.raises(ImageError, match="file names are never used"):
        expand_series(tmp_path / "unordered")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match="no DICOM file"):
        expand_series(tmp_path / "empty")
    write_series(tmp_path / "big", n=4)
    with pytest.raises(ImageError, match="4 chosen slices hold 65,536 pixels") as info:
        expand_series(tmp_path / "big", max_pixels=128 * 128 * 3)  # each slice fits, the series does not
    assert info.value.kind == "image_too_large"
    with pytest.raises(ImageError, match="a folder"):
        load_image(tmp_path / "big")  # a series is never read as one image


def write_nifti(path: Path, layout: str = "LAS") -> np.ndarray:
    """A 4 x 5 x 7 int16 volume, value 100 i + 10 j + k where i runs to the patient's left (4), j anterior (5) and
    k superior (7 slices, 2 mm), scaled by scl_slope 2, scl_inter -10. `LAS`: stored [i, j, k]; `SLA`: stored
    [k, i, j] (the superior axis first, as a sagittal-style file orders its axes)."""
    i, j, k = np.meshgrid(np.arange(4), np.arange(5), np.arange(7), indexing="ij")
    data = (100 * i + 10 * j + k).astype(np.int16)
    affine = np.diag([-1.0, 1.0, 2.0, 1.0])
    if layout == "SLA":
        data = np.ascontiguousarray(data.transpose(2, 0, 1))
        affine = np.array([[0.0, -1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    img = nibabel.Nifti1Image(data, affine)
    img.header.set_slope_inter(2.0, -10.0)
    nibabel.save(img, str(path))
    return data


@pytest.mark.parametrize("layout", ["LAS", "SLA"])
def test_nifti_slices_in_canonical_order_shown_the_radiological_way(layout: str, tmp_path: Path) -> None:
    from medllava.volumes import nifti_slice_array

    path = tmp_path / "vol.nii.gz"
    write_nifti(path, layout)
    refs = expand_series(path, SliceSpec(3))
    assert refs == [f"{path}#slice={k}" for k in (0, 3, 6)]  # linspace(0, 6, 3), k along superior
    # displayed slice k: row r is anterior -> posterior (j = 4 - r), column c patient right -> left; in LAS the
    # patient's right is i = 0, so column c is i = c; values are scaled: 2 * raw - 10.
    values, _ = nifti_slice_array(path, 3)
    expected = np.array([[2 * (100 * c + 10 * (4 - r) + 3) - 10 for c in range(4)] for r in range(5)], dtype=float)
    np.testing.assert_array_equal(values, expected)
    assert probe_image(refs[1]) == (4, 5)
    gray = _gray(load_image(refs[1], window=Window(300, 800)))
    np.testing.assert_array_equal(gray, [[window_by_hand(v, 300, 800) for v in row] for row in expected])
    # 2 mm slices, 4 mm apart around the middle (6 mm): 2, 6, 10 mm -> slices 1, 3, 5
    assert expand_series(path, SliceSpec(3, 4.0)) == [f"{path}#slice={k}" for k in (1, 3, 5)]
    with pytest.raises(ImageError) as info:
        load_image(f"{path}#slice=7")
    assert info.value.kind == "bad_frame"
    truncated = tmp_path / "cut.nii.gz"  # a download cut short: every path names it, none crashes
    truncated.write_bytes(path.read_bytes()[:200])
    for attempt in (lambda: expand_series(truncated), lambda: load_image(f"{truncated}#slice=3"),
                    lambda: probe_image(f"{truncated}#slice=3")):
        with pytest.raises(ImageError) as info:
            attempt()
        assert info.value.kind == "unreadable_image" and "cut.nii.gz" in str(info.value)


def test_stacked_windows_make_the_three_channels(tmp_path: Path) -> None:
    write_series(tmp_path / "s", n=3, monochrome1=False)
    ref = expand_series(tmp_path / "s")[2]  # HU -100 everywhere
    window = Window.parse("medgemma_ct")
    rgb = np.asarray(load_image(ref, window=window))
    expected = [window_by_hand(-100, 0, 2048), window_by_hand(-100, 40, 350), window_by_hand(-100, 40, 80)]
    assert [set(rgb[..., c].ravel().tolist()) for c in range(3)] == [{v} for v in expected]
    assert expected == [115, 25, 0]  # (-99.5/2047 + .5) * 255, (-139.5/349 + .5) * 255, below the brain window
    assert Window.parse("wide+mediastinum+brain").channels == ((0, 2048), (50, 350), (40, 80))
    with pytest.raises(ValueError, match="three"):
        Window.parse("lung+bone")


def test_chat_loader_gives_a_series_as_its_slices(tmp_path: Path) -> None:
    anatomical = write_series(tmp_path / "s", n=5)
    images = load_images(tmp_path / "s", window=Window(-50, 400), slices=SliceSpec(3))
    assert [_gray(im)[0, 0] for im in images] == [_gray(load_image(anatomical[k], window=Window(-50, 400)))[0, 0]
                                                   for k in (0, 2, 4)]
    with pytest.raises(ImageError, match="at most 2"):
        load_images(tmp_path / "s", slices=SliceSpec(3), max_images=2)


def test_series_in_records_become_their_slices(tmp_path: Path, base_models: dict) -> None:
    """SFT (one placeholder for the series -> one per slice), GRPO rows and evaluation items, on the same slices."""
    from medllava.data.render import Renderer
    from medllava.data.rl import build_rl_rows
    from medllava.data.validate import prepare_samples
    from medllava.evaluate import load_items
    from medllava.model import load_model

    images = tmp_path / "images"
    write_series(images / "ct1", n=6)
    write_nifti(images / "mr1.nii.gz")
    Image.new("RGB", (32, 32), (40, 40, 40)).save(images / "xray.png")
    _, processor = load_model(base_models[("clip", "llama")])
    spec = SliceSpec(3)
    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"id": "s1", "images": ["xray.png", "ct1"], "conversations": [
        {"from": "human", "value": "<image>\nPrior film. <image>\nIs there a nodule in the CT?"},
        {"from": "gpt", "value": "No."}]}) + "\n")
    samples, _ = prepare_samples([str(sft)], Renderer(processor, "chat", 2048), image_folder=images, progress=False,
                                 slices=spec)
    assert len(samples[0].images) == 4 and Path(samples[0].images[0]).name == "xray.png"
    placeholder = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    assert int((samples[0].input_ids == placeholder).sum()) == 4
    vqa = tmp_path / "vqa.jsonl"
    vqa.write_text(json.dumps({"id": "v1", "image": "mr1.nii.gz", "question": "Is there a lesion?",
                               "answer": "no", "qtype": "yes_no"}) + "\n")
    rows, _ = build_rl_rows([str(vqa)], processor, image_folder=images, progress=False, slices=spec)
    assert rows[0]["images"] == [f"{images / 'mr1.nii.gz'}#slice={k}" for k in (0, 3, 6)]
    items, errors = load_items(vqa, processor, images, slices=spec)
    assert not errors and items[0].images == rows[0]["images"] and items[0].prompt.count("<image>") == 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "b1", "image": "ct1", "question": "Q?", "answer": "no", "qtype": "yes_no"}) + "\n")
    items, errors = load_items(bad, processor, images, slices=SliceSpec(6))
    assert not errors and len(items[0].images) == 6
    (images / "ct1" / "extra.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
    items, errors = load_items(bad, processor, images, slices=spec)
    assert not items and errors[0].error.kind == "unreadable_image" and "extra.dcm" in errors[0].error.reason


def test_series_in_preference_pairs_become_their_slices(tmp_path: Path, base_models: dict) -> None:
    """DPO pairs: each side's series as its slices, the shared prompt's placeholder repeated per slice; a rejected
    series of another length under the shared prompt is refused by name."""
    from medllava.data.preference import prepare_pairs
    from medllava.data.render import Renderer
    from medllava.model import load_model

    images = tmp_path / "images"
    write_series(images / "ct1", n=6)
    write_series(images / "ct2", n=2, series_uid="9.9")
    _, processor = load_model(base_models[("clip", "llama")])
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"id": "ok", "prompt": "<image>\nIs there a nodule?", "chosen": "Yes.", "rejected": "No.", "images": ["ct1"]},
            {"id": "short", "prompt": "<image>\nIs there a nodule?", "chosen": "Yes.", "rejected": "Yes.", "images": ["ct1"],
             "rejected_images": ["ct2"]}]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples, _, report = prepare_pairs([str(pairs)], Renderer(processor, "chat", 2048), image_folder=images,
                                       skip_invalid=True, progress=False, slices=SliceSpec(3))
    placeholder = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    assert len(samples) == 2 and all(len(s.images) == 3 and int((s.input_ids == placeholder).sum()) == 3
                                     for s in samples)
    assert report.counts() == {"image_count_mismatch": 1} and "rejected side" in report.errors[0].reason


def test_serve_takes_a_series_under_its_root_and_no_link_out_of_it(tmp_path: Path) -> None:
    """A local series folder or volume under --image-root gives its slices (each counted in --max-images); a link
    out of the root is refused, with a `#slice=K` suffix too and as a file inside a series folder."""
    from medllava.serve import RequestError, ServeSettings, read_images

    root, outside = tmp_path / "root", tmp_path / "outside"
    slices = write_series(root / "ct1", n=5)
    outside.mkdir()
    write_nifti(outside / "secret.nii.gz")
    (root / "link.nii.gz").symlink_to(outside / "secret.nii.gz")
    settings = ServeSettings(model_id="m", image_root=root, slices=SliceSpec(3), max_images=4)
    assert [len(part) for part in read_images(["ct1", f"ct1/{slices[0].name}"], settings)] == [3, 1]
    with pytest.raises(RequestError) as info:
        read_images(["ct1", "ct1"], settings)  # 6 slice images
    assert info.value.code == "too_many_images"
    for url in ("link.nii.gz#slice=0", "link.nii.gz"):
        with pytest.raises(RequestError) as info:
            read_images([url], settings)
        assert info.value.status == 403, url
    leaked = write_series(outside / "s", n=2)
    write_series(root / "leaky", n=1)
    (root / "leaky" / "z.dcm").symlink_to(leaked[1])  # a slice of the series that lives outside the root
    with pytest.raises(RequestError) as info:
        read_images(["leaky"], settings)
    assert info.value.status == 403
