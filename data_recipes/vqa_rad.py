#!/usr/bin/env python3
"""VQA-RAD -> medllava VQA records (GRPO / evaluation), optionally also one-turn instruction conversations.

Accepts the public release (`VQA_RAD Dataset Public.json`: qid, image_name, question, answer, answer_type,
image_organ, phrase_type; images in `VQA_RAD Image Folder/`), or a `datasets` source with embedded images
(`hf:flaviagiammarino/vqa-rad:test`, or a local parquet file), whose images are written under OUT_DIR/images.
yes/no answers become `yes_no` questions, others `open`; answer_type (CLOSED/OPEN) and organ are kept.

    python -m data_recipes.vqa_rad --in "VQA_RAD Dataset Public.json" --split train --out data/vqa/vqa_rad_train.jsonl
    python -m data_recipes.vqa_rad --in "VQA_RAD Dataset Public.json" --split test --out data/vqa/vqa_rad_test.jsonl
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medllava.recipes import corpora


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--in", dest="inp", required=True, help="public JSON, or hf:NAME[:SPLIT] / parquet")
    parser.add_argument("--out", required=True, type=Path, help="VQA JSONL to write")
    parser.add_argument("--split", choices=["train", "test", "all"], default=None,
                        help="public JSON only, required: test = phrase_type test_*, train = the rest, all = both "
                             "(never the default: test questions must not reach a training file unasked)")
    parser.add_argument("--image-folder", default=None, help="check that every image exists in this folder")
    parser.add_argument("--instruct-out", type=Path, default=None, help="also write one-turn LLaVA conversations")
    args = parser.parse_args(argv)
    if args.inp.startswith("hf:") or args.inp.endswith((".parquet", ".arrow")):
        mapper = corpora.embedded_vqa_row("vqarad", args.out.parent / "images")
        check = None
    else:
        if args.split is None:
            parser.error("the public JSON holds both splits: say which with --split train|test|all")
        mapper = corpora.vqa_rad_row(None if args.split == "all" else args.split)
        check = corpora.image_exists_in(args.image_folder)
    report = corpora.convert_vqa([args.inp], corpora.json_source, mapper, args.out, instruct_out=args.instruct_out,
                                 image_check=check)
    corpora.finish(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
