"""The contamination check: exact and near-duplicate images and repeated (image, question) pairs between training
files and an evaluation set, in `medllava data overlap`, `medllava eval --prior-from` and the model card."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from medllava.data.overlap import MIN_SIMILARITY, check_overlap, image_key, index_training

from .conftest import write_jsonl


def _scan(seed: int, size: int = 96) -> Image.Image:
    """A study-like picture: smooth anatomy of random shape plus texture (distinct seeds, distinct images)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    field = sum(rng.uniform(0.3, 1) * np.sin(rng.uniform(2, 9) * x + rng.uniform(0, 6)) *
                np.cos(rng.uniform(2, 9) * y + rng.uniform(0, 6)) for _ in range(4))
    field = (field - field.min()) / np.ptp(field) * 200 + rng.normal(0, 6, field.shape)
    return Image.fromarray(np.clip(field, 0, 255).astype(np.uint8)).convert("RGB")


def _variants(image: Image.Image) -> dict[str, Image.Image]:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=75)
    return {"jpeg": Image.open(io.BytesIO(buffer.getvalue())), "half": image.resize((image.width // 2, image.height // 2)),
            "double": image.resize((image.width * 2, image.height * 2)),
            "brighter": ImageEnhance.Brightness(image).enhance(1.1), "contrast": ImageEnhance.Contrast(image).enhance(0.9)}


def test_a_reencoded_resized_or_brightened_copy_is_near_and_distinct_scans_are_not() -> None:
    """The threshold's two sides, measured: every variant of a scan stays above MIN_SIMILARITY, distinct scans
    stay below it."""
    scans = [_scan(s) for s in range(40)]
    keys = [image_key(s) for s in scans]
    matrix = np.stack([k.fingerprint for k in keys])
    similar = matrix @ matrix.T
    np.fill_diagonal(similar, -1)
    assert similar.max() < MIN_SIMILARITY, similar.max()
    for scan, key in zip(scans[:10], keys[:10]):
        for name, variant in _variants(scan).items():
            other = image_key(variant)
            assert float(other.fingerprint @ key.fingerprint) >= MIN_SIMILARITY, name
            assert other.sha256 != key.sha256  # not the same pixels: only the near check finds it


def test_overlap_names_exact_near_and_repeated_pairs(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for i in range(6):
        _scan(i).save(images / f"train{i}.png")
    _scan(0).save(images / "copy_of_train0.png")  # the same pixels under another name
    _variants(_scan(1))["jpeg"].save(images / "train1_as_jpeg.jpg")
    _scan(100).save(images / "new.png")
    train = write_jsonl(tmp_path / "train.jsonl", [
        {"id": "t0", "image": "train0.png", "question": "Is there a lesion?", "answer": "yes", "qtype": "yes_no"},
        {"id": "t1", "image": "train1.png", "conversations": [{"from": "human", "value": "<image>\nWhich side?"},
                                                               {"from": "gpt", "value": "Left."}]},
        *({"id": f"t{i}", "image": f"train{i}.png", "question": "Is it normal?", "answer": "no", "qtype": "yes_no"}
          for i in range(2, 6))])
    test = write_jsonl(tmp_path / "test.jsonl", [
        {"id": "e-copy", "image": "copy_of_train0.png", "question": "Is there a lesion?", "answer": "yes",
         "qtype": "yes_no"},
        {"id": "e-jpeg", "image": "train1_as_jpeg.jpg", "question": "How large is it?", "answer": "small",
         "qtype": "open"},
        {"id": "e-new", "image": "new.png", "question": "Is there a lesion?", "answer": "no", "qtype": "yes_no"}])
    report = check_overlap(index_training([train], images, progress=False), test, images, progress=False)
    assert report["exact_image"]["ids"] == ["e-copy"] and report["near_image"]["ids"] == ["e-jpeg"]
    assert report["repeated_pair"]["ids"] == ["e-copy"]  # e-jpeg asks another question about its image
    assert report["contaminated"] == {"count": 2, "ids": ["e-copy", "e-jpeg"]}
    assert report["train_images"] == 6 and report["eval_records"] == 3


def test_unreadable_images_are_counted_never_passed_as_clean(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    _scan(0).save(images / "a.png")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 32)
    train = write_jsonl(tmp_path / "train.jsonl", [
        {"id": "t", "image": "broken.png", "question": "Q?", "answer": "yes", "qtype": "yes_no"}])
    test = write_jsonl(tmp_path / "test.jsonl", [
        {"id": "e", "image": "a.png", "question": "Q?", "answer": "yes", "qtype": "yes_no"},
        {"id": "f", "image": "missing.png", "question": "Q?", "answer": "yes", "qtype": "yes_no"}])
    report = check_overlap(index_training([train], images, progress=False), test, images, progress=False)
    assert report["unreadable_train"] == 1 and report["unreadable_eval"] == 1


def test_data_overlap_command_and_eval_report_the_clean_subset(tmp_path: Path, phantom: Path, base_models: dict,
                                                               capsys: pytest.CaptureFixture) -> None:
    """`medllava data overlap` writes the report; `medllava eval --prior-from` puts it in metrics.json with the
    clean subset's accuracy, the table and the summary say so. A test record whose image is a training image is
    found."""
    from medllava.cli import main

    rows = [json.loads(line) for line in (phantom / "test.jsonl").read_text().splitlines()]
    train_image = json.loads((phantom / "rl.jsonl").read_text().splitlines()[0])["image"]
    rows[0]["image"] = train_image  # a leaked training image
    lost = next(i for i, r in enumerate(rows) if i and r["qtype"] == "yes_no")
    rows[lost]["image"] = "missing.png"  # unreadable: whether it overlaps is unknown, so it is not clean
    test = write_jsonl(tmp_path / "test.jsonl", rows)
    train = [str(phantom / "instruct.jsonl"), str(phantom / "rl.jsonl")]
    assert main(["data", "overlap", *train, "--eval", str(test), "--image-folder", str(phantom / "images"),
                 "--out", str(tmp_path / "overlap.json")]) == 0
    report = json.loads((tmp_path / "overlap.json").read_text())
    assert rows[0]["id"] in report["exact_image"]["ids"]
    assert main(["eval", str(base_models[("clip", "llama")]), "--data", str(test), "--image-folder",
                 str(phantom / "images"), "--out", str(tmp_path / "eval"), "--max-new-tokens", "2",
                 "--prior-from", *train, "--summary", str(tmp_path / "summary.json"), "--stage", "s"]) == 0
    metrics = json.loads((tmp_path / "eval/metrics.json").read_text())
    assert metrics["overlap"]["exact_image"]["ids"] == report["exact_image"]["ids"]
    assert report["unreadable_eval_ids"] == [rows[lost]["id"]]
    flagged = set(report["contaminated"]["ids"]) | set(report["repeated_pair"]["ids"])
    assert 0 < len(flagged) < len(rows) - 1
    clean_closed = [r for r in rows if r["id"] not in flagged and r["qtype"] != "open" and r is not rows[lost]]
    assert metrics["clean"]["n_closed"] == len(clean_closed) and metrics["clean"]["n"] == len(rows) - 1 - len(flagged)
    assert "overlap with training" in (tmp_path / "eval/metrics.md").read_text()
    entry = json.loads((tmp_path / "summary.json").read_text())["s"]
    assert entry["overlap"] == report["contaminated"]["count"]
    # --no-overlap: the text prior without reading every training image
    assert main(["eval", str(base_models[("clip", "llama")]), "--data", str(test), "--image-folder",
                 str(phantom / "images"), "--out", str(tmp_path / "eval2"), "--max-new-tokens", "2",
                 "--prior-from", *train, "--no-overlap"]) == 0
    metrics = json.loads((tmp_path / "eval2/metrics.json").read_text())
    assert "prior" in metrics and "overlap" not in metrics and "clean" not in metrics


def test_model_card_lists_the_overlap_of_each_evaluation() -> None:
    from medllava.export import _overlap_cell

    overlap = {"eval_records": 100, "contaminated": {"count": 3, "ids": ["a", "b", "c"]},
               "repeated_pair": {"count": 1, "ids": ["a"]}}
    assert _overlap_cell({"overlap": overlap, "clean": {"accuracy": 0.8123}}) == "3 of 100 records (0.812 on the rest)"
    assert _overlap_cell({}) == "not checked"
