#!/usr/bin/env python3
"""Peak host memory of `medllava export` on a real-width model: the exporting process and its verification process.

    python benchmarks/export_memory.py --llm-layers 32 --dtype bfloat16 --out results/export_memory   # 7B shape
    python benchmarks/export_memory.py --llm-layers 6 --dtype bfloat16 --compare-with /path/to/old/checkout

The model: LLaVA-1.5-7B's shapes with random weights -- CLIP ViT-L/14 at 336 px (24 layers, width 1024) and a
Llama-2-7B-shaped LLM (width 4096, MLP 11008, 32 heads; --llm-layers of its 32 layers), assembled by
medllava's own `build_model` and saved as a stage output in fp32 (as a stage with fp32 trainable weights saves).
Then `export()` runs in a fresh process; its resident memory and its verification child's are sampled every
0.2 s, and the largest of each and of their sum at one moment are recorded.
`--compare-with` runs the same export with another checkout's medllava (e.g. the code before the one-copy
export) for a side-by-side figure. Writes OUT.json and OUT.md; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
me, peaks, done = psutil.Process(), {"exporter": 0, "verifier": 0, "together": 0}, threading.Event()

def sample():  # resident memory of this process and its verification child, every 0.2 s
    while not done.is_set():
        try:
            own = me.memory_info().rss
            kids = sum(c.memory_info().rss for c in me.children(recursive=True))
        except psutil.Error:
            continue
        peaks.update(exporter=max(peaks["exporter"], own), verifier=max(peaks["verifier"], kids),
                     together=max(peaks["together"], own + kids))
        done.wait(0.2)

thread = threading.Thread(target=sample, daemon=True)
thread.start()
report = export(stage, out, **kwargs)
done.set()
thread.join()
print(json.dumps({"seconds": time.time() - start, **{f"{k}_peak_rss_gb": v / 2**30 for k, v in peaks.items()},
                  "exporter_ru_maxrss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "verification": report["verification"]}))
"""


def build_stage(folder: Path, llm_layers: int) -> dict:
    """Save the real-width random model as a stage output folder; returns its parameter counts."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

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
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                       num_hidden_layers=llm_layers, num_attention_heads=32, num_key_value_heads=32,
                                       max_position_embeddings=4096, tie_word_embeddings=False,
                                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                       pad_token_id=tok.pad_token_id))
    llm.save_pretrained(llm_dir)
    tok.save_pretrained(llm_dir)
    del llm
    model, processor = build_model(str(vision_dir), str(llm_dir), dtype=torch.float32)
    counts = {"vision": sum(p.numel() for n, p in model.named_parameters() if "vision_tower" in n),
              "total": sum(p.numel() for p in model.parameters())}
    save_model(model, processor, folder)
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
             "| code | seconds | exporter peak RSS GiB | verifier peak RSS GiB | both together, peak GiB | probe "
             "| reload diff | drift |",
             "|---|---:|---:|---:|---:|---|---:|---:|"]
    for name, r in runs.items():
        v = r["verification"]
        lines.append(f"| {name} | {r['seconds']:.0f} | {r['exporter_peak_rss_gb']:.1f} | {r['verifier_peak_rss_gb']:.1f} "
                     f"| {r['together_peak_rss_gb']:.1f} | {v.get('probe', 'fp32 on cpu')} "
                     f"| {v['max_abs_logit_diff']:.1e} | {v.get('rounding_drift_max_abs_logit_diff', float('nan')):.1e} |")
    lines += ["", "RSS sampled every 0.2 s (psutil) in the exporting process and its verification child; 'together' "
              "is the largest sum at one moment, what the machine must hold."]
    lines.append("")
    args.out.with_suffix(".md").write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
