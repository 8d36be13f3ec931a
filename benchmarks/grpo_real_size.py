#!/usr/bin/env python3
"""A few GRPO steps of a real-size architecture (random init) in bf16, with step time split into generation
and training; writes a JSON report. Meant for a GPU (a real-size model generating on CPU would take hours);
`--cpu --preset tiny` is the smoke test the test suite runs.

    python3 benchmarks/grpo_real_size.py --preset clip-qwen2.5-1.5b --steps 6 --out results/gpu/grpo_real_size.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    from data_recipes import phantom
    from medllava.bench import build_bench_model
    from medllava.config import config_from_dict
    from medllava.model import save_model
    from medllava.train.stage import run_stage

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="clip-qwen2.5-1.5b")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--completion-length", type=int, default=256)
    parser.add_argument("--cpu", action="store_true", help="run on CPU in fp32 (smoke test with --preset tiny)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("grpo_real_size.py needs a CUDA GPU (or --cpu with --preset tiny)")
    device = torch.device("cpu" if args.cpu else "cuda")
    dtype, precision = (torch.float32, "fp32") if args.cpu else (torch.bfloat16, "bf16")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model, processor = build_bench_model(args.preset, dtype, device)
        save_model(model, processor, tmp / "base")
        del model
        if not args.cpu:
            torch.cuda.empty_cache()
        size = processor.image_processor.size["height"]
        phantom.generate(tmp / "data", seed=0, n_train=64, n_test=4, size=size)
        cfg = {
            "name": f"grpo-{args.preset}", "kind": "grpo",
            "model": {"init_from": str(tmp / "base")},
            "data": {"train_files": [str(tmp / "data/rl.jsonl")], "image_folder": str(tmp / "data/images"),
                     "max_length": 2048},
            "trainable": {"vision": "frozen", "projector": "full", "llm": "full"},
            "grpo": {"prompt": "think", "rewards": {"accuracy": 1.0, "think_format": 0.5},
                     "num_generations": args.generations, "max_completion_length": args.completion_length,
                     "temperature": 1.0, "log_completions_every": 0},
            "optim": {"lr": 1e-6, "max_steps": args.steps, "per_device_batch_size": args.generations, "warmup_ratio": 0.0},
            "run": {"output_dir": str(tmp / "out"), "precision": precision, "gradient_checkpointing": not args.cpu,
                    "logging_steps": 1, "save_steps": 10**6, "use_cpu": args.cpu},
        }
        (tmp / "grpo.yaml").write_text(yaml.safe_dump(cfg))
        if not args.cpu:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = run_stage(config_from_dict(cfg))
        seconds = time.perf_counter() - start
        history = json.loads((out / "train_log.json").read_text())
    steps = [h for h in history if "timing/generation_s" in h]
    report = {
        "preset": args.preset, "device": "CPU" if args.cpu else torch.cuda.get_device_name(), "steps": len(steps),
        "completions_per_step": args.generations, "max_completion_length": args.completion_length,
        "generation_s_per_step": statistics.mean(h["timing/generation_s"] for h in steps[1:] or steps),
        "train_s_per_step": statistics.mean(h["timing/train_s"] for h in steps[1:] or steps),
        "mean_completion_length": statistics.mean(h.get("completions/mean_length", 0) for h in steps),
        "losses": [h.get("loss") for h in steps], "wall_s": seconds,
        "peak_memory_gb": None if args.cpu else torch.cuda.max_memory_allocated() / 2**30,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
