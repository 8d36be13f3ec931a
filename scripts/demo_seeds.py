#!/usr/bin/env python3
"""Run the demo curriculum (./train.sh) for several seeds and tabulate held-out accuracy per stage.

Each seed changes the phantom data, the tiny models' initialisation and every stage's seed. Writes
results/demo_seeds.json and results/demo_seeds.md (the README quotes the table).

    .venv/bin/python scripts/demo_seeds.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("align", "instruct", "grpo")


def run_seed(seed: int) -> dict:
    runs, data = ROOT / f"runs/demo-seed{seed}", ROOT / f"data/phantom-seed{seed}"
    env = {**os.environ, "SEED": str(seed), "DEMO_RUNS": str(runs.relative_to(ROOT)), "DEMO_DATA": str(data.relative_to(ROOT))}
    log = ROOT / f"runs/demo-seed{seed}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as fh:
        subprocess.run(["./train.sh"], cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, check=True)
    summary = json.loads((runs / "summary.json").read_text())
    summary["seconds"] = json.loads((runs / "timing.json").read_text())["seconds"]
    return summary


def table(results: dict[int, dict]) -> str:
    """Per seed and stage: accuracy, blind accuracy (blank image) and text prior, beside chance, and the share of
    multiple-choice answers that name an option of their own question (the rest score 0: incoherent)."""
    seeds = sorted(results)
    lines = ["| seed | stage | accuracy | chance | blind | prior | accuracy - blind | accuracy - prior | MC own option |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]

    def cell(value: float | None, spec: str = ".3f") -> str:
        return "-" if value is None else format(value, spec)

    for s in seeds:
        for st in STAGES:
            e = results[s][st]
            prior = e.get("prior_accuracy")
            lines.append(f"| {s} | {st} | {e['accuracy']:.3f} | {e['chance']:.3f} | {cell(e.get('blind_accuracy'))} | "
                         f"{cell(prior)} | {cell(e.get('blind_gap'), '+.3f')} | "
                         f"{cell(None if prior is None else e['accuracy'] - prior, '+.3f')} | "
                         f"{cell(e.get('own_option_rate'))} |")
    lines += ["", "| seed | align | instruct | grpo | GRPO - instruct | minutes |", "|---:|---:|---:|---:|---:|---:|"]
    for s in seeds:
        r = results[s]
        accs = " | ".join(f"{r[st]['accuracy']:.3f}" for st in STAGES)
        lines.append(f"| {s} | {accs} | {r['grpo']['accuracy'] - r['instruct']['accuracy']:+.3f} | "
                     f"{r['seconds'] / 60:.1f} |")
    gains = [results[s]["grpo"]["accuracy"] - results[s]["instruct"]["accuracy"] for s in seeds]
    means = " | ".join(f"{statistics.mean(results[s][st]['accuracy'] for s in seeds):.3f}" for st in STAGES)
    lines.append(f"| mean | {means} | {statistics.mean(gains):+.3f} (min {min(gains):+.3f}) | |")
    return "\n".join(lines) + "\n"


def environment() -> str:
    """The versions that produced the figures (the pinned ones, requirements/lock.txt) and the machine."""
    import platform
    from importlib.metadata import version

    names = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers", "numpy")
    versions = ", ".join(f"{n} {version(n)}" for n in names)
    return f"{platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPU cores; {versions}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    args = parser.parse_args(argv)
    results = {}
    for seed in args.seeds:
        print(f"seed {seed} ...", flush=True)
        results[seed] = run_seed(seed)
        print(json.dumps({st: results[seed][st]["accuracy"] for st in STAGES}), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "demo_seeds.json").write_text(json.dumps(results, indent=2) + "\n")
    for r in results.values():
        r["environment"] = environment()
    md = ("# Demo curriculum over seeds\n\nHeld-out closed-question accuracy after each stage "
          "(`scripts/demo_seeds.py`), beside chance, blind accuracy (the same questions with a blank image) and the "
          "text prior (the most common training answer to the same question, no image, no model); `MC own option` is "
          "the share of multiple-choice answers that name an option of their own question (an answer naming another "
          "question's option is incoherent and scores 0).\n\n"
          f"Environment: Python {environment()} (requirements/lock.txt).\n\n" + table(results))
    (args.out / "demo_seeds.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
