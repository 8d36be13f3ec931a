"""RL (GRPO) data: VQA records -> conversational prompts with their images, plus the gold columns rewards read.

Each row: {"id", "prompt": [{"role": "user", "content": text}], "images": [...], "answer", "qtype", "options"}.
TRL inserts one image part per image before the user text, which the chat template renders as `<image>\\n` per
image + text: the same wording as the instruction data and the evaluation (a question that places its own
placeholders has them taken out: GRPO always puts the images first). A series or volume becomes its slices
(medllava.volumes). Prompts longer than the limit (text + every image's tokens) are filtered and counted, never
truncated; other bad records follow `skip_invalid` like the SFT stages.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from medllava.data.expand import ImageExpander
from medllava.data.records import RecordError, image_fields, record_images
from medllava.data.render import user_content
from medllava.data.validate import (
    ValidationReport,
    check_images,
    expand_series_refs,
    finish_report,
    first_failure,
    resolve_image,
)
from medllava.data.vqa import VQARecord, format_question, read_vqa
from medllava.imaging import Window, image_size, load_image
from medllava.processor import IMAGE_TOKEN
from medllava.volumes import SliceSpec

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


def prompt_length(processor: Any, messages: list[dict[str, str]], images: list[Any] | None = None,
                  expander: ImageExpander | None = None) -> int:
    """Rendered prompt length in tokens, every image's tokens included (each counted at its size where the model
    family's count depends on it), with the image parts in front of the text as TRL puts them."""
    expander = expander or ImageExpander(processor)
    refs = list(images) if images else [None]
    with_image: list[dict[str, Any]] = [dict(m) for m in messages]
    with_image[-1]["content"] = user_content(processor, f"{IMAGE_TOKEN}\n" * len(refs) + with_image[-1]["content"],
                                             expander.family)
    text = processor.apply_chat_template(with_image, add_generation_prompt=True, tokenize=False)
    n = len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
    dynamic = expander.family.dynamic_resolution
    return n - len(refs) + sum(expander.count(image_size(ref) if ref is not None and dynamic else None) for ref in refs)


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
    slices: SliceSpec | None = None,
) -> tuple[list[dict[str, Any]], ValidationReport]:
    """Read, check and format RL records. Returns the rows (image as a resolved path) and the report.
    `with_location` adds each record's source and line to its row (tools that map rows back to their input).
    An image embedded in a `datasets` source stays in the row as read, or becomes the path `store_embedded`
    returns for it (a stage's data cache writes it to a file there). A series or volume becomes its slices
    (`slices`, medllava.volumes), each one image of the question."""
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
                expand_record(item, image_folder, allow_absolute=allow_absolute_paths, slices=slices)
            except RecordError as err:
                errors.append(err.located(item.source, item.line, item.id))
                continue
            records.append(item)
    # RL sets are small and an image that fails inside generation has no skip path: decode every one now.
    failures = check_images([ref for r in records for ref in r.images], level="full", progress=progress)
    rows: list[dict[str, Any]] = []
    expander = ImageExpander(processor)
    for rec in tqdm(records, desc="formatting prompts", disable=not progress, leave=False):
        bad = first_failure(rec.images, failures)
        if bad is not None:
            errors.append(RecordError(bad.kind, f"{bad.reason} ({bad.path})", source=rec.source, line=rec.line,
                                      record_id=rec.id))
            continue
        messages = prompt_messages(rec, mode, instruction, system_prompt)
        length = prompt_length(processor, messages, rec.images, expander)
        if length > max_prompt_length:
            too_long.append(RecordError("too_long", f"prompt length {length} > {max_prompt_length} (filtered, never truncated)",
                                        source=rec.source, line=rec.line, record_id=rec.id))
            continue
        images = [str(ref) if isinstance(ref, (str, Path)) else store_embedded(ref) if store_embedded is not None
                  else ref for ref in rec.images]
        rows.append({"id": rec.id, "prompt": messages, "images": images, "answer": rec.answer,
                     "qtype": rec.qtype, "options": rec.options,
                     **({"source": rec.source, "line": rec.line} if with_location else {})})
    report = finish_report(total, len(rows), errors, skip_invalid=skip_invalid, report_dir=report_dir, sources=sources,
                           always_skipped=too_long)
    return rows, report


def expand_record(record: VQARecord, image_folder: str | Path, *, allow_absolute: bool = False,
                  slices: SliceSpec | None = None) -> list[int]:
    """Resolve a VQA record's images in place (inside the image folder), each series or volume replaced by its
    slices and a placeholder the question puts for it repeated per slice. Returns how many images each of the
    record's own images became (1, or a series' slice count). Raises a RecordError naming the problem."""
    refs = [resolve_image(ref, image_folder, allow_absolute=allow_absolute) for ref in record.images]
    record.images, (record.question,), counts = expand_series_refs(refs, [record.question], slices)
    return counts


def load_images_transform(batch: dict[str, list[Any]], window: Window | None = None) -> dict[str, list[Any]]:
    """`datasets` transform: each row's image paths become RGB PIL images on access (through the DICOM window, if
    any)."""
    batch = dict(batch)
    batch["images"] = [[load_image(ref, window=window) for ref in refs] for refs in batch["images"]]
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
        row = {"id": f"{rid}_{k // 2}" if len(convs) > 2 else rid, **image_fields(record_images(data)),
               "question": question, "answer": a["value"].strip()}
        if qtype and not (qtype == "yes_no" and row["answer"].lower().rstrip(".") not in ("yes", "no")):
            row["qtype"] = qtype
        out.append(row)
    return out
