#!/usr/bin/env python3
"""MedFrameQA (multi-image: 2 to 5 frames of one clinical video per question) -> medllava VQA records.

Input: the `datasets` release (`hf:SuhaoYu1020/MedFrameQA:test`, or its parquet files): question_id, system, organ,
keyword, modality, video_id, question, options (a list of option texts), correct_answer (the letter), image_1 ..
image_5 (embedded frames, in video order; unused ones empty). Frames are written under OUT_DIR/images and listed
in order as the record's `images`; the question refers to them as "the first image", "the second image", so they
come before it. `modality`, `organ` and `system` are kept, so `medllava eval` reports accuracy per modality and
organ; `medllava eval --blind` adds the order check (frames reversed) and one frame blanked at a time.

    python -m data_recipes.medframeqa --in hf:SuhaoYu1020/MedFrameQA:test --out data/medframeqa/test.jsonl
"""

from __future__ import annotations

from medllava.recipes import corpora


def main(argv: list[str] | None = None) -> int:
    return corpora.embedded_recipe_main(argv, __doc__, corpora.medframeqa_row)


if __name__ == "__main__":
    raise SystemExit(main())
