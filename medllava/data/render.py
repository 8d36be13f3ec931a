"""Render a record to token ids and labels: "plain" for alignment, "chat" for instruction tuning.

plain: [bos] <image>... caption </s>, loss on the caption and the end token (LLaVA's pretraining form).
chat:  the processor's chat template; loss on each assistant turn's text and its end-of-turn token only.
The chat labels come from character spans: the conversation is rendered once, each assistant span is
located by rendering the prefix with the generation prompt, and tokens starting inside a span are
supervised. Image placeholders stay one id each here; the dataset expands them (medllava.data.expand), and the
length checked here is the expanded one, each image counted at its own size.

Llava renders the `<image>` placeholders written in the record's text through the LLM's template; the other
families get structured content (image parts, then text) rendered by their own processor's chat template.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from jinja2 import TemplateError

from medllava.data.expand import IGNORE_INDEX, ImageExpander
from medllava.data.records import Record, RecordError
from medllava.families import Family
from medllava.imaging import ImageError, image_size
from medllava.processor import IMAGE_TOKEN

__all__ = ["IGNORE_INDEX", "Rendered", "Renderer", "structured", "user_content"]


def structured(text: str) -> list[dict[str, str]]:
    """A record turn's text as structured content: an image part for each `<image>` (a newline right after it
    belongs to the placeholder, as medllava.processor.parts_to_text writes it), text parts between."""
    parts: list[dict[str, str]] = []
    pieces = text.split(IMAGE_TOKEN)
    for i, piece in enumerate(pieces):
        if i > 0:
            parts.append({"type": "image"})
            piece = piece[1:] if piece.startswith("\n") else piece
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def user_content(processor: Any, text: str, family: Family | None = None) -> str | list[dict[str, str]]:
    """A turn's text (with `<image>` placeholders) as the processor's chat template takes it: structured for the
    families whose own templates render image parts, the text itself for Llava's wrapped template."""
    from medllava.families import family_of_processor

    return structured(text) if (family or family_of_processor(processor)).structured_content else text


@dataclass
class Rendered:
    """A rendered sample: ids with one `<image>` id per image, labels aligned to them, expanded length."""

    id: str
    input_ids: np.ndarray
    labels: np.ndarray
    images: list[Any]
    length: int
    source: str = ""
    line: int = 0


class Renderer:
    """Renders records for one processor, format and length limit."""

    def __init__(
        self,
        processor: Any,
        fmt: str = "chat",
        max_length: int = 2048,
        system_prompt: str | None = None,
        family: Family | None = None,
    ) -> None:
        if fmt not in ("plain", "chat"):
            raise ValueError(f"unknown rendering format {fmt!r}")
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.format = fmt
        self.max_length = max_length
        self.system_prompt = system_prompt
        self.images = ImageExpander(processor, family)
        self.family = self.images.family
        self.image_token_id = self.images.placeholder_id
        self.template = processor.chat_template
        if fmt == "chat" and not self.template:
            raise ValueError("processor has no chat template")
        if fmt == "chat" and system_prompt:
            try:
                self._apply([{"role": "system", "content": system_prompt}, {"role": "user", "content": "q"}], True)
            except TemplateError as err:
                raise ValueError(f"data.system_prompt: this chat template does not accept a system turn ({err})") from None

    # -- helpers ---------------------------------------------------------------------------------------------
    def _apply(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def image_tokens(self, record: Record) -> list[int]:
        """How many tokens each of the record's images expands to (sizes read from the image headers where the
        family's count depends on them)."""
        if not self.family.dynamic_resolution:
            return [self.images.count(None)] * len(record.images)
        counts = []
        for ref in record.images:
            try:
                counts.append(self.images.count(image_size(ref)))
            except ImageError as err:
                raise _failer(record)(err.kind, f"{err.reason} ({err.path})") from None
        return counts

    def _finish(self, record: Record, ids: list[int], labels: list[int]) -> Rendered:
        fail = _failer(record)
        n_placeholders = sum(1 for t in ids if t == self.image_token_id)
        if n_placeholders != len(record.images):
            raise fail("image_count_mismatch", f"{n_placeholders} {IMAGE_TOKEN} placeholder(s) for {len(record.images)} image(s)")
        if not any(label != IGNORE_INDEX for label in labels):
            raise fail("empty_answer", "nothing to learn: no supervised tokens")
        length = len(ids) + sum(n - 1 for n in self.image_tokens(record))
        if length > self.max_length:
            raise fail("too_long", f"rendered length {length} > max_length {self.max_length} (never truncated)")
        return Rendered(
            id=record.id,
            input_ids=np.asarray(ids, dtype=np.int64),
            labels=np.asarray(labels, dtype=np.int64),
            images=list(record.images),
            length=length,
            source=record.source,
            line=record.line,
        )

    # -- public ----------------------------------------------------------------------------------------------
    def messages(self, record: Record) -> list[dict[str, str]]:
        """The record as chat messages (system prompt added if configured and absent)."""
        msgs: list[dict[str, Any]] = [{"role": t.role, "content": t.text} for t in record.turns]
        if self.system_prompt and (not msgs or msgs[0]["role"] != "system"):
            msgs.insert(0, {"role": "system", "content": self.system_prompt})
        if self.family.structured_content:
            msgs = [{"role": m["role"], "content": structured(m["content"])} for m in msgs]
        return msgs

    def render(self, record: Record) -> Rendered:
        """Render one structurally valid record (see validate.check_structure); raises RecordError."""
        return self.render_plain(record) if self.format == "plain" else self.render_chat(record)

    def render_plain(self, record: Record) -> Rendered:
        fail = _failer(record)
        answers = [t.text for t in record.turns if t.role == "assistant"]
        if not answers or not answers[-1].strip():
            raise fail("empty_answer", "no caption (last assistant turn) to align on")
        caption = answers[-1].strip()
        if IMAGE_TOKEN in caption:
            raise fail("image_count_mismatch", f"{IMAGE_TOKEN} inside the caption")
        n_placeholders = sum(t.text.count(IMAGE_TOKEN) for t in record.turns)
        if n_placeholders != len(record.images):
            raise fail("image_count_mismatch", f"{n_placeholders} {IMAGE_TOKEN} placeholder(s) for {len(record.images)} image(s)")
        tok = self.tokenizer
        prefix = ([tok.bos_token_id] if tok.bos_token_id is not None else []) + [self.image_token_id] * len(record.images)
        body = tok(caption, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        return self._finish(record, prefix + body, [IGNORE_INDEX] * len(prefix) + body)

    def render_chat(self, record: Record) -> Rendered:
        fail = _failer(record)
        msgs = self.messages(record)
        spans: list[tuple[int, int]] = []
        try:
            full = self._apply(msgs, add_generation_prompt=False)
            for i, msg in enumerate(msgs):
                if msg["role"] != "assistant":
                    continue
                prompt = self._apply(msgs[:i], add_generation_prompt=True)
                upto = full if i == len(msgs) - 1 else self._apply(msgs[: i + 1], add_generation_prompt=False)
                if not (full.startswith(upto) and upto.startswith(prompt)):
                    raise fail(
                        "template_error",
                        f"chat template is not prefix-stable at turn {i} (it rewrites earlier turns); "
                        "set model.chat_template to one that is",
                    )
                answer = upto[len(prompt):].rstrip()
                spans.append((len(prompt), len(prompt) + len(answer)))
        except TemplateError as err:
            raise fail("template_error", str(err)) from None
        enc = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        labels = [IGNORE_INDEX] * len(ids)
        span_index = 0
        for k, (start, _end) in enumerate(enc["offset_mapping"]):
            while span_index < len(spans) and start >= spans[span_index][1]:
                span_index += 1
            if span_index == len(spans):
                break
            lo, hi = spans[span_index]
            if lo <= start < hi and ids[k] != self.image_token_id:
                labels[k] = ids[k]
        return self._finish(record, ids, labels)


def _failer(record: Record):
    def fail(kind: str, reason: str) -> RecordError:
        return RecordError(kind, reason, source=record.source, line=record.line, record_id=record.id)

    return fail
