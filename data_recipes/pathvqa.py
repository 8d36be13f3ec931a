#!/usr/bin/env python3
"""PathVQA -> medllava VQA records, optionally also one-turn instruction conversations.

Input: the `datasets` release with embedded images (`hf:flaviagiammarino/path-vqa:test`, or its parquet
files: image, question, answer). Images are written under OUT_DIR/images; yes/no answers become `yes_no`,
the rest `open`. (The original release ships pickles, which medllava does not load.)

    python -m data_recipes.pathvqa --in hf:flaviagiammarino/path-vqa:test --out data/pathvqa/test.jsonl
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medllava.recipes import corpora


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--in", dest="inp", nargs="+", required=True, help="hf:NAME[:SPLIT] or parquet file(s)")
    parser.add_argument("--out", required=True, type=Path, help="VQA JSONL to write")
    parser.add_argument("--instruct-out", type=Path, default=None, help="also write one-turn LLaVA conversations")
    args = parser.parse_args(argv)
    mapper = corpora.embedded_vqa_row("pathvqa", args.out.parent / "images")
    report = corpora.convert_vqa(args.inp, corpora.json_source, mapper, args.out, instruct_out=args.instruct_out)
    corpora.finish(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
