#!/usr/bin/env python3
"""Convert LLaVA-form VQA records (human question / gpt answer turns) into VQA records for GRPO or evaluation.

Input: JSON or JSONL of {"id", "image", "conversations": [...], "answer_type"?} (LLaVA-Med's VQA-RAD, SLAKE
and PathVQA files use this form). Output: JSONL of {"id", "image", "question", "answer", "qtype"?}, one per
question turn; records that do not parse are skipped and reported with their reason.

    python -m data_recipes.llava_to_vqa --in test.json --out data/vqa_rad/test_vqa.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from medllava.data.records import RecordError, iter_raw
from medllava.data.rl import from_llava_conversation
from medllava.data.vqa import parse_vqa


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--in", dest="inp", required=True, help="LLaVA-form JSON/JSONL")
    parser.add_argument("--out", required=True, type=Path, help="VQA JSONL to write")
    args = parser.parse_args(argv)
    read = written = 0
    skipped: Counter[str] = Counter()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as fh:
        for raw in iter_raw(args.inp):
            read += 1
            if raw.error is not None:
                skipped[raw.error.kind] += 1
                print(f"skip {raw.error.describe()}", file=sys.stderr)
                continue
            rows = from_llava_conversation(raw.data or {})
            if not rows:
                skipped["no_question_answer_pair"] += 1
                continue
            for row in rows:
                try:
                    parse_vqa(row, raw.source, raw.line)
                except RecordError as err:
                    skipped[err.kind] += 1
                    print(f"skip {err.describe()}", file=sys.stderr)
                    continue
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                written += 1
    print(json.dumps({"read": read, "written": written, "skipped": dict(skipped)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
