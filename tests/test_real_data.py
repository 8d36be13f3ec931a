"""What a user meets on a real data set: symlinked image folders, resume under a changed config, DICOM windows
(presets, VOI LUT) in training, and a model card that lists what reproduces the run."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from medllava.config import ConfigError, config_from_dict
from medllava.data.records import RecordError
from medllava.data.validate import resolve_image

from .conftest import stage_dict, write_jsonl

# -- symlinked image folders -------------------------------------------------------------------------------------


def hub_snapshot(phantom: Path, root: Path) -> Path:
    """The Hugging Face cache layout: snapshots/<rev>/images/... are links into ../../blobs/<hash>."""
    blobs = root / "blobs"
    snapshot = root / "snapshots" / "abc123" / "images"
    for i, src in enumerate(sorted((phantom / "images").rglob("*.png"))):
        blob = blobs / f"{i:08x}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, blob)
        link = snapshot / src.relative_to(phantom / "images")
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


def test_images_reached_through_symlinks_inside_the_folder_train(tmp_path: Path, phantom: Path,
                                                                 base_models: dict) -> None:
    from medllava.train.sft import prepare_sft

    images = hub_snapshot(phantom, tmp_path / "hub")
    assert resolve_image("train/train_00000.png", images).is_file()
    linked_dir = tmp_path / "linked"
    linked_dir.mkdir()
    (linked_dir / "train").symlink_to(images / "train", target_is_directory=True)  # a folder of links is fine too
    assert resolve_image("train/train_00001.png", linked_dir).is_file()
    for bad in ("../hub/blobs/00000000", "train/../../escape.png"):
        with pytest.raises(RecordError, match="escapes the image folder"):
            resolve_image(bad, images)
    with pytest.raises(RecordError, match="absolute image path"):
        resolve_image(str(images / "train/train_00000.png"), images)

    cfg = stage_dict(tmp_path, phantom, init_from=base_models[("clip", "llama")], optim={"max_steps": 1},
                     data={"image_folder": str(images)})
    run = prepare_sft(config_from_dict(cfg))
    assert len(run.trainer.train_dataset) == 24
    run.trainer.train()


# -- resume under a changed config -------------------------------------------------------------------------------


def test_resume_refuses_a_changed_config_unless_forced(tmp_path: Path, phantom: Path, base_models: dict) -> None:
    from medllava.train.sft import prepare_sft

    cfg = stage_dict(tmp_path, phantom, init_from=base_models[("clip", "llama")],
                     optim={"max_steps": 2}, run={"save_steps": 1, "save_total_limit": 3})
    run = prepare_sft(config_from_dict(cfg))
    run.trainer.train()
    out = Path(cfg["run"]["output_dir"])
    assert (out / "checkpoint-2" / "medllava_resume.json").is_file()

    same = prepare_sft(config_from_dict({**cfg, "run": {**cfg["run"], "logging_steps": 5, "report_to": "none"}}))
    assert same.checkpoint and same.checkpoint.endswith("checkpoint-2")  # logging may change on resume

    changed = {**cfg, "optim": {**cfg["optim"], "lr": 1e-3}, "data": {**cfg["data"], "max_length": 600}}
    with pytest.raises(ConfigError, match=r"changed since .*checkpoint-2.*: data\.max_length, optim\.lr.*run\.resume: force"):
        prepare_sft(config_from_dict(changed))
    forced = prepare_sft(config_from_dict({**changed, "run": {**changed["run"], "resume": "force"}}))
    assert forced.checkpoint and forced.checkpoint.endswith("checkpoint-2")


# -- DICOM windows in training ------------------------------------------------------------------------------------

pydicom = pytest.importorskip("pydicom")


def test_window_presets_parse() -> None:
    from medllava.imaging import WINDOW_PRESETS, Window

    assert Window.parse("lung") == Window(-600, 1500) and Window.parse("Brain") == Window(40, 80)
    assert Window.parse("40,400") == Window(40, 400)
    assert {"lung", "mediastinum", "bone", "brain", "abdomen"} <= set(WINDOW_PRESETS)
    with pytest.raises(ValueError, match="one of .*lung"):
        Window.parse("lungs")


def _ct_with(tmp_path: Path, name: str, **elements: object) -> Path:
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for key in ("WindowCenter", "WindowWidth"):
        if key in ds:
            delattr(ds, key)
    for key, value in elements.items():
        setattr(ds, key, value)
    path = tmp_path / name
    ds.save_as(path)
    return path


def _voi_expected(path: Path) -> np.ndarray:
    """pydicom's apply_voi_lut on the rescaled values, mapped from its output range to 0..255."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    from medllava.imaging import voi_output_range

    ds = pydicom.dcmread(path)
    out = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float64)
    lo, hi = voi_output_range(ds)
    return np.clip((out - lo) / (hi - lo) * 255.0, 0, 255).round()


def test_dicom_voi_lut_sequence_renders_as_pydicom_applies_it(tmp_path: Path) -> None:
    from pydicom.dataset import Dataset

    from medllava.imaging import load_image

    item = Dataset()
    item.add_new(0x00283002, "SS", [256, -1024, 12])  # LUTDescriptor: 256 entries from -1024 HU, 12-bit output
    item.add_new(0x00283006, "US", [int(4095 * (1 - i / 255)) for i in range(256)])  # LUTData: inverting steps
    item.LUTExplanation = "test"
    path = _ct_with(tmp_path, "voi_lut.dcm", VOILUTSequence=[item])
    gray = np.asarray(load_image(path))[..., 0].astype(np.float64)
    assert np.abs(gray - _voi_expected(path)).max() <= 1
    plain = np.asarray(load_image(_ct_with(tmp_path, "plain.dcm")))[..., 0].astype(np.float64)
    assert np.corrcoef(gray.ravel(), plain.ravel())[0, 1] < 0  # the LUT inverts: not the min-max rendering


def test_dicom_sigmoid_voi_function_renders_as_pydicom_applies_it(tmp_path: Path) -> None:
    from medllava.imaging import load_image

    path = _ct_with(tmp_path, "sigmoid.dcm", WindowCenter=40, WindowWidth=400, VOILUTFunction="SIGMOID")
    gray = np.asarray(load_image(path))[..., 0].astype(np.float64)
    assert np.abs(gray - _voi_expected(path)).max() <= 1


def test_dicom_pixel_limit_is_checked_before_decoding(tmp_path: Path) -> None:
    from medllava.imaging import ImageError, load_image

    path = _ct_with(tmp_path, "huge.dcm", Rows=60000, Columns=60000)  # the pixel data is that of 128x128
    with pytest.raises(ImageError) as err:
        load_image(path)
    assert err.value.kind == "image_too_large"


def test_a_stage_with_a_lung_window_feeds_the_windowed_image(tmp_path: Path, phantom: Path, base_models: dict) -> None:
    import torch
    from pydicom.data import get_testdata_file

    from medllava.imaging import Window, load_image
    from medllava.train.sft import prepare_sft

    images = tmp_path / "dicom"
    images.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), images / "ct.dcm")
    data = write_jsonl(tmp_path / "ct.jsonl", [{"id": "ct", "image": "ct.dcm", "conversations": [
        {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "An axial CT slice."}]}])
    cfg = stage_dict(tmp_path, phantom, init_from=base_models[("clip", "llama")],
                     data={"train_files": [str(data)], "image_folder": str(images), "window": "lung"})
    run = prepare_sft(config_from_dict(cfg))
    fed = run.trainer.train_dataset[0]["image_inputs"]["pixel_values"]
    processor = run.processor.image_processor
    lung = processor(images=[load_image(images / "ct.dcm", window=Window.parse("lung"))], return_tensors="pt")
    own = processor(images=[load_image(images / "ct.dcm")], return_tensors="pt")
    assert torch.equal(fed, lung["pixel_values"]) and not torch.equal(fed, own["pixel_values"])
    with pytest.raises(ConfigError, match="data.window"):
        config_from_dict({**cfg, "data": {**cfg["data"], "window": "lungs"}})


# -- the model card -----------------------------------------------------------------------------------------------


def test_model_card_lists_what_reproduces_the_run(tmp_path: Path, phantom: Path, base_models: dict) -> None:
    import subprocess
    import sys

    from medllava.export import export
    from medllava.train.stage import run_stage

    sft = stage_dict(tmp_path / "sft", phantom, init_from=base_models[("clip", "llama")],
                     trainable={"vision": "frozen", "projector": "full", "llm": "lora"},
                     lora={"target_modules": ["q_proj", "v_proj"]},
                     optim={"max_steps": 2, "per_device_batch_size": 2, "global_batch_size": 4, "warmup_ratio": 0.1,
                            "scheduler": "cosine"}, run={"seed": 7})
    first = run_stage(config_from_dict(sft))
    grpo = stage_dict(tmp_path / "grpo", phantom, init_from=first, optim={"max_steps": 1, "per_device_batch_size": 4})
    grpo["kind"] = "grpo"
    grpo["data"]["train_files"] = [str(phantom / "rl.jsonl")]
    grpo["grpo"] = {"prompt": "plain", "rewards": {"accuracy": 1.0, "answer_format": 0.25}, "num_generations": 4,
                    "max_completion_length": 6, "temperature": 0.9, "beta": 0.0, "log_completions_every": 0}
    second = run_stage(config_from_dict(grpo))
    result = subprocess.run([sys.executable, "-m", "medllava.cli", "eval", str(second), "--data", str(phantom / "test.jsonl"),
                             "--image-folder", str(phantom / "images"), "--limit", "4"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    export(second, tmp_path / "export")
    card = (tmp_path / "export" / "README.md").read_text()
    rl_records = sum(1 for line in (phantom / "rl.jsonl").read_text().splitlines() if line.strip())
    import hashlib

    for needle in (
        "## Reproducing the run", "global batch: 4 samples per optimizer step = 2 per device x 1 rank(s) x 2 accumulation",
        "packing: on", "schedule cosine, warm-up 0.1", "LoRA: r 4, alpha 8, dropout 0.0, targets q_proj, v_proj",
        "quantization: none", "GRPO: 4 generations per question, completion length 6, temperature 0.9",
        "beta (KL) 0.0", "rewards accuracy 1.0, answer_format 0.25", "seed 7",
        f"data: `{phantom / 'instruct.jsonl'}` (24 records, sha256 "
        f"{hashlib.sha256((phantom / 'instruct.jsonl').read_bytes()).hexdigest()})",
        f"data: `{phantom / 'rl.jsonl'}` ({rl_records} records",
        "greedy, plain prompt, at most 6 new tokens",
    ):
        assert needle in card, needle
