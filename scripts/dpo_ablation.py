#!/usr/bin/env python3
"""Does the demo's DPO stage make the model look? Instruct vs instruct + DPO, with image rejects vs text rejects.

For each seed: the demo's phantom data, tiny models, align and instruct stages (as ./train.sh runs them), then
pairs from the instruct model (data_recipes/preference_pairs.py, one sampling pass), split by reject kind:
- image rejects: the same right answer with the image blanked or noised inside the lesion box;
- text rejects: the instruct model's own wrong answers to the real image;
and stages/demo/dpo.yaml trained on each set from the same instruct model. Every model is evaluated on the held-out
closed questions with the real image and with a blank one (blind): the blind gap (accuracy - blind accuracy) is how
much the answers depend on the image. Writes results/dpo_ablation.json, .md (the table, and a verdict computed from
it) and .png.

    .venv/bin/python scripts/dpo_ablation.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("instruct", "dpo_image", "dpo_text")
IMAGE_REJECTS = ("image:blank", "image:lesion")


def sh(cmd: list[str], log: Path) -> None:
    with log.open("a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, check=True,
                       env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})


def medllava(*args: str) -> list[str]:
    return [sys.executable, "-m", "medllava.cli", *args]


def write_results(out: Path, name: str, results: dict, title: str, intro: str, table_md: str, verdict_lines: list[str],
                  draw: Callable[[dict, Path], None], caption: str) -> str:
    """OUT/NAME.json (the results), NAME.png (drawn by `draw`) and NAME.md (title, intro, environment, the table, the
    verdict computed from it, the figure); returns the markdown."""
    from scripts.demo_seeds import environment

    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    draw(results, out / f"{name}.png")
    md = (f"# {title}\n\n{intro}\n\nEnvironment: Python {environment()}.\n\n{table_md}\n" + "\n".join(verdict_lines)
          + f"\n\n![{caption}]({name}.png)\n")
    (out / f"{name}.md").write_text(md)
    return md


def run_seed(seed: int, root: Path, max_records: int) -> dict:
    runs, data = root / f"seed{seed}", root / f"seed{seed}" / "phantom"
    log = root / f"seed{seed}.log"
    start = time.time()
    paths = [f"--data.image_folder={data}/images", f"--run.seed={seed}"]
    if not (runs / "instruct" / "medllava_stage.yaml").is_file():
        shutil.rmtree(runs, ignore_errors=True)
        runs.mkdir(parents=True)
        sh([sys.executable, "-m", "data_recipes.phantom", "--out", str(data), "--train", "2000", "--test", "100",
            "--seed", str(seed)], log)
        sh(medllava("tiny", str(runs / "base"), "--corpus", str(data / "corpus.txt"), "--vision", "clip", "--llm",
                    "llama", "--vision-hidden", "64", "--llm-hidden", "128", "--llm-layers", "4", "--seed", str(seed)),
           log)
        sh(medllava("train", "stages/demo/align.yaml", *paths, f"--run.output_dir={runs}/align",
                    f"--model.vision_tower={runs}/base/vision", f"--model.llm={runs}/base/llm",
                    f"--data.train_files=[{data}/align.jsonl]"), log)
        sh(medllava("train", "stages/demo/instruct.yaml", *paths, f"--run.output_dir={runs}/instruct",
                    f"--model.init_from={runs}/align", f"--data.train_files=[{data}/instruct.jsonl]"), log)
    summary = runs / "summary.json"
    summary.unlink(missing_ok=True)
    pairs = runs / "pairs.jsonl"
    if not pairs.is_file():
        sh([sys.executable, "-m", "data_recipes.preference_pairs", "--model", str(runs / "instruct"), "--data",
            str(data / "rl.jsonl"), "--image-folder", str(data / "images"), "--out", str(pairs), "--rejects",
            *IMAGE_REJECTS, "text", "--n", "4", "--max-new-tokens", "8", "--max-records", str(max_records),
            "--seed", str(seed)], log)
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    counts = {}
    for arm, kinds in (("dpo_image", IMAGE_REJECTS), ("dpo_text", ("text",))):
        subset = [r for r in rows if r["reject"] in kinds]
        counts[arm] = len(subset)
        (runs / f"pairs_{arm}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in subset))
        shutil.rmtree(runs / arm, ignore_errors=True)
        sh(medllava("train", "stages/demo/dpo.yaml", *paths, f"--run.output_dir={runs}/{arm}",
                    f"--model.init_from={runs}/instruct", f"--data.train_files=[{runs}/pairs_{arm}.jsonl]"), log)
    for arm in ARMS:
        sh(medllava("eval", str(runs / arm), "--data", str(data / "test.jsonl"), "--image-folder", str(data / "images"),
                    "--blind", "--summary", str(summary), "--stage", arm), log)
    result = json.loads(summary.read_text())
    result = {arm: {k: result[arm].get(k) for k in ("accuracy", "blind_accuracy", "blind_gap", "n", "chance")}
              for arm in ARMS}
    result["pairs"] = counts
    result["pairs_report"] = json.loads((runs / "pairs.report.json").read_text())["made"]
    result["seconds"] = round(time.time() - start)
    return result


def verdict(results: dict[int, dict]) -> list[str]:
    """What the table shows, computed from it (never written by hand)."""
    lines = []
    for arm, what in (("dpo_image", "image rejects"), ("dpo_text", "text rejects")):
        gaps = [results[s][arm]["blind_gap"] - results[s]["instruct"]["blind_gap"] for s in results]
        accs = [results[s][arm]["accuracy"] - results[s]["instruct"]["accuracy"] for s in results]
        raised = sum(g > 0 for g in gaps)
        kept = sum(a >= -0.01 for a in accs)
        lines.append(f"- DPO with {what}: blind gap {statistics.mean(gaps):+.3f} on average over instruct (raised on "
                     f"{raised} of {len(gaps)} seeds), accuracy {statistics.mean(accs):+.3f} (within 0.01 or better "
                     f"on {kept} of {len(accs)}).")
    return lines


def table(results: dict[int, dict]) -> str:
    head = ["| seed | " + " | ".join(f"{a} acc | {a} blind | {a} gap" for a in ARMS) + " | pairs (image / text) | min |",
            "|---:|" + "---:|" * (3 * len(ARMS) + 2)]
    for s in sorted(results):
        r = results[s]
        cells = " | ".join(f"{r[a]['accuracy']:.3f} | {r[a]['blind_accuracy']:.3f} | {r[a]['blind_gap']:+.3f}" for a in ARMS)
        head.append(f"| {s} | {cells} | {r['pairs']['dpo_image']} / {r['pairs']['dpo_text']} | {r['seconds'] / 60:.1f} |")
    means = " | ".join(
        f"{statistics.mean(results[s][a]['accuracy'] for s in results):.3f} | "
        f"{statistics.mean(results[s][a]['blind_accuracy'] for s in results):.3f} | "
        f"{statistics.mean(results[s][a]['blind_gap'] for s in results):+.3f}" for a in ARMS)
    head.append(f"| mean | {means} | | |")
    return "\n".join(head) + "\n"


def plot(results: dict[int, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted(results)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    width = 0.25
    for k, arm in enumerate(ARMS):
        xs = [i + (k - 1) * width for i in range(len(seeds))]
        axes[0].bar(xs, [results[s][arm]["accuracy"] for s in seeds], width, label=arm)
        axes[1].bar(xs, [results[s][arm]["blind_gap"] for s in seeds], width, label=arm)
    for ax, title in zip(axes, ("accuracy", "blind gap (accuracy - blind accuracy)")):
        ax.set_xticks(range(len(seeds)), [f"seed {s}" for s in seeds])
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work", type=Path, default=ROOT / "runs/dpo-ablation")
    parser.add_argument("--max-records", type=int, default=600, help="RL questions the pairs are built from")
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    args = parser.parse_args(argv)
    results = {}
    for seed in args.seeds:
        print(f"seed {seed} ...", flush=True)
        results[seed] = run_seed(seed, args.work, args.max_records)
        print(json.dumps({a: results[seed][a] for a in ARMS}), flush=True)
    intro = ("Held-out closed questions of the phantom demo (`scripts/dpo_ablation.py`): the instruct model, and "
             "`stages/demo/dpo.yaml` trained from it on pairs it made (`data_recipes/preference_pairs.py`) whose "
             "rejected side is the same right answer with the image blanked or noised inside the lesion box (image "
             "rejects) or the model's own wrong answer (text rejects). `blind` is the accuracy with a blank image; "
             "the gap is how much the answers depend on the image.")
    print(write_results(args.out, "dpo_ablation", results, "DPO ablation on the demo: image rejects vs text rejects",
                        intro, table(results), verdict(results), plot, "accuracy and blind gap per seed"))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
