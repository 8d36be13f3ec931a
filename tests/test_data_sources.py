"""Every `datasets` source (parquet, saved dataset, embedded images) in every stage and tool, and evaluation that
decodes images batch by batch and loads in bf16 on a GPU."""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from medllava.config import config_from_dict
from medllava.imaging import load_image

from .conftest import stage_dict, write_jsonl


def embedded_copy(jsonl: Path, images: Path, out: Path, *, drop_ids: bool = False) -> Path:
    """A JSONL VQA/LLaVA file turned into a parquet file (or a saved dataset folder) with embedded images."""
    import datasets

    rows = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]
    for row in rows:
        row["image"] = {"bytes": (images / row["image"]).read_bytes(), "path": Path(row["image"]).name}
        if drop_ids:
            row.pop("id")
    columns = list(dict.fromkeys(k for row in rows for k in row))
    ds = datasets.Dataset.from_list([{k: row.get(k) for k in columns} for row in rows])
    ds = ds.cast_column("image", datasets.Image())
    if out.suffix == ".parquet":
        ds.to_parquet(str(out))
    else:
        ds.save_to_disk(str(out))
    return out


def pixels(ref) -> np.ndarray:
    return np.asarray(load_image(ref))


def test_grpo_reads_embedded_images_from_parquet(tmp_path: Path, phantom: Path, base_models: dict) -> None:
    """The GRPO rows hold a file for each embedded image (in the data cache), never the image's string form."""
    from medllava.model import load_model
    from medllava.train.grpo import prepared_rows

    from .test_grpo import grpo_stage

    source = embedded_copy(phantom / "rl.jsonl", phantom / "images", tmp_path / "rl.parquet")
    cfg = config_from_dict(grpo_stage(tmp_path, phantom, base_models[("clip", "llama")],
                                      f"--data.train_files=[{source}]", "--data.max_samples=null"))

    _, processor = load_model(base_models[("clip", "llama")])
    rows = prepared_rows(cfg, processor, tmp_path / "out")
    originals = [json.loads(line) for line in (phantom / "rl.jsonl").read_text().splitlines()]
    assert len(rows) == len(originals)
    for row, orig in zip(rows, originals):
        assert len(row["images"]) == 1 and Path(row["images"][0]).is_file(), row["images"]
        assert np.array_equal(pixels(row["images"][0]), pixels(phantom / "images" / orig["image"]))


def test_sft_reads_embedded_images_from_a_saved_dataset(tmp_path: Path, phantom: Path, base_models: dict) -> None:
    from medllava.train.sft import prepare_sft

    source = embedded_copy(phantom / "instruct.jsonl", phantom / "images", tmp_path / "instruct_ds")
    cfg = stage_dict(tmp_path, phantom, init_from=base_models[("clip", "llama")], optim={"max_steps": 1},
                     data={"train_files": [str(source)]})
    run = prepare_sft(config_from_dict(cfg))
    dataset = run.trainer.train_dataset
    assert len(dataset) == 24
    first = json.loads((phantom / "instruct.jsonl").read_text().splitlines()[0])
    assert np.array_equal(pixels(dataset.samples[0].images[0]), pixels(phantom / "images" / first["image"]))
    run.trainer.train()


def test_eval_reads_embedded_images(tmp_path: Path, phantom: Path, base_models: dict) -> None:
    from medllava.evaluate import evaluate
    from medllava.model import load_model

    model, processor = load_model(base_models[("clip", "llama")])
    source = embedded_copy(phantom / "test.jsonl", phantom / "images", tmp_path / "test.parquet")
    plain = evaluate(model, processor, phantom / "test.jsonl", image_folder=phantom / "images", max_new_tokens=4,
                     out_dir=tmp_path / "a", progress=False)
    embedded = evaluate(model, processor, source, max_new_tokens=4, out_dir=tmp_path / "b", progress=False)
    assert "skipped" not in embedded and embedded["n"] == plain["n"] == 18
    read = [json.loads(line)["prediction"] for line in (tmp_path / "a/predictions.jsonl").read_text().splitlines()]
    assert read == [json.loads(line)["prediction"] for line in (tmp_path / "b/predictions.jsonl").read_text().splitlines()]


def test_eval_decodes_images_batch_by_batch_and_counts_a_bad_one(tmp_path: Path, phantom: Path, base_models: dict,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """At most one batch of decoded images is alive at a time; an image that fails to decode is skipped, counted
    and named, and the others are still answered."""
    import shutil

    import medllava.evaluate as ev
    from medllava.model import load_model

    images = tmp_path / "images"
    shutil.copytree(phantom / "images", images)
    rows = [json.loads(line) for line in (phantom / "test.jsonl").read_text().splitlines()]
    (images / rows[3]["image"]).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)  # a header, then garbage
    alive: set[int] = set()
    peak = [0]

    def counting_load(*args, **kwargs):
        img = load_image(*args, **kwargs)
        key = id(img)
        alive.add(key)
        weakref.finalize(img, alive.discard, key)
        peak[0] = max(peak[0], len(alive))
        return img

    import medllava.imaging as imaging

    monkeypatch.setattr(imaging, "load_image", counting_load)  # what eval's batch decoding (decode_each) calls
    model, processor = load_model(base_models[("clip", "llama")])
    metrics = ev.evaluate(model, processor, phantom / "test.jsonl", image_folder=images, batch_size=2,
                          max_new_tokens=2, blind=True, out_dir=tmp_path / "eval", progress=False)
    assert peak[0] <= 2 * 2, f"{peak[0]} decoded images alive at once with batch size 2"
    broken = [r["id"] for r in rows if r["image"] == rows[3]["image"]]
    assert metrics["n"] == len(rows) - len(broken) and metrics["skipped"] == {"unsupported_format": len(broken)}
    skipped = [json.loads(line) for line in (tmp_path / "eval/skipped.jsonl").read_text().splitlines()]
    assert [s["id"] for s in skipped] == broken


def test_eval_chat_and_filter_load_bf16_on_a_gpu_that_has_it(monkeypatch: pytest.MonkeyPatch, base_models: dict,
                                                            tmp_path: Path, phantom: Path) -> None:
    import medllava.model as model_module
    from medllava.cli import main
    from medllava.model import inference_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert inference_dtype(torch.device("cuda")) == torch.bfloat16
    assert inference_dtype(torch.device("cpu")) == torch.float32
    seen: list[torch.dtype] = []

    class Stop(Exception):
        pass

    def fake_load(path, *, dtype=torch.float32, **kwargs):
        seen.append(dtype)
        raise Stop

    monkeypatch.setattr(model_module, "load_model", fake_load)
    monkeypatch.setattr(model_module, "pick_device", lambda name="auto": torch.device("cuda"))
    with pytest.raises(Stop):
        main(["eval", str(base_models[("clip", "llama")]), "--data", str(phantom / "test.jsonl")])
    from data_recipes import pass_rate_filter

    with pytest.raises(Stop):
        pass_rate_filter.main(["--model", str(base_models[("clip", "llama")]), "--data", str(phantom / "rl.jsonl"),
                               "--out", str(tmp_path / "kept.jsonl")])
    assert seen == [torch.bfloat16, torch.bfloat16]


def _run_filter(*args: str) -> int:
    from data_recipes import pass_rate_filter

    return pass_rate_filter.main(list(args))


@pytest.mark.parametrize("form", ["parquet", "json_array_without_ids"])
def test_pass_rate_filter_carries_rows_from_any_source_unchanged(form: str, tmp_path: Path, phantom: Path,
                                                                 base_models: dict) -> None:
    """Every kept question is written out as read (plus its pass rate): embedded images stay embedded (parquet
    out), records without ids keep their fields."""
    import datasets

    lines = (phantom / "rl.jsonl").read_text().splitlines()[:6]
    short = write_jsonl(tmp_path / "rl6.jsonl", lines)
    if form == "parquet":
        source = embedded_copy(short, phantom / "images", tmp_path / "rl.parquet")
        out = tmp_path / "kept.parquet"
        image_folder = str(tmp_path)
    else:
        rows = [json.loads(line) for line in lines]
        for row in rows:
            row.pop("id")
            row["note"] = {"reader": "r1", "grade": [1, 2]}
        source = tmp_path / "rl.json"
        source.write_text(json.dumps(rows), encoding="utf-8")
        out = tmp_path / "kept.jsonl"
        image_folder = str(phantom / "images")
    code = _run_filter("--model", str(base_models[("clip", "llama")]), "--data", str(source), "--image-folder",
                       image_folder, "--out", str(out), "--n", "2", "--max-new-tokens", "2", "--min-rate", "-1",
                       "--max-rate", "2")
    assert code == 0
    if form == "parquet":
        kept = datasets.load_dataset("parquet", data_files=str(out), split="train")
        original = datasets.load_dataset("parquet", data_files=str(source), split="train")
        assert isinstance(kept.features["image"], datasets.Image)
        assert len(kept) == len(original) == 6
        for a, b in zip(kept, original):
            assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
            assert {k: v for k, v in a.items() if k not in ("image", "pass_rate")} == \
                {k: v for k, v in b.items() if k != "image"}
    else:
        kept = [json.loads(line) for line in out.read_text().splitlines()]
        assert [{k: v for k, v in r.items() if k != "pass_rate"} for r in kept] == json.loads(source.read_text())
        assert all(0 <= r["pass_rate"] <= 1 for r in kept)


def test_pass_rate_filter_refuses_jsonl_for_embedded_images_before_sampling(tmp_path: Path, phantom: Path,
                                                                            base_models: dict) -> None:
    source = embedded_copy(phantom / "rl.jsonl", phantom / "images", tmp_path / "rl.parquet")
    with pytest.raises(SystemExit, match="embedded images.*parquet"):
        _run_filter("--model", str(base_models[("clip", "llama")]), "--data", str(source), "--out",
                    str(tmp_path / "kept.jsonl"))


def test_self_instruct_writes_embedded_images_by_content(tmp_path: Path, phantom: Path) -> None:
    from collections import Counter

    from medllava.recipes.self_instruct import iter_inputs

    source = embedded_copy(phantom / "align.jsonl", phantom / "images", tmp_path / "align.parquet")
    skipped: Counter = Counter()
    assert list(iter_inputs([source], skipped)) == [] and skipped["embedded_image"] == 24
    skipped = Counter()
    items = list(iter_inputs([source], skipped, tmp_path / "images"))
    originals = [json.loads(line) for line in (phantom / "align.jsonl").read_text().splitlines()]
    assert len(items) == 24 and not skipped
    for (rid, image, _caption, _), orig in zip(items, originals):
        assert rid == orig["id"]
        assert (tmp_path / "images" / image).read_bytes() == (phantom / "images" / orig["image"]).read_bytes()
