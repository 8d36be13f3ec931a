#!/usr/bin/env python3
"""PathVQA -> medllava VQA records, optionally also one-turn instruction conversations.

Input: the `datasets` release with embedded images (`hf:flaviagiammarino/path-vqa:test`, or its parquet
files: image, question, answer). Images are written under OUT_DIR/images; yes/no answers become `yes_no`,
the rest `open`. (The original release ships pickles, which medllava does not load.)

    python -m data_recipes.pathvqa --in hf:flaviagiammarino/path-vqa:test --out data/pathvqa/test.jsonl
"""

from __future__ import annotations

from medllava.recipes import corpora


def main(argv: list[str] | None = None) -> int:
    return corpora.embedded_recipe_main(argv, __doc__, lambda images: corpora.embedded_vqa_row("pathvqa", images))


if __name__ == "__main__":
    raise SystemExit(main())
