#!/usr/bin/env python3
"""Keep the RL questions a model sometimes gets right: estimate each question's pass rate with n samples.

Groups whose completions are all right or all wrong have zero reward spread and teach GRPO nothing
(Med-R1, MedVLThinker filter them). For each question the current model (e.g. the instruction stage's
output) samples n answers at the GRPO temperature; each is graded like the GRPO accuracy reward. Questions
with a pass rate strictly between the bounds are written out; a report (counts, pass-rate histogram, every
dropped id with its reason) goes beside the output as OUT.report.json.

    python data_recipes/pass_rate_filter.py --model runs/demo/instruct --data data/phantom/rl.jsonl \\
        --image-folder data/phantom/images --out data/phantom/rl_filtered.jsonl --n 8
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from medllava.data.rl import build_rl_rows  # noqa: E402
from medllava.evaluate import generate_batch  # noqa: E402
from medllava.imaging import load_image  # noqa: E402
from medllava.model import load_model, pick_device  # noqa: E402
from medllava.rewards import grade  # noqa: E402


def pass_rates(model, processor, rows: list[dict], *, n: int, temperature: float, max_new_tokens: int,
               batch_size: int, progress: bool = True) -> list[float]:
    """The share of n sampled answers that grade correct, per row."""
    rates: list[float] = []
    for start in tqdm(range(0, len(rows), batch_size), desc="sampling", disable=not progress):
        chunk = rows[start:start + batch_size]
        prompts = []
        for row in chunk:
            messages = [dict(m) for m in row["prompt"]]
            messages[-1] = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": messages[-1]["content"]}]}
            prompts.append(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        images = [load_image(row["image"]) for row in chunk]
        answers = generate_batch(model, processor, prompts, images, max_new_tokens, num_samples=n, temperature=temperature)
        for i, row in enumerate(chunk):
            samples = answers[i * n:(i + 1) * n]
            rates.append(sum(grade(a, row["answer"], row["qtype"], row["options"]).correct for a in samples) / n)
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="stage output to sample with (the GRPO starting point)")
    parser.add_argument("--data", required=True, help="RL/VQA file: id, image, question, answer, qtype, options?")
    parser.add_argument("--image-folder", default=".")
    parser.add_argument("--out", required=True, type=Path, help="filtered JSONL to write")
    parser.add_argument("--prompt", choices=["plain", "answer", "think"], default="plain", help="as in the GRPO config")
    parser.add_argument("--n", type=int, default=8, help="samples per question (GRPO's num_generations)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32, help="questions per generation batch")
    parser.add_argument("--min-rate", type=float, default=0.0, help="keep questions with pass rate > this")
    parser.add_argument("--max-rate", type=float, default=1.0, help="keep questions with pass rate < this")
    parser.add_argument("--max-records", type=int, default=None, help="only the first N questions")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    model, processor = load_model(args.model)
    model.to(pick_device()).eval()
    rows, report = build_rl_rows([args.data], processor, image_folder=args.image_folder, mode=args.prompt,
                                 skip_invalid=True, max_samples=args.max_records, max_prompt_length=10**9)
    rates = pass_rates(model, processor, rows, n=args.n, temperature=args.temperature,
                       max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    originals = {}
    for line in Path(args.data).read_text(encoding="utf-8").splitlines():
        if line.strip():
            obj = json.loads(line)
            originals[str(obj.get("id"))] = obj
    kept, dropped = [], []
    for row, rate in zip(rows, rates):
        if args.min_rate < rate < args.max_rate:
            kept.append({**originals.get(row["id"], {}), "pass_rate": rate})
        else:
            dropped.append({"id": row["id"], "pass_rate": rate, "reason": "all right" if rate >= args.max_rate else "all wrong"})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as fh:
        for obj in kept:
            fh.write(json.dumps(obj, ensure_ascii=False) + "\n")
    histogram = Counter(f"{r:.3f}" for r in rates)
    summary = {
        "model": args.model, "data": args.data, "n": args.n, "temperature": args.temperature,
        "read": report.total, "invalid": len(report.errors), "invalid_counts": report.counts(),
        "sampled": len(rows), "kept": len(kept),
        "dropped_all_right": sum(1 for d in dropped if d["reason"] == "all right"),
        "dropped_all_wrong": sum(1 for d in dropped if d["reason"] == "all wrong"),
        "mean_pass_rate": round(sum(rates) / len(rates), 4) if rates else None,
        "pass_rate_histogram": dict(sorted(histogram.items())), "dropped": dropped,
    }
    report_path = args.out.with_suffix(".report.json")
    report_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("dropped", "pass_rate_histogram")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
