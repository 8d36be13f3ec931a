"""RL (GRPO) data: VQA records -> conversational prompts with an image, plus the gold columns rewards read.

Each row: {"id", "prompt": [{"role": "user", "content": text}], "image", "answer", "qtype", "options"}.
TRL inserts the image part before the user text, which the chat template renders as `<image>\\n` + text:
the same wording as the instruction data. Prompts longer than the limit (text + image tokens) are filtered
and counted, never truncated; other bad records follow `skip_invalid` like the SFT stages.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from medllava.data.expand import ImageExpander
from medllava.data.records import RecordError
from medllava.data.render import user_content
from medllava.data.validate import ValidationReport, check_images, finish_report, first_failure, resolve_image
from medllava.data.vqa import VQARecord, format_question, read_vqa
from medllava.imaging import Window, image_size, load_image
from medllava.processor import IMAGE_TOKEN

logger = logging.getLogger(__name__)

# What 'answer' and 'think' prompts append to the question (Med-R1 / MedVLThinker style).
INSTRUCTIONS = {
    "plain": None,
    "answer": "Give the final answer inside <answer> </answer> tags.",
    "think": "First think step by step inside <think> </think> tags, then give the final answer inside "
             "<answer> </answer> tags.",
}
MC_SHORT = "Choose one option by its letter."


def prompt_text(record: VQARecord, mode: str = "plain", instruction: str | None = None) -> str:
    """The user text for an RL question (no `<image>`: the image part is added in front of it)."""
    if mode == "plain":
        return format_question(record.question, record.options, with_image=False)
    text = format_question(record.question, record.options, with_image=False, mc_instruction=MC_SHORT)
    return f"{text}\n{instruction or INSTRUCTIONS[mode]}"


def prompt_messages(record: VQARecord, mode: str = "plain", instruction: str | None = None,
                    system_prompt: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": prompt_text(record, mode, instruction)})
    return messages


def prompt_length(processor: Any, messages: list[dict[str, str]], image: Any = None,
                  images: ImageExpander | None = None) -> int:
    """Rendered prompt length in tokens, the image's tokens included (counted at its size where the model family's
    count depends on it), with the image part in front of the text as TRL puts it."""
    images = images or ImageExpander(processor)
    with_image: list[dict[str, Any]] = [dict(m) for m in messages]
    with_image[-1]["content"] = user_content(processor, f"{IMAGE_TOKEN}\n{with_image[-1]['content']}", images.family)
    text = processor.apply_chat_template(with_image, add_generation_prompt=True, tokenize=False)
    n = len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
    size = image_size(image) if image is not None and images.family.dynamic_resolution else None
    return n - 1 + images.count(size)


def build_rl_rows(
    files: Iterable[str],
    processor: Any,
    *,
    image_folder: str | Path = ".",
    mode: str = "plain",
    instruction: str | None = None,
    system_prompt: str | None = None,
    max_prompt_length: int = 2048,
    skip_invalid: bool = False,
    allow_absolute_paths: bool = False,
    max_samples: int | None = None,
    report_dir: str | Path | None = None,
    progress: bool = True,
    with_location: bool = False,
    store_embedded: Callable[[Any], str] | None = None,
) -> tuple[list[dict[str, Any]], ValidationReport]:
    """Read, check and format RL records. Returns the rows (image as a resolved path) and the report.
    `with_location` adds each record's source and line to its row (tools that map rows back to their input).
    An image embedded in a `datasets` source stays in the row as read, or becomes the path `store_embedded`
    returns for it (a stage's data cache writes it to a file there)."""
    records: list[VQARecord] = []
    errors: list[RecordError] = []
    too_long: list[RecordError] = []
    sources: dict[str, int] = {}
    total = 0
    for file in files:
        for item in read_vqa(file):
            if max_samples is not None and total >= max_samples:
                break
            total += 1
            sources[str(file)] = sources.get(str(file), 0) + 1
            if isinstance(item, RecordError):
                errors.append(item)
                continue
            try:
                item.image = resolve_image(item.image, image_folder, allow_absolute=allow_absolute_paths)
            except RecordError as err:
                errors.append(err.located(item.source, item.line, item.id))
                continue
            records.append(item)
    # RL sets are small and an image that fails inside generation has no skip path: decode every one now.
    failures = check_images([r.image for r in records], level="full", progress=progress)
    rows: list[dict[str, Any]] = []
    expander = ImageExpander(processor)
    for rec in tqdm(records, desc="formatting prompts", disable=not progress, leave=False):
        bad = first_failure([rec.image], failures)
        if bad is not None:
            errors.append(RecordError(bad.kind, bad.reason, source=rec.source, line=rec.line, record_id=rec.id))
            continue
        messages = prompt_messages(rec, mode, instruction, system_prompt)
        length = prompt_length(processor, messages, rec.image, expander)
        if length > max_prompt_length:
            too_long.append(RecordError("too_long", f"prompt length {length} > {max_prompt_length} (filtered, never truncated)",
                                        source=rec.source, line=rec.line, record_id=rec.id))
            continue
        image = str(rec.image) if isinstance(rec.image, (str, Path)) else \
            store_embedded(rec.image) if store_embedded is not None else rec.image
        rows.append({"id": rec.id, "prompt": messages, "image": image, "answer": rec.answer,
                     "qtype": rec.qtype, "options": rec.options,
                     **({"source": rec.source, "line": rec.line} if with_location else {})})
    report = finish_report(total, len(rows), errors, skip_invalid=skip_invalid, report_dir=report_dir, sources=sources,
                           always_skipped=too_long)
    return rows, report


def load_images_transform(batch: dict[str, list[Any]], window: Window | None = None) -> dict[str, list[Any]]:
    """`datasets` transform: image paths become RGB PIL images on access (through the DICOM window, if any)."""
    batch = dict(batch)
    batch["image"] = [load_image(path, window=window) for path in batch["image"]]
    return batch


def rl_dataset(rows: list[dict[str, Any]], window: Window | None = None) -> Any:
    """A `datasets.Dataset` of RL rows whose images load lazily."""
    import datasets

    return datasets.Dataset.from_list(rows).with_transform(functools.partial(load_images_transform, window=window))


def from_llava_conversation(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Split a LLaVA-form VQA record (human question / gpt answer turns) into RL records, one per question.

    `answer_type` (LLaVA-Med's CLOSED/OPEN) maps to yes_no/open; otherwise the type is inferred from the answer.
    """
    convs = data.get("conversations") or []
    rid = str(data.get("id", data.get("question_id", "")))
    qtype = {"closed": "yes_no", "open": "open"}.get(str(data.get("answer_type", "")).lower())
    out = []
    for k in range(0, len(convs) - 1, 2):
        q, a = convs[k], convs[k + 1]
        if q.get("from") not in ("human", "user") or a.get("from") not in ("gpt", "assistant"):
            continue
        question = q["value"].replace(IMAGE_TOKEN, "").strip()
        row = {"id": f"{rid}_{k // 2}" if len(convs) > 2 else rid, "image": data.get("image"),
               "question": question, "answer": a["value"].strip()}
        if qtype and not (qtype == "yes_no" and row["answer"].lower().rstrip(".") not in ("yes", "no")):
            row["qtype"] = qtype
        out.append(row)
    return out
