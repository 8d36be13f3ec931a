#!/usr/bin/env python3
"""Does a tiny model learn to compare two studies? The phantom progression pairs, with the order and per-image checks.

For each seed: the demo's phantom data with progression pairs (`data_recipes/phantom.py --pairs`), tiny models,
the demo's align stage, then the demo's instruct stage on the single-image conversations plus the progression
questions (both images first, prior then current). The model is evaluated on held-out pairs with `medllava eval
--blind`, which asks each question four more ways: both images blank (blind), the studies in reverse order (the
order-swapped baseline: "has a lesion appeared since the prior study?" reverses its answer when the studies are
swapped, so a model that compares them in order loses there), and one image blanked at a time (the single-image
baselines: "is a lesion seen on both the prior and the current study?" is answered at most 3 in 4 right from
either image alone, by construction). Writes results/progression.json, .md (the table and a verdict computed from it) and .png.

    .venv/bin/python scripts/progression_ablation.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.dpo_ablation import medllava, sh, write_results  # noqa: E402

TOPICS = {"persistent": "'seen on both studies?' (at most 0.75 from either study alone)",
          "appeared": "'has a lesion appeared?' (reversed by swapping the studies)"}
CHECKS = ("asked", "order", "without_image_1", "without_image_2", "blind")
LABELS = {"asked": "as asked", "order": "studies swapped", "without_image_1": "prior blanked",
          "without_image_2": "current blanked", "blind": "both blanked"}


def run_seed(seed: int, root: Path, pairs: int, test_pairs: int, *, train: int = 2000, align_epochs: int = 2,
             instruct_epochs: int = 6) -> dict:
    """One seed: data, tiny models, align and instruct (the demo's stages; `train` single-image phantoms and the
    epochs as given), then the held-out pairs asked every way. Returns the accuracies per check and topic."""
    runs, data = root / f"seed{seed}", root / f"seed{seed}" / "phantom"
    log = root / f"seed{seed}.log"
    start = time.time()
    paths = [f"--data.image_folder={data}/images", f"--run.seed={seed}"]
    if not (runs / "instruct" / "medllava_stage.yaml").is_file():
        shutil.rmtree(runs, ignore_errors=True)
        runs.mkdir(parents=True)
        sh([sys.executable, "-m", "data_recipes.phantom", "--out", str(data), "--train", str(train), "--test", "0",
            "--pairs", str(pairs), "--test-pairs", str(test_pairs), "--seed", str(seed)], log)
        sh(medllava("tiny", str(runs / "base"), "--corpus", str(data / "corpus.txt"), "--vision", "clip", "--llm",
                    "llama", "--vision-hidden", "64", "--llm-hidden", "128", "--llm-layers", "4", "--seed", str(seed)),
           log)
        sh(medllava("train", "stages/demo/align.yaml", *paths, f"--run.output_dir={runs}/align",
                    f"--model.vision_tower={runs}/base/vision", f"--model.llm={runs}/base/llm",
                    f"--data.train_files=[{data}/align.jsonl]", f"--optim.epochs={align_epochs}"), log)
        sh(medllava("train", "stages/demo/instruct.yaml", *paths, f"--run.output_dir={runs}/instruct",
                    f"--model.init_from={runs}/align", f"--optim.epochs={instruct_epochs}",
                    f"--data.train_files=[{data}/instruct.jsonl,{data}/progression_instruct.jsonl]"), log)
    out = runs / "eval"
    shutil.rmtree(out, ignore_errors=True)
    sh(medllava("eval", str(runs / "instruct"), "--data", str(data / "progression_test.jsonl"), "--image-folder",
                str(data / "images"), "--blind", "--out", str(out)), log)
    metrics = json.loads((out / "metrics.json").read_text())
    result = {"asked": metrics["multi_image"]["accuracy"], "order": metrics["order"]["accuracy"],
              "order_changed": metrics["order"]["changed"],
              "swapped_gold": metrics["order"].get("swapped_accuracy"), "blind": metrics["blind"]["accuracy"],
              **{k: v["accuracy"] for k, v in metrics["ablation"].items()},
              "by_topic": {k: v["accuracy"] for k, v in metrics.get("by_topic", {}).items()},
              "n": metrics["multi_image"]["n_closed"], "chance": metrics["chance"]}
    for topic in TOPICS:  # the checks per question kind, from the predictions
        rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        from medllava.evaluate import score

        sub = [r for r in rows if r.get("topic") == topic]
        result[f"{topic}_checks"] = {c: score(sub, key="prediction" if c == "asked" else f"{c}_prediction")["accuracy"]
                                     for c in CHECKS}
    result["seconds"] = round(time.time() - start)
    return result


def verdict(results: dict[int, dict]) -> list[str]:
    """What the table shows, computed from it (never written by hand)."""
    lines = []
    for check in CHECKS[1:]:
        margins = [results[s]["asked"] - results[s][check] for s in results]
        lines.append(f"- as asked vs {LABELS[check]}: {statistics.mean(margins):+.3f} on average, higher on "
                     f"{sum(m > 0 for m in margins)} of {len(margins)} seeds.")
    for topic, check, what in (("persistent", "without_image_1", "the prior blanked"),
                               ("persistent", "without_image_2", "the current blanked"),
                               ("appeared", "order", "the studies swapped")):
        margins = [results[s][f"{topic}_checks"]["asked"] - results[s][f"{topic}_checks"][check] for s in results]
        lines.append(f"- {TOPICS[topic]}: as asked vs {what}: {statistics.mean(margins):+.3f} on average, higher on "
                     f"{sum(m > 0 for m in margins)} of {len(margins)} seeds.")
    return lines


def table(results: dict[int, dict]) -> str:
    head = ["| seed | " + " | ".join(LABELS[c] for c in CHECKS) + " | answers changed by the swap | n | min |",
            "|---:|" + "---:|" * (len(CHECKS) + 3)]
    for s in sorted(results):
        r = results[s]
        head.append(f"| {s} | " + " | ".join(f"{r[c]:.3f}" for c in CHECKS)
                    + f" | {r['order_changed']:.3f} | {r['n']} | {r['seconds'] / 60:.1f} |")
    for topic in TOPICS:
        for s in sorted(results):
            c = results[s][f"{topic}_checks"]
            head.append(f"| {s}, {topic} only | " + " | ".join(f"{c[k]:.3f}" for k in CHECKS) + " | | | |")
    return "\n".join(head) + "\n"


def plot(results: dict[int, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted(results)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.8 / len(CHECKS)
    for k, check in enumerate(CHECKS):
        ax.bar([i - 0.4 + width / 2 + k * width for i in range(len(seeds))], [results[s][check] for s in seeds],
               width, label=LABELS[check])
    ax.set_xticks(range(len(seeds)), [f"seed {s}" for s in seeds])
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (held-out pairs)")
    ax.set_title("progression pairs: as asked vs order-swapped and single-image baselines")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work", type=Path, default=ROOT / "runs/progression")
    parser.add_argument("--pairs", type=int, default=1500, help="training progression pairs")
    parser.add_argument("--test-pairs", type=int, default=200, help="held-out progression pairs")
    parser.add_argument("--train", type=int, default=1000, help="single-image phantoms (align and instruct data)")
    parser.add_argument("--align-epochs", type=int, default=1)
    parser.add_argument("--instruct-epochs", type=int, default=6)
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    args = parser.parse_args(argv)
    results = {}
    for seed in args.seeds:
        print(f"seed {seed} ...", flush=True)
        results[seed] = run_seed(seed, args.work, args.pairs, args.test_pairs, train=args.train,
                                 align_epochs=args.align_epochs, instruct_epochs=args.instruct_epochs)
        print(json.dumps(results[seed]), flush=True)
    intro = ("Held-out progression pairs (`scripts/progression_ablation.py`): a prior and a current phantom study "
             "of one patient where a lesion appears, persists or vanishes, asked \"has a lesion appeared since the "
             "prior study?\" (reversed by swapping the studies) and \"is a lesion seen on both the prior and the "
             "current study?\" (at most 3 in 4 right from either study alone, by construction). The tiny demo model "
             f"(align {args.align_epochs} epoch(s) on {args.train} single-image captions, then instruct "
             f"{args.instruct_epochs} epochs on their conversations plus {args.pairs} progression pairs; "
             "tests/test_progression.py runs seed 0 of this at 100 held-out pairs) is asked each "
             "question as recorded, with the studies swapped (graded against the recorded answer: the order-swapped "
             "baseline), with one study blanked, and with both blanked.")
    print(write_results(args.out, "progression", results, "Comparing two studies: the phantom progression pairs",
                        intro, table(results), verdict(results), plot, "accuracy per check and seed"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
