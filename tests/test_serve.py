"""`medllava serve`: started on loopback with a tiny model, spoken to with the official `openai` client.

Plain and streamed answers equal `medllava chat --prompt`; every bad input gets its 4xx JSON error in the OpenAI
shape and the next good request still succeeds; a burst past the queue is answered or refused (429), never lost.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx2")  # the HTTP client openai uses
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

KEY = "sk-test-not-a-secret"
MAX_NEW = 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_uri(path: Path, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(path.read_bytes()).decode()}"


@pytest.fixture(scope="module")
def talking_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model whose random LLM writes text (an empty answer would make equality tests prove nothing)."""
    from medllava.model import build_model, save_model
    from medllava.presets import make_tiny_pair

    root = tmp_path_factory.mktemp("serve_model")
    model, processor = build_model(*map(str, make_tiny_pair(root / "pair", "clip", "llama")))
    save_model(model, processor, root / "model")
    return root / "model"


@pytest.fixture(scope="module")
def server(talking_model: Path, phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    port = _free_port()
    log = tmp_path_factory.mktemp("serve_log") / "server.log"
    with log.open("w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "medllava.cli", "serve", str(talking_model), "--port", str(port),
             "--image-root", str(phantom / "images"), "--api-key", KEY, "--max-new-tokens", str(MAX_NEW),
             "--max-queue", "4", "--max-body-mb", "1", "--model-id", "tiny"],
            stdout=fh, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise AssertionError(f"server exited: {log.read_text()[-3000:]}")
            time.sleep(0.1)
        else:
            raise AssertionError(f"server did not start: {log.read_text()[-3000:]}")
        yield {"base": base, "proc": proc, "log": log}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert KEY not in log.read_text()  # the key never reaches the log


def _client(server: dict, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server['base']}/v1", api_key=key, max_retries=0, timeout=120)


def _question(image_uri: str, text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_uri}},
                                         {"type": "text", "text": text}]}]


def _chat_cli(model: Path, image: Path, question: str) -> str:
    out = subprocess.run([sys.executable, "-m", "medllava.cli", "chat", str(model), "--image", str(image),
                          "--prompt", question, "--max-new-tokens", str(MAX_NEW)],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_plain_and_streamed_answers_equal_chat(server: dict, talking_model: Path, phantom: Path) -> None:
    image = sorted((phantom / "images").rglob("*.png"))[0]
    question = "Is any lesion visible?"
    expected = _chat_cli(talking_model, image, question)
    assert expected  # the model writes something
    client = _client(server)
    plain = client.chat.completions.create(model="tiny", messages=_question(data_uri(image), question))
    assert plain.choices[0].message.content == expected
    assert plain.usage.completion_tokens > 0 and plain.choices[0].finish_reason in ("stop", "length")
    stream = client.chat.completions.create(model="tiny", messages=_question(data_uri(image), question), stream=True)
    pieces, finish = [], None
    for chunk in stream:
        pieces.append(chunk.choices[0].delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == expected and finish in ("stop", "length")
    rel = image.relative_to(phantom / "images")  # a local path under --image-root reads the same image
    by_path = client.chat.completions.create(model="tiny", messages=_question(str(rel), question))
    assert by_path.choices[0].message.content == expected
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_dicom_data_uri_is_read(server: dict) -> None:
    pydicom_data = pytest.importorskip("pydicom.data")
    path = Path(pydicom_data.get_testdata_file("CT_small.dcm"))
    reply = _client(server).chat.completions.create(
        model="tiny", messages=_question(data_uri(path, "application/dicom"), "Which organ?"), max_tokens=4)
    assert reply.choices[0].message.content is not None


def _bad_requests(phantom: Path) -> list[tuple[str, dict, bytes | None, int]]:
    good_image = data_uri(sorted((phantom / "images").rglob("*.png"))[0])
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    ok = {"model": "tiny", "messages": _question(good_image, "Is any lesion visible?"), "max_tokens": 4}

    def body(**change: object) -> bytes:
        return json.dumps({**ok, **change}).encode()

    buffer = io.BytesIO()
    Image.new("L", (5000, 5000)).save(buffer, "PNG")  # 25 megapixels in a few kB
    huge = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    corrupt = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 64).decode()
    text_uri = "data:text/plain;base64," + base64.b64encode(b"hello").decode()
    return [
        ("malformed JSON", auth, b'{"model": "tiny", "messages": [', 400),
        ("messages not a list", auth, body(messages="hello"), 400),
        ("max_tokens a string", auth, body(max_tokens="many"), 400),
        ("role unknown", auth, body(messages=[{"role": "robot", "content": "hi"}]), 400),
        ("huge body", auth, b'{"model": "tiny", "pad": "' + b"x" * (2 * 2**20) + b'"}', 413),
        ("path outside the image root", auth, body(messages=_question("../../../etc/passwd", "hi")), 403),
        ("absolute path outside the root", auth, body(messages=_question("/etc/hostname", "hi")), 403),
        ("corrupt image", auth, body(messages=_question(corrupt, "hi")), 400),
        ("non-image data URI", auth, body(messages=_question(text_uri, "hi")), 400),
        ("remote URL not allowed", auth, body(messages=_question("http://example.com/x.png", "hi")), 400),
        ("max_tokens over the limit", auth, body(max_tokens=10**6), 400),
        ("unknown model", auth, body(model="gpt-4"), 404),
        ("missing API key", {"Content-Type": "application/json"}, body(), 401),
        ("wrong API key", {"Authorization": "Bearer nope", "Content-Type": "application/json"}, body(), 401),
        ("last message not from the user", auth,
         body(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]), 400),
        # issue 27: no Content-Length, so the limit was never applied (the server grew past 4 GiB)
        ("huge chunked body", auth, _chunks(b'{"model": "tiny", "pad": "', b"x" * (2 * 2**20), b'"}'), 413),
        # issue 27: these were HTTP 500 with a non-JSON body
        ("<image> in the user's text", auth, body(messages=[{"role": "user", "content": "look <image> here"}]), 400),
        # issue 27: twelve 25-megapixel PNGs of a few kB each took the server from 373 MiB to 2.5 GB
        ("images holding too many pixels together", auth,
         body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": huge}}] * 3
                         + [{"type": "text", "text": "hi"}]}]), 413),
        # issue 27: the prompt was never checked against the model's context (2048 positions) before generate
        ("prompt longer than the context", auth,
         body(messages=[{"role": "user", "content": "lesion " * 3000}], max_tokens=4), 400),
        ("too many images", auth, body(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": good_image}}] * 9 + [{"type": "text", "text": "hi"}]}]), 400),
        ("image_url part without image_url", auth,
         body(messages=[{"role": "user", "content": [{"type": "image_url"}, {"type": "text", "text": "hi"}]}]), 400),
    ]


def _chunks(*pieces: bytes) -> Iterator[bytes]:
    """A body sent with Transfer-Encoding: chunked (no Content-Length), 64 KiB at a time."""
    data = b"".join(pieces)
    for start in range(0, len(data), 2**16):
        yield data[start:start + 2**16]


def test_each_bad_request_gets_its_json_error_and_the_server_goes_on(server: dict, phantom: Path) -> None:
    url = f"{server['base']}/v1/chat/completions"
    for name, headers, content, status in _bad_requests(phantom):
        reply = httpx.post(url, headers=headers, content=content, timeout=120)
        assert reply.status_code == status, (name, reply.status_code, reply.text[:300])
        error = reply.json()["error"]
        assert error["message"] and error["type"], name
        good = _client(server).chat.completions.create(
            model="tiny", messages=_question(data_uri(sorted((phantom / "images").rglob("*.png"))[0]), "hi"),
            max_tokens=2)
        assert good.choices[0].message.content is not None, name
    assert server["proc"].poll() is None


def test_a_burst_past_the_queue_is_answered_or_refused_never_lost(server: dict, phantom: Path) -> None:
    image = data_uri(sorted((phantom / "images").rglob("*.png"))[0])

    def one(_: int) -> int:
        reply = httpx.post(f"{server['base']}/v1/chat/completions", timeout=300,
                           headers={"Authorization": f"Bearer {KEY}"},
                           json={"model": "tiny", "messages": _question(image, "hi"), "max_tokens": MAX_NEW})
        if reply.status_code == 429:
            assert reply.json()["error"]["code"] == "queue_full" and reply.headers.get("retry-after")
        return reply.status_code

    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(one, range(16)))
    assert len(codes) == 16 and set(codes) <= {200, 429} and codes.count(200) >= 5  # 1 running + 4 waiting
    assert httpx.get(f"{server['base']}/health", timeout=5).json()["status"] == "ok"


def test_streamed_pieces_join_to_the_stripped_answer() -> None:
    import queue

    from medllava.serve import _trimmed

    q: queue.Queue = queue.Queue()
    for piece in ["  ", " Yes", ",", " there ", "  ", "is", " a lesion.", "  \n", None]:
        q.put(piece)
    assert "".join(_trimmed(q)) == "Yes, there   is a lesion."


def test_data_uri_rules() -> None:
    from medllava.serve import RequestError, decode_data_uri

    media, data = decode_data_uri("data:image/png;base64," + base64.b64encode(b"abc").decode(), max_bytes=100)
    assert media == "image/png" and data == b"abc"
    for bad in ("data:image/png,abc", "data:text/plain;base64,YQ==", "data:image/png;base64,***", "http://x"):
        with pytest.raises(RequestError):
            decode_data_uri(bad, max_bytes=100)
    with pytest.raises(RequestError) as err:
        decode_data_uri("data:image/png;base64," + "A" * 400, max_bytes=100)
    assert err.value.status == 413


def test_streams_arriving_together_past_the_queue_get_429_in_process(talking_model: Path, phantom: Path) -> None:
    """Issue 27, in one event loop: 12 streamed requests sent at once to a server with a queue of 2. The place in
    the queue used to be taken only when a stream began, so requests let through together found the queue full
    after their 200 had been sent (an empty stream). Each is now a full stream or a 429 with Retry-After."""
    import asyncio

    from medllava.model import load_model
    from medllava.serve import ServeSettings, create_app

    model, processor = load_model(talking_model)
    model.eval()
    app = create_app(model, processor, ServeSettings(model_id="tiny", image_root=phantom / "images", max_queue=2,
                                                     default_max_tokens=4))
    image = data_uri(sorted((phantom / "images").rglob("*.png"))[0])
    body = {"model": "tiny", "messages": _question(image, "hi"), "max_tokens": 4, "stream": True}

    async def burst() -> list[tuple[int, str, str | None]]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://tiny") as client:
            async def one() -> tuple[int, str, str | None]:
                reply = await client.post("/v1/chat/completions", json=body, timeout=300)
                return reply.status_code, reply.text, reply.headers.get("retry-after")

            return await asyncio.gather(*(one() for _ in range(12)))

    results = asyncio.run(burst())
    codes = [code for code, _, _ in results]
    assert set(codes) <= {200, 429} and 429 in codes and codes.count(200) >= 3, codes
    for code, text, retry in results:
        if code == 200:
            assert text.rstrip().endswith("data: [DONE]") and '"finish_reason"' in text, text[-300:]
        else:
            assert json.loads(text)["error"]["code"] == "queue_full" and retry


def test_a_refused_request_is_refused_before_its_images_are_decoded(talking_model: Path, phantom: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Reviewer finding (issue 27): images were decoded before the queue place was taken, so a flood past the
    queue still made the server decode every request's images before answering 429. The place now comes first:
    only requests that are let in have their images read, and one running + `max_queue` waiting are let in."""
    import asyncio

    import medllava.serve as serve
    from medllava.model import load_model

    reads: list[int] = []
    real = serve.read_images

    def counting(urls: list[str], settings: serve.ServeSettings) -> list:
        reads.append(len(urls))
        return real(urls, settings)

    monkeypatch.setattr(serve, "read_images", counting)
    model, processor = load_model(talking_model)
    model.eval()
    app = serve.create_app(model, processor, serve.ServeSettings(model_id="tiny", image_root=phantom / "images",
                                                                 max_queue=2, default_max_tokens=2))
    image = data_uri(sorted((phantom / "images").rglob("*.png"))[0])

    async def burst(stream: bool) -> list[int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://tiny") as client:
            async def one() -> int:
                body = {"model": "tiny", "messages": _question(image, "hi"), "max_tokens": 2, "stream": stream}
                return (await client.post("/v1/chat/completions", json=body, timeout=300)).status_code

            return await asyncio.gather(*(one() for _ in range(10)))

    async def both() -> list[tuple[bool, list[int], int]]:  # one event loop, as a server has
        found = []
        for stream in (False, True):
            reads.clear()
            codes = await burst(stream)
            found.append((stream, codes, len(reads)))
        return found

    for stream, codes, n_read in asyncio.run(both()):
        assert set(codes) == {200, 429} and codes.count(200) >= 3, codes  # 1 running + 2 waiting
        assert n_read == codes.count(200), (stream, codes, n_read)


async def _asgi(app, method: str, path: str, chunks: list[bytes], *, after_body=None, stall: bool = False):
    """Call an ASGI app as a client would over one connection: the body in `chunks`; `after_body(pieces)` (awaited
    once, beside the call) decides when the client goes away (None: never); `stall`: the body never finishes.
    Returns (status, body pieces, response headers)."""
    import asyncio

    queue_in = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1 or stall}
                for i, c in enumerate(chunks)]
    status, pieces, headers = [0], [], {}
    gone = asyncio.Event()

    async def leave() -> None:
        await after_body(pieces)
        gone.set()

    async def receive() -> dict:
        if queue_in:
            return queue_in.pop(0)
        await gone.wait()  # as a server's receive: returns at once once the client has gone, else waits
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            status[0] = message["status"]
            headers.update({k.decode(): v.decode() for k, v in message.get("headers", [])})
        elif message["type"] == "http.response.body" and message.get("body"):
            pieces.append(message["body"])

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [(b"content-type", b"application/json"), (b"host", b"tiny")],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 80)}
    watcher = asyncio.create_task(leave()) if after_body is not None else None
    try:
        await app(scope, receive, send)
    finally:
        if watcher is not None:
            watcher.cancel()
    return status[0], pieces, headers


def _asgi_call(app, method: str, path: str, chunks: list[bytes], **kwargs):
    import asyncio

    return asyncio.run(_asgi(app, method, path, chunks, **kwargs))


def test_a_client_that_goes_away_stops_its_generation(talking_model: Path, phantom: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Issue 27: a client that disconnected mid-answer left its generation running to max_tokens, holding the one
    generation slot. Now generation stops within a token of the disconnect, streamed or plain."""
    import asyncio
    import logging

    from medllava.model import load_model
    from medllava.serve import ServeSettings, create_app

    model, processor = load_model(talking_model)
    model.eval()
    model.generation_config.eos_token_id = None  # it never ends an answer by itself: only a stop can end it early
    limit = 400
    image = data_uri(sorted((phantom / "images").rglob("*.png"))[0])
    settings = ServeSettings(model_id="tiny", image_root=phantom / "images", max_tokens_limit=limit)

    def request(stream: bool) -> list[bytes]:
        return [json.dumps({"model": "tiny", "messages": _question(image, "Describe the image."), "max_tokens": limit,
                            "stream": stream}).encode()]

    # the model writes to the limit when nobody leaves (else the test below would prove nothing)
    status, pieces, _ = _asgi_call(create_app(model, processor, settings), "POST", "/v1/chat/completions",
                                   request(False))
    whole = json.loads(b"".join(pieces))
    assert status == 200 and whole.get("usage", {}).get("completion_tokens") == limit, whole

    async def after_three_pieces(pieces: list[bytes]) -> None:
        while sum(b'"content"' in p for p in pieces) < 3:
            await asyncio.sleep(0.01)

    async def at_once(pieces: list[bytes]) -> None:
        await asyncio.sleep(0.3)

    import re

    async def scenario(stream: bool, leave) -> int:  # one event loop, as a server has
        app = create_app(model, processor, settings)
        await _asgi(app, "POST", "/v1/chat/completions", request(stream), after_body=leave)
        for _ in range(2400):  # the generating thread reports when it ends (a slow machine waits longer)
            if "generation stopped after" in caplog.text:
                break
            await asyncio.sleep(0.05)
        status, pieces, _ = await _asgi(app, "GET", "/health", [b""])
        return json.loads(b"".join(pieces))["running"]

    for stream, leave in ((True, after_three_pieces), (False, at_once)):
        with caplog.at_level(logging.INFO, logger="medllava.serve"):
            caplog.clear()
            running = asyncio.run(scenario(stream, leave))
        assert "client went away" in caplog.text, stream
        made = int(re.search(r"generation stopped after (\d+) of (\d+) tokens", caplog.text).group(1))
        assert made < limit and running == 0, (stream, made, running)


def test_slow_senders_and_connection_floods_get_json_errors(talking_model: Path, phantom: Path) -> None:
    """Issue 27: nothing limited how long a client may take to send its body or how many requests the server
    holds at once. A body that has not arrived within the read timeout gets a JSON 408; past max_connections a
    JSON 429 with Retry-After, before the body is read."""
    import asyncio

    from medllava.model import load_model
    from medllava.serve import ServeSettings, create_app

    model, processor = load_model(talking_model)
    app = create_app(model, processor, ServeSettings(model_id="tiny", read_timeout_s=0.5, max_connections=2))
    status, pieces, _ = _asgi_call(app, "POST", "/v1/chat/completions", [b'{"model": "ti'], stall=True)
    error = json.loads(b"".join(pieces))["error"]
    assert status == 408 and error["code"] == "request_timeout" and "0.5 s" in error["message"]

    app2 = create_app(model, processor, ServeSettings(model_id="tiny", read_timeout_s=2.0, max_connections=2))
    holders: list = []

    async def scenario() -> tuple[int, list[bytes], dict]:
        # two slow senders hold both places; a third request is refused at once
        async def slow() -> None:
            holders.append(await asyncio.to_thread(_asgi_call, app2, "POST", "/v1/chat/completions", [b"{"],
                                                   stall=True))

        tasks = [asyncio.create_task(slow()) for _ in range(2)]
        await asyncio.sleep(0.5)
        third = await asyncio.to_thread(_asgi_call, app2, "GET", "/health", [b""])
        await asyncio.gather(*tasks)
        return third

    status, pieces, headers = asyncio.run(scenario())
    error = json.loads(b"".join(pieces))["error"]
    assert status == 429 and error["code"] == "too_many_connections" and headers.get("retry-after")
    assert [h[0] for h in holders] == [408, 408]
    status, pieces, _ = _asgi_call(app2, "GET", "/health", [b""])  # places given back
    assert status == 200


def test_fuzzed_requests_get_json_4xx_or_an_answer_never_a_500(talking_model: Path, phantom: Path) -> None:
    """Issue 27: hostile requests written by hypothesis from the request schema (arbitrary JSON where each field
    goes, wrong roles and part types, `<image>` in text, broken and hostile image URLs, huge or negative numbers,
    non-JSON bodies). Each gets an answer or an OpenAI-shaped JSON 4xx; the server keeps serving. Bounded: 150
    examples, a few tokens per answer."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from starlette.testclient import TestClient

    from medllava.model import load_model
    from medllava.serve import ServeSettings, create_app

    model, processor = load_model(talking_model)
    model.eval()
    app = create_app(model, processor, ServeSettings(model_id="tiny", default_max_tokens=2, max_tokens_limit=3,
                                                     max_body_bytes=64 * 1024, image_root=phantom / "images"))
    png = data_uri(sorted((phantom / "images").rglob("*.png"))[0])
    leaf = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=30)
    anything = st.recursive(leaf, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.text(max_size=8), inner, max_size=3), max_leaves=12)
    url = st.one_of(st.just(png), st.text(max_size=40), st.sampled_from([
        "http://127.0.0.1:9/x.png", "file:///etc/passwd", "/etc/passwd", "../../etc/passwd", "data:image/png;base64,",
        "data:application/dicom;base64,AAAA", "data:text/html;base64,PGh0bWw+"]),
        st.binary(max_size=120).map(lambda b: "data:image/png;base64," + base64.b64encode(b).decode()))
    def mostly(good: st.SearchStrategy, bad: st.SearchStrategy) -> st.SearchStrategy:
        return st.one_of(good, good, good, bad)  # one_of draws its branches evenly: 3 in 4 near-valid

    text_part = st.fixed_dictionaries({"type": st.just("text"),
                                       "text": st.sampled_from(["Any lesion?", "<image> what?", "<image>"])
                                       | st.text(max_size=40)})
    image_part = st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": url})})
    part = st.one_of(text_part, image_part, st.fixed_dictionaries({"type": st.sampled_from(["image_url", "text",
                                                                                           "audio"])}), anything)
    message = st.fixed_dictionaries({
        "role": mostly(st.just("user"), st.sampled_from(["system", "assistant", "tool"]) | st.text(max_size=6)),
        "content": mostly(st.lists(part, min_size=1, max_size=3), st.text(max_size=60) | anything)})
    body = st.fixed_dictionaries(
        {"model": mostly(st.just("tiny"), st.text(max_size=6)),
         "messages": mostly(st.lists(message, min_size=1, max_size=3), anything)},
        optional={"stream": mostly(st.booleans(), anything),
                  "max_tokens": mostly(st.integers(1, 3), st.integers(-3, 10**12) | anything),
                  "temperature": mostly(st.floats(0, 2), anything), "n": mostly(st.just(1), st.integers(-1, 3))})
    raw = st.one_of(body.map(json.dumps), body.map(json.dumps), body.map(json.dumps), anything.map(json.dumps),
                    st.binary(max_size=200))
    seen: dict[int, int] = {}

    with TestClient(app, raise_server_exceptions=False) as client:
        @settings(max_examples=150, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(raw)
        def hostile(payload: str | bytes) -> None:
            reply = client.post("/v1/chat/completions", content=payload,
                                headers={"content-type": "application/json"})
            seen[reply.status_code] = seen.get(reply.status_code, 0) + 1
            assert reply.status_code in (200, 400, 404, 413, 429), (reply.status_code, reply.text[:300], payload)
            if reply.status_code != 200:
                error = reply.json()["error"]
                assert error["message"] and error["type"], reply.text
            elif reply.headers["content-type"].startswith("text/event-stream"):
                assert reply.text.rstrip().endswith("data: [DONE]"), reply.text[-300:]
            else:
                assert reply.json()["choices"][0]["message"]["role"] == "assistant"

        hostile()
        good = client.post("/v1/chat/completions", json={"model": "tiny", "messages": _question(png, "Any lesion?")})
    assert good.status_code == 200 and good.json()["choices"][0]["message"]["content"] is not None
    assert seen.get(400, 0) > 0 and sum(seen.values()) >= 150, seen
