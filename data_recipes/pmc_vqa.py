#!/usr/bin/env python3
"""PMC-VQA (multiple choice) -> medllava VQA records, optionally also one-turn instruction conversations.

Input: the published CSV files (train.csv / test.csv: Figure_path, Question, Answer, Choice A..D written as
" A:text", Answer_label; figures under images/). Choices lose their "A:" prefixes; the gold answer is the
label letter (or the option matching Answer when the label is missing).

    python data_recipes/pmc_vqa.py --in PMC-VQA/test.csv --image-folder PMC-VQA/images --out data/pmc_vqa/test.jsonl
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from medllava.data import corpora  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--in", dest="inp", nargs="+", required=True, help="PMC-VQA CSV file(s)")
    parser.add_argument("--out", required=True, type=Path, help="VQA JSONL to write")
    parser.add_argument("--image-folder", default=None, help="check that every figure exists in this folder")
    parser.add_argument("--instruct-out", type=Path, default=None, help="also write one-turn LLaVA conversations")
    args = parser.parse_args(argv)
    report = corpora.convert_vqa(args.inp, corpora.csv_source, corpora.pmc_vqa_row, args.out,
                                 instruct_out=args.instruct_out, image_check=corpora.image_exists_in(args.image_folder))
    corpora.finish(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
