#!/usr/bin/env python3
"""PMC-VQA (multiple choice) -> medllava VQA records, optionally also one-turn instruction conversations.

Input: the published CSV files (train.csv / test.csv: Figure_path, Question, Answer, Choice A..D written as
" A:text", Answer_label; figures under images/). Choices lose their "A:" prefixes; the gold answer is the
label letter (or the option matching Answer when the label is missing).

    python -m data_recipes.pmc_vqa --in PMC-VQA/test.csv --image-folder PMC-VQA/images --out data/pmc_vqa/test.jsonl
"""

from __future__ import annotations

from medllava.recipes import corpora


def main(argv: list[str] | None = None) -> int:
    return corpora.vqa_recipe_main(
        argv, __doc__, corpora.csv_source, corpora.pmc_vqa_row,
        in_help="PMC-VQA CSV file(s)", image_help="check that every figure exists in this folder")


if __name__ == "__main__":
    raise SystemExit(main())
