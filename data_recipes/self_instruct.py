#!/usr/bin/env python3
"""Write LLaVA-Med-style instruction conversations from figure captions with any OpenAI-compatible endpoint.

Input: JSON/JSONL of {"id", "image", "caption", "mentions"?} or LLaVA-Med alignment records (the caption is
the last gpt turn). Output: LLaVA-form JSONL, one line per generated record, appended as each finishes; a
re-run skips ids already present (kill it any time and start it again). Alongside: OUT.failures.jsonl (ids
and reasons) and OUT.report.json (done, failed, tokens used). The API key is read from the environment
variable named by --api-key-env and never printed.

    OPENAI_API_KEY=... python data_recipes/self_instruct.py --in data/llava_med/align.jsonl \\
        --out data/llava_med/self_instruct.jsonl --base-url https://api.example.com/v1 --model gpt-4o-mini
    python data_recipes/self_instruct.py --in captions.jsonl --out x.jsonl --base-url URL --model M --dry-run
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from medllava.data.self_instruct import GeneratorSettings, build_messages, load_inputs, run_generation  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--in", dest="inp", nargs="+", required=True, help="caption records (JSON/JSONL)")
    parser.add_argument("--out", required=True, type=Path, help="JSONL of generated conversations (appended)")
    parser.add_argument("--base-url", required=True, help="OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--model", required=True)
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the key")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight at most")
    parser.add_argument("--max-attempts", type=int, default=6, help="attempts per record (429/5xx/timeouts/resets)")
    parser.add_argument("--max-malformed", type=int, default=3, help="malformed answers tolerated per record")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    parser.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds (doubles)")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--shots", type=int, default=2, help="few-shot examples per request (0-5)")
    parser.add_argument("--limit", type=int, default=None, help="process at most N records this run")
    parser.add_argument("--dry-run", action="store_true", help="print the prompts of the first records, call nothing")
    args = parser.parse_args(argv)

    if args.dry_run:
        items, skipped = load_inputs(args.inp)
        for rid, image, caption, mentions in items[: args.limit or 3]:
            print(json.dumps({"id": rid, "image": image, "messages": build_messages(caption, mentions, rid, args.shots)},
                             ensure_ascii=False, indent=1))
        print(json.dumps({"inputs": len(items), "skipped_inputs": dict(skipped)}))
        return 0
    settings = GeneratorSettings(
        base_url=args.base_url, model=args.model, api_key_env=args.api_key_env, concurrency=args.concurrency,
        max_attempts=args.max_attempts, max_malformed=args.max_malformed, timeout=args.timeout,
        backoff_base=args.backoff, temperature=args.temperature, max_tokens=args.max_tokens, shots=args.shots,
    )
    report = run_generation(args.inp, args.out, settings, limit=args.limit)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
