#!/usr/bin/env python3
"""LLaVA-Med data -> medllava instruction records (LLaVA form, JSONL).

  --kind align     llava_med_alignment_500k.json (PMC figure-caption pairs) -> stage-1 records
  --kind instruct  llava_med_instruct_60k(_inline_mention).json (GPT-4 conversations) -> stage-2 records

Records are checked (image present, roles alternating from the human, no empty answers); the `<image>`
placeholder is moved to the start of the first human turn; skips are counted with their reason.

    python -m data_recipes.llava_med --kind align --in llava_med_alignment_500k.json --out data/llava_med/align.jsonl
    python -m data_recipes.llava_med --kind instruct --in llava_med_instruct_60k_inline_mention.json \\
        --image-folder data/llava_med/images --out data/llava_med/instruct_60k.jsonl
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medllava.recipes import corpora


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=["align", "instruct"], required=True)
    parser.add_argument("--in", dest="inp", required=True, help="LLaVA-Med JSON file")
    parser.add_argument("--out", required=True, type=Path, help="JSONL to write")
    parser.add_argument("--image-folder", default=None, help="skip (and count) records whose image is missing here")
    args = parser.parse_args(argv)
    report = corpora.convert_llava_med(args.inp, args.out, kind=args.kind, image_folder=args.image_folder)
    corpora.finish(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
