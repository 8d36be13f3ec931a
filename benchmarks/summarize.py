#!/usr/bin/env python3
"""Collect a results folder (bench_*.json, grpo_real_size.json) into one markdown summary on stdout."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from medllava.bench import markdown  # noqa: E402


def main(folder: str) -> int:
    root = Path(folder)
    parts = []
    for path in sorted(root.glob("bench_*.json")):
        parts.append(markdown(json.loads(path.read_text())))
    grpo = root / "grpo_real_size.json"
    if grpo.is_file():
        g = json.loads(grpo.read_text())
        parts.append(f"### GRPO, {g['preset']} on {g['device']}\n\n| steps | completions/step | generation s/step | "
                     f"training s/step | peak mem GB |\n|---:|---:|---:|---:|---:|\n| {g['steps']} | "
                     f"{g['completions_per_step']} | {g['generation_s_per_step']:.2f} | {g['train_s_per_step']:.2f} | "
                     f"{g['peak_memory_gb'] or 0:.1f} |\n")
    print("\n".join(parts) if parts else f"no results in {root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1] if len(sys.argv) > 1 else "results"))
