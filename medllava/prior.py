"""The text-prior baseline: answer each question with the training set's most common answer to the same question.

No image and no model: the baseline shows how much of an accuracy the question's wording alone buys. Training
files may be VQA records ({"question", "answer", "options"?}) or conversations (LLaVA `conversations` or
`messages`; every user turn paired with the assistant turn after it). Questions are compared after
normalisation (lower case, no punctuation or articles, `<image>`, option lines and the multiple-choice instruction
removed); multiple-choice answers are counted as their option's text, so a prior answer still grades when a test
question lists the options in another order. Ties go to the answer seen first.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medllava.data.records import RawRecord, RecordError, iter_raw, normalize
from medllava.data.vqa import LETTERS, MC_INSTRUCTION, parse_vqa
from medllava.grading import normalize_text, parse_choice

logger = logging.getLogger(__name__)

_OPTION_LINE = re.compile(r"^\(?([A-Z])[.)]\s+(.+)$")


def question_key(text: str) -> str:
    """A question's wording, normalised: the stem only (no `<image>`, option lines or MC instruction)."""
    lines = [ln.strip() for ln in text.replace("<image>", " ").splitlines()]
    stem = [ln for ln in lines if ln and not _OPTION_LINE.match(ln) and ln != MC_INSTRUCTION]
    return normalize_text(" ".join(stem))


def _options_in(text: str) -> list[str]:
    return [m.group(2).strip() for ln in text.splitlines() if (m := _OPTION_LINE.match(ln.strip()))]


@dataclass
class TextPrior:
    """Answer counts per normalised question, read from training files."""

    counts: dict[str, Counter[str]] = field(default_factory=dict)
    spelling: dict[str, str] = field(default_factory=dict)
    """The first-seen written form of each normalised answer."""
    sources: list[str] = field(default_factory=list)
    pairs: int = 0
    skipped: int = 0

    def add(self, question: str, answer: str) -> None:
        key, norm = question_key(question), normalize_text(answer)
        if not key or not norm:
            return
        self.counts.setdefault(key, Counter())[norm] += 1
        self.spelling.setdefault(norm, answer.strip())
        self.pairs += 1

    def answer(self, question: str) -> str | None:
        """The most common training answer to this question, or None when the question was never seen."""
        counts = self.counts.get(question_key(question))
        if not counts:
            return None
        return self.spelling[counts.most_common(1)[0][0]]


def _pairs(data: dict[str, Any]) -> Iterable[tuple[str, str]]:
    """(question, answer) pairs of one raw record: a VQA record, or a conversation's user/assistant turns."""
    if "conversations" not in data and "messages" not in data:
        rec = parse_vqa(data)
        answer = rec.answer
        if rec.qtype == "multiple_choice" and rec.options and rec.answer_letter:
            answer = rec.options[LETTERS.index(rec.answer_letter)]
        yield rec.question, answer
        return
    turns = normalize(RawRecord("", 0, data)).turns
    for user, reply in zip(turns, turns[1:]):
        if user.role != "user" or reply.role != "assistant":
            continue
        options, answer = _options_in(user.text), reply.text
        if options:
            letter = parse_choice(answer, options)
            if letter is None:
                continue
            answer = options[LETTERS.index(letter)]
        yield user.text, answer


def build_prior(paths: Sequence[str | Path]) -> TextPrior:
    """Count the question -> answer pairs of the training files; unreadable records are counted and reported."""
    prior = TextPrior(sources=[str(p) for p in paths])
    errors: list[str] = []
    for path in paths:
        for raw in iter_raw(path):
            if raw.error is not None:
                prior.skipped += 1
                errors.append(raw.error.describe())
                continue
            try:
                for question, answer in _pairs(raw.data or {}):
                    prior.add(question, answer)
            except RecordError as err:
                prior.skipped += 1
                errors.append(err.located(raw.source, raw.line, None).describe())
    if errors:
        logger.warning("text prior: skipped %d record(s): %s", len(errors), "; ".join(errors[:5]))
    if not prior.pairs:
        raise ValueError(f"text prior: no question/answer pairs in {', '.join(prior.sources)}")
    return prior
