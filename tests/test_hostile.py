"""The hostile-input matrix: each bad file or record gives its named error (or a counted skip); everything
else is still processed; nothing ends in a traceback. Data files and the chat CLI alike."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from medllava.cli import main
from medllava.data.records import ERROR_KINDS
from medllava.data.render import Renderer
from medllava.data.validate import DataValidationError, prepare_samples
from medllava.model import load_model

CONV = [{"from": "human", "value": "<image>\nIs there a lesion?"}, {"from": "gpt", "value": "No."}]


def _conv(*turns: tuple[str, str]) -> list[dict]:
    return [{"from": r, "value": v} for r, v in turns]


@pytest.fixture(scope="module")
def hostile_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image folder holding one good image and one of each kind of hostile file."""
    root = tmp_path_factory.mktemp("hostile") / "images"
    root.mkdir()
    Image.new("RGB", (40, 40), (50, 50, 50)).save(root / "ok.png")
    png = (root / "ok.png").read_bytes()
    (root / "corrupt.png").write_bytes(png[:60] + b"\x00" * 40 + png[100:140])
    Image.new("RGB", (64, 64), (10, 200, 30)).save(root / "full.jpg", quality=90)
    jpeg = (root / "full.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "empty.png").write_bytes(b"")
    Image.new("1", (12000, 12000)).save(root / "bomb.png")  # 144 Mpx in a few kB: a decompression bomb
    (root / "notes.png").write_text("this is not an image", encoding="utf-8")
    pydicom = pytest.importorskip("pydicom")
    shutil.copy(pydicom.data.get_testdata_file("reportsi.dcm"), root / "report.dcm")  # DICOM without pixel data
    Image.new("RGB", (8, 8)).save(root.parent / "outside.png")
    return root


def _abs_ok(root: Path) -> str:
    return str(root / "ok.png")


# kind -> (the bad line of the JSONL file: text, bytes or a record; a callable gets the image folder)
MATRIX: dict[str, object] = {
    "unreadable_image": {"id": "corrupt-png", "image": "corrupt.png", "conversations": CONV},
    "unreadable_image-jpeg": {"id": "truncated-jpeg", "image": "truncated.jpg", "conversations": CONV},
    "empty_file": {"id": "zero-byte", "image": "empty.png", "conversations": CONV},
    "image_too_large": {"id": "bomb", "image": "bomb.png", "conversations": CONV},
    "no_pixel_data": {"id": "dicom-no-pixels", "image": "report.dcm", "conversations": CONV},
    "unsupported_format": {"id": "text-as-png", "image": "notes.png", "conversations": CONV},
    "missing_image": {"id": "missing", "image": "nope.png", "conversations": CONV},
    "invalid_encoding": b'{"id": "latin1", "image": "ok.png", "conversations": "caf\xe9"}',
    "invalid_json": '{"id": "broken", "image": ',
    "not_an_object": "[1, 2, 3]",
    "missing_field": {"id": "no-conv", "image": "ok.png"},
    "unknown_role": {"id": "doctor", "image": "ok.png", "conversations": _conv(("doctor", "<image>\nHi"), ("gpt", "Hello"))},
    "empty_conversation": {"id": "empty", "image": "ok.png", "conversations": []},
    "bad_roles": {"id": "roles", "image": "ok.png", "conversations": _conv(("gpt", "<image>\nHello"), ("human", "Hi"))},
    "empty_answer": {"id": "blank", "image": "ok.png", "conversations": _conv(("human", "<image>\nHi"), ("gpt", "  "))},
    "image_count_mismatch": {"id": "two-tags", "image": "ok.png",
                             "conversations": _conv(("human", "<image>\n<image>\nHi"), ("gpt", "x"))},
    "image_outside_root": {"id": "escape", "image": "../outside.png", "conversations": CONV},
    "image_outside_root-absolute": lambda root: {"id": "absolute", "image": _abs_ok(root), "conversations": CONV},
    "too_long": {"id": "long", "image": "ok.png", "conversations": _conv(("human", "<image>\n" + "lesion " * 400), ("gpt", "No."))},
}


@pytest.fixture(scope="module")
def processor(base_models: dict):
    return load_model(base_models[("clip", "llama")])[1]


DECODE_ONLY = {"unreadable_image"}  # a PNG whose header reads and whose data is corrupt


def test_matrix_covers_the_error_kinds() -> None:
    kinds = {k.split("-")[0] for k in MATRIX}
    assert kinds <= set(ERROR_KINDS)
    assert {"unreadable_image", "empty_file", "image_too_large", "no_pixel_data", "invalid_encoding", "invalid_json",
            "unknown_role", "empty_conversation", "image_count_mismatch", "image_outside_root"} <= kinds


@pytest.mark.parametrize("case", sorted(MATRIX))
def test_hostile_record_gives_its_named_error_and_the_rest_is_processed(case: str, tmp_path: Path, hostile_images: Path,
                                                                        processor) -> None:
    kind = case.split("-")[0]
    bad = MATRIX[case]
    bad = bad(hostile_images) if callable(bad) else bad
    lines = [json.dumps({"id": "good1", "image": "ok.png", "conversations": CONV}).encode()]
    lines.append(bad if isinstance(bad, bytes) else (bad if isinstance(bad, str) else json.dumps(bad)).encode())
    lines.append(json.dumps({"id": "good2", "image": "ok.png", "conversations": CONV}).encode())
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    renderer = Renderer(processor, "chat", 128)
    # Pixel data that is corrupt behind a readable header is found by decoding: before training with
    # image_check 'full'; with the default 'header' the data loader finds it (tests/test_data_scale.py).
    check = "full" if case in DECODE_ONLY else "header"
    if check == "full":
        samples, _ = prepare_samples([str(path)], renderer, image_folder=hostile_images, progress=False)
        assert len(samples) == 3
    with pytest.raises(DataValidationError) as info:
        prepare_samples([str(path)], renderer, image_folder=hostile_images, report_dir=tmp_path, progress=False,
                        image_check=check)
    report = info.value.report
    assert [e.kind for e in report.errors] == [kind]
    err = report.errors[0]
    assert (err.source, err.line) == (str(path), 2)
    assert f"{path}:2" in str(info.value) and kind in str(info.value)
    assert report.total == 3 and report.valid == 2
    assert json.loads((tmp_path / "data_report.json").read_text())["counts"] == {kind: 1}
    samples, skipped = prepare_samples([str(path)], renderer, image_folder=hostile_images, skip_invalid=True,
                                       report_dir=tmp_path, progress=False, image_check=check)
    assert [s.id for s in samples] == ["good1", "good2"]
    assert skipped.counts() == {kind: 1}


CHAT_CASES = {
    "corrupt.png": "cannot decode image",
    "truncated.jpg": "cannot decode image",
    "empty.png": "empty (0 bytes)",
    "bomb.png": "too large",
    "report.dcm": "no pixel data",
    "notes.png": "not a recognised image format",
    "nope.png": "image file not found",
}


@pytest.mark.parametrize("name", sorted(CHAT_CASES))
def test_chat_cli_hostile_images_are_one_clear_line(name: str, hostile_images: Path, base_models: dict,
                                                    capsys: pytest.CaptureFixture) -> None:
    code = main(["chat", str(base_models[("clip", "llama")]), "--image", str(hostile_images / name), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("medllava chat: error")]
    assert len(lines) == 1 and CHAT_CASES[name] in lines[0] and name in lines[0]
    assert "Traceback" not in err
