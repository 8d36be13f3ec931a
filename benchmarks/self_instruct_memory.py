#!/usr/bin/env python3
"""Memory of the self-instruct generator over many inputs: it must stay flat (inputs are streamed through a
bounded window), whatever the input count.

    python benchmarks/self_instruct_memory.py --inputs 100000 --out results/self_instruct_memory

Runs `run_generation` in this process against an instant OpenAI-compatible stub on 127.0.0.1 (every answer a
valid two-turn conversation) and samples this process's resident memory after every 5% of the inputs.
Writes OUT.json and OUT.md. No timing is asserted anywhere; the figures are for reading.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from medllava.recipes.self_instruct import GeneratorSettings, run_generation  # noqa: E402

ANSWER = json.dumps({"choices": [{"message": {"role": "assistant", "content": json.dumps([
    {"from": "human", "value": "What kind of scan is this?"},
    {"from": "gpt", "value": "An axial CT of the chest with a small nodule."}])}}],
    "usage": {"prompt_tokens": 100, "completion_tokens": 40, "total_tokens": 140}}).encode()


class Stub(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        return

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(ANSWER)))
        self.end_headers()
        self.wfile.write(ANSWER)


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("results/self_instruct_memory"))
    args = parser.parse_args(argv)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    samples: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "captions.jsonl"
        with src.open("w", encoding="utf-8") as fh:
            for i in range(args.inputs):
                fh.write(json.dumps({"id": f"r{i:07d}", "image": f"pmc/r{i}.jpg",
                                     "caption": f"Axial CT of the chest, case {i}, with a small nodule."}) + "\n")
        done = {"n": 0}
        step = max(1, args.inputs // 20)
        start = time.time()
        samples.append({"done": 0, "rss_mb": round(rss_mb(), 1), "seconds": 0.0})

        def on_outcome(_outcome: object) -> None:
            done["n"] += 1
            if done["n"] % step == 0:
                samples.append({"done": done["n"], "rss_mb": round(rss_mb(), 1), "seconds": round(time.time() - start, 1)})

        settings = GeneratorSettings(base_url=url, model="stub", concurrency=args.concurrency, timeout=30)
        report = run_generation([src], Path(tmp) / "out.jsonl", settings, progress=False, on_outcome=on_outcome)
    server.shutdown()
    first = next(s for s in samples if s["done"] >= step)
    result = {
        "machine": f"{platform.machine()}, {platform.python_implementation()} {platform.python_version()}",
        "inputs": args.inputs, "concurrency": args.concurrency, "generated": report["generated"],
        "requests": report["requests"], "seconds": round(time.time() - start, 1), "samples": samples,
        "rss_growth_after_first_5pct_mb": round(samples[-1]["rss_mb"] - first["rss_mb"], 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    lines = [f"# Self-instruct generator memory ({args.inputs:,} inputs, concurrency {args.concurrency})", "",
             f"{result['machine']}; instant local stub endpoint; {result['generated']:,} generated in "
             f"{result['seconds']} s.", "", "| inputs done | RSS (MB) |", "|---:|---:|"]
    lines += [f"| {s['done']:,} | {s['rss_mb']} |" for s in samples]
    lines += ["", f"RSS growth from 5% to 100% of the inputs: {result['rss_growth_after_first_5pct_mb']} MB "
                  "(the ids already seen are kept to refuse duplicates: about 100 bytes each)."]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
