#!/usr/bin/env python3
"""Write LLaVA-Med-style instruction conversations from figure captions with any OpenAI-compatible endpoint.

Input: JSON/JSONL of {"id", "image", "caption", "mentions"?} or LLaVA-Med alignment records (the caption is
the last gpt turn). Output: LLaVA-form JSONL, one line per generated record, appended as each finishes; a
re-run skips ids already present (kill it any time and start it again). Alongside, appended as they happen:
OUT.failures.jsonl (ids and reasons) and OUT.usage.jsonl (one line per answered request, with its tokens);
OUT.report.json sums every run of the same output. Ctrl-C or SIGTERM stops submitting, cancels what has not
started, lets in-flight requests finish for --grace seconds, writes the report and exits non-zero (a second
Ctrl-C exits at once; output lines stay whole). --max-requests / --max-tokens stop the same way once that much
has been spent on this output over every run. The API key is read from the environment variable named by
--api-key-env and never printed.

    OPENAI_API_KEY=... python -m data_recipes.self_instruct --in data/llava_med/align.jsonl \\
        --out data/llava_med/self_instruct.jsonl --base-url https://api.example.com/v1 --model gpt-4o-mini
    python -m data_recipes.self_instruct --in captions.jsonl --out x.jsonl --base-url URL --model M --dry-run
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

from medllava.recipes.self_instruct import (
    GeneratorSettings,
    SpendingLimits,
    build_messages,
    default_images_dir,
    load_inputs,
    run_generation,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--in", dest="inp", nargs="+", required=True,
                        help="caption records (JSON/JSONL, or a datasets source: hf:NAME[:SPLIT], parquet, a folder)")
    parser.add_argument("--out", required=True, type=Path, help="JSONL of generated conversations (appended)")
    parser.add_argument("--images-out", type=Path, default=None,
                        help="where images embedded in a datasets source are written, named by content; records "
                             "name them relative to it (default: OUT's folder/images)")
    parser.add_argument("--base-url", required=True, help="OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--model", required=True)
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the key")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight at most")
    parser.add_argument("--max-attempts", type=int, default=6, help="attempts per record (429/5xx/timeouts/resets)")
    parser.add_argument("--max-malformed", type=int, default=3, help="malformed answers tolerated per record")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    parser.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds (doubles)")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max-answer-tokens", type=int, default=1024,
                        help="completion length per request (the API's max_tokens)")
    parser.add_argument("--shots", type=int, default=2, help="few-shot examples per request (0-5)")
    parser.add_argument("--limit", type=int, default=None, help="process at most N records this run")
    parser.add_argument("--max-requests", type=int, default=None,
                        help="stop once this many requests were sent for this output (every run counted)")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="stop once this many total tokens were spent for this output (every run counted); "
                             "answers already in flight then still arrive (at most --concurrency - 1 more)")
    parser.add_argument("--retry-failed", action="store_true",
                        help="also retry records that failed in earlier runs (by default a re-run continues where the "
                             "last one stopped and pays for no failure twice)")
    parser.add_argument("--grace", type=float, default=3.0,
                        help="seconds in-flight requests may finish after Ctrl-C / SIGTERM before they are abandoned")
    parser.add_argument("--dry-run", action="store_true", help="print the prompts of the first records, call nothing")
    args = parser.parse_args(argv)

    if args.dry_run:
        items, skipped = load_inputs(args.inp, args.images_out or default_images_dir(args.out))
        for rid, image, caption, mentions in items[: args.limit or 3]:
            print(json.dumps({"id": rid, "image": image, "messages": build_messages(caption, mentions, rid, args.shots)},
                             ensure_ascii=False, indent=1))
        print(json.dumps({"inputs": len(items), "skipped_inputs": dict(skipped)}))
        return 0
    settings = GeneratorSettings(
        base_url=args.base_url, model=args.model, api_key_env=args.api_key_env, concurrency=args.concurrency,
        max_attempts=args.max_attempts, max_malformed=args.max_malformed, timeout=args.timeout,
        backoff_base=args.backoff, temperature=args.temperature, max_tokens=args.max_answer_tokens, shots=args.shots,
    )
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        if received:  # the second one: leave now (every output line is one write, so none is cut)
            os._exit(128 + signum)
        received.append(signum)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    report = run_generation(args.inp, args.out, settings, limit=args.limit, stop=stop, grace=args.grace,
                            retry_failed=args.retry_failed, images_dir=args.images_out,
                            limits=SpendingLimits(args.max_requests, args.max_tokens))
    print(json.dumps(report))
    if report["stopped"] is None:
        return 0
    where = f"{report['total_in_output']} records in {args.out}, {report['requests']} requests spent"
    if received:
        print(f"self_instruct: stopped by {signal.Signals(received[0]).name} ({where}); run the same command again "
              "to resume", file=sys.stderr)
        return 128 + received[0]
    print(f"self_instruct: spending limit: {report['stopped']} ({where}); raise the limit and run the same command "
          "again to resume", file=sys.stderr)
    return 3


if __name__ == "__main__":
    raise SystemExit(main())
