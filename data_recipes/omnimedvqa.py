#!/usr/bin/env python3
"""OmniMedVQA (multiple choice, per modality) -> medllava VQA records.

Input: the per-dataset QA JSON files (QA_information/Open-access/*.json: question_id, image_path, question,
option_A..D, gt_answer as option text, modality_type, dataset); images relative to the release root.
The gold letter is the option equal to gt_answer; modality_type is kept, so `medllava eval` reports
accuracy per modality.

    python data_recipes/omnimedvqa.py --in OmniMedVQA/QA_information/Open-access/*.json \\
        --image-folder OmniMedVQA --out data/omnimedvqa/test.jsonl
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from medllava.data import corpora  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--in", dest="inp", nargs="+", required=True, help="OmniMedVQA QA JSON file(s)")
    parser.add_argument("--out", required=True, type=Path, help="VQA JSONL to write")
    parser.add_argument("--image-folder", default=None, help="check that every image exists (release root)")
    parser.add_argument("--instruct-out", type=Path, default=None, help="also write one-turn LLaVA conversations")
    args = parser.parse_args(argv)
    report = corpora.convert_vqa(args.inp, corpora.json_source, corpora.omnimedvqa_row, args.out,
                                 instruct_out=args.instruct_out, image_check=corpora.image_exists_in(args.image_folder))
    corpora.finish(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
