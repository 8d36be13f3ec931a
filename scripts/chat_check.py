#!/usr/bin/env python3
"""Ask the exported demo model held-out questions through `medllava chat --prompt` (the real CLI, one process
per question) and score the answers like `medllava eval`. Writes results/chat_check.json and .md.

    .venv/bin/python scripts/chat_check.py --model runs/demo/export --data data/phantom --n 30
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from medllava.data.vqa import format_question  # noqa: E402
from medllava.grading import grade  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/demo/export")
    parser.add_argument("--data", type=Path, default=Path("data/phantom"))
    parser.add_argument("--n", type=int, default=30, help="questions, spread evenly over the test set")
    parser.add_argument("--out", type=Path, default=ROOT / "results/chat_check.json")
    args = parser.parse_args(argv)
    rows = [json.loads(line) for line in (args.data / "test.jsonl").read_text().splitlines()]
    picked = rows[:: max(1, len(rows) // args.n)][: args.n]
    results = []
    for row in picked:
        prompt = format_question(row["question"], row.get("options"), with_image=False)
        image = args.data / "images" / row["image"]
        proc = subprocess.run([sys.executable, "-m", "medllava.cli", "chat", args.model, "--image", str(image),
                               "--prompt", prompt], capture_output=True, text=True, cwd=ROOT)
        answer = proc.stdout.strip()
        g = grade(answer, row["answer"], row["qtype"], row.get("options"))
        results.append({"id": row["id"], "topic": row.get("topic"), "question": prompt, "gold": row["answer"],
                        "answer": answer, "correct": g.correct, "exit_code": proc.returncode})
        print(f"{row['id']:<16} {row.get('topic', ''):<9} gold {row['answer']:<4} -> {answer!r} {'ok' if g.correct else 'x'}")
    right = sum(r["correct"] for r in results)
    summary = {"model": args.model, "questions": len(results), "correct": right, "accuracy": right / len(results),
               "all_exit_0": all(r["exit_code"] == 0 for r in results), "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    lines = ["# `medllava chat` one-shot on held-out demo questions", "",
             f"{right} of {len(results)} answered right ({100 * right / len(results):.0f}%), model `{args.model}`.", "",
             "| id | topic | gold | answer | right |", "|---|---|---|---|---|"]
    lines += [f"| {r['id']} | {r['topic']} | {r['gold']} | {r['answer']} | {'yes' if r['correct'] else 'no'} |" for r in results]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"{right}/{len(results)} right")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
