#!/usr/bin/env python3
"""A bounded load test of `medllava serve` on loopback: C concurrent clients x R requests each, then stop.

Every request must be answered (200) or refused with 429/503; none may be lost (a connection error or any other
status), and the server must still answer /health afterwards. Writes results/serve_load.{json,md}: counts,
latency p50/p95 of answered requests, requests/s, and the machine.

`--soak SECONDS`: good clients and hostile ones side by side for that long (an oversized chunked body, a PNG that
decodes to 5000x5000, twelve images in one request, `<image>` in text, a slow sender, a streamer that hangs up
after its first piece, a flood of connections); the server's resident memory is sampled throughout. Every good
request must be answered or refused with 429 (none lost), every hostile one must get its JSON 4xx (or, for the
hang-up, nothing), and a good request must succeed at the end. Writes results/serve_soak.{json,md}.

    .venv/bin/python benchmarks/serve_load.py                    # the demo-sized model, 32 clients x 4 requests
    .venv/bin/python benchmarks/serve_load.py --model runs/demo/export
    .venv/bin/python benchmarks/serve_load.py --soak 120         # mixed good and hostile clients for 2 minutes
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


def rss_mib(pid: int) -> float | None:
    """Resident memory of a process (Linux /proc), MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def big_png() -> str:
    """A small file that decodes to 5000 x 5000 pixels (a decompression bomb in miniature)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (5000, 5000)).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def raw_request(port: int, head: str, body_parts: list[bytes], *, pause: float = 0.0, read: bool = True) -> str:
    """Send a request over a plain socket (chunked bodies, slow senders); the status line, or what went wrong."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
            try:
                sock.sendall(head.encode())
                for part in body_parts:
                    sock.sendall(part)
                    if pause:
                        time.sleep(pause)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server refused before the body ended and closed its side: its reply is still there
            if not read:
                return "sent"
            reply = sock.recv(4096).decode(errors="replace")
            return reply.split("\r\n", 1)[0].split(" ", 2)[1] if reply.startswith("HTTP/") else "no reply"
    except OSError as err:
        return f"socket: {type(err).__name__}"


def soak(args: argparse.Namespace, base: str, port: int, server_pid: int, limits: list[str]) -> dict:
    """Good and hostile clients side by side for args.soak seconds; returns the report."""
    import threading

    import httpx2 as httpx

    image, bomb = probe_png(), big_png()
    good = {"model": "m", "max_tokens": args.max_tokens, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "Is any lesion visible?"}]}]}
    hostile_bodies = {
        "bomb_image": {"model": "m", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": bomb}}, {"type": "text", "text": "?"}]}]},
        "twelve_images": {"model": "m", "messages": [{"role": "user", "content": [
            *[{"type": "image_url", "image_url": {"url": image}}] * 12, {"type": "text", "text": "?"}]}]},
        "image_token_in_text": {"model": "m", "messages": [{"role": "user", "content": "<image> " * 50}]},
        "no_url": {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
    }
    deadline = time.time() + args.soak
    results: dict[str, list[tuple[str, float]]] = {}
    lock = threading.Lock()
    rss: list[float] = []

    def record(kind: str, status: str, seconds: float) -> None:
        with lock:
            results.setdefault(kind, []).append((status, seconds))

    def sampler() -> None:
        while time.time() < deadline + 5:
            value = rss_mib(server_pid)
            if value is not None:
                rss.append(value)
            time.sleep(0.2)

    def good_client() -> None:
        with httpx.Client(timeout=300) as http:
            while time.time() < deadline:
                start = time.perf_counter()
                try:
                    status = str(http.post(f"{base}/v1/chat/completions", json=good).status_code)
                except httpx.HTTPError as err:
                    status = f"lost: {type(err).__name__}"
                record("good", status, time.perf_counter() - start)

    def hostile_client(kind: str) -> None:
        with httpx.Client(timeout=300) as http:
            while time.time() < deadline:
                start = time.perf_counter()
                try:
                    if kind == "hang_up_stream":
                        with http.stream("POST", f"{base}/v1/chat/completions",
                                         json={**good, "stream": True, "max_tokens": 256}) as reply:
                            status = str(reply.status_code)
                            for _ in reply.iter_lines():
                                break  # gone after the first piece
                    else:
                        status = str(http.post(f"{base}/v1/chat/completions", json=hostile_bodies[kind]).status_code)
                except httpx.HTTPError as err:
                    status = f"lost: {type(err).__name__}"
                record(kind, status, time.perf_counter() - start)
                time.sleep(args.hostile_pause)

    def chunked_client() -> None:  # 2 MiB chunked, no Content-Length
        head = ("POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                "Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"x" * 65536
        parts = [f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"] * 32 + [b"0\r\n\r\n"]
        while time.time() < deadline:
            start = time.perf_counter()
            record("chunked_2mib", raw_request(port, head, parts), time.perf_counter() - start)
            time.sleep(args.hostile_pause)

    def slow_client() -> None:  # a body that never finishes
        head = ("POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                "Content-Length: 100000\r\n\r\n")
        while time.time() < deadline:
            start = time.perf_counter()
            record("slow_sender", raw_request(port, head, [b'{"model": "m"']), time.perf_counter() - start)

    def flood_client() -> None:  # bursts of many connections at once
        while time.time() < deadline:
            def one(_: int) -> tuple[str, float]:
                start = time.perf_counter()
                try:
                    status = str(httpx.post(f"{base}/v1/chat/completions", json=good, timeout=300).status_code)
                except httpx.HTTPError as err:
                    status = f"lost: {type(err).__name__}"
                return status, time.perf_counter() - start

            with ThreadPoolExecutor(48) as pool:
                for status, seconds in pool.map(one, range(48)):
                    record("flood", status, seconds)

    baseline = rss_mib(server_pid)
    workers = [threading.Thread(target=sampler)]
    workers += [threading.Thread(target=good_client) for _ in range(args.clients)]
    workers += [threading.Thread(target=hostile_client, args=(kind,)) for kind in [*hostile_bodies, "hang_up_stream"]]
    workers += [threading.Thread(target=chunked_client), threading.Thread(target=slow_client),
                threading.Thread(target=flood_client)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.perf_counter() - start
    with httpx.Client(timeout=300) as http:
        final = http.post(f"{base}/v1/chat/completions", json=good)
    # each hostile request gets its own 4xx, or 429 when the queue is full of others (its place is taken before
    # its images are read, so a refusal costs no decoding)
    expected = {"good": {"200", "429"}, "flood": {"200", "429", "503"}, "bomb_image": {"400", "413", "429"},
                "twelve_images": {"400", "429"}, "image_token_in_text": {"400", "429"}, "no_url": {"400", "429"},
                "hang_up_stream": {"200", "429"}, "chunked_2mib": {"413", "429"}, "slow_sender": {"408", "429"}}
    kinds = {}
    for kind, rows in sorted(results.items()):
        statuses: dict[str, int] = {}
        for status, _ in rows:
            statuses[status] = statuses.get(status, 0) + 1
        unexpected = sum(n for st, n in statuses.items() if st not in expected[kind])
        kinds[kind] = {"sent": len(rows), "statuses": statuses, "unexpected": unexpected}
    answered = sorted(t for s_, t in results.get("good", []) if s_ == "200")
    q = statistics.quantiles(answered, n=20) if len(answered) >= 2 else [float("nan")] * 19
    return {
        "machine": machine(), "model": args.label or ("demo-sized random" if args.model is None else str(args.model)),
        "seconds": args.soak, "wall_s": round(wall, 1), "good_clients": args.clients, "max_tokens": args.max_tokens,
        "max_queue": args.max_queue, "hostile_pause_s": args.hostile_pause, "server_limits": " ".join(limits),
        "kinds": kinds, "rss_baseline_mib": round(baseline or 0, 1),
        "rss_peak_mib": round(max(rss), 1) if rss else None, "rss_end_mib": round(rss[-1], 1) if rss else None,
        "good_answered": len(answered), "good_lost": sum(1 for s_, _ in results.get("good", []) if s_.startswith("lost")),
        "latency_p50_s": round(statistics.median(answered), 3) if answered else None,
        "latency_p95_s": round(q[18], 3) if answered else None, "good_request_after": final.status_code,
        "ok": final.status_code == 200 and all(k["unexpected"] == 0 for k in kinds.values()),
    }


def soak_markdown(report: dict) -> str:
    rows = "".join(f"| {kind} | {k['sent']} | {', '.join(f'{s} x{n}' for s, n in sorted(k['statuses'].items()))} | "
                   f"{k['unexpected']} |\n" for kind, k in report["kinds"].items())
    return (f"# `medllava serve` soak test ({report['machine']})\n\n"
            f"{report['seconds']} s of {report['good_clients']} good clients beside hostile ones, loopback, "
            f"{report['model']} model, max_tokens {report['max_tokens']}, queue {report['max_queue']}, hostile "
            f"clients pausing {report['hostile_pause_s']} s between requests; server limits "
            f"{report['server_limits']} (`benchmarks/serve_load.py --soak`).\n\n"
            "| client | requests | replies | unexpected |\n|---|---:|---|---:|\n" + rows +
            f"\nServer resident memory: {report['rss_baseline_mib']} MiB at start, peak {report['rss_peak_mib']} "
            f"MiB, {report['rss_end_mib']} MiB at the end. Good requests: {report['good_answered']} answered "
            f"(p50 {report['latency_p50_s']} s, p95 {report['latency_p95_s']} s), {report['good_lost']} lost; "
            f"a good request after the soak: HTTP {report['good_request_after']}.\n")


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
    parser.add_argument("--soak", type=float, default=None, metavar="SECONDS",
                        help="mixed good and hostile clients for this long (--clients good ones)")
    parser.add_argument("--hostile-pause", type=float, default=0.05,
                        help="seconds each hostile client waits between requests in the soak (0: as fast as it can)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or demo_sized_model(Path(tmp))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        log = Path(tmp) / "server.log"
        limits = ["--max-body-mb", "1", "--read-timeout", "5", "--max-pixels", str(2048 * 2048)] if args.soak else []
        server = subprocess.Popen([sys.executable, "-m", "medllava.cli", "serve", str(model), "--port", str(port),
                                   "--model-id", "m", "--max-queue", str(args.max_queue), *limits],
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
            if args.soak:
                report = soak(args, base, port, server.pid, limits)
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / "serve_soak.json").write_text(json.dumps(report, indent=2) + "\n")
                (args.out / "serve_soak.md").write_text(soak_markdown(report))
                print(soak_markdown(report))
                return 0 if report["ok"] else 1
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
