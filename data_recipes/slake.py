#!/usr/bin/env python3
"""SLAKE 1.0 (English questions) -> medllava VQA records, optionally also one-turn instruction conversations.

Input: the published split files (train.json / validate.json / test.json: qid, img_name, question, answer,
q_lang, modality, location, answer_type; images under imgs/). Chinese questions (q_lang zh) are skipped and
counted. modality (CT / MRI / X-Ray) and location (organ) are kept for per-slice metrics.

    python data_recipes/slake.py --in Slake1.0/test.json --image-folder Slake1.0/imgs --out data/slake/test.jsonl
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from medllava.data import corpora  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--in", dest="inp", nargs="+", required=True, help="SLAKE split JSON file(s)")
    parser.add_argument("--out", required=True, type=Path, help="VQA JSONL to write")
    parser.add_argument("--image-folder", default=None, help="check that every image exists in this folder (imgs/)")
    parser.add_argument("--instruct-out", type=Path, default=None, help="also write one-turn LLaVA conversations")
    args = parser.parse_args(argv)
    report = corpora.convert_vqa(args.inp, corpora.json_source, corpora.slake_row, args.out,
                                 instruct_out=args.instruct_out, image_check=corpora.image_exists_in(args.image_folder))
    corpora.finish(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
