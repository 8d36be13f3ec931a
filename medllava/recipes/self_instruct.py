"""Generate LLaVA-Med-style instruction conversations from figure captions with an OpenAI-compatible endpoint.

A text-only model reads a caption (and sentences of the paper that mention the figure) and writes a
multi-turn conversation as if both sides could see the image. Robustness: bounded concurrency and a bounded
submission window (inputs are streamed, at most concurrency x 2 taken and not finished); retries with
exponential backoff and jitter on 429 / 5xx / timeouts / connection errors (Retry-After honoured); malformed
answers retried, then recorded as failed; each finished record appended to the output JSONL as one whole,
fsynced line, so a re-run resumes with no duplicates and no gaps (a half-written last line from a killed run
is discarded). Every answered request is appended to OUT.usage.jsonl (tokens) and every failure to
OUT.failures.jsonl as it happens, so any kill keeps them and the report sums every run of the same output.
A stop (the caller sets `stop`: Ctrl-C / SIGTERM in the command) submits nothing more, cancels what has not
started, lets in-flight requests finish within a grace period and writes the report; spending limits
(`max_requests`, `max_tokens`, counted over every run) stop the same way. Turns that leak the caption ("caption", "figure", "I cannot see", ...) are dropped and
"Based on the caption," openings stripped. The API key comes from an environment variable and is never
printed or written.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import queue
import random
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medllava.data.records import iter_raw
from medllava.imaging import ImageError, store_image
from medllava.processor import IMAGE_TOKEN

logger = logging.getLogger(__name__)

SYSTEM_PROMPT = """\
You write training conversations for a medical imaging assistant.

You receive the caption of one biomedical image and, sometimes, sentences from the article that refer to it. \
You cannot see the image, but the conversation you write must read as if both speakers are looking at it: \
a person asks about the image and an assistant answers from what is visible.

Rules:
- Never mention or hint at a caption, legend, figure number, article, authors or text; the assistant describes \
what it sees in the image.
- Ask varied questions: modality and view, anatomy, the main finding, its location, size or number, how it \
compares with normal appearance, and what it could mean clinically.
- Answer only what the caption supports. When something cannot be told from the image, say so plainly; be \
cautious about diagnoses and use hedged language ("is consistent with", "may represent").
- Do not invent patient details, measurements or results that the caption does not give.
- Write 2 to 4 question-answer pairs. Answers are one to four sentences.

Return only a JSON array of turns, alternating human and gpt, starting with human:
[{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}, ...]"""

FEW_SHOT: list[tuple[str, list[dict[str, str]]]] = [
    (
        "Caption: Frontal chest radiograph showing a large right-sided pleural effusion with blunting of the "
        "costophrenic angle and mild mediastinal shift to the left.",
        [
            {"from": "human", "value": "What kind of image is this?"},
            {"from": "gpt", "value": "This is a frontal (posteroanterior or anteroposterior) chest X-ray."},
            {"from": "human", "value": "What is the most noticeable abnormality?"},
            {"from": "gpt", "value": "There is a large area of homogeneous opacity at the base of the right "
                                     "hemithorax with loss of the costophrenic angle, consistent with a right pleural "
                                     "effusion."},
            {"from": "human", "value": "Is the mediastinum in its normal position?"},
            {"from": "gpt", "value": "The mediastinum appears mildly shifted toward the left, which can happen when a "
                                     "large effusion pushes the structures away from the affected side."},
        ],
    ),
    (
        "Caption: Axial contrast-enhanced CT of the abdomen demonstrating a 4 cm hypodense lesion in segment VI "
        "of the liver with peripheral rim enhancement (arrow). Mentions: The lesion was later drained.",
        [
            {"from": "human", "value": "Which organ shows the abnormality in this scan?"},
            {"from": "gpt", "value": "The abnormality is in the liver, in the posterior part of the right lobe."},
            {"from": "human", "value": "How would you describe the lesion?"},
            {"from": "gpt", "value": "It is a rounded low-density lesion about 4 cm across with an enhancing rim. This "
                                     "pattern may represent an abscess or another fluid-filled lesion, but the image alone "
                                     "cannot confirm its nature."},
        ],
    ),
    (
        "Caption: Sagittal T2-weighted MRI of the lumbar spine showing L4-L5 disc herniation compressing the "
        "thecal sac.",
        [
            {"from": "human", "value": "What imaging technique was used here?"},
            {"from": "gpt", "value": "This is a sagittal T2-weighted MRI of the lumbar spine."},
            {"from": "human", "value": "Where is the problem located?"},
            {"from": "gpt", "value": "At the L4-L5 level, disc material extends posteriorly beyond the vertebral margins "
                                     "and indents the thecal sac, consistent with a disc herniation."},
        ],
    ),
    (
        "Caption: Histology (H&E, x200) of a lymph node biopsy showing effacement of the normal architecture by "
        "sheets of large atypical lymphoid cells.",
        [
            {"from": "human", "value": "What type of image is this?"},
            {"from": "gpt", "value": "This is a photomicrograph of tissue stained with hematoxylin and eosin, at "
                                     "medium magnification."},
            {"from": "human", "value": "Does the tissue look normal?"},
            {"from": "gpt", "value": "No. The normal organization of the lymph node is replaced by sheets of large, "
                                     "atypical-looking lymphoid cells. This appearance raises concern for a lymphoma, "
                                     "which would need confirmation with additional stains."},
        ],
    ),
    (
        "Caption: Gross specimen of a resected kidney showing a well-circumscribed yellow-orange tumor in the "
        "upper pole with areas of hemorrhage.",
        [
            {"from": "human", "value": "What are we looking at?"},
            {"from": "gpt", "value": "This is a gross pathology specimen of a surgically removed kidney, cut open to "
                                     "show its interior."},
            {"from": "human", "value": "What stands out about the mass?"},
            {"from": "gpt", "value": "There is a well-defined yellow-orange mass in the upper pole with darker areas "
                                     "that look like hemorrhage. This appearance is typical of a renal cell carcinoma, "
                                     "although histology is needed to be sure."},
        ],
    ),
]

_LEAK = re.compile(
    r"\b(caption|captions|legend|figure|fig\.|the (?:text|paper|article|study|authors?)|"
    r"(?:i|we) (?:cannot|can't|can not|am unable to|are unable to|do not|don't) (?:see|view|access)|"
    r"as (?:described|mentioned|stated|noted) (?:in|above)|(?:provided|given) (?:description|information))\b",
    re.IGNORECASE,
)
_OPENING = re.compile(
    r"^\s*(?:based on|according to|from|as (?:described|mentioned|stated) in) (?:the |this )?"
    r"(?:caption|figure|description|text|information provided|provided information)\s*[,:]?\s*",
    re.IGNORECASE,
)
RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


@dataclass
class GeneratorSettings:
    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 4
    max_attempts: int = 6
    max_malformed: int = 3
    timeout: float = 120.0
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    temperature: float = 0.7
    max_tokens: int = 1024
    shots: int = 2


@dataclass
class Outcome:
    id: str
    record: dict[str, Any] | None = None
    reason: str | None = None
    tokens: Counter = field(default_factory=Counter)
    attempts: int = 0
    aborted: bool = False
    """Stopped before it finished (a stop or a spending limit): neither generated nor failed; the next run does it."""


def caption_of(data: dict[str, Any]) -> tuple[str, list[str]]:
    """Caption and inline mentions from {caption, mentions?} or a LLaVA-Med alignment record."""
    caption = data.get("caption") or data.get("fig_caption")
    if not caption and isinstance(data.get("conversations"), list):
        answers = [t.get("value", "") for t in data["conversations"] if t.get("from") in ("gpt", "assistant")]
        caption = answers[-1] if answers else None
    mentions = data.get("mentions") or data.get("inline_mentions") or data.get("in_text_mention") or []
    if isinstance(mentions, str):
        mentions = [mentions]
    return (str(caption).strip() if caption else ""), [str(m).strip() for m in mentions if str(m).strip()]


def build_messages(caption: str, mentions: list[str], record_id: str, shots: int = 2) -> list[dict[str, str]]:
    """System prompt, `shots` few-shot examples (chosen by the record id, deterministic), then the caption."""
    start = int(hashlib.sha1(record_id.encode()).hexdigest(), 16) % len(FEW_SHOT)
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    for k in range(min(shots, len(FEW_SHOT))):
        example, conversation = FEW_SHOT[(start + k) % len(FEW_SHOT)]
        messages.append({"role": "user", "content": example})
        messages.append({"role": "assistant", "content": json.dumps(conversation, ensure_ascii=False)})
    text = f"Caption: {caption}"
    if mentions:
        text += " Mentions: " + " ".join(mentions)
    messages.append({"role": "user", "content": text})
    return messages


class MalformedAnswer(ValueError):
    """The model's answer is not a usable conversation."""


def parse_conversation(content: str) -> list[dict[str, str]]:
    """The JSON array of turns in a model answer (code fences tolerated); raises MalformedAnswer."""
    text = content.strip()
    fence = re.match(r"^```(?:json)?\s*(.*?)\s*```$", text, re.DOTALL)
    if fence:
        text = fence.group(1)
    start, end = text.find("["), text.rfind("]")
    if start < 0 or end <= start:
        raise MalformedAnswer("no JSON array in the answer")
    try:
        turns = json.loads(text[start:end + 1])
    except json.JSONDecodeError as err:
        raise MalformedAnswer(f"invalid JSON ({err.msg})") from None
    out = []
    for i, t in enumerate(turns if isinstance(turns, list) else []):
        if not isinstance(t, dict):
            raise MalformedAnswer(f"turn {i} is not an object")
        role = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}.get(str(t.get("from", t.get("role", ""))).lower())
        value = t.get("value", t.get("content"))
        if role is None or not isinstance(value, str) or not value.strip():
            raise MalformedAnswer(f"turn {i} has no role or text")
        if role != ("human" if i % 2 == 0 else "gpt"):
            raise MalformedAnswer("turns do not alternate human/gpt")
        out.append({"from": role, "value": value.strip()})
    if len(out) < 2:
        raise MalformedAnswer("fewer than one question-answer pair")
    if len(out) % 2:
        out = out[:-1]
    return out


def filter_leaks(turns: list[dict[str, str]]) -> tuple[list[dict[str, str]], int]:
    """Drop question-answer pairs that reveal the caption; strip 'Based on the caption,' openings."""
    kept: list[dict[str, str]] = []
    dropped = 0
    for q, a in zip(turns[0::2], turns[1::2]):
        answer = _OPENING.sub("", a["value"])
        answer = answer[:1].upper() + answer[1:]
        if _LEAK.search(q["value"]) or _LEAK.search(answer):
            dropped += 1
            continue
        kept += [q, {"from": "gpt", "value": answer}]
    return kept, dropped


class Appender:
    """Appends one JSON line per call: encoded first, then written with a single write() and fsynced, under a lock,
    so a kill at any moment leaves only whole lines (or a cut last line that `completed_ids` discards)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.lock = threading.Lock()
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def append(self, row: dict[str, Any]) -> None:
        data = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        with self.lock:
            written = 0
            while written < len(data):
                written += os.write(self.fd, data[written:])
            os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Whole lines of a side file (usage, failures); a line cut by a kill is ignored."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


@dataclass
class SpendingLimits:
    """Stop cleanly once this many requests / total tokens are spent on one output, over every run."""

    max_requests: int | None = None
    max_tokens: int | None = None


def spent(rows: list[dict[str, Any]]) -> tuple[int, Counter]:
    """Requests sent and tokens used, from OUT.usage.jsonl rows."""
    tokens: Counter = Counter()
    for row in rows:
        tokens.update({k: v for k, v in (row.get("tokens") or {}).items() if isinstance(v, int)})
    return sum(1 for row in rows if row.get("event") == "sent"), tokens


class Ledger:
    """What was spent on one output, appended to OUT.usage.jsonl as it happens: a 'sent' line before each request
    leaves (so even a SIGKILL loses no request from the count) and an 'answer' line with its tokens after."""

    def __init__(self, path: Path, limits: SpendingLimits) -> None:
        self.limits = limits
        self.lock = threading.Lock()
        self.reserved, self.tokens = spent(read_jsonl(path))  # requests sent (earlier runs) and being sent
        self.appender = Appender(path)

    def exhausted(self) -> str | None:
        """Which limit is reached, or None."""
        if self.limits.max_requests is not None and self.reserved >= self.limits.max_requests:
            return f"--max-requests {self.limits.max_requests} reached ({self.reserved} requests over every run)"
        total = self.tokens.get("total_tokens", 0)
        if self.limits.max_tokens is not None and total >= self.limits.max_tokens:
            return f"--max-tokens {self.limits.max_tokens} reached ({total} tokens over every run)"
        return None

    def reserve(self, record_id: str) -> bool:
        """May one more request be sent? If so it is counted and logged now, before it leaves (so concurrent
        workers never overshoot the limit, and a kill never hides a request)."""
        with self.lock:
            if self.exhausted():
                return False
            self.reserved += 1
        self.appender.append({"id": record_id, "event": "sent", "time": round(time.time(), 3)})
        return True

    def record(self, record_id: str, status: str, tokens: dict[str, int]) -> None:
        with self.lock:
            self.tokens.update(tokens)
        self.appender.append({"id": record_id, "event": "answer", "status": status, "tokens": tokens,
                              "time": round(time.time(), 3)})

    def close(self) -> None:
        self.appender.close()


def completed_ids(path: Path) -> set[str]:
    """Ids already in the output; a partial last line left by a killed run is cut off."""
    if not path.is_file():
        return set()
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep < len(data):
        logger.warning("%s: discarding a half-written last line from an interrupted run", path)
        with path.open("r+b") as fh:
            fh.truncate(keep)
    ids = set()
    for line in data[:keep].decode("utf-8").splitlines():
        if line.strip():
            ids.add(str(json.loads(line)["id"]))
    return ids


class Generator:
    """Calls the endpoint with retries; turns each input record into a conversation or a failure."""

    def __init__(self, settings: GeneratorSettings, *, ledger: Ledger | None = None,
                 stop: threading.Event | None = None) -> None:
        self.s = settings
        self.ledger = ledger
        self.stop = stop or threading.Event()
        self.url = settings.base_url.rstrip("/") + "/chat/completions"
        key = os.environ.get(settings.api_key_env, "")
        self.headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}

    def _post(self, payload: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        """One POST: (status, headers, body). Timeouts and connection failures raise."""
        request = urllib.request.Request(self.url, data=json.dumps(payload).encode(), headers=self.headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.s.timeout) as response:
                return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
        except urllib.error.HTTPError as err:  # a non-2xx answer is a status, not an error here
            headers = {k.lower(): v for k, v in (err.headers or {}).items()}
            return err.code, headers, err.read()

    def generate(self, record_id: str, image: str, caption: str, mentions: list[str]) -> Outcome:
        outcome = Outcome(record_id)
        messages = build_messages(caption, mentions, record_id, self.s.shots)
        payload = {"model": self.s.model, "messages": messages, "temperature": self.s.temperature,
                   "max_tokens": self.s.max_tokens}
        malformed = 0
        last = "no attempt"
        for attempt in range(self.s.max_attempts):
            if self.stop.is_set() or (self.ledger is not None and not self.ledger.reserve(record_id)):
                outcome.aborted = True  # nothing more is sent: the next run picks this record up
                return outcome
            outcome.attempts = attempt + 1
            retry_after = None
            try:
                status, headers, raw = self._post(payload)
            except TimeoutError:
                last = "timeout"
                self._record(record_id, last, {})
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError, OSError) as err:
                reason = getattr(err, "reason", err)
                last = "timeout" if isinstance(reason, (TimeoutError, socket.timeout)) else f"connection error ({type(reason).__name__})"
                self._record(record_id, last, {})
            else:
                usage = {}
                if status == 200:
                    try:
                        usage = {k: v for k, v in (json.loads(raw).get("usage") or {}).items() if isinstance(v, int)}
                    except (ValueError, AttributeError):
                        usage = {}
                self._record(record_id, f"HTTP {status}", usage)
                if status != 200:
                    last = f"HTTP {status}"
                    if status not in RETRYABLE_STATUS:
                        outcome.reason = last
                        return outcome
                    retry_after = headers.get("retry-after")
                else:
                    try:
                        body = json.loads(raw)
                        outcome.tokens.update(usage)
                        content = body["choices"][0]["message"]["content"]
                        turns = parse_conversation(content)
                    except (ValueError, KeyError, IndexError, TypeError) as err:
                        malformed += 1
                        last = f"malformed answer ({err})" if isinstance(err, MalformedAnswer) else "malformed response body"
                        if malformed >= self.s.max_malformed:
                            outcome.reason = last
                            return outcome
                        continue
                    kept, _dropped = filter_leaks(turns)
                    if not kept:
                        malformed += 1
                        last = "every turn leaked the caption"
                        if malformed >= self.s.max_malformed:
                            outcome.reason = last
                            return outcome
                        continue
                    kept[0]["value"] = f"{IMAGE_TOKEN}\n{kept[0]['value']}"
                    outcome.record = {"id": record_id, "image": image, "conversations": kept, "generator": self.s.model}
                    return outcome
            if attempt + 1 < self.s.max_attempts:
                self._sleep(attempt, retry_after)
        outcome.reason = f"gave up after {self.s.max_attempts} attempts: {last}"
        return outcome

    def _record(self, record_id: str, status: str, tokens: dict[str, int]) -> None:
        if self.ledger is not None:
            self.ledger.record(record_id, status, tokens)

    def _sleep(self, attempt: int, retry_after: str | None) -> None:
        delay = min(self.s.backoff_max, self.s.backoff_base * 2 ** attempt) * (0.5 + random.random() / 2)
        if retry_after:
            try:
                delay = max(delay, min(float(retry_after), self.s.backoff_max))
            except ValueError:
                pass
        self.stop.wait(delay)  # a stop ends the wait at once


def iter_inputs(sources: Iterable[str | Path], skipped: Counter,
                images_dir: Path | None = None) -> Iterator[tuple[str, str, str, list[str]]]:
    """(id, image, caption, mentions) per usable input record, streamed; skips counted by reason in `skipped`.
    An image embedded in a `datasets` source is written to `images_dir` under a name made from its content, and
    that name (relative to `images_dir`) is the record's image; without `images_dir` such a record is skipped
    and counted as 'embedded_image'."""
    seen: set[str] = set()
    for source in sources:
        for raw in iter_raw(source):
            if raw.error is not None:
                skipped[raw.error.kind] += 1
                continue
            data = raw.data or {}
            rid = str(data.get("id", f"{Path(str(source)).name}:{raw.line}"))
            caption, mentions = caption_of(data)
            if rid in seen:
                skipped["duplicate_id"] += 1
            elif not caption:
                skipped["no_caption"] += 1
            elif not data.get("image"):
                skipped["no_image"] += 1
            elif not isinstance(data["image"], str) and images_dir is None:
                skipped["embedded_image"] += 1
            else:
                image = data["image"]
                if not isinstance(image, str):
                    try:
                        image = store_image(image, images_dir)
                    except ImageError:
                        skipped["unreadable_image"] += 1
                        continue
                seen.add(rid)
                yield rid, image, caption, mentions


def load_inputs(sources: Iterable[str | Path],
                images_dir: Path | None = None) -> tuple[list[tuple[str, str, str, list[str]]], Counter]:
    """Every usable input as a list (the dry run); skips counted by reason."""
    skipped: Counter = Counter()
    return list(iter_inputs(sources, skipped, images_dir)), skipped


def default_images_dir(out: Path) -> Path:
    """Where images embedded in a `datasets` source go unless told otherwise: OUT's folder/images."""
    return out.parent / "images"


def side_files(out: Path) -> dict[str, Path]:
    return {"failures": out.with_suffix(".failures.jsonl"), "usage": out.with_suffix(".usage.jsonl"),
            "report": out.with_suffix(".report.json")}


def run_generation(sources: Iterable[str | Path], out: Path, settings: GeneratorSettings, *, limit: int | None = None,
                   progress: bool = True, stop: threading.Event | None = None, limits: SpendingLimits | None = None,
                   grace: float = 3.0, on_outcome: Callable[[Outcome], None] | None = None,
                   retry_failed: bool = False, images_dir: Path | None = None) -> dict[str, Any]:
    """Generate conversations for every input not already in `out` (nor failed in an earlier run, unless
    `retry_failed`: a resumed run continues where the last one stopped); append failures and usage as they happen;
    images embedded in a `datasets` source are written to `images_dir` (default: OUT's folder/images);
    write OUT.report.json (summed over every run of `out`). `report["stopped"]` says why a run ended early:
    'interrupted' (`stop` was set) or the spending limit reached."""
    from tqdm.auto import tqdm

    started = time.time()
    files = side_files(out)
    stop = stop or threading.Event()
    done = completed_ids(out)
    failed_before = set() if retry_failed else {str(f["id"]) for f in read_jsonl(files["failures"])} - done
    ledger = Ledger(files["usage"], limits or SpendingLimits())
    failures_log = Appender(files["failures"])
    appender = Appender(out)
    generator = Generator(settings, ledger=ledger, stop=stop)
    skipped: Counter = Counter()
    seen = {"inputs": 0, "already_done": 0}

    def stream() -> Iterator[tuple[str, str, str, list[str]]]:
        for it in iter_inputs(sources, skipped, images_dir if images_dir is not None else default_images_dir(out)):
            seen["inputs"] += 1
            if it[0] in done:
                seen["already_done"] += 1
            elif it[0] not in failed_before:
                yield it

    todo = stream()
    inbox: queue.Queue = queue.Queue()
    outbox: queue.Queue = queue.Queue()

    def worker() -> None:
        while True:
            item = inbox.get()
            if item is None:
                return
            outbox.put(generator.generate(*item))

    # Daemon workers: a request still in flight after the grace period is abandoned with the process.
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(settings.concurrency)]
    for t in threads:
        t.start()
    window = settings.concurrency * 2
    open_items = taken = generated = failed = 0
    stopped: str | None = None
    deadline: float | None = None
    bar = tqdm(desc="generating", disable=not progress, unit="record")
    try:
        while True:
            if stopped is None and (stop.is_set() or ledger.exhausted()):
                stopped = "interrupted" if stop.is_set() else ledger.exhausted()
                stop.set()
                while True:  # cancel what no worker has started
                    try:
                        if inbox.get_nowait() is not None:
                            open_items -= 1
                    except queue.Empty:
                        break
                deadline = time.time() + grace
            while stopped is None and open_items < window and (limit is None or taken < limit):
                item = next(todo, None)
                if item is None:
                    break
                inbox.put(item)
                open_items += 1
                taken += 1
            if open_items == 0:
                break
            try:
                outcome = outbox.get(timeout=0.05)
            except queue.Empty:
                if deadline is not None and time.time() > deadline:
                    break  # the grace period is over: abandon what is still in flight
                continue
            open_items -= 1
            if on_outcome is not None:
                on_outcome(outcome)
            if outcome.record is not None:
                appender.append(outcome.record)
                generated += 1
                bar.update()
            elif not outcome.aborted:
                failures_log.append({"id": outcome.id, "reason": outcome.reason, "attempts": outcome.attempts,
                                     "time": round(time.time(), 3)})
                failed += 1
                bar.update()
    finally:
        for _ in threads:
            inbox.put(None)
        bar.close()
        appender.close()
        failures_log.close()
        ledger.close()
    report = summarize(out, settings, skipped, inputs=seen["inputs"], generated=generated, failed_now=failed,
                       already_done=seen["already_done"], seconds=time.time() - started, stopped=stopped)
    files["report"].write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def summarize(out: Path, settings: GeneratorSettings, skipped: Counter, *, inputs: int, generated: int,
              failed_now: int, already_done: int, seconds: float, stopped: str | None) -> dict[str, Any]:
    """The report of one output over every run: what is in it, what failed last (and is not in it since),
    and every request and token spent. `inputs` counts the usable inputs read (all of them unless stopped)."""
    files = side_files(out)
    in_output = completed_ids(out)
    latest: dict[str, dict[str, Any]] = {}
    for row in read_jsonl(files["failures"]):
        latest[str(row["id"])] = row  # the latest failure of an id counts (a --retry-failed run may add one)
    failures = {rid: row for rid, row in latest.items() if rid not in in_output}
    requests, tokens = spent(read_jsonl(files["usage"]))
    reasons = Counter(re.sub(r"\(.*\)", "", f.get("reason") or "").strip() for f in failures.values())
    return {
        "inputs": inputs, "skipped_inputs": dict(skipped), "already_done": already_done, "generated": generated,
        "failed_this_run": failed_now, "failed": len(failures), "failure_reasons": dict(reasons),
        "total_in_output": len(in_output), "requests": requests, "tokens": dict(tokens),
        "seconds": round(seconds, 1), "model": settings.model, "stopped": stopped,
        "failures_file": str(files["failures"]), "usage_file": str(files["usage"]),
    }
