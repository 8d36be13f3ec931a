"""Read preference pairs (for DPO) from the published layouts into one form; every problem is a RecordError naming
the file, the line and the id, and the rejected side's images obey every image rule the chosen side's do.

Layouts, detected per record, from JSON, JSONL or any `datasets` source (as SFT records):
- TRL: {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages, "images" | "image"}
  (TRL feeds the chosen side's images to both sides);
- ms-swift: {"messages": [..., the chosen assistant turn], "rejected_response": str, "images", "rejected_images",
  "rejected_messages": [...]} -- `rejected_images` are the rejected side's own images (the conditional preference
  "same answer, another image"), `rejected_messages` its whole conversation (with its own `rejected_images`);
- LLaMA-Factory (sharegpt): {"conversations": [{"from", "value"}, ...], "chosen": {"from", "value"},
  "rejected": {...}, "images", "system"};
- TRL's implicit prompt: {"chosen": messages, "rejected": messages, "images"} -- two whole conversations; the
  prompt is everything before each one's last (assistant) turn;
- LLaMA-Factory (alpaca): {"instruction", "input"?, "chosen", "rejected", "images", "system"?};
- RLAIF-V style (`hf:openbmb/RLAIF-V-Dataset`): {"question", "chosen", "rejected", "image"}; a question without an
  `<image>` placeholder gets one per image in front;
- medllava's own (what `data_recipes/preference_pairs.py` writes): TRL's keys plus "rejected_images" and "weight".
An optional "weight" (MMedPO's per-pair clinical-relevance weight) is a finite number >= 0 (null: 1).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medllava.data.records import (
    RawRecord,
    Record,
    RecordError,
    Turn,
    as_list,
    expand_placeholders,
    iter_raw,
    normalize,
    record_images,
)
from medllava.data.render import IGNORE_INDEX, IMAGE_TOKEN, Rendered, Renderer
from medllava.data.validate import (
    ValidationReport,
    check_images,
    check_structure,
    default_workers,
    expand_series_refs,
    finish_report,
    first_failure,
    render_records,
    resolve_image,
)
from medllava.imaging import ImageError
from medllava.volumes import SliceSpec

SIDES = ("chosen", "rejected")


@dataclass
class PreferencePair:
    """One pair: the prompt turns (ending with the user's), the chosen and rejected answers, and each side's images.

    `rejected_prompt` / `rejected_images` are None when the rejected side shares the chosen side's."""

    id: str
    prompt: list[Turn]
    chosen: str
    rejected: str
    images: list[Any]
    rejected_prompt: list[Turn] | None = None
    rejected_images: list[Any] | None = None
    weight: float = 1.0
    layout: str = "trl"
    source: str = ""
    line: int = 0

    @property
    def own_rejected_images(self) -> bool:
        """Whether the rejected side sees images of its own (the conditional, image-grounded preference)."""
        return self.rejected_images is not None and self.rejected_images != self.images

    def side(self, which: str) -> tuple[list[Turn], str, list[Any]]:
        """(prompt turns, answer, images) of 'chosen' or 'rejected'."""
        if which == "chosen":
            return self.prompt, self.chosen, self.images
        prompt = self.rejected_prompt if self.rejected_prompt is not None else self.prompt
        images = self.rejected_images if self.rejected_images is not None else self.images
        return prompt, self.rejected, images


def detect_layout(data: dict[str, Any]) -> str:
    """Which published layout a record is in (raises KeyError naming the keys when none)."""
    if "rejected_response" in data or "rejected_messages" in data:
        return "ms-swift"
    if "conversations" in data and "chosen" in data and "rejected" in data:
        return "llama-factory"
    if "chosen" in data and "rejected" in data:
        if "prompt" in data:
            return "trl"
        if "instruction" in data:
            return "alpaca"
        if "question" in data:
            return "rlaif-v"
        if isinstance(data["chosen"], list) and isinstance(data["rejected"], list):
            return "trl-implicit"
    raise KeyError(f"no preference layout fits the keys {sorted(data)} (TRL: prompt/chosen/rejected, or chosen/rejected "
                   "conversations; ms-swift: messages/rejected_response; LLaMA-Factory: conversations/chosen/rejected "
                   "or instruction/chosen/rejected; RLAIF-V: question/chosen/rejected)")


def _turns(value: Any, raw: RawRecord, what: str, key: str = "messages") -> tuple[list[Turn], list[Any]]:
    """Turns (and images given as parts) of a conversation value, through the SFT reader's normalisation."""
    if isinstance(value, str):
        return [Turn("user", value)], []
    record = normalize(RawRecord(raw.source, raw.line, {"id": "-", key: value}))
    if not record.turns:
        raise RecordError("empty_conversation", f"'{what}' has no turns")
    return record.turns, record.images


def _answer(value: Any, raw: RawRecord, what: str) -> str:
    """The assistant text of a completion given as text, one message, a list of messages, or {from, value}."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, dict) and "value" in value:
        text = value["value"] if isinstance(value["value"], str) else None
    else:
        turns, _ = _turns(value if isinstance(value, list) else [value], raw, what)
        if any(t.role != "assistant" for t in turns):
            raise RecordError("bad_roles", f"'{what}' must hold assistant turns only")
        text = "\n".join(t.text for t in turns)
    if not isinstance(text, str):
        raise RecordError("missing_field", f"'{what}' must be text")
    if not text.strip():
        raise RecordError("empty_answer", f"'{what}' is empty")
    return text


def parse_pair(raw: RawRecord) -> PreferencePair:
    """A preference pair from one parsed record, or a located RecordError."""
    data = raw.data or {}
    rid = data.get("id")
    rid = str(rid) if rid is not None else f"{Path(raw.source).name}:{raw.line}"
    try:
        pair = _parse(data, raw, rid)
        _check(pair)
    except RecordError as err:
        raise err.located(raw.source, raw.line, rid) from None
    return pair


def _parse(data: dict[str, Any], raw: RawRecord, rid: str) -> PreferencePair:
    try:
        layout = detect_layout(data)
    except KeyError as err:
        raise RecordError("missing_field", str(err.args[0])) from None
    images = record_images(data)
    rejected_prompt = rejected_images = None
    if layout == "trl":
        prompt, part_images = _turns(data["prompt"], raw, "prompt")
        images = images or part_images
        chosen, rejected = _answer(data["chosen"], raw, "chosen"), _answer(data["rejected"], raw, "rejected")
    elif layout == "trl-implicit":
        chosen_turns, part_images = _turns(data["chosen"], raw, "chosen")
        rejected_turns, rejected_part_images = _turns(data["rejected"], raw, "rejected")
        images = images or part_images
        if rejected_part_images and rejected_part_images != images:  # the rejected conversation's own images
            rejected_images = rejected_part_images
        for what, turns in (("chosen", chosen_turns), ("rejected", rejected_turns)):
            if turns[-1].role != "assistant":
                raise RecordError("bad_roles", f"'{what}' must end with an assistant turn")
        prompt, chosen = chosen_turns[:-1], chosen_turns[-1].text
        rejected = rejected_turns[-1].text
        if rejected_turns[:-1] != prompt:
            rejected_prompt = rejected_turns[:-1]
    elif layout in ("alpaca", "rlaif-v"):
        if layout == "alpaca":
            text = "\n".join(str(data[k]) for k in ("instruction", "input") if isinstance(data.get(k), str) and data[k])
        else:
            text = data["question"] if isinstance(data["question"], str) else ""
        if not text.strip():
            raise RecordError("missing_field", f"'{'instruction' if layout == 'alpaca' else 'question'}' is empty")
        if IMAGE_TOKEN not in text and images:
            text = f"{IMAGE_TOKEN}\n" * len(images) + text
        prompt = [Turn("user", text)]
        if isinstance(data.get("system"), str) and data["system"].strip():
            prompt = [Turn("system", data["system"]), *prompt]
        chosen, rejected = _answer(data["chosen"], raw, "chosen"), _answer(data["rejected"], raw, "rejected")
    elif layout == "llama-factory":
        prompt, _ = _turns(data["conversations"], raw, "conversations", key="conversations")
        if isinstance(data.get("system"), str) and data["system"].strip():  # LLaMA-Factory's `system` column
            prompt = [Turn("system", data["system"]), *prompt]
        chosen, rejected = _answer(data["chosen"], raw, "chosen"), _answer(data["rejected"], raw, "rejected")
    else:  # ms-swift: the conversation ends with the chosen answer
        if "messages" not in data:
            raise RecordError("missing_field", "ms-swift layout: 'messages' (ending with the chosen answer) is missing")
        turns, part_images = _turns(data["messages"], raw, "messages")
        images = images or part_images
        if turns[-1].role != "assistant":
            raise RecordError("bad_roles", "'messages' must end with the chosen assistant turn")
        prompt, chosen = turns[:-1], turns[-1].text
        if "rejected_messages" in data:
            other, other_images = _turns(data["rejected_messages"], raw, "rejected_messages")
            if other[-1].role != "assistant":
                raise RecordError("bad_roles", "'rejected_messages' must end with the rejected assistant turn")
            rejected_prompt, rejected = other[:-1], other[-1].text
            # ms-swift: a rejected conversation of its own brings its own images (`rejected_images`, or parts)
            rejected_images = other_images or as_list(data.get("rejected_images"))
        else:
            rejected = _answer(data["rejected_response"], raw, "rejected_response")
    if "rejected_images" in data:
        rejected_images = as_list(data["rejected_images"])
    weight = 1.0 if data.get("weight") is None else data["weight"]
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise RecordError("bad_weight", f"'weight' {weight!r} must be a finite number >= 0")
    return PreferencePair(id=rid, prompt=prompt, chosen=chosen, rejected=rejected, images=images,
                          rejected_prompt=rejected_prompt, rejected_images=rejected_images, weight=float(weight),
                          layout=layout, source=raw.source, line=raw.line)


def _check(pair: PreferencePair) -> None:
    """Each side is a well-formed conversation (SFT's rules) with as many placeholders as images, and the pair
    prefers something: identical sides teach nothing."""
    for which in ("chosen", "rejected"):
        prompt, answer, images = pair.side(which)
        try:
            check_structure(Record(pair.id, images, [*prompt, Turn("assistant", answer)]))
        except RecordError as err:
            raise RecordError(err.kind, f"{which} side: {err.reason}") from None
    if pair.side("chosen") == pair.side("rejected"):
        raise RecordError("same_pair", "chosen and rejected are the same answer with the same images")


def _expand_side(images: list[Any], turns: list[Turn] | None, slices: SliceSpec | None,
                 which: str) -> tuple[list[Any], list[Turn] | None, list[int]]:
    """One side's images with each series or volume as its slices, its turns' placeholders repeated per slice."""
    flat, texts, counts = expand_series_refs(images, [t.text for t in turns or []], slices, f"{which} side: ")
    return flat, None if turns is None else [Turn(t.role, text) for t, text in zip(turns, texts)], counts


def expand_pair_series(pair: PreferencePair, slices: SliceSpec | None = None) -> PreferencePair:
    """Both sides' series and volumes as their slices (in place). A rejected side that shares the chosen side's
    prompt must give the same number of images per placeholder (refused by name otherwise)."""
    pair.images, prompt, counts = _expand_side(pair.images, pair.prompt, slices, "chosen")
    pair.prompt = prompt or []
    if pair.rejected_images is None and pair.rejected_prompt is not None:  # its own prompt over the chosen images
        texts = expand_placeholders([t.text for t in pair.rejected_prompt], counts)
        pair.rejected_prompt = [Turn(t.role, text) for t, text in zip(pair.rejected_prompt, texts)]
    if pair.rejected_images is not None:
        pair.rejected_images, rejected_prompt, rejected_counts = _expand_side(
            pair.rejected_images, pair.rejected_prompt, slices, "rejected")
        pair.rejected_prompt = rejected_prompt
        if pair.rejected_prompt is None and rejected_counts != counts:
            raise RecordError("image_count_mismatch", f"rejected side: its series give {rejected_counts} slice images "
                              f"where the shared prompt's placeholders take {counts}")
    return pair


def read_pairs(source: str | Path, image_folder: str | Path = ".", *, allow_absolute: bool = False,
               slices: SliceSpec | None = None) -> Iterator[PreferencePair | RecordError]:
    """Every pair of a source with both sides' image paths resolved inside the image folder (a series or volume
    as its slices, `slices`), or its error."""
    for raw in iter_raw(source):
        if raw.error is not None:
            yield raw.error
            continue
        try:
            pair = parse_pair(raw)
            pair.images = [resolve_image(r, image_folder, allow_absolute=allow_absolute) for r in pair.images]
            if pair.rejected_images is not None:
                try:
                    pair.rejected_images = [resolve_image(r, image_folder, allow_absolute=allow_absolute)
                                            for r in pair.rejected_images]
                except RecordError as err:
                    raise RecordError(err.kind, f"rejected side: {err.reason}") from None
            expand_pair_series(pair, slices)
        except RecordError as err:
            rid = (raw.data or {}).get("id")
            yield err if err.source else err.located(raw.source, raw.line, None if rid is None else str(rid))
            continue
        yield pair


def check_pair_images(pairs: Iterable[PreferencePair], *, level: str = "header",
                      progress: bool = False) -> tuple[list[PreferencePair], list[RecordError]]:
    """Check both sides' images (each distinct image once; 'header', 'full' or 'none' as for SFT): the pairs whose
    images all pass, and an error naming the pair, the side and the image for each other pair."""
    pairs = list(pairs)
    refs = [r for p in pairs for r in (*p.images, *(p.rejected_images or []))]
    failures = check_images(refs, level=level, progress=progress)
    kept, errors = [], []
    for pair in pairs:
        failed: tuple[str, ImageError] | None = None
        for which, refs_of_side in (("chosen", pair.images), ("rejected", pair.rejected_images or [])):
            err = first_failure(refs_of_side, failures)
            if err is not None:
                failed = (which, err)
                break
        if failed is None:
            kept.append(pair)
        else:
            which, err = failed
            errors.append(RecordError(err.kind, f"{which} side: {err}", source=pair.source, line=pair.line,
                                      record_id=pair.id))
    return kept, errors


def last_answer_only(sample: Rendered) -> Rendered:
    """The sample with only its last supervised span kept: a pair's completion is its final answer, never an
    earlier assistant turn of the shared conversation."""
    supervised = np.flatnonzero(sample.labels != IGNORE_INDEX)
    breaks = np.flatnonzero(np.diff(supervised) > 1)
    start = supervised[breaks[-1] + 1] if len(breaks) else supervised[0]
    labels = sample.labels.copy()
    labels[:start] = IGNORE_INDEX
    return Rendered(sample.id, sample.input_ids, labels, sample.images, sample.length, sample.source, sample.line)


def side_record(pair: PreferencePair, which: str) -> Record:
    """One side of a pair as an SFT record: its prompt turns, its answer, its images."""
    prompt, answer, images = pair.side(which)
    return Record(pair.id, list(images), [*prompt, Turn("assistant", answer)], source=pair.source, line=pair.line)


def prepare_pairs(files: Iterable[str], renderer: Renderer, *, image_folder: str | Path = ".",
                  allow_absolute_paths: bool = False, skip_invalid: bool = False,
                  report_dir: str | Path | None = None, max_samples: int | None = None, image_check: str = "header",
                  workers: int | None = None, progress: bool = True, slices: SliceSpec | None = None,
                  ) -> tuple[list[Rendered], list[float], ValidationReport]:
    """Read, check and render every pair of the files, both sides by SFT's rules (containment, image headers and
    pixel limits, placeholders, length never truncated). Returns the sides as one list (chosen, rejected, chosen,
    ... : pair i is items 2i and 2i+1, each labelled on its final answer only), the pairs' weights, and the report;
    a bad pair stops the run unless skipping, and is then counted and named (file, line, side)."""
    pairs: list[PreferencePair] = []
    errors: list[RecordError] = []
    sources: dict[str, int] = {}
    total = 0
    for file in files:
        for item in read_pairs(file, image_folder, allow_absolute=allow_absolute_paths, slices=slices):
            if max_samples is not None and total >= max_samples:
                break
            total += 1
            sources[str(file)] = sources.get(str(file), 0) + 1
            (pairs if isinstance(item, PreferencePair) else errors).append(item)
    pairs, image_errors = check_pair_images(pairs, level=image_check, progress=progress)
    errors += image_errors
    records = [side_record(pair, which) for pair in pairs for which in SIDES]
    rendered = render_records(records, renderer, workers=default_workers() if workers is None else workers,
                              progress=progress)
    samples: list[Rendered] = []
    weights: list[float] = []
    for i, pair in enumerate(pairs):
        sides = rendered[2 * i: 2 * i + 2]
        failed = next(((which, r) for which, r in zip(SIDES, sides, strict=True) if isinstance(r, RecordError)), None)
        if failed is not None:
            which, err = failed
            errors.append(RecordError(err.kind, f"{which} side: {err.reason}", source=pair.source, line=pair.line,
                                      record_id=pair.id))
            continue
        samples += [last_answer_only(r) for r in sides]  # type: ignore[arg-type]
        weights.append(pair.weight)
    report = finish_report(total, len(weights), errors, skip_invalid=skip_invalid, report_dir=report_dir,
                           sources=sources)
    return samples, weights, report
