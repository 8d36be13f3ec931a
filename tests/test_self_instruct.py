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

from medllava.data.self_instruct import (
    GeneratorSettings,
    MalformedAnswer,
    build_messages,
    completed_ids,
    filter_leaks,
    parse_conversation,
    run_generation,
)

from .conftest import REPO, write_jsonl

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
        cmd = [sys.executable, str(REPO / "data_recipes/self_instruct.py"), "--in", str(src), "--out", str(out),
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
    result = subprocess.run([sys.executable, str(REPO / "data_recipes/self_instruct.py"), "--in", str(src), "--out",
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
