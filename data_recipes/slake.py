#!/usr/bin/env python3
"""SLAKE 1.0 (English questions) -> medllava VQA records, optionally also one-turn instruction conversations.

Input: the published split files (train.json / validate.json / test.json: qid, img_name, question, answer,
q_lang, modality, location, answer_type; images under imgs/). Chinese questions (q_lang zh) are skipped and
counted. modality (CT / MRI / X-Ray) and location (organ) are kept for per-slice metrics; `mask` names the image's
segmentation (imgs/xmlabN/mask.png: organs and lesions), the region data_recipes/preference_pairs.py noises.

    python -m data_recipes.slake --in Slake1.0/test.json --image-folder Slake1.0/imgs --out data/slake/test.jsonl
"""

from __future__ import annotations

from medllava.recipes import corpora


def main(argv: list[str] | None = None) -> int:
    return corpora.vqa_recipe_main(
        argv, __doc__, corpora.json_source, corpora.slake_row,
        in_help="SLAKE split JSON file(s)", image_help="check that every image exists in this folder (imgs/)")


if __name__ == "__main__":
    raise SystemExit(main())
