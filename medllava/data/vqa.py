"""VQA records (for GRPO and evaluation) and the one way a question is put to the model.

Record: {"id", "image" | "images", "question", "answer", "qtype", "options"?, "modality"?, "answer_if_swapped"?}
  `images`: one image or a list (prior and current study, several views, a series' slices); the question either
  holds one `<image>` placeholder per image where each belongs ("Prior: <image> Current: <image> Has it grown?"),
  or none, and then the images come first, in their order. qtype: yes_no | multiple_choice | open | number; for
  multiple_choice, `options` is a list of texts and `answer` is the letter ("B") or the option text.
  `answer_if_swapped` (comparative questions): the gold answer when the images are given in reverse order, which
  the evaluation's order check scores. The same `format_question` renders the prompt for instruction data, GRPO
  and evaluation, so the model is always asked the same way.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medllava.data.records import RecordError, image_fields, iter_raw, record_images
from medllava.processor import IMAGE_TOKEN

QTYPES = ("yes_no", "multiple_choice", "open", "number")
LETTERS = string.ascii_uppercase
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."


@dataclass
class VQARecord:
    id: str
    images: list[Any]
    question: str
    answer: str
    qtype: str
    options: list[str] | None = None
    source: str = ""
    line: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def answer_letter(self) -> str | None:
        """For multiple choice: the gold letter (from a letter or an option text)."""
        if self.qtype != "multiple_choice" or not self.options:
            return None
        ans = self.answer.strip()
        if len(ans) == 1 and ans.upper() in LETTERS[: len(self.options)]:
            return ans.upper()
        for i, opt in enumerate(self.options):
            if opt.strip().lower() == ans.lower():
                return LETTERS[i]
        return None

    def to_dict(self) -> dict[str, Any]:
        out = {"id": self.id, **image_fields(self.images), "question": self.question, "answer": self.answer,
               "qtype": self.qtype}
        if self.options:
            out["options"] = self.options
        out.update(self.meta)
        return out


def format_options(options: list[str]) -> str:
    return "\n".join(f"{LETTERS[i]}. {opt}" for i, opt in enumerate(options))


def format_question(question: str, options: list[str] | None = None, *, with_image: bool = True,
                    mc_instruction: str | None = MC_INSTRUCTION, n_images: int = 1) -> str:
    """The user turn for a VQA question: one `<image>` per image first (unless the question places its own), the
    question, lettered options and the MC instruction. `with_image=False`: the text alone, placeholders the
    question holds removed (GRPO's prompts, where the image parts are put in front of it)."""
    text = question.strip()
    if options:
        text = f"{text}\n{format_options(options)}"
        if mc_instruction:
            text = f"{text}\n{mc_instruction}"
    if not with_image:
        return strip_placeholders(text)
    return text if IMAGE_TOKEN in text else f"{IMAGE_TOKEN}\n" * n_images + text


def strip_placeholders(text: str) -> str:
    """The text without its `<image>` placeholders (a newline right after one belongs to it)."""
    text = text.replace(f"{IMAGE_TOKEN}\n", "").replace(IMAGE_TOKEN, "")
    return re.sub(r"[ \t]{2,}", " ", text).strip()


def infer_qtype(answer: str, options: list[str] | None) -> str:
    """Question type when a record does not say: options -> multiple choice, yes/no answers -> closed."""
    if options:
        return "multiple_choice"
    low = answer.strip().lower().rstrip(".")
    if low in ("yes", "no"):
        return "yes_no"
    try:
        float(low.replace(",", ""))
        return "number"
    except ValueError:
        return "open"


def parse_vqa(data: dict[str, Any], source: str = "", line: int = 0) -> VQARecord:
    """Validate one VQA object; raise a located RecordError."""
    rid = str(data.get("id", data.get("question_id", f"{Path(source).name}:{line}")))

    def fail(kind: str, reason: str) -> RecordError:
        return RecordError(kind, reason, source=source, line=line, record_id=rid)

    for key in ("question", "answer"):
        if not isinstance(data.get(key), (str, int, float)) or str(data.get(key)).strip() == "":
            raise fail("missing_field", f"'{key}' is missing or empty")
    images = record_images(data)
    if not images or any(ref is None or ref == "" for ref in images):
        raise fail("missing_field", "'image' is missing" if not images else "an entry of 'images' is empty")
    placed = str(data["question"]).count(IMAGE_TOKEN)
    if placed not in (0, len(images)):
        raise fail("image_count_mismatch", f"the question places {placed} {IMAGE_TOKEN} placeholder(s) for "
                                           f"{len(images)} image(s)")
    options = data.get("options")
    if options is not None and (not isinstance(options, list) or len(options) < 2 or len(options) > len(LETTERS)):
        raise fail("missing_field", "'options' must be a list of 2 to 26 texts")
    options = [str(o) for o in options] if options else None
    answer = str(data["answer"]).strip()
    qtype = data.get("qtype") or data.get("answer_type") or infer_qtype(answer, options)
    qtype = {"closed": "yes_no", "CLOSED": "yes_no", "mc": "multiple_choice", "OPEN": "open"}.get(qtype, qtype)
    if qtype not in QTYPES:
        raise fail("missing_field", f"qtype {qtype!r} is not one of {QTYPES}")
    if qtype == "multiple_choice" and not options:
        raise fail("missing_field", "multiple_choice needs 'options'")
    meta = {k: v for k, v in data.items() if k not in ("id", "question_id", "image", "images", "question", "answer", "qtype", "options")}
    rec = VQARecord(rid, images, str(data["question"]), answer, qtype, options, source, line, meta)
    if qtype == "multiple_choice" and rec.answer_letter is None:
        raise fail("bad_answer", f"answer {answer!r} is neither a letter of the options nor an option text")
    if qtype == "yes_no" and answer.lower().rstrip(".") not in ("yes", "no"):
        raise fail("bad_answer", f"yes_no answer must be yes or no, got {answer!r}")
    return rec


def read_vqa(path: str | Path) -> Iterator[VQARecord | RecordError]:
    """Every record of a VQA file (JSON/JSONL/datasets), or the RecordError for a bad one."""
    for raw in iter_raw(path):
        if raw.error is not None:
            yield raw.error
            continue
        try:
            yield parse_vqa(raw.data or {}, raw.source, raw.line)
        except RecordError as err:
            yield err
