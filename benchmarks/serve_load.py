#!/usr/bin/env python3
"""A bounded load test of `medllava serve` on loopback: C concurrent clients x R requests each, then stop.

Every request must be answered (200) or refused with 429/503; none may be lost (a connection error or any other
status), and the server must still answer /health afterwards. Writes results/serve_load.{json,md}: counts,
latency p50/p95 of answered requests, requests/s, and the machine.

    .venv/bin/python benchmarks/serve_load.py                    # the demo-sized model, 32 clients x 4 requests
    .venv/bin/python benchmarks/serve_load.py --model runs/demo/export
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def demo_sized_model(folder: Path) -> Path:
    """The demo's tiny model shape (CLIP-like tower 64 wide, Llama-like LLM 128 wide, 4 layers), random weights."""
    from medllava.model import build_model, save_model
    from medllava.presets import make_tiny_pair, tiny_corpus

    vision, llm = make_tiny_pair(folder / "pair", "clip", "llama", corpus=tiny_corpus([]), vision_hidden=64,
                                 llm_hidden=128, llm_layers=4)
    model, processor = build_model(str(vision), str(llm))
    save_model(model, processor, folder / "model")
    return folder / "model"


def probe_png() -> str:
    import numpy as np
    from PIL import Image

    arr = (np.indices((32, 32)).sum(0) * 4).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPU cores ({cpu}), {platform.system()} {platform.machine()}"


def main(argv: list[str] | None = None) -> int:
    import httpx2 as httpx

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: a demo-sized random one)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-queue", type=int, default=16)
    parser.add_argument("--label", default=None, help="how the model is named in the report (default: its path)")
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or demo_sized_model(Path(tmp))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        log = Path(tmp) / "server.log"
        server = subprocess.Popen([sys.executable, "-m", "medllava.cli", "serve", str(model), "--port", str(port),
                                   "--model-id", "m", "--max-queue", str(args.max_queue)],
                                  stdout=log.open("w"), stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 120
            while True:
                try:
                    if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None or time.time() > deadline:
                    raise SystemExit(f"server did not start:\n{log.read_text()[-2000:]}")
                time.sleep(0.2)
            image = probe_png()
            body = {"model": "m", "max_tokens": args.max_tokens, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "Is any lesion visible?"}]}]}

            def client(_: int) -> list[tuple[str, float]]:
                out = []
                with httpx.Client(timeout=600) as http:
                    for _ in range(args.requests):
                        start = time.perf_counter()
                        try:
                            status = str(http.post(f"{base}/v1/chat/completions", json=body).status_code)
                        except httpx.HTTPError as err:
                            status = f"lost: {type(err).__name__}"
                        out.append((status, time.perf_counter() - start))
                return out

            start = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                results = [r for rs in pool.map(client, range(args.clients)) for r in rs]
            wall = time.perf_counter() - start
            alive = httpx.get(f"{base}/health", timeout=10).json().get("status") == "ok"
        finally:
            server.terminate()
            server.wait(timeout=30)

    answered = sorted(t for s, t in results if s == "200")
    refused = sum(1 for s, _ in results if s in ("429", "503"))
    lost = [s for s, _ in results if s not in ("200", "429", "503")]
    q = statistics.quantiles(answered, n=20) if len(answered) >= 2 else [float("nan")] * 19
    report = {
        "machine": machine(), "model": args.label or ("demo-sized random" if args.model is None else str(args.model)),
        "clients": args.clients, "requests_per_client": args.requests, "max_tokens": args.max_tokens,
        "max_queue": args.max_queue, "sent": len(results), "answered": len(answered), "refused": refused,
        "lost": len(lost), "lost_kinds": sorted(set(lost)), "server_alive_after": alive, "wall_s": round(wall, 2),
        "answered_per_s": round(len(answered) / wall, 2), "latency_p50_s": round(statistics.median(answered), 3)
        if answered else None, "latency_p95_s": round(q[18], 3) if answered else None,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_load.json").write_text(json.dumps(report, indent=2) + "\n")
    md = (f"# `medllava serve` load test ({report['machine']})\n\n"
          f"{args.clients} concurrent clients x {args.requests} requests, loopback, {report['model']} model, "
          f"max_tokens {args.max_tokens}, queue {args.max_queue} (`benchmarks/serve_load.py`).\n\n"
          "| sent | answered | refused (429/503) | lost | server alive after | answered/s | p50 s | p95 s |\n"
          "|---:|---:|---:|---:|---|---:|---:|---:|\n"
          f"| {report['sent']} | {report['answered']} | {report['refused']} | {report['lost']} | "
          f"{'yes' if alive else 'no'} | {report['answered_per_s']} | {report['latency_p50_s']} | "
          f"{report['latency_p95_s']} |\n\nLatency is per answered request, queueing included; one request "
          "generates at a time (one model on one device), the others wait in the queue or are refused past it.\n")
    (args.out / "serve_load.md").write_text(md)
    print(md)
    return 0 if not lost and alive else 1


if __name__ == "__main__":
    sys.exit(main())
