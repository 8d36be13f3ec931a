"""An OpenAI-compatible HTTP server for a trained model: `medllava serve MODEL`.

    POST /v1/chat/completions   messages with text and image_url parts (data: URIs for PNG/JPEG/DICOM; local
                                paths only under --image-root, where a DICOM series folder or a NIfTI volume gives
                                its slices; remote URLs only with --allow-remote-images); several image parts in a
                                message are its images in order;
                                `stream: true` answers as server-sent events
    GET  /v1/models             the one model served
    GET  /health                liveness and queue state

Answers come from the same code as `medllava chat` (`ChatSession`, DICOM windowing included), greedy unless the
request sets a temperature above 0. Bounded: request body size (counted as it arrives, chunked or not), image
pixels, `max_tokens`, and requests in flight (one generates at a time, `max_queue` wait; past that a 429 with
Retry-After, for streamed requests too: their place is taken before the response starts). Errors are JSON in the
OpenAI shape ({"error": {"message", "type", "param", "code"}}) with a 4xx code, and the server keeps serving.
An API key (--api-key or MEDLLAVA_API_KEY) is checked in constant time and never logged. Binds to loopback unless
told otherwise. Built on FastAPI + uvicorn.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import queue
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.requests import Request  # the serve extra (fastapi); an endpoint's annotation resolves here

from medllava.chat import ChatSession
from medllava.imaging import DEFAULT_MAX_PIXELS, ImageError, Window, load_image, probe_image
from medllava.processor import IMAGE_TOKEN
from medllava.volumes import SliceSpec, expand_series, is_series, split_slice_ref

logger = logging.getLogger(__name__)

API_KEY_ENV = "MEDLLAVA_API_KEY"
CLIENT_GONE = "medllava.client_gone"
"""ASGI scope key: an asyncio.Event set when the client of a request with a body has disconnected."""
IMAGE_TYPES = {"image/png", "image/jpeg", "image/jpg", "application/dicom", "image/dicom"}


class ImageURL(BaseModel):
    url: str


class Part(BaseModel):
    """A content part: text, or an image_url."""

    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None

    @model_validator(mode="after")
    def _has_its_field(self) -> Part:
        if self.type == "image_url" and self.image_url is None:
            raise ValueError("an image_url part needs image_url: {url: ...}")
        if self.type == "text" and self.text is None:
            raise ValueError("a text part needs text")
        return self


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str | list[Part]


class ChatRequest(BaseModel):
    """The fields of an OpenAI chat-completions request that this server reads (others are ignored)."""

    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    n: int = Field(default=1, ge=1, le=1)


@dataclass
class ServeSettings:
    """Limits and access rules of one server."""

    model_id: str
    image_root: Path | None = None
    allow_remote_images: bool = False
    api_key: str | None = None
    max_body_bytes: int = 20 * 2**20
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_tokens_limit: int = 1024
    default_max_tokens: int = 256
    max_queue: int = 16
    max_prompt_tokens: int | None = None
    """Longest prompt (images expanded) a request may make; None: the model's context minus the request's
    max_tokens."""
    max_images: int = 8
    """Images one request may hold (all its messages together)."""
    max_total_pixels: int = 64 * 10**6
    """Pixels all of a request's images may hold together, read from their headers before any is decoded."""
    window: Window | None = None
    slices: SliceSpec | None = None
    """How a local series folder or NIfTI volume becomes slices (default: medllava.volumes.SliceSpec())."""
    system_prompt: str | None = None
    max_connections: int = 32
    """Requests held at once (sending their body, waiting or generating); past it a 429 before the body is read.
    With `max_body_bytes` it bounds what request bodies can hold in memory."""
    read_timeout_s: float = 30.0
    """Time a client has to send its whole request body; past it a 408 (a slow sender holds no place for long)."""
    max_generation_s: float = 600.0
    """Longest one answer may take; past it generation stops and the answer ends with finish_reason "length"."""


class RequestError(Exception):
    """A client error: HTTP status and an OpenAI-shaped message."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """The OpenAI error shape."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def decode_data_uri(url: str, *, max_bytes: int) -> tuple[str, bytes]:
    """(media type, bytes) of a base64 `data:` URI; RequestError for anything else."""
    head, sep, payload = url.partition(",")
    if not sep or not head.startswith("data:") or not head.endswith(";base64"):
        raise RequestError(400, "image data URIs must look like data:image/png;base64,...", param="image_url")
    media = head[5:-7].strip().lower()
    if media not in IMAGE_TYPES:
        raise RequestError(400, f"unsupported image type {media!r} (PNG, JPEG or DICOM)", param="image_url")
    if len(payload) * 3 // 4 > max_bytes:
        raise RequestError(413, "image data exceeds the request size limit", param="image_url")
    try:
        return media, base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, "image data is not valid base64", param="image_url") from None


def read_images(urls: list[str], settings: ServeSettings) -> list[list[Image.Image]]:
    """A request's images, a list per image part (data: URIs, paths under the image root, or when allowed remote
    URLs; a local DICOM series folder or NIfTI volume gives its slices, per --slices): their count (slices
    included) and their pixels together are checked from the headers before any is decoded."""
    if len(urls) > settings.max_images:
        raise RequestError(400, f"{len(urls)} images in one request; this server takes at most {settings.max_images}",
                           param="messages", code="too_many_images")
    with tempfile.TemporaryDirectory() as tmp:
        per_part = [slice_sources(image_source(url, settings, Path(tmp) / f"{i}.dcm"), settings)
                    for i, url in enumerate(urls)]
        sources = [source for part in per_part for source in part]
        if len(sources) > settings.max_images:
            raise RequestError(400, f"the request's images make {len(sources)} images with their slices; this server "
                               f"takes at most {settings.max_images}", param="messages", code="too_many_images")
        total = 0
        for source in sources:
            try:
                width, height = probe_image(source, max_pixels=settings.max_pixels)
            except ImageError as err:
                raise RequestError(400, f"image: {err.kind}: {err.reason}", param="image_url", code=err.kind) from None
            total += width * height
            if total > settings.max_total_pixels:
                raise RequestError(413, f"the request's images hold more than {settings.max_total_pixels} pixels "
                                   "together", param="image_url", code="too_many_pixels")
        images = []
        for part in per_part:
            try:
                images.append([load_image(source, window=settings.window, max_pixels=settings.max_pixels)
                               for source in part])
            except ImageError as err:
                raise RequestError(400, f"image: {err.kind}: {err.reason}", param="image_url", code=err.kind) from None
        return images


def slice_sources(source: bytes | Path, settings: ServeSettings) -> list[bytes | Path | str]:
    """One image part's sources: a series folder or NIfTI volume under the image root as its slices, else itself."""
    if isinstance(source, bytes) or not is_series(source):
        return [source]
    try:
        refs = list(expand_series(source, settings.slices, max_pixels=settings.max_pixels))
    except ImageError as err:
        raise RequestError(400, f"image: {err.kind}: {err.reason}", param="image_url", code=err.kind) from None
    root = settings.image_root.resolve() if settings.image_root is not None else None
    for ref in refs:  # a series folder's files may be links: each must lead inside the root too
        if root is not None:
            _inside_root(Path(split_slice_ref(ref)[0]), root)
    return refs


def image_source(url: str, settings: ServeSettings, dicom_path: Path) -> bytes | Path:
    """Where an image part's bytes are: decoded data (DICOM written to `dicom_path`), or a checked local path."""
    if url.startswith("data:"):
        media, data = decode_data_uri(url, max_bytes=settings.max_body_bytes)
        if "dicom" in media:
            dicom_path.write_bytes(data)
            return dicom_path
        return data
    if url.startswith(("http://", "https://")):
        if not settings.allow_remote_images:
            raise RequestError(400, "remote image URLs are refused (start the server with --allow-remote-images)",
                               param="image_url")
        return fetch_remote(url, settings.max_body_bytes)
    return local_image(url, settings)


def local_image(url: str, settings: ServeSettings) -> Path:
    """A local path (plain or file://) inside --image-root; RequestError otherwise."""
    if settings.image_root is None:
        raise RequestError(400, "local image paths are refused (start the server with --image-root DIR)",
                           param="image_url")
    raw, index = split_slice_ref(url.removeprefix("file://"))
    root = settings.image_root.resolve()
    path = _inside_root((root / raw) if not Path(raw).is_absolute() else Path(raw), root)
    return path if index is None else Path(f"{path}#slice={index}")  # the file checked, then its slice


def _inside_root(path: Path, root: Path) -> Path:
    """`path` with its links followed, when that lies under `root`; RequestError (403) otherwise."""
    path = path.resolve()
    if not path.is_relative_to(root):
        raise RequestError(403, "the image path is outside the server's image root", param="image_url",
                           kind="permission_error")
    return path


def fetch_remote(url: str, max_bytes: int) -> bytes:
    """A remote image, at most `max_bytes`, 10 s timeout."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 (opted in by --allow-remote-images)
            data = response.read(max_bytes + 1)
    except (urllib.error.URLError, TimeoutError, ValueError) as err:
        raise RequestError(400, f"cannot fetch the image: {err}", param="image_url") from None
    if len(data) > max_bytes:
        raise RequestError(413, "the remote image exceeds the size limit", param="image_url")
    return data


def _content_parts(content: str | list[Part]) -> tuple[str, list[str]]:
    if isinstance(content, str):
        return content, []
    texts, urls = [], []
    for part in content:
        if part.type == "text":
            texts.append(part.text or "")
        else:
            urls.append(part.image_url.url)
    return "\n".join(t for t in texts if t), urls


def build_session(model: Any, processor: Any, request: ChatRequest, settings: ServeSettings) -> tuple[ChatSession, str]:
    """A ChatSession holding the request's earlier turns and pending images, and the last user text."""
    max_tokens = request.max_completion_tokens or request.max_tokens or settings.default_max_tokens
    if max_tokens > settings.max_tokens_limit:
        raise RequestError(400, f"max_tokens {max_tokens} exceeds this server's limit {settings.max_tokens_limit}",
                           param="max_tokens")
    messages = list(request.messages)
    if messages[-1].role != "user":
        raise RequestError(400, "the last message must be from the user", param="messages")
    system = settings.system_prompt
    if messages[0].role == "system":
        system = _content_parts(messages.pop(0).content)[0]
    session = ChatSession(model, processor, max_new_tokens=max_tokens, temperature=request.temperature or 0.0,
                          system_prompt=system)
    parts = [_content_parts(m.content) for m in messages]
    images = iter(read_images([u for _, urls in parts for u in urls], settings))  # a list per image part
    expected = "user"
    for i, message in enumerate(messages):
        if message.role != expected:
            raise RequestError(400, f"messages[{i}]: roles must alternate user/assistant after an optional system "
                               "message", param="messages")
        text, urls = parts[i]
        if IMAGE_TOKEN in text or str(getattr(processor, "image_token", IMAGE_TOKEN)) in text:
            raise RequestError(400, f"messages[{i}]: the text holds the image placeholder "
                               f"{getattr(processor, 'image_token', IMAGE_TOKEN)!r}; send images as image_url parts",
                               param="messages")
        if message.role == "assistant":
            if urls:
                raise RequestError(400, f"messages[{i}]: assistant messages cannot hold images", param="messages")
            session.messages.append({"role": "assistant", "content": [{"type": "text", "text": text}]})
        else:
            mine = [image for _ in urls for image in next(images)]
            if i < len(messages) - 1:
                session.messages.append({"role": "user", "content": [{"type": "image"} for _ in mine]
                                         + [{"type": "text", "text": text}]})
                session.images.extend(mine)
            else:
                session.pending.extend(mine)
                last = text
        expected = "assistant" if expected == "user" else "user"
    return session, last


def check_prompt_length(session: ChatSession, text: str, settings: ServeSettings, context: int | None) -> None:
    """Refuse (400, context_length_exceeded) a prompt longer than --max-prompt-tokens, by default the model's
    context minus the answer's max_tokens, before any generation."""
    limit = settings.max_prompt_tokens
    if limit is None and context is not None:
        limit = context - session.max_new_tokens
    if limit is None:
        return
    n = session.prompt_tokens(text)
    if n > limit:
        why = "" if settings.max_prompt_tokens is not None else \
            f" (the model's context {context} minus max_tokens {session.max_new_tokens})"
        raise RequestError(400, f"the prompt is {n} tokens; this server takes at most {limit}{why}",
                           param="messages", code="context_length_exceeded")


class _Gate:
    """One generation at a time; at most `max_queue` requests wait; past that, refuse. A place is taken when a
    request arrives, before its images are read, so a refused request costs no decoding."""

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self.waiting = 0
        self.running = 0
        self.lock = asyncio.Lock()

    def reserve(self) -> None:
        """Take a place in the queue now or refuse with 429 (before any answer byte is sent). The event loop runs
        one coroutine at a time and nothing here awaits, so the check and the count are one step."""
        if self.waiting + self.running >= self.max_queue + 1:  # one generating + max_queue waiting
            raise RequestError(429, f"the server is busy ({self.waiting} requests waiting); retry later",
                               kind="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
        self.waiting += 1

    async def enter(self, reserved: bool = False) -> None:
        """Wait for the generation slot (with a place reserved earlier, or one taken here)."""
        if not reserved:
            self.reserve()
        try:
            await self.lock.acquire()
        finally:
            self.waiting -= 1
        self.running += 1

    def cancel(self) -> None:
        """Give back a reserved place that will not be used (the stream never started)."""
        self.waiting -= 1

    def leave(self) -> None:
        self.running -= 1
        self.lock.release()


async def _reply(send: Any, status: int, err: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    """Send a whole JSON error response from ASGI middleware (and close the connection)."""
    payload = json.dumps(err).encode()
    extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close"), *extra]})
    await send({"type": "http.response.body", "body": payload})


class _BodyLimit:
    """ASGI middleware, before any route: at most `max_in_flight` requests are held at once (past that a JSON 429);
    a request body is counted as it arrives, whatever its transfer encoding (a chunked body has no
    Content-Length), and refused with a JSON 413 past `max_bytes`, or a 408 when it has not all arrived within
    `read_timeout_s`; it is then replayed to the app, so at most `max_bytes` of it are ever held."""

    def __init__(self, app: Any, max_bytes: int, read_timeout_s: float = 30.0, max_in_flight: int = 32) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout_s = read_timeout_s
        self.max_in_flight = max_in_flight
        self.in_flight = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_in_flight:
            await _reply(send, 429, error_body(f"the server holds {self.in_flight} requests, its limit; retry later",
                                               "rate_limit_error", code="too_many_connections"),
                         {"Retry-After": "1"})
            return
        self.in_flight += 1
        try:
            await self._guarded(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def _guarded(self, scope: Any, receive: Any, send: Any) -> None:
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.read_timeout_s
        chunks, total = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                await _reply(send, 408, error_body(f"the request body did not arrive within {self.read_timeout_s:g} s",
                                                   code="request_timeout"))
                return
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            total += len(body)
            if total > self.max_bytes:
                await _reply(send, 413, error_body(f"the request body exceeds {self.max_bytes} bytes"))
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        whole, replayed = b"".join(chunks), False
        # After the body, only a disconnect can arrive: one watcher waits for it, and the app sees it through
        # replay() or the event in the scope (polled while a plain answer is made)
        gone = scope[CLIENT_GONE] = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": whole, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        watcher = asyncio.create_task(watch())
        try:
            await self.app(scope, replay, send)
        finally:
            watcher.cancel()


def _trimmed(pieces: queue.Queue) -> Any:
    """The streamed pieces with leading and trailing white space dropped, so that the joined stream equals the
    plain answer (which `ChatSession.ask` strips)."""
    started, held = False, ""
    while True:
        piece = pieces.get()
        if piece is None:
            return
        if not started:
            piece = piece.lstrip()
            if not piece:
                continue
            started = True
        body = piece.rstrip()
        if body:
            yield held + body
            held = piece[len(body):]
        else:
            held += piece


def create_app(model: Any, processor: Any, settings: ServeSettings) -> Any:
    """The FastAPI application serving one loaded model."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="medllava", docs_url=None, redoc_url=None, openapi_url=None)
    gate = _Gate(settings.max_queue)
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    created = int(time.time())

    def fail(err: RequestError) -> JSONResponse:
        return JSONResponse(error_body(err.message, err.kind, err.param, err.code), status_code=err.status,
                            headers=err.headers)

    app.add_middleware(_BodyLimit, max_bytes=settings.max_body_bytes, read_timeout_s=settings.read_timeout_s,
                       max_in_flight=settings.max_connections)

    @app.exception_handler(RequestError)
    async def on_request_error(_: Request, err: RequestError) -> JSONResponse:
        return fail(err)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message = "the request body is not valid JSON"
        return fail(RequestError(400, f"{where}: {message}" if where else message, param=where or None))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(_: Request, err: StarletteHTTPException) -> JSONResponse:
        return fail(RequestError(err.status_code, str(err.detail), kind="invalid_request_error"))

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable[[Request], Awaitable[Any]]) -> Any:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > settings.max_body_bytes):
            return fail(RequestError(413, f"the request body exceeds {settings.max_body_bytes} bytes"))
        if settings.api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), settings.api_key.encode()):
                return fail(RequestError(401, "missing or wrong API key (Authorization: Bearer KEY)",
                                         kind="authentication_error", code="invalid_api_key"))
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": settings.model_id, "running": gate.running, "waiting": gate.waiting}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": settings.model_id, "object": "model", "created": created,
                                            "owned_by": "medllava"}]}

    def time_limit(stop: threading.Event) -> tuple[asyncio.TimerHandle, threading.Event]:
        """Stop generation after settings.max_generation_s; the second event says the limit was reached."""
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            stop.set()

        return asyncio.get_running_loop().call_later(settings.max_generation_s, expire), expired

    def note_cancel(session: ChatSession) -> None:
        usage = session.last_usage
        if usage.get("finish_reason") == "cancelled":
            logger.info("generation stopped after %d of %d tokens", usage["completion_tokens"], session.max_new_tokens)

    def finish_reason(session: ChatSession, expired: threading.Event) -> str:
        reason = session.last_usage.get("finish_reason", "stop")
        return "length" if expired.is_set() and reason == "cancelled" else reason

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        if body.model != settings.model_id:
            raise RequestError(404, f"model {body.model!r} is not served here (GET /v1/models lists {settings.model_id!r})",
                               param="model", code="model_not_found")
        gate.reserve()  # the place first: a full queue is a 429 before any image is read (and, for a stream,
        # before its 200 is sent)
        try:
            session, text = await asyncio.to_thread(build_session, model, processor, body, settings)
            await asyncio.to_thread(check_prompt_length, session, text, settings, context)
        except BaseException:
            gate.cancel()
            raise
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not body.stream:
            await gate.enter(reserved=True)
            loop = asyncio.get_running_loop()
            stop = threading.Event()

            def work() -> str:  # gives the gate back when generation ends, even if the client has gone
                try:
                    return session.ask(text, stop=stop)
                finally:
                    note_cancel(session)
                    loop.call_soon_threadsafe(gate.leave)

            timer, expired = time_limit(stop)
            done = loop.run_in_executor(None, work)
            try:
                gone = request.scope.get(CLIENT_GONE)
                if gone is not None:
                    waiter = asyncio.ensure_future(gone.wait())
                    finished, _ = await asyncio.wait({done, waiter}, return_when=asyncio.FIRST_COMPLETED)
                    waiter.cancel()
                    if done not in finished:
                        stop.set()  # nobody will read the answer: stop making it
                        logger.info("client went away; its generation stops")
                answer = await done
            finally:
                timer.cancel()
            usage = session.last_usage
            return {"id": rid, "object": "chat.completion", "created": now, "model": settings.model_id,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                                 "finish_reason": finish_reason(session, expired)}],
                    "usage": {"prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"],
                              "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}}
        place = {"held": True}  # until the stream takes it over (or the response ends without starting it)

        def release() -> None:
            if place.pop("held", False):
                gate.cancel()

        return _ReservedStream(_stream(session, text, rid, now, place), release, media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache"})

    class _ReservedStream(StreamingResponse):
        """A stream holding a queue place: given back if the response ends before the stream took it over."""

        def __init__(self, content: AsyncIterator[str], release: Callable[[], None], **kwargs: Any) -> None:
            super().__init__(content, **kwargs)
            self.release = release

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.release()

    async def _stream(session: ChatSession, text: str, rid: str, now: int,
                      place: dict[str, bool]) -> AsyncIterator[str]:
        # The gate is taken when the stream starts and given back by the generating thread when it ends, so a
        # client that goes away mid-answer never lets a second generation run beside the first.
        pieces: queue.Queue = queue.Queue()
        failure: list[BaseException] = []
        loop = asyncio.get_running_loop()
        stop = threading.Event()

        def work() -> None:
            try:
                session.ask(text, on_text=pieces.put, stop=stop)
            except Exception as err:  # noqa: BLE001 -- reported to the client as the stream's last event
                failure.append(err)
            finally:
                note_cancel(session)
                pieces.put(None)
                loop.call_soon_threadsafe(gate.leave)

        def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
            return "data: " + json.dumps({"id": rid, "object": "chat.completion.chunk", "created": now,
                                          "model": settings.model_id,
                                          "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}) + "\n\n"

        place.pop("held")  # the reservation is ours: enter() gives the place back however the wait ends
        await gate.enter(reserved=True)
        worker = threading.Thread(target=work, daemon=True)
        try:
            worker.start()
        except RuntimeError:
            gate.leave()
            raise
        timer, expired = time_limit(stop)
        try:
            yield chunk({"role": "assistant", "content": ""})
            trimmed = _trimmed(pieces)
            while (piece := await asyncio.to_thread(next, trimmed, None)) is not None:
                yield chunk({"content": piece})
            await asyncio.to_thread(worker.join)
        finally:  # also when the client went away mid-answer (the stream is cancelled or closed here)
            timer.cancel()
            if worker.is_alive():
                stop.set()
                logger.info("client went away mid-stream; its generation stops")
        if failure:
            logger.error("generation failed: %s", failure[0])
            yield "data: " + json.dumps(error_body(f"generation failed: {failure[0]}", "server_error")) + "\n\n"
        else:
            yield chunk({}, finish_reason(session, expired))
        yield "data: [DONE]\n\n"

    return app


def run_server(args: Any) -> int:
    """Entry point for `medllava serve` (arguments from the CLI parser)."""
    import os

    import uvicorn

    from medllava.config import ConfigError, slices_option, stage_slices, window_option
    from medllava.model import load_for_inference

    window = window_option(args.window)
    slices = slices_option(args.slices, stage_slices(args.model))  # unset: the model's stage's data.slices
    image_root = Path(args.image_root) if args.image_root else None
    if image_root is not None and not image_root.is_dir():
        raise ConfigError(f"--image-root {image_root}: no such folder")
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    bits = 4 if args.load_in_4bit else 8 if args.load_in_8bit else None
    model, processor = load_for_inference(args.model, bits=bits, device=args.device, allow_pickle=args.allow_pickle)
    settings = ServeSettings(
        model_id=args.model_id or Path(args.model).resolve().name, image_root=image_root,
        allow_remote_images=args.allow_remote_images, api_key=api_key, max_body_bytes=int(args.max_body_mb * 2**20),
        max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS, max_tokens_limit=args.max_tokens_limit,
        default_max_tokens=min(args.max_new_tokens, args.max_tokens_limit), max_queue=args.max_queue,
        max_images=args.max_images, max_prompt_tokens=args.max_prompt_tokens, max_total_pixels=int(args.max_total_mpixels * 10**6),
        window=window, slices=slices, system_prompt=args.system, max_connections=args.max_connections,
        read_timeout_s=args.read_timeout, max_generation_s=args.max_generation_seconds)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("serving on %s: reachable from other machines%s", args.host,
                       "" if api_key else " and without an API key")
    print(f"medllava serve: {settings.model_id} on http://{args.host}:{args.port}/v1 (API key "
          f"{'required' if api_key else 'not required'})", flush=True)
    # uvicorn's own connection limit (a plain 503) backs up the app's JSON 429: idle connections that never send
    # a request count there, not in the app
    uvicorn.run(create_app(model, processor, settings), host=args.host, port=args.port, log_level="warning",
                access_log=False, limit_concurrency=2 * settings.max_connections + 8, timeout_keep_alive=5)
    return 0
