"""The self-instruct generator against a real HTTP server on 127.0.0.1 that injects faults."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from medllava.recipes.self_instruct import (
    GeneratorSettings,
    MalformedAnswer,
    build_messages,
    completed_ids,
    filter_leaks,
    parse_conversation,
    run_generation,
)

from .conftest import write_jsonl

KEY = "sk-test-never-print-me-42"
GOOD = [
    {"from": "human", "value": "What kind of scan is this?"},
    {"from": "gpt", "value": "Based on the caption, this is an axial CT of the chest."},
    {"from": "human", "value": "Is there a nodule?"},
    {"from": "gpt", "value": "Yes, there is a small nodule in the right upper lobe."},
]
LEAKY_PAIR = [{"from": "human", "value": "What does the figure legend say?"},
              {"from": "gpt", "value": "The caption says it is a CT."}]


class FaultyServer:
    """Chat completions with scripted faults: script[id] lists the action for attempt 1, 2, ...; then 'ok'."""

    def __init__(self, script: dict[str, list[str]], *, slow_seconds: float = 1.0, delay: float = 0.0) -> None:
        self.script = script
        self.attempts: dict[str, int] = defaultdict(int)
        self.auth: set[str] = set()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # noqa: ANN002, ANN201 - keep the test output quiet
                return

            def do_POST(self):  # noqa: N802, ANN201
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.auth.add(self.headers.get("Authorization", ""))
                rid = re.search(r"case (\w+)", body["messages"][-1]["content"]).group(1)
                with server.lock:
                    n = server.attempts[rid]
                    server.attempts[rid] += 1
                actions = server.script.get(rid, [])
                action = actions[n] if n < len(actions) else "ok"
                if delay:
                    time.sleep(delay)
                if action == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if action == "slow":
                    time.sleep(slow_seconds)
                if action in ("429", "500", "400"):
                    self.send_response(int(action))
                    if action == "429":
                        self.send_header("Retry-After", "0")
                    self.end_headers()
                    return
                if action == "malformed_body":
                    payload = b"{not json"
                else:
                    turns = {"ok": GOOD, "slow": GOOD, "ok_leak": LEAKY_PAIR + GOOD[2:], "leak": LEAKY_PAIR}.get(action)
                    content = "I am sorry, here is some prose." if action == "malformed_answer" else json.dumps(turns)
                    payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}],
                                          "usage": {"prompt_tokens": 100, "completion_tokens": 40, "total_tokens": 140}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> FaultyServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _captions(path: Path, ids: list[str]) -> Path:
    return write_jsonl(path, [{"id": rid, "image": f"{rid}.jpg", "caption": f"Axial CT of case {rid} with a nodule."}
                              for rid in ids])


def _settings(url: str, **kw) -> GeneratorSettings:
    base = dict(base_url=url, model="test-model", concurrency=3, max_attempts=5, max_malformed=3, timeout=0.5,
                backoff_base=0.01, backoff_max=0.05)
    base.update(kw)
    return GeneratorSettings(**base)


def test_every_input_ends_generated_or_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    script = {
        "c01": ["429", "500", "ok"],
        "c02": ["slow", "drop", "ok"],
        "c03": ["malformed_body", "ok"],
        "c04": ["malformed_answer"] * 5,
        "c05": ["400"],
        "c06": ["ok_leak"],
        "c07": ["leak"] * 5,
        "c08": ["500"] * 10,
    }
    ids = [f"c{i:02d}" for i in range(9)]
    src = _captions(tmp_path / "captions.jsonl", ids)
    out = tmp_path / "conv.jsonl"
    with FaultyServer(script) as server:
        report = run_generation([src], out, _settings(server.url), progress=False)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    generated = {r["id"] for r in rows}
    failures = {f["id"]: f["reason"] for f in map(json.loads, out.with_suffix(".failures.jsonl").read_text().splitlines())}
    assert generated == {"c00", "c01", "c02", "c03", "c06"}
    assert set(failures) == {"c04", "c05", "c07", "c08"}
    assert generated | set(failures) == set(ids)  # no input lost
    assert failures["c05"] == "HTTP 400"
    assert "malformed answer" in failures["c04"] and "leaked" in failures["c07"]
    assert failures["c08"].startswith("gave up after 5 attempts: HTTP 500")
    assert report["generated"] == 5 and report["failed"] == 4 and report["inputs"] == 9
    # Tokens of every answer received: 5 generated, plus 3 malformed (c04) and 3 leaking (c07) answers.
    assert report["tokens"]["total_tokens"] == 140 * (5 + 3 + 3)
    assert server.auth == {f"Bearer {KEY}"}
    by_id = {r["id"]: r for r in rows}
    first = by_id["c00"]["conversations"]
    assert first[0]["value"].startswith("<image>\n") and first[1]["value"].startswith("This is an axial CT")
    assert all("caption" not in t["value"].lower() for t in by_id["c06"]["conversations"])
    assert len(by_id["c06"]["conversations"]) == 2
    stored = out.read_text() + out.with_suffix(".report.json").read_text() + out.with_suffix(".failures.jsonl").read_text()
    assert KEY not in stored


def test_killed_run_resumes_without_duplicates_or_gaps(tmp_path: Path) -> None:
    ids = [f"k{i:02d}" for i in range(24)]
    src = _captions(tmp_path / "captions.jsonl", ids)
    out = tmp_path / "conv.jsonl"
    env = {**os.environ, "OPENAI_API_KEY": KEY}
    with FaultyServer({"k05": ["500", "ok"], "k11": ["drop", "ok"]}, delay=0.15) as server:
        cmd = [sys.executable, "-m", "data_recipes.self_instruct", "--in", str(src), "--out", str(out),
               "--base-url", server.url, "--model", "m", "--concurrency", "2", "--backoff", "0.01", "--timeout", "5"]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.time() + 60
        while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 6):
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done_before = len(out.read_text().splitlines())
        assert 6 <= done_before < len(ids), "the kill should land mid-run"
        with out.open("a") as fh:  # what a kill in the middle of a write leaves behind
            fh.write('{"id": "k99", "image": "half')
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    got = [r["id"] for r in rows]
    assert len(got) == len(set(got)) == len(ids) and set(got) == set(ids)
    assert report["already_done"] == done_before and report["generated"] == len(ids) - done_before
    assert KEY not in result.stdout + result.stderr


def test_dry_run_prints_prompts_and_calls_nothing(tmp_path: Path) -> None:
    src = _captions(tmp_path / "captions.jsonl", ["d1", "d2"])
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = subprocess.run([sys.executable, "-m", "data_recipes.self_instruct", "--in", str(src), "--out",
                             str(tmp_path / "o.jsonl"), "--base-url", f"http://127.0.0.1:{port}/v1", "--model", "m",
                             "--dry-run"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "You write training conversations" in result.stdout and "Axial CT of case d1" in result.stdout
    assert not (tmp_path / "o.jsonl").exists()


def test_prompt_structure() -> None:
    messages = build_messages("A chest X-ray.", ["The effusion resolved."], "r1", shots=2)
    assert messages[0]["role"] == "system" and "Never mention" in messages[0]["content"]
    assert [m["role"] for m in messages[1:]] == ["user", "assistant", "user", "assistant", "user"]
    assert messages[-1]["content"] == "Caption: A chest X-ray. Mentions: The effusion resolved."
    assert build_messages("x", [], "r1") == build_messages("x", [], "r1")  # deterministic few-shot choice


@pytest.mark.parametrize(
    ("content", "ok"),
    [
        (json.dumps(GOOD), True),
        ("```json\n" + json.dumps(GOOD) + "\n```", True),
        ("Here you go: " + json.dumps(GOOD), True),
        ("no json here", False),
        ("[{\"from\": \"gpt\", \"value\": \"x\"}, {\"from\": \"human\", \"value\": \"y\"}]", False),
        ("[{\"from\": \"human\", \"value\": \"only a question\"}]", False),
        ("[1, 2]", False),
    ],
)
def test_parse_conversation(content: str, ok: bool) -> None:
    if ok:
        assert parse_conversation(content)[0]["from"] == "human"
    else:
        with pytest.raises(MalformedAnswer):
            parse_conversation(content)


def test_leak_filter() -> None:
    turns = LEAKY_PAIR + [{"from": "human", "value": "Any effusion?"},
                          {"from": "gpt", "value": "According to the description, no effusion is visible."},
                          {"from": "human", "value": "Can you see the heart?"},
                          {"from": "gpt", "value": "I cannot see the image, so I cannot say."}]
    kept, dropped = filter_leaks(turns)
    assert dropped == 2
    assert kept == [{"from": "human", "value": "Any effusion?"}, {"from": "gpt", "value": "No effusion is visible."}]


def test_completed_ids_discards_a_half_line(tmp_path: Path) -> None:
    path = tmp_path / "o.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "ima')
    assert completed_ids(path) == {"a", "b"}
    assert path.read_text() == '{"id": "a"}\n{"id": "b"}\n'


# -- stop means stop, nothing learned is lost (interruptions, spending guard, bounded submission) ------------------


def _cmd(src: Path, out: Path, url: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "data_recipes.self_instruct", "--in", str(src), "--out", str(out),
            "--base-url", url, "--model", "m", "--concurrency", "2", "--backoff", "0.01", "--timeout", "30", *extra]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _wait_for(out: Path, k: int, proc: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline and len(_lines(out)) < k and proc.poll() is None:
        time.sleep(0.02)


def _uninterrupted(tmp_path: Path, ids: list[str], script: dict, env: dict) -> dict:
    src = _captions(tmp_path / "ref_captions.jsonl", ids)
    with FaultyServer(script, delay=0.05) as server:
        result = subprocess.run(_cmd(src, tmp_path / "ref.jsonl", server.url), env=env, capture_output=True, text=True,
                                timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_stops_within_seconds_pays_for_nothing_more_and_resumes(sig: int, tmp_path: Path) -> None:
    ids = [f"s{i:03d}" for i in range(60)]
    script = {"s007": ["500", "ok"], "s013": ["malformed_answer"] * 5}  # a retry and a failure before the signal
    env = {**os.environ, "OPENAI_API_KEY": KEY}
    reference = _uninterrupted(tmp_path, ids, script, env)
    src = _captions(tmp_path / "captions.jsonl", ids)
    out = tmp_path / "conv.jsonl"
    with FaultyServer(script, delay=0.3) as server:
        proc = subprocess.Popen(_cmd(src, out, server.url), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        _wait_for(out, 20, proc)  # s007 and s013 (3 attempts) are finished by then
        k = len(_lines(out))
        sent_at_signal = sum(server.attempts.values())
        started = time.time()
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=30)
        elapsed = time.time() - started
        sent = sum(server.attempts.values())
        window = 2 * 2  # --concurrency 2: at most 4 requests submitted and not yet finished
        assert proc.returncode != 0 and elapsed < 5, (proc.returncode, elapsed)
        # k records finished: k requests, + s007's retry and s013's three attempts; then at most the window
        assert sent <= sent_at_signal + window and sent <= k + 4 + window
        message = [line for line in stderr.splitlines() if "run the same command again" in line]
        assert len(message) == 1, stderr[-2000:]
        rows = _lines(out)
        usage = _lines(out.with_suffix(".usage.jsonl"))
        assert len({r["id"] for r in rows}) == len(rows) >= k  # whole lines; what finished in the grace period kept
        assert sum(u["event"] == "sent" for u in usage) == sent  # every request the server got is on disk
        assert sum(u["event"] == "answer" for u in usage) == sent  # ... and its answer, with its tokens
        report = json.loads(out.with_suffix(".report.json").read_text())
        assert report["stopped"] == "interrupted" and report["total_in_output"] == len(rows)

        result = subprocess.run(_cmd(src, out, server.url), env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    final = json.loads(result.stdout.strip().splitlines()[-1])
    got = [r["id"] for r in _lines(out)]
    assert len(got) == len(set(got)) and set(got) == set(ids) - {"s013"}
    for key in ("total_in_output", "failed", "requests"):
        assert final[key] == reference[key], key
    assert final["tokens"] == reference["tokens"] and final["failure_reasons"] == reference["failure_reasons"]


def test_sigkill_leaves_whole_lines_and_the_spending_on_disk(tmp_path: Path) -> None:
    ids = [f"x{i:03d}" for i in range(40)]
    src = _captions(tmp_path / "captions.jsonl", ids)
    out = tmp_path / "conv.jsonl"
    env = {**os.environ, "OPENAI_API_KEY": KEY}
    with FaultyServer({"x003": ["400"]}, delay=0.2) as server:
        proc = subprocess.Popen(_cmd(src, out, server.url), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for(out, 10, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        rows = _lines(out)  # every line parses
        usage = _lines(out.with_suffix(".usage.jsonl"))
        failures = _lines(out.with_suffix(".failures.jsonl"))
        assert len(rows) >= 10 and {u["id"] for u in usage} >= {r["id"] for r in rows}
        assert sum(u.get("tokens", {}).get("total_tokens", 0) for u in usage) >= 140 * len(rows)
        # each request is logged before it leaves: the kill can add at most the ones just logged, never hide one
        assert 0 <= sum(u["event"] == "sent" for u in usage) - sum(server.attempts.values()) <= 2
        assert [f["id"] for f in failures] == ["x003"] and failures[0]["reason"] == "HTTP 400"
        result = subprocess.run(_cmd(src, out, server.url), env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    got = [r["id"] for r in _lines(out)]
    assert len(got) == len(set(got)) and set(got) == set(ids) - {"x003"}
    final = json.loads(result.stdout.strip().splitlines()[-1])
    assert 0 <= final["requests"] - sum(server.attempts.values()) <= 2  # summed over both runs
    assert final["failed"] == 1 and server.attempts["x003"] == 1  # x003 not paid for twice
    with FaultyServer({}) as server:  # asked to, a run retries what failed before
        retry = subprocess.run(_cmd(src, out, server.url, "--retry-failed"), env=env, capture_output=True, text=True,
                               timeout=120)
    assert retry.returncode == 0 and json.loads(retry.stdout.strip().splitlines()[-1])["failed"] == 0
    assert len(_lines(out)) == len(ids)


def test_spending_guard_counts_across_resumed_runs(tmp_path: Path) -> None:
    ids = [f"b{i:02d}" for i in range(12)]
    src = _captions(tmp_path / "captions.jsonl", ids)
    out = tmp_path / "conv.jsonl"
    env = {**os.environ, "OPENAI_API_KEY": KEY}
    with FaultyServer({}) as server:
        first = subprocess.run(_cmd(src, out, server.url, "--max-requests", "5"), env=env, capture_output=True,
                               text=True, timeout=120)
        assert first.returncode != 0 and "spending limit" in first.stderr and "--max-requests" in first.stderr
        assert sum(server.attempts.values()) == 5 and len(_lines(out)) == 5
        again = subprocess.run(_cmd(src, out, server.url, "--max-requests", "8"), env=env, capture_output=True,
                               text=True, timeout=120)
        assert again.returncode != 0 and sum(server.attempts.values()) == 8  # 5 earlier + 3 now
        tokens = subprocess.run(_cmd(src, out, server.url, "--max-tokens", str(140 * 10)), env=env,
                                capture_output=True, text=True, timeout=120)
        assert tokens.returncode != 0 and "--max-tokens" in tokens.stderr
        # tokens are known only when answers arrive: requests already in flight when the limit is reached finish,
        # so the run may overshoot by at most concurrency - 1 requests (requests, counted before sending, never do)
        assert 10 <= len(_lines(out)) == sum(server.attempts.values()) <= 10 + (2 - 1)
        done = subprocess.run(_cmd(src, out, server.url), env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and len(_lines(out)) == 12
    assert json.loads(done.stdout.strip().splitlines()[-1])["requests"] == 12


def test_inputs_stream_through_a_bounded_window(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """At no moment are more than concurrency x 2 inputs taken from the source and not yet finished."""
    from medllava.recipes import self_instruct as si

    taken = {"n": 0, "max_open": 0}
    finished = {"n": 0}
    real = si.iter_inputs

    def counting(*a, **k):  # noqa: ANN002, ANN003, ANN202
        for item in real(*a, **k):
            taken["n"] += 1
            taken["max_open"] = max(taken["max_open"], taken["n"] - finished["n"])
            yield item

    monkeypatch.setattr(si, "iter_inputs", counting)
    src = _captions(tmp_path / "captions.jsonl", [f"w{i:03d}" for i in range(50)])
    with FaultyServer({}, delay=0.01) as server:
        report = run_generation([src], tmp_path / "o.jsonl", _settings(server.url, concurrency=3), progress=False,
                                on_outcome=lambda _o: finished.__setitem__("n", finished["n"] + 1))
    assert report["generated"] == 50 and taken["max_open"] <= 3 * 2
