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
    seeds = sorted(results)
    lines = ["| seed | chance | " + " | ".join(STAGES) + " | GRPO - instruct | minutes |",
             "|---:|---:|" + "---:|" * len(STAGES) + "---:|---:|"]
    for s in seeds:
        r = results[s]
        accs = " | ".join(f"{r[st]['accuracy']:.3f}" for st in STAGES)
        lines.append(f"| {s} | {r['instruct']['chance']:.3f} | {accs} | "
                     f"{r['grpo']['accuracy'] - r['instruct']['accuracy']:+.3f} | {r['seconds'] / 60:.1f} |")
    gains = [results[s]["grpo"]["accuracy"] - results[s]["instruct"]["accuracy"] for s in seeds]
    means = " | ".join(f"{statistics.mean(results[s][st]['accuracy'] for s in seeds):.3f}" for st in STAGES)
    lines.append(f"| mean | | {means} | {statistics.mean(gains):+.3f} (min {min(gains):+.3f}) | |")
    return "\n".join(lines) + "\n"


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
    md = "# Demo curriculum over seeds\n\nHeld-out closed-question accuracy after each stage " \
         "(`scripts/demo_seeds.py`, 2-core CPU).\n\n" + table(results)
    (args.out / "demo_seeds.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
