#!/usr/bin/env python3
"""Keep the RL questions a model sometimes gets right: estimate each question's pass rate with n samples.

Groups whose completions are all right or all wrong have zero reward spread and teach GRPO nothing
(Med-R1, MedVLThinker filter them). For each question the current model (e.g. the instruction stage's
output) samples n answers at the GRPO temperature; each is graded like the GRPO accuracy reward. Questions
with a pass rate strictly between the bounds are written out, each row exactly as read plus its `pass_rate`, in
the form OUT names: JSONL (`.jsonl`), a JSON list (`.json`), parquet (`.parquet`) or a saved dataset (a folder);
questions with embedded images (a `datasets` source) need parquet or a folder. --data takes any source the stages
take. Images are decoded batch by batch; one that does not decode is dropped and named. A report (counts,
pass-rate histogram, every dropped id with its reason) goes beside the output as OUT.report.json.

    python -m data_recipes.pass_rate_filter --model runs/demo/instruct --data data/phantom/rl.jsonl \\
        --image-folder data/phantom/images --out data/phantom/rl_filtered.jsonl --n 8
    python -m data_recipes.pass_rate_filter --stage stages/llava_med_v15/grpo.yaml --model runs/llava_med_v15/instruct

With --stage, everything but the model comes from the GRPO stage (what `./train.sh stages/<family>` runs).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch
from tqdm.auto import tqdm

from medllava.config import slices_option
from medllava.data.records import check_writable, write_records
from medllava.data.rl import build_rl_rows
from medllava.evaluate import generate_batch
from medllava.grading import grade
from medllava.imaging import ImageError, Window, decode_each
from medllava.model import load_for_inference


def sample_answers(model, processor, rows: list[dict], *, n: int, temperature: float, max_new_tokens: int,
                   batch_size: int, progress: bool = True, window: Window | None = None) -> list[list[str] | None]:
    """n sampled answers per row (RL rows: prompt messages and images, put in front of the text as GRPO puts them);
    None for a row one of whose images does not decode (images are decoded batch by batch, never all at once)."""
    out: list[list[str] | None] = []
    for start in tqdm(range(0, len(rows), batch_size), desc="sampling", disable=not progress):
        batch = rows[start:start + batch_size]
        decoded = [decode_each(row["images"], window) for row in batch]
        usable = [not any(isinstance(image, ImageError) for image in row_images) for row_images in decoded]
        chunk = [row for row, ok in zip(batch, usable) if ok]
        images = [row_images for row_images, ok in zip(decoded, usable) if ok]
        prompts = []
        for row in chunk:
            messages = [dict(m) for m in row["prompt"]]
            messages[-1] = {"role": "user", "content": [{"type": "image"} for _ in row["images"]]
                            + [{"type": "text", "text": messages[-1]["content"]}]}
            prompts.append(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        answers = iter(generate_batch(model, processor, prompts, images, max_new_tokens, num_samples=n,
                                      temperature=temperature) if chunk else [])
        del images, decoded
        for ok in usable:
            out.append([next(answers) for _ in range(n)] if ok else None)  # n answers per prompt, in order
    return out


def pass_rates(model, processor, rows: list[dict], *, n: int, temperature: float, max_new_tokens: int,
               batch_size: int, progress: bool = True, window: Window | None = None) -> list[float | None]:
    """The share of n sampled answers that grade correct, per row; None for a row whose image does not decode."""
    samples = sample_answers(model, processor, rows, n=n, temperature=temperature, max_new_tokens=max_new_tokens,
                             batch_size=batch_size, progress=progress, window=window)
    return [None if answers is None else
            sum(grade(a, row["answer"], row["qtype"], row["options"]).correct for a in answers) / n
            for row, answers in zip(rows, samples)]


def filter_settings(args: argparse.Namespace, overrides: list[str]) -> argparse.Namespace:
    """With --stage: data, image folder, output, prompt and sampling settings come from the GRPO stage config
    (its grpo.pass_rate_filter section), so the filter samples exactly as the stage will train."""
    if args.stage is None:
        if overrides:
            raise SystemExit(f"config overrides need --stage: {overrides}")
        missing = [name for name in ("data", "out") if getattr(args, name) in (None, [])]
        if missing:
            raise SystemExit(f"--{' and --'.join(missing)} required (or --stage GRPO_STAGE.yaml)")
        return args
    from medllava.config import load_config

    cfg = load_config(args.stage, overrides)
    if cfg.kind != "grpo":
        raise SystemExit(f"--stage {args.stage}: not a GRPO stage (kind: {cfg.kind})")
    f, g = cfg.grpo.pass_rate_filter, cfg.grpo
    if not f.source:
        raise SystemExit(f"--stage {args.stage}: grpo.pass_rate_filter.source is empty (which questions to filter?)")
    args.data = args.data or f.source
    args.image_folder = cfg.data.image_folder
    args.out = args.out or Path(cfg.data.train_files[0])
    args.prompt, args.instruction, args.system_prompt = g.prompt, g.instruction, cfg.data.system_prompt
    args.n, args.temperature, args.max_new_tokens = g.num_generations, g.temperature, g.max_completion_length
    args.min_rate, args.max_rate, args.batch_size, args.seed = f.min_rate, f.max_rate, f.batch_size, cfg.run.seed
    args.window = args.window or cfg.data.window
    args.slices = args.slices or f"{cfg.data.slices.count},{cfg.data.slices.spacing}"
    return args


def original_rows(sources: list[str]) -> dict[tuple[str, int], dict]:
    """Every input row as read, by (source, line), so kept questions are written out unchanged."""
    from medllava.data.records import iter_raw

    return {(raw.source, raw.line): raw.data for src in sources for raw in iter_raw(src) if raw.data is not None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="stage output to sample with (the GRPO starting point)")
    parser.add_argument("--stage", default=None,
                        help="GRPO stage YAML: take data (grpo.pass_rate_filter.source), output (data.train_files[0]), "
                             "prompt and sampling settings from it; --section.key=value overrides apply to it")
    parser.add_argument("--data", nargs="+", default=None, help="RL/VQA files: id, image, question, answer, qtype, options?")
    parser.add_argument("--image-folder", default=".")
    parser.add_argument("--out", type=Path, default=None, help="filtered JSONL to write")
    parser.add_argument("--prompt", choices=["plain", "answer", "think"], default="plain", help="as in the GRPO config")
    parser.add_argument("--n", type=int, default=8, help="samples per question (GRPO's num_generations)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32, help="questions per generation batch")
    parser.add_argument("--min-rate", type=float, default=0.0, help="keep questions with pass rate > this")
    parser.add_argument("--max-rate", type=float, default=1.0, help="keep questions with pass rate < this")
    parser.add_argument("--max-records", type=int, default=None, help="only the first N questions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--window", default=None, help="DICOM window: preset (lung, bone, ...) or CENTER,WIDTH")
    parser.add_argument("--slices", default=None, help="series/volume images: COUNT or COUNT,SPACING (default 8,uniform)")
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a for a in argv if a.startswith("--") and "." in a.split("=", 1)[0]]
    args = parser.parse_args([a for a in argv if a not in overrides])
    args.instruction = args.system_prompt = None
    args = filter_settings(args, overrides)

    torch.manual_seed(args.seed)
    originals = original_rows(args.data)  # every input row as read, to be written out unchanged
    try:
        check_writable(list(originals.values()), args.out)  # before any sampling, not after it
    except ValueError as err:
        raise SystemExit(f"--out: {err}") from None
    model, processor = load_for_inference(args.model)  # bf16 on a GPU that has it
    rows, report = build_rl_rows(args.data, processor, image_folder=args.image_folder, mode=args.prompt,
                                 instruction=args.instruction, system_prompt=args.system_prompt, skip_invalid=True,
                                 max_samples=args.max_records, max_prompt_length=10**9, with_location=True,
                                 slices=slices_option(args.slices))
    rates = pass_rates(model, processor, rows, n=args.n, temperature=args.temperature,
                       max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                       window=Window.parse(args.window) if args.window else None)
    kept, dropped = [], []
    for row, rate in zip(rows, rates):
        if rate is None:
            dropped.append({"id": row["id"], "source": row["source"], "line": row["line"], "pass_rate": None,
                            "reason": "image does not decode"})
        elif args.min_rate < rate < args.max_rate:
            kept.append({**originals[(row["source"], row["line"])], "pass_rate": rate})
        else:
            dropped.append({"id": row["id"], "pass_rate": rate, "reason": "all right" if rate >= args.max_rate else "all wrong"})
    rates = [r for r in rates if r is not None]
    histogram = Counter(f"{r:.3f}" for r in rates)
    summary = {
        "model": args.model, "data": args.data, "n": args.n, "temperature": args.temperature,
        "prompt": args.prompt, "max_new_tokens": args.max_new_tokens, "min_rate": args.min_rate, "max_rate": args.max_rate,
        "read": report.total, "invalid": len(report.errors), "invalid_counts": report.counts(),
        "sampled": len(rows), "kept": len(kept),
        "dropped_all_right": sum(1 for d in dropped if d["reason"] == "all right"),
        "dropped_all_wrong": sum(1 for d in dropped if d["reason"] == "all wrong"),
        "dropped_unreadable_image": sum(1 for d in dropped if d["reason"] == "image does not decode"),
        "mean_pass_rate": round(sum(rates) / len(rates), 4) if rates else None,
        "pass_rate_histogram": dict(sorted(histogram.items())), "dropped": dropped,
    }
    report_path = args.out.with_name(args.out.stem + ".report.json")
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("dropped", "pass_rate_histogram")}))
    if not kept:
        print(f"pass_rate_filter: no question kept (pass rates outside ({args.min_rate}, {args.max_rate})); nothing "
              f"written to {args.out}; see {report_path}", file=sys.stderr)
        return 2
    write_records(kept, args.out)  # whole or absent: a later run never reads half a file
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
