"""Start-up that scales: header-only image checks with loader-time skips that are counted and named, rendering
across processes equal to rendering in one, and a flat (memory-mapped) cache. The figures themselves come from
benchmarks/data_scale.py, never from a timed test."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medllava.config import config_from_dict
from medllava.data.records import iter_raw, normalize
from medllava.data.validate import check_images, render_records
from medllava.imaging import ImageError, load_image, probe_image

from .conftest import stage_dict


def truncated_jpeg(path: Path) -> Path:
    """A JPEG whose header is fine and whose pixel data is cut short (and then garbage)."""
    buffer = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(buffer, "JPEG")
    data = buffer.getvalue()
    path.write_bytes(data[: len(data) // 3] + b"\x00" * 64)
    return path


def test_header_check_passes_what_only_decoding_finds(tmp_path: Path) -> None:
    bad = truncated_jpeg(tmp_path / "cut.jpg")
    probe_image(bad)  # the header is readable and the size is within the limit
    with pytest.raises(ImageError):
        load_image(bad)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    huge = tmp_path / "huge.png"
    Image.new("L", (20_000, 20_000)).save(huge)
    kinds = {Path(k).name: e.kind for k, e in check_images(
        [bad, tmp_path / "empty.png", tmp_path / "text.png", tmp_path / "missing.png", huge], level="header",
        progress=False).items()}
    assert kinds == {"empty.png": "empty_file", "text.png": "unsupported_format", "missing.png": "missing_image",
                     "huge.png": "image_too_large"}
    assert set(check_images([bad], level="full", progress=False)) == {bad}
    assert check_images([tmp_path / "missing.png"], level="none") == {}


def _stage_with_broken_image(tmp_path: Path, phantom: Path, base: Path, image_check: str) -> tuple[dict, list[str]]:
    images = tmp_path / "images"
    shutil.copytree(phantom / "images", images)
    records = [json.loads(line) for line in (phantom / "instruct.jsonl").read_text().splitlines()]
    victim = records[5]["image"]
    truncated_jpeg(images / victim)  # a .png name with JPEG bytes cut short: the header reads, the pixels do not
    broken = [r["id"] for r in records if r["image"] == victim]
    cfg = stage_dict(tmp_path, phantom, init_from=base, optim={"max_steps": 6, "per_device_batch_size": 4},
                     data={"image_folder": str(images), "image_check": image_check, "skip_invalid": True})
    return cfg, broken


def test_an_image_that_fails_in_the_loader_is_skipped_counted_and_named(tmp_path: Path, phantom: Path,
                                                                          base_models: dict) -> None:
    from medllava.train.stage import run_stage

    cfg, broken = _stage_with_broken_image(tmp_path, phantom, base_models[("clip", "llama")], "header")
    out = run_stage(config_from_dict(cfg))  # 6 steps x 4 samples: every one of the 24 samples is met
    report = json.loads((out / "data_report.json").read_text())
    assert report["valid"] == 24 and report["invalid"] == 0  # the header check let it through ...
    assert report["loader_skipped"] == len(broken)  # ... and the loader named it, once however often it was met
    assert [e["id"] for e in report["loader_errors"]] == broken
    assert report["loader_errors"][0]["kind"] == "unreadable_image" and report["loader_errors"][0]["line"] > 0
    history = json.loads((out / "train_log.json").read_text())
    assert all(np.isfinite(h["loss"]) for h in history if "loss" in h)


def test_full_image_check_rejects_it_before_training(tmp_path: Path, phantom: Path, base_models: dict) -> None:
    from medllava.data.render import Renderer
    from medllava.model import load_model
    from medllava.train.sft import prepared_samples

    cfg, broken = _stage_with_broken_image(tmp_path, phantom, base_models[("clip", "llama")], "full")
    _, processor = load_model(base_models[("clip", "llama")])
    stage = config_from_dict(cfg)
    out = tmp_path / "out"
    out.mkdir()
    samples = prepared_samples(stage, Renderer(processor, "chat", 512), out)
    report = json.loads((out / "data_report.json").read_text())
    assert len(samples) == 24 - len(broken) and [e["id"] for e in report["errors"]] == broken


def test_rendering_across_processes_equals_one_process(phantom: Path, base_models: dict) -> None:
    from medllava.data.render import Renderer
    from medllava.model import load_model

    _, processor = load_model(base_models[("siglip", "qwen2")])
    renderer = Renderer(processor, "chat", 512)
    records = [normalize(raw) for raw in iter_raw(phantom / "instruct.jsonl")] * 3
    records[7].turns[1].text = ""  # an error travels back in order too
    serial = render_records(records, renderer, workers=1)
    parallel = render_records(records, renderer, workers=2, min_chunk=5)
    assert len(serial) == len(parallel) == 72
    for a, b in zip(serial, parallel):
        assert type(a) is type(b)
        if hasattr(a, "input_ids"):
            assert a.id == b.id and np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.labels, b.labels)
        else:
            assert a.describe() == b.describe()


def test_cache_is_memory_mapped_and_equal_to_the_samples(tmp_path: Path, phantom: Path, base_models: dict) -> None:
    from medllava.data.cache import CachedSamples, save_samples
    from medllava.data.render import Renderer
    from medllava.model import load_model

    _, processor = load_model(base_models[("clip", "llama")])
    renderer = Renderer(processor, "chat", 512)
    samples = [renderer.render(normalize(raw)) for raw in iter_raw(phantom / "instruct.jsonl")]
    cached = CachedSamples(save_samples(samples, tmp_path / "cache"))
    assert len(cached) == len(samples)
    for a, b in zip(samples, cached):
        assert (a.id, a.images, a.length, a.source, a.line) == (b.id, b.images, b.length, b.source, b.line)
        assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.labels, b.labels)
    assert cached[-1].id == samples[-1].id
    with pytest.raises(IndexError):
        cached[len(samples)]
    # nothing per sample lives in Python objects: ids, labels, lengths and metadata are all memory-mapped
    assert all(isinstance(v, np.memmap) for v in (cached._ids, cached._labels, cached.lengths, cached._meta))


def test_dataloader_workers_freeze_the_inherited_heap(phantom: Path, base_models: dict) -> None:
    """A forked worker's garbage collector must not walk (and so copy) the parent's objects: the dataset freezes
    them on its first item in a worker; the parent's collector is left as it was."""
    import gc

    import torch
    from torch.utils.data import DataLoader

    from medllava.data.collate import SFTDataset
    from medllava.data.render import Renderer
    from medllava.model import load_model

    class Probe(SFTDataset):
        def __getitem__(self, index: int) -> dict:
            item = super().__getitem__(index)
            item["frozen"] = gc.get_freeze_count()
            return item

    _, processor = load_model(base_models[("clip", "llama")])
    renderer = Renderer(processor, "chat", 512)
    samples = [renderer.render(normalize(raw)) for raw in iter_raw(phantom / "instruct.jsonl")][:4]
    dataset = Probe(samples, renderer.images)
    before = gc.get_freeze_count()
    loader = DataLoader(dataset, batch_size=None, num_workers=1, multiprocessing_context="fork")
    assert all(item["frozen"] > 0 for item in loader)
    assert gc.get_freeze_count() == before
    assert dataset[0]["frozen"] == before  # in the main process nothing is frozen
    assert isinstance(dataset[0]["input_ids"], torch.Tensor)


def _build_in_a_process(folder: str, log: str) -> bool:
    import os
    import time
    from pathlib import Path

    from medllava.data.cache import build_once

    def write(staging: Path) -> None:
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        staging.mkdir(parents=True)
        for i in range(20):
            (staging / f"part{i}.txt").write_text(str(i))
            time.sleep(0.02)

    return build_once(Path(folder), write)


def test_two_jobs_on_one_cache_both_finish_and_the_data_is_made_once(tmp_path: Path) -> None:
    """Issue 28: two jobs sharing one data.cache_dir wrote into the same staging folder and one crashed
    (FileNotFoundError / FileExistsError). Under a lock beside the folder, the first makes it in a staging folder of
    its own; the second waits and reuses it. A folder a killed job left incomplete is made again."""
    import multiprocessing

    from medllava.data.cache import COMPLETE, build_once, is_complete

    folder, log = tmp_path / "cache" / "sft-key", tmp_path / "writers.log"
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        built = pool.starmap(_build_in_a_process, [(str(folder), str(log))] * 2)
    assert sorted(built) == [False, True] and len(log.read_text().split()) == 1
    assert is_complete(folder) and sorted(p.name for p in folder.iterdir()) == sorted(
        [COMPLETE] + [f"part{i}.txt" for i in range(20)])
    assert [p.name for p in folder.parent.iterdir() if "staging" in p.name] == []
    # a folder without its COMPLETE mark (a killed writer) is made again
    (folder / COMPLETE).unlink()
    assert build_once(folder, lambda staging: staging.mkdir()) and is_complete(folder)
