"""Side-by-side training throughput against LLaMA-Factory on `medllava bench`'s tiny preset.

Same model (the bench's tiny Llava, built once and saved), the same synthetic samples (the bench's generator, same
seed), fp32, the same timing window (steps after warm-up) and the same count of real tokens (image tokens included,
padding excluded). LLaMA-Factory pins its own transformers, accelerate, peft and trl, so it runs in a virtual
environment of its own (`--lf-python`); medllava's modes run through `medllava bench` with this interpreter. Every
mode runs in its own process and the modes alternate over `--rounds`; each figure is the median over the rounds.

LLaMA-Factory's modes: `lf_neat_packing` (packed rows with a block-diagonal 4-D mask: samples isolated),
`lf_packing` (packed rows, one causal mask: samples see each other) and `lf_plain` (padded batches). Its packed rows
are `cutoff_len + 1` positions each, so its packed modes take `--lf-rows` rows per step (about as many real tokens
as medllava's `--batch-size` samples); tokens/s compares the two whatever the grouping.

    python benchmarks/peer_llamafactory.py --lf-python /path/to/lf-venv/bin/python --rounds 4 \\
        --out results/peer_llamafactory.json

The LLaMA-Factory environment: `pip install llamafactory==0.9.5` and its pinned dependencies, with this machine's
torch. LLaMA-Factory imports torchaudio at module level (used only for audio inputs); where no torchaudio build
matches the installed torch, `--lf-shim` puts an empty module in its place (`--make-shim DIR` writes one).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MEDLLAVA_MODES = ("packed", "padded")
LF_MODES = ("lf_neat_packing", "lf_packing", "lf_plain")


def prepare(workdir: Path, samples: int, max_length: int, median_answer_tokens: int, seed: int) -> dict[str, Any]:
    """Save the bench's tiny model and write its samples as a LLaMA-Factory sharegpt dataset (medllava side)."""
    import torch

    from medllava.bench import build_bench_model, synthetic_records
    from medllava.model import save_model
    from medllava.processor import num_image_tokens

    torch.manual_seed(seed)
    model, processor = build_bench_model("tiny", torch.float32, torch.device("cpu"))
    save_model(model, processor, workdir / "model")
    image_dir = workdir / "data" / "images"
    records = synthetic_records(samples, median_answer_tokens, max_length - num_image_tokens(processor) - 64,
                                image_dir, model.config.vision_config.image_size, seed)
    rows = [json.loads(line) for line in records.read_text(encoding="utf-8").splitlines()]
    lf_rows = [{"conversations": r["conversations"], "images": [str(image_dir / r["image"])]} for r in rows]
    (workdir / "data" / "bench.json").write_text(json.dumps(lf_rows), encoding="utf-8")
    (workdir / "data" / "dataset_info.json").write_text(json.dumps({"bench": {
        "file_name": "bench.json", "formatting": "sharegpt",
        "columns": {"messages": "conversations", "images": "images"}}}), encoding="utf-8")
    return {"pad_token_id": processor.tokenizer.pad_token_id, "samples": len(rows)}


def lf_run(workdir: Path, mode: str, steps: int, warmup: int, batch_size: int, rows: int, max_length: int,
           pad_token_id: int, seed: int) -> dict[str, Any]:
    """One LLaMA-Factory mode (runs inside LLaMA-Factory's environment: no medllava import here)."""
    import torch
    from llamafactory.train.tuner import run_exp
    from transformers import TrainerCallback

    class Window(TrainerCallback):
        """Times steps [warmup, warmup + steps) and counts the real tokens and images the model sees in them."""

        def __init__(self) -> None:
            self.start = self.end = 0.0
            self.tokens = self.positions = self.images = 0
            self.measuring = False

        def _count(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
            if self.measuring and torch.is_grad_enabled():
                ids = kwargs.get("input_ids", args[0] if args else None)
                self.tokens += int((ids != pad_token_id).sum())
                self.positions += ids.numel()
                pixels = kwargs.get("pixel_values")
                self.images += 0 if pixels is None else int(pixels.shape[0])

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            model.register_forward_pre_hook(self._count, with_kwargs=True)

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == warmup:
                self.start = time.perf_counter()
            self.measuring = warmup <= state.global_step < warmup + steps

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.measuring:
                self.end = time.perf_counter()
            self.measuring = False

    window = Window()
    packing = mode in ("lf_neat_packing", "lf_packing")
    run_exp(args={
        "stage": "sft", "do_train": True, "model_name_or_path": str(workdir / "model"), "template": "llava",
        "default_system": "",  # no system prompt, as in medllava's samples (the template's would add ~100 tokens)
        "dataset": "bench", "dataset_dir": str(workdir / "data"), "cutoff_len": max_length,
        "packing": packing, "neat_packing": mode == "lf_neat_packing", "flash_attn": "sdpa",
        "finetuning_type": "full", "freeze_vision_tower": True, "freeze_multi_modal_projector": False,
        "disable_gradient_checkpointing": True,  # LLaMA-Factory's default turns it on; medllava's bench runs without
        "output_dir": str(workdir / "lf_out" / mode), "overwrite_output_dir": True, "overwrite_cache": True,
        "per_device_train_batch_size": rows if packing else batch_size, "gradient_accumulation_steps": 1,
        "max_steps": warmup + steps, "learning_rate": 1e-5, "logging_steps": 10**6, "save_strategy": "no",
        "report_to": "none", "bf16": False, "fp16": False, "use_cpu": True, "seed": seed, "disable_tqdm": True,
        "dataloader_num_workers": 0, "plot_loss": False,
    }, callbacks=[window])
    seconds = window.end - window.start
    return {"mode": mode, "seconds": seconds, "tokens": window.tokens, "positions": window.positions,
            "samples": window.images, "tokens_per_s": window.tokens / seconds, "samples_per_s": window.images / seconds,
            "padding_fraction": 1 - window.tokens / window.positions}


def medllava_run(mode: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """One medllava mode through `medllava bench` in a fresh process (the bench's own model and samples)."""
    out = workdir / f"medllava_{mode}.json"
    subprocess.run([str(Path(sys.executable).parent / "medllava"), "bench", "--preset", "tiny", "--modes", mode,
                    "--samples", str(args.samples), "--steps", str(args.steps), "--warmup", str(args.warmup),
                    "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
                    "--median-answer-tokens", str(args.median_answer_tokens), "--seed", str(args.seed),
                    "--out", str(out)], check=True, stdout=subprocess.DEVNULL)
    r = json.loads(out.read_text(encoding="utf-8"))["results"][0]
    return {k: r[k] for k in ("mode", "seconds", "tokens", "samples", "tokens_per_s", "samples_per_s",
                              "padding_fraction")}


def markdown(report: dict[str, Any]) -> str:
    """The median table: isolation stated per mode, each mode's ratio to LLaMA-Factory's isolated packing
    (neat_packing), every round's tokens/s."""
    res = {r["mode"]: r for r in report["results"]}
    isolates = {"packed": "yes", "padded": "n/a", "lf_neat_packing": "yes", "lf_packing": "**no**", "lf_plain": "n/a"}
    names = {"packed": "medllava packed", "padded": "medllava padded", "lf_neat_packing": "LLaMA-Factory neat_packing",
             "lf_packing": "LLaMA-Factory packing", "lf_plain": "LLaMA-Factory no packing"}
    neat = res.get("lf_neat_packing", {}).get("tokens_per_s")
    lines = [f"### medllava vs LLaMA-Factory {report['llamafactory']} on {report['machine']}", "",
             f"tiny preset, {report['settings']['samples']} synthetic samples, fp32, {report['settings']['steps']} "
             f"timed steps after {report['settings']['warmup']} of warm-up, median of {report['settings']['rounds']} "
             "alternating rounds, each mode in its own process", "",
             "| trainer, mode | tokens/s | samples/s | tokens per sample | padding | isolates samples | vs LF neat_packing | "
             "rounds (tokens/s) |",
             "|---|---:|---:|---:|---:|---|---:|---|"]
    for mode, r in res.items():
        ratio = f"{r['tokens_per_s'] / neat:.2f}x" if neat else "-"
        rounds = ", ".join(f"{x:,.0f}" for x in r["rounds"])
        lines.append(f"| {names[mode]} | {r['tokens_per_s']:,.0f} | {r['samples_per_s']:.1f} | "
                     f"{r['tokens'] / max(r['samples'], 1):.0f} | {100 * r['padding_fraction']:.0f}% | {isolates[mode]} | {ratio} | {rounds} |")
    lines += ["", f"medllava: {report['settings']['batch_size']} samples per step; LLaMA-Factory packed modes: "
              f"{report['settings']['lf_rows']} rows of {report['settings']['max_length'] + 1} positions per step, "
              f"plain: {report['settings']['batch_size']} samples per step. Per-round ratio medllava packed / LF "
              f"neat_packing: {', '.join(f'{x:.2f}x' for x in report['packed_over_neat_rounds'])}."]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lf-python", help="python of the LLaMA-Factory environment")
    p.add_argument("--lf-shim", default=None, help="folder put first on LLaMA-Factory's PYTHONPATH (empty torchaudio)")
    p.add_argument("--make-shim", default=None, help="write an empty torchaudio package into this folder and exit")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lf-rows", type=int, default=3, help="packed rows per step for LLaMA-Factory's packed modes")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--median-answer-tokens", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modes", default=",".join(MEDLLAVA_MODES + LF_MODES))
    p.add_argument("--out", default=None)
    p.add_argument("--lf-one", nargs=2, metavar=("WORKDIR", "MODE"), help=argparse.SUPPRESS)
    p.add_argument("--pad-token-id", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.make_shim:
        shim = Path(args.make_shim) / "torchaudio"
        shim.mkdir(parents=True, exist_ok=True)
        (shim / "__init__.py").write_text('"""Empty stand-in for torchaudio (LLaMA-Factory imports it at module level; '
                                          'the benchmark has no audio)."""\n', encoding="utf-8")
        return 0
    if args.lf_one:
        result = lf_run(Path(args.lf_one[0]), args.lf_one[1], args.steps, args.warmup, args.batch_size, args.lf_rows,
                        args.max_length, args.pad_token_id, args.seed)
        print("RESULT " + json.dumps(result))
        return 0
    if not args.lf_python:
        p.error("--lf-python is required")
    modes = [m.strip() for m in args.modes.split(",")]
    unknown = set(modes) - set(MEDLLAVA_MODES + LF_MODES)
    if unknown:
        p.error(f"unknown modes {sorted(unknown)}")
    env = {"PYTHONPATH": args.lf_shim} if args.lf_shim else {}
    version = subprocess.run([args.lf_python, "-c", "import importlib.metadata as m; print(m.version('llamafactory'))"],
                             check=True, capture_output=True, text=True).stdout.strip()
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        meta = prepare(workdir, args.samples, args.max_length, args.median_answer_tokens, args.seed)
        for r in range(args.rounds):
            for mode in modes:
                if mode in MEDLLAVA_MODES:
                    result = medllava_run(mode, args, workdir)
                else:
                    done = subprocess.run(
                        [args.lf_python, __file__, "--lf-one", str(workdir), mode, "--steps", str(args.steps),
                         "--warmup", str(args.warmup), "--batch-size", str(args.batch_size), "--lf-rows",
                         str(args.lf_rows), "--max-length", str(args.max_length), "--seed", str(args.seed),
                         "--pad-token-id", str(meta["pad_token_id"])],
                        check=True, capture_output=True, text=True, env={**os.environ, **env})
                    result = json.loads(next(line for line in done.stdout.splitlines()
                                             if line.startswith("RESULT "))[len("RESULT "):])
                print(f"round {r + 1}: {mode}: {result['tokens_per_s']:,.0f} tokens/s", flush=True)
                runs[mode].append(result)
    results = []
    for rs in runs.values():
        middle = sorted(rs, key=lambda x: x["tokens_per_s"])[(len(rs) - 1) // 2]
        results.append({**middle, "rounds": [x["tokens_per_s"] for x in rs]})
    per_round = ([a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(runs["packed"], runs["lf_neat_packing"])]
                 if "packed" in runs and "lf_neat_packing" in runs else [])
    report = {"machine": f"CPU {platform.machine()}, {_cpu_name()}", "llamafactory": version,
              "settings": vars(args) | {"lf_python": None, "lf_shim": None}, "results": results,
              "packed_over_neat_rounds": per_round,
              "packed_over_neat_median": statistics.median(per_round) if per_round else None}
    table = markdown(report)
    print(table)
    if args.out:
        from medllava.bench import write_report

        write_report(report, table, args.out)
    return 0


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
