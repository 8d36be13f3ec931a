#!/usr/bin/env python3
"""Peak host memory of `medllava export` on a real-width model: the exporting process and its verification process.

    python benchmarks/export_memory.py --llm-layers 32 --dtype bfloat16 --out results/export_memory   # 7B shape
    python benchmarks/export_memory.py --llm-layers 6 --dtype bfloat16 --compare-with /path/to/old/checkout

The model: LLaVA-1.5-7B's shapes with random weights -- CLIP ViT-L/14 at 336 px (24 layers, width 1024) and a
Llama-2-7B-shaped LLM (width 4096, MLP 11008, 32 heads; --llm-layers of its 32 layers), assembled by
medllava's own `build_model` and saved as a stage output in fp32 (as a stage with fp32 trainable weights saves).
The LLM is written tensor by tensor (drawn, written into its shard, dropped) and the stage assembled from its
memory-mapped files, so building a 7B stage needs no more memory than the export. Then `export()` runs in a fresh
process; the resident memory of it and of its verification child is sampled every 0.2 s: all of it (RSS, which
counts pages of memory-mapped weight files, clean and reclaimable) and the anonymous part (RssAnon: what the
machine must really hold). The largest of each and of their sum at one moment are recorded.
`--compare-with` runs the same export with another checkout's medllava (e.g. the code before the one-copy
export) for a side-by-side figure. Writes OUT.json and OUT.md; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

MEASURE = r"""
import json, resource, sys, threading, time
import psutil
start = time.time()
from medllava.export import export
stage, out, dtype = sys.argv[1:4]
kwargs = {"dtype": dtype} if dtype != "default" else {}
me, done = psutil.Process(), threading.Event()
peaks = {f"{who}_{kind}": 0 for who in ("exporter", "verifier", "together") for kind in ("rss", "anon")}

def anon(proc):  # resident anonymous memory: what cannot be dropped and read back from a file
    with open(f"/proc/{proc.pid}/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("RssAnon:"))

def sample():  # this process and its verification child, every 0.2 s
    while not done.is_set():
        try:
            kids = me.children(recursive=True)
            now = {"exporter_rss": me.memory_info().rss, "exporter_anon": anon(me),
                   "verifier_rss": sum(k.memory_info().rss for k in kids), "verifier_anon": sum(anon(k) for k in kids)}
        except (psutil.Error, OSError, StopIteration):
            continue
        now["together_rss"] = now["exporter_rss"] + now["verifier_rss"]
        now["together_anon"] = now["exporter_anon"] + now["verifier_anon"]
        for key, value in now.items():
            peaks[key] = max(peaks[key], value)
        done.wait(0.2)

thread = threading.Thread(target=sample, daemon=True)
thread.start()
report = export(stage, out, **kwargs)
done.set()
thread.join()
print(json.dumps({"seconds": time.time() - start, **{f"{k}_peak_gb": v / 2**30 for k, v in peaks.items()},
                  "exporter_ru_maxrss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "verification": report["verification"]}))
"""


def write_random_llm(folder: Path, config: object, seed: int = 0, shard_bytes: int = 2 * 2**30) -> None:
    """Save a random-init fp32 Llama in safetensors shards without ever holding it: the model is laid out on the
    meta device, and each tensor is drawn, written into its shard and dropped (norms 1, the rest N(0, 0.02))."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    shard: dict = {}
    size = parts = 0
    for name, meta in skeleton.state_dict().items():
        tensor = torch.ones(meta.shape) if name.endswith("norm.weight") else torch.empty(meta.shape).normal_(0, 0.02, generator=generator)
        if shard and size + tensor.numel() * 4 > shard_bytes:  # full: write it, so at most one shard is ever held
            save_file(shard, str(folder / f"model-part{parts:05d}.safetensors"), metadata={"format": "pt"})
            shard, size, parts = {}, 0, parts + 1
        shard[name] = tensor
        size += tensor.numel() * 4
    save_file(shard, str(folder / f"model-part{parts:05d}.safetensors"), metadata={"format": "pt"})
    files = sorted(folder.glob("model-*.safetensors"))
    weight_map = {}
    for i, path in enumerate(files):
        final = folder / f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        path.rename(final)
        with safe_open(str(final), framework="pt") as fh:
            weight_map.update({k: final.name for k in fh.keys()})
    total = sum(f.stat().st_size for f in folder.glob("model-*.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}, indent=1))
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(folder)


def build_stage(folder: Path, llm_layers: int) -> dict:
    """Save the real-width random model as a stage output folder; returns its parameter counts."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig

    from medllava.model import build_model, save_model
    from medllava.presets import tiny_corpus, train_tokenizer
    from medllava.processor import image_processor_for_tower

    torch.manual_seed(0)
    vision_dir, llm_dir = folder.parent / "vision", folder.parent / "llm"
    tower = CLIPVisionModel(CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                             num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768))
    tower.save_pretrained(vision_dir)
    image_processor_for_tower(str(vision_dir), 336, aspect="resize", model_type="clip").save_pretrained(vision_dir)
    del tower
    tok = train_tokenizer("llama", tiny_corpus(), vocab_size=400)
    write_random_llm(llm_dir, LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                          num_hidden_layers=llm_layers, num_attention_heads=32, num_key_value_heads=32,
                                          max_position_embeddings=4096, tie_word_embeddings=False,
                                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                          pad_token_id=tok.pad_token_id))
    tok.save_pretrained(llm_dir)
    model, processor = build_model(str(vision_dir), str(llm_dir), dtype=torch.float32)
    counts = {"vision": sum(p.numel() for n, p in model.named_parameters() if "vision_tower" in n),
              "total": sum(p.numel() for p in model.parameters())}
    save_model(model, processor, folder)
    del model
    shutil.rmtree(llm_dir)  # the stage holds its own copy; 28 GB of disk back
    return counts


def run_export(stage: Path, out: Path, dtype: str, checkout: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(checkout)
    result = subprocess.run([sys.executable, "-c", MEASURE, str(stage), str(out), dtype], capture_output=True,
                            text=True, env=env, cwd=checkout)
    if result.returncode != 0:
        raise SystemExit(f"export with {checkout} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm-layers", type=int, default=32, help="LLM layers (32: the 7B shape)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/medllava_export_memory"))
    parser.add_argument("--compare-with", type=Path, default=None, help="another checkout's root, run with its default dtype")
    parser.add_argument("--out", type=Path, default=Path("results/export_memory"))
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    stage = args.work / f"stage_{args.llm_layers}"
    counts_path = stage / "param_counts.json"
    if not counts_path.is_file():
        start = time.time()
        counts = build_stage(stage, args.llm_layers)
        counts["build_s"] = time.time() - start
        counts_path.write_text(json.dumps(counts), encoding="utf-8")
    counts = json.loads(counts_path.read_text(encoding="utf-8"))
    stored_gb = sum(p.stat().st_size for p in stage.glob("*.safetensors")) / 2**30
    runs = {"this checkout": run_export(stage, args.work / "export_new", args.dtype, REPO)}
    if args.compare_with is not None:
        runs[f"{args.compare_with} (its default dtype)"] = run_export(stage, args.work / "export_old", "default",
                                                                     args.compare_with)
    import torch

    report = {"machine": f"{platform.node()}: {os.cpu_count()} CPUs, {platform.machine()}, "
                         f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, "
                         f"CUDA {'yes' if torch.cuda.is_available() else 'no'}",
              "llm_layers": args.llm_layers, "params": counts, "stored_fp32_gb": stored_gb, "dtype": args.dtype,
              "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    lines = [f"# Export memory ({report['machine']})", "",
             f"LLaVA-1.5-7B widths (CLIP ViT-L/14-336, Llama-2-7B-shaped LLM with {args.llm_layers} of 32 layers), random "
             f"weights: {counts['total'] / 1e9:.2f} B parameters, stage output stored in fp32 ({stored_gb:.1f} GiB). "
             f"Export to {args.dtype} unless noted.", "",
             "| code | seconds | exporter peak GiB: RSS / anonymous | verifier peak GiB: RSS / anonymous | together, "
             "peak GiB: RSS / anonymous | probe | reload diff | drift |",
             "|---|---:|---:|---:|---:|---|---:|---:|"]
    for name, r in runs.items():
        v = r["verification"]
        lines.append(f"| {name} | {r['seconds']:.0f} | {r['exporter_rss_peak_gb']:.1f} / {r['exporter_anon_peak_gb']:.1f} "
                     f"| {r['verifier_rss_peak_gb']:.1f} / {r['verifier_anon_peak_gb']:.1f} "
                     f"| {r['together_rss_peak_gb']:.1f} / {r['together_anon_peak_gb']:.1f} | {v.get('probe', 'fp32 on cpu')} "
                     f"| {v['max_abs_logit_diff']:.1e} | {v.get('rounding_drift_max_abs_logit_diff', float('nan')):.1e} |")
    lines += ["", "Sampled every 0.2 s in the exporting process and its verification child. RSS counts the pages of "
              "memory-mapped weight files (clean: the kernel drops them under pressure and reads them back); "
              "anonymous memory (RssAnon) is what the machine must hold. 'together' is the largest sum at one moment."]
    lines.append("")
    args.out.with_suffix(".md").write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
