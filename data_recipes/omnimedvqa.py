#!/usr/bin/env python3
"""OmniMedVQA (multiple choice, per modality) -> medllava VQA records.

Input: the per-dataset QA JSON files (QA_information/Open-access/*.json: question_id, image_path, question,
option_A..D, gt_answer as option text, modality_type, dataset); images relative to the release root.
The gold letter is the option equal to gt_answer; modality_type is kept, so `medllava eval` reports
accuracy per modality.

    python -m data_recipes.omnimedvqa --in OmniMedVQA/QA_information/Open-access/*.json \\
        --image-folder OmniMedVQA --out data/omnimedvqa/test.jsonl
"""

from __future__ import annotations

from medllava.recipes import corpora


def main(argv: list[str] | None = None) -> int:
    return corpora.vqa_recipe_main(
        argv, __doc__, corpora.json_source, corpora.omnimedvqa_row,
        in_help="OmniMedVQA QA JSON file(s)", image_help="check that every image exists (release root)")


if __name__ == "__main__":
    raise SystemExit(main())
