#!/usr/bin/env python3
"""Start-up cost and loader memory at data scale: the first prepare of a training set, the cached re-run, and the
memory a DataLoader worker adds after a full pass.

    python benchmarks/data_scale.py --sizes 10000 100000 500000 --distinct 100000 --out results/data_scale

Synthetic LLaVA-style instruction records (two question/answer turns, one `<image>`), record i using image
i mod DISTINCT; the images are distinct 512x512 JPEGs (about 27 kB each, generated once under --work). The
tokenizer and chat template are the tiny preset's (medllava.presets), which render like a real one.
Each measurement runs in a fresh process, the stage's own code path (`medllava.train.sft.prepared_samples`):
- first prepare: read, check (data.image_check: header), render across processes, write the cache;
- cached re-run: from calling prepared_samples on a complete cache to the first batch out of a DataLoader with
  --loader-workers workers (model loading excluded);
- loader: the first 20,000 samples with images decoded and preprocessed (samples/s), then a full pass in which
  the workers read every sample's ids, labels and metadata (pixels are transient and left out), after which
  each worker's unique set size (USS: pages only it holds, i.e. what it adds) and proportional set size.
Peak RSS of the main process is ru_maxrss; the rendering processes' peak is reported apart.
Writes OUT.json and OUT.md. No timing is asserted anywhere; the figures are for reading.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGETS = {
    "cached_500k_s": 15.0,  # cached re-run of 500k records to the first batch
    "first_100k_s": 120.0,  # first prepare of 100k records with distinct 512x512 JPEGs
    "worker_mb_500k": 100.0,  # memory a DataLoader worker adds at 500k records
}


def make_image(args: tuple[Path, int]) -> None:
    import numpy as np
    from PIL import Image

    folder, i = args
    path = folder / f"{i:06d}.jpg"
    if path.is_file():
        return
    rng = np.random.default_rng(i)
    small = (rng.random((16, 16, 3)) * 255).astype(np.uint8)  # smooth, distinct content: a realistic file size
    Image.fromarray(small).resize((512, 512), Image.BILINEAR).save(path.with_suffix(".tmp"), "JPEG", quality=85)
    os.replace(path.with_suffix(".tmp"), path)


def make_images(folder: Path, n: int) -> float:
    from multiprocessing import Pool

    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with Pool(os.cpu_count()) as pool:
        pool.map(make_image, [(folder, i) for i in range(n)], chunksize=512)
    return time.perf_counter() - start


def make_records(path: Path, n: int, distinct: int) -> None:
    if path.is_file() and sum(1 for _ in path.open("rb")) == n:
        return
    organs = ["right lower lobe", "left upper lobe", "liver", "spleen", "left kidney", "pancreatic head"]
    with path.open("w", encoding="utf-8") as fh:
        for i in range(n):
            organ = organs[i % len(organs)]
            fh.write(json.dumps({"id": f"r{i:07d}", "image": f"{i % distinct:06d}.jpg", "conversations": [
                {"from": "human", "value": "<image>\nWhat does this image show? Describe the main finding."},
                {"from": "gpt", "value": f"An axial CT image showing a {3 + i % 40} mm lesion in the {organ}, "
                                         "with smooth margins and no surrounding fat stranding."},
                {"from": "human", "value": "Is it likely to be benign?"},
                {"from": "gpt", "value": "Smooth margins favour a benign lesion, but size and growth over time "
                                         "decide; comparison with prior imaging is advised."}]}) + "\n")


def stage_config(records: Path, images: Path, pair: Path, cache: Path, out: Path) -> Any:
    from medllava.config import config_from_dict

    return config_from_dict({
        "name": "data_scale", "kind": "sft",
        "model": {"vision_tower": str(pair / "vision"), "llm": str(pair / "llm")},
        "data": {"train_files": [str(records)], "image_folder": str(images), "format": "chat", "max_length": 512,
                 "cache_dir": str(cache)},
        "optim": {"max_steps": 1, "per_device_batch_size": 8},
        "run": {"output_dir": str(out), "use_cpu": True},
    })


def worker_memory(pids: list[int]) -> list[dict[str, float]]:
    import psutil

    out = []
    for pid in pids:
        info = psutil.Process(pid).memory_full_info()
        entry = {"uss_mb": info.uss / 2**20, "pss_mb": getattr(info, "pss", 0) / 2**20, "rss_mb": info.rss / 2**20}
        rollup = Path(f"/proc/{pid}/smaps_rollup")
        if rollup.is_file():  # Linux: split USS into private anonymous memory and file-backed pages
            fields = {}
            for line in rollup.read_text().splitlines()[1:]:
                name, _, rest = line.partition(":")
                fields[name.strip()] = int(rest.split()[0]) / 1024 if rest.split() else 0.0
            entry.update(anon_mb=fields.get("Anonymous", 0.0), private_dirty_mb=fields.get("Private_Dirty", 0.0),
                         private_clean_mb=fields.get("Private_Clean", 0.0))
        out.append(entry)
    return out


def child(mode: str, records: Path, images: Path, pair: Path, cache: Path, out: Path, loader_workers: int,
          image_pass: int = 20_000) -> dict:
    """One measurement in this (fresh) process; returns its figures."""
    import psutil
    import torch
    from torch.utils.data import DataLoader

    from medllava.data.collate import SFTCollator, SFTDataset
    from medllava.data.render import Renderer
    from medllava.model import build_model
    from medllava.train.sft import prepared_samples

    torch.set_num_threads(1)
    cfg = stage_config(records, images, pair, cache, out)
    out.mkdir(parents=True, exist_ok=True)
    _, processor = build_model(str(pair / "vision"), str(pair / "llm"))
    renderer = Renderer(processor, "chat", cfg.data.max_length)
    result: dict[str, Any] = {}
    start = time.perf_counter()
    samples = prepared_samples(cfg, renderer, out)
    result["prepare_s"] = time.perf_counter() - start
    result["samples"] = len(samples)
    if mode == "first":
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result["render_processes_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        return result
    dataset = SFTDataset(samples, renderer.images)
    loader = DataLoader(dataset, batch_size=64, shuffle=True, num_workers=loader_workers, persistent_workers=True,
                        collate_fn=SFTCollator(processor.tokenizer.pad_token_id), prefetch_factor=4)
    it = iter(loader)
    next(it)
    result["to_first_batch_s"] = time.perf_counter() - start
    pids = [c.pid for c in psutil.Process().children() if c.is_running()]
    result["workers_after_first_batch"] = worker_memory(pids)
    # Images, decoded and preprocessed, for a bounded number of samples (the loader's per-sample cost) ...
    start, seen = time.perf_counter(), 64
    for batch in it:
        seen += len(batch["sample_ids"])
        if seen >= image_pass:
            break
    result["image_pass_samples"] = seen
    result["image_pass_samples_per_s"] = seen / (time.perf_counter() - start)
    del it, loader
    # ... and every sample's ids, labels and metadata read in the workers (what a worker would copy if samples
    # were Python objects); pixels are transient and left out of this pass.
    text = SFTDataset(WithoutImages(samples), renderer.images)
    loader = DataLoader(text, batch_size=256, shuffle=True, num_workers=loader_workers, persistent_workers=True,
                        collate_fn=SFTCollator(processor.tokenizer.pad_token_id), prefetch_factor=4)
    it = iter(loader)
    start, seen = time.perf_counter(), 0
    for batch in it:
        if seen == 0:
            pids = [c.pid for c in psutil.Process().children() if c.is_running() and c.pid not in pids]
            result["workers_at_start_of_full_pass"] = worker_memory(pids)
        seen += len(batch["sample_ids"])
    result["full_pass_s"] = time.perf_counter() - start
    result["full_pass_samples"] = seen
    result["workers_after_full_pass"] = worker_memory(pids)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


class WithoutImages:
    """Samples as stored, with their image lists emptied (ids, labels and metadata still read from the store)."""

    def __init__(self, samples: Any) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Any:
        import dataclasses

        return dataclasses.replace(self.samples[index], images=[])


def run_child(mode: str, *args: Path, loader_workers: int) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, *map(str, args), "--loader-workers", str(loader_workers)]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown(report: dict) -> str:
    lines = [f"# Data at scale ({report['machine']})", "",
             f"Records: two-turn LLaVA-style instruction records, record i on image i mod {report['distinct']} "
             f"(distinct 512x512 JPEGs); image check `{report['image_check']}`; {report['render_workers']} rendering "
             f"processes; DataLoader with {report['loader_workers']} workers. Each figure from a fresh process. "
             "Loader samples/s: the first 20,000 samples with their images decoded and preprocessed (batch 64). "
             "Full pass: every sample's ids, labels and metadata read in the workers (batch 256, pixels left out: "
             "they are transient); USS is the memory only that worker holds, i.e. what it adds.",
             "",
             "| records | distinct images | first prepare s | records/s | peak RSS MB (main) | cached: to first batch s "
             "| loader samples/s with images | full pass s | worker USS MB at start -> after full pass |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in report["runs"]:
        f, c = row["first"], row["cached"]
        uss = ", ".join(f"{a['uss_mb']:.0f} -> {b['uss_mb']:.0f}" for a, b in zip(c["workers_at_start_of_full_pass"],
                                                                              c["workers_after_full_pass"]))
        lines.append(f"| {row['records']:,} | {row['distinct']:,} | {f['prepare_s']:.1f} | {row['records'] / f['prepare_s']:,.0f} "
                     f"| {f['peak_rss_mb']:.0f} | {c['to_first_batch_s']:.2f} | {c['image_pass_samples_per_s']:.0f} "
                     f"| {c['full_pass_s']:.0f} | {uss} |")
    lines += ["", "| target | measured | limit | met |", "|---|---:|---:|---|"]
    for name, entry in report["targets"].items():
        lines.append(f"| {name} | {entry['measured']:.2f} | {entry['limit']:.0f} | {'yes' if entry['met'] else 'NO'} |")
    lines += ["", "A 2-rank job prepares once: `tests/test_ranks.py` (the writer renders, the other rank waits and "
              "reads the cache; the log and data report show one prepare).",
              "Growth: seconds per 1,000 records in the first prepare: "
              + ", ".join(f"{r['records']:,}: {1000 * r['first']['prepare_s'] / r['records']:.2f}" for r in report["runs"]),
              ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 500_000])
    parser.add_argument("--distinct", type=int, default=100_000, help="distinct images (record i uses i mod this)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/medllava_data_scale"))
    parser.add_argument("--loader-workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("results/data_scale"))
    parser.add_argument("--child", nargs=6, default=None, metavar=("MODE", "RECORDS", "IMAGES", "PAIR", "CACHE", "OUT"))
    args = parser.parse_args()
    if args.child:
        mode, *paths = args.child
        print(json.dumps(child(mode, *map(Path, paths), loader_workers=args.loader_workers)))
        return 0

    from medllava.data.validate import default_workers
    from medllava.presets import make_tiny_pair

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    pair = work / "pair"
    if not (pair / "llm").is_dir():
        make_tiny_pair(pair, "clip", "llama")
    images = work / "images"
    print(f"images: {args.distinct} distinct 512x512 JPEGs ...", flush=True)
    made = make_images(images, args.distinct)
    runs = []
    for n in args.sizes:
        records = work / f"records_{n}.jsonl"
        make_records(records, n, args.distinct)
        cache = work / f"cache_{n}"
        shutil.rmtree(cache, ignore_errors=True)
        out = work / f"out_{n}"
        first = run_child("first", records, images, pair, cache, out, loader_workers=args.loader_workers)
        print(f"{n}: first prepare {first['prepare_s']:.1f} s", flush=True)
        cached = run_child("cached", records, images, pair, cache, out, loader_workers=args.loader_workers)
        print(f"{n}: cached to first batch {cached['to_first_batch_s']:.2f} s, loader {cached['image_pass_samples_per_s']:.0f} samples/s, full pass {cached['full_pass_s']:.0f} s, "
              f"workers {[round(w['uss_mb']) for w in cached['workers_after_full_pass']]} MB USS", flush=True)
        runs.append({"records": n, "distinct": min(n, args.distinct), "first": first, "cached": cached})

    def at(n: int) -> dict | None:
        return next((r for r in runs if r["records"] == n), None)

    targets = {}
    if (r := at(500_000)) is not None:
        targets["cached re-run of 500k, to first batch (s)"] = r["cached"]["to_first_batch_s"]
        targets["memory a worker adds at 500k (USS MB, largest worker)"] = max(
            w["uss_mb"] for w in r["cached"]["workers_after_full_pass"])
    if (r := at(100_000)) is not None and args.distinct >= 100_000:
        targets["first prepare of 100k, distinct JPEGs (s)"] = r["first"]["prepare_s"]
    limits = dict(zip(["cached re-run of 500k, to first batch (s)", "memory a worker adds at 500k (USS MB, largest worker)",
                       "first prepare of 100k, distinct JPEGs (s)"],
                      [TARGETS["cached_500k_s"], TARGETS["worker_mb_500k"], TARGETS["first_100k_s"]]))
    report = {
        "machine": f"{platform.node() or 'unknown'}: {os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}",
        "distinct": args.distinct, "image_generation_s": made, "image_check": "header",
        "render_workers": default_workers(), "loader_workers": args.loader_workers, "runs": runs,
        "targets": {k: {"measured": v, "limit": limits[k], "met": v <= limits[k]} for k, v in targets.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    args.out.with_suffix(".md").write_text(markdown(report), encoding="utf-8")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
