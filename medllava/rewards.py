"""Verifiable rewards for medical VQA, and the answer extraction that evaluation shares. Pure Python.

Extraction: the last `<answer>...</answer>` block; else a stated answer ("the answer is X", "Answer: X");
else the whole text with any `<think>` block removed. Grading by question type:
- multiple_choice: `B`, `(B)`, `B.`, `B)`, `B. option text`, or the exact option text; two different letters,
  or a letter contradicted by another option's text, score 0;
- yes_no: exactly one of yes/no, on word boundaries, not negated ("not yes" scores 0; "abnormal" holds no "no");
- number: the first number (digits or a small number word) equals the gold value;
- open: normalised exact match; token F1 as partial credit; recall of gold tokens (the LLaVA-Med metric).

Reward functions follow TRL's signature `(completions, **dataset_columns) -> list[float]`.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

LETTERS = string.ascii_uppercase
_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_OPEN_ANSWER = re.compile(r"<answer>((?:(?!</answer>).)*)$", re.DOTALL | re.IGNORECASE)
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_STATED = re.compile(r"(?:final answer|the answer|answer)\s*(?:is|:)\s*(.+)", re.IGNORECASE)
_THINK_FORMAT = re.compile(r"\s*<think>(?P<think>(?:(?!<think>|</think>).)+)</think>\s*<answer>(?P<answer>(?:(?!<answer>|</answer>).)+)</answer>\s*", re.DOTALL)
_ANSWER_FORMAT = re.compile(r"\s*<answer>(?P<answer>(?:(?!<answer>|</answer>|<think>).)+)</answer>\s*", re.DOTALL)
_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)
_NEGATION = re.compile(r"\b(not|n't|never)\W*$", re.IGNORECASE)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?|[-+]?\.\d+")
_NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve".split())}


def completion_text(completion: Any) -> str:
    """TRL passes a string (standard format) or a list of messages (conversational format)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "".join(
            m.get("content", "") if isinstance(m.get("content"), str)
            else "".join(p.get("text", "") for p in m.get("content", []) if isinstance(p, dict))
            for m in completion if isinstance(m, dict)
        )
    if isinstance(completion, dict):
        return completion_text([completion])
    return str(completion or "")


def extract_answer(text: str) -> str:
    """The answer part of a completion (see module docstring); '' when there is nothing."""
    text = text or ""
    blocks = _ANSWER_BLOCK.findall(text)
    if blocks:
        return blocks[-1].strip()
    unclosed = _OPEN_ANSWER.search(text)
    if unclosed:
        return unclosed.group(1).strip()
    body = _THINK_BLOCK.sub(" ", text)
    body = re.sub(r"</?think>", " ", body, flags=re.IGNORECASE).strip()
    stated = _STATED.findall(body)
    if stated:
        return stated[-1].strip().splitlines()[0].strip()
    return body


def _plain(text: str) -> str:
    """Lower case, punctuation to spaces, single spaces."""
    text = "".join(" " if ch in string.punctuation else ch for ch in text.lower())
    return " ".join(text.split())


def normalize_text(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD-style), for open answers."""
    return " ".join(_ARTICLES.sub(" ", _plain(text)).split())


def token_f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_text(prediction).split(), normalize_text(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def token_recall(prediction: str, gold: str) -> float:
    """Share of the gold answer's normalised tokens found in the prediction (LLaVA-Med's open-question metric)."""
    ref = normalize_text(gold).split()
    if not ref:
        return 0.0
    pred = set(normalize_text(prediction).split())
    return sum(1 for t in ref if t in pred) / len(ref)


def parse_yes_no(answer: str) -> str | None:
    """'yes' or 'no' when exactly one of them occurs (word boundaries) and it is not negated; else None."""
    found = set()
    for m in _YES_NO.finditer(answer):
        if _NEGATION.search(answer[: m.start()]):
            return None
        found.add(m.group(1).lower())
    return found.pop() if len(found) == 1 else None


def parse_choice(answer: str, options: Sequence[str]) -> str | None:
    """The chosen letter of a multiple-choice answer, or None when absent or ambiguous."""
    n = len(options)
    valid = set(LETTERS[:n])
    text = answer.strip().strip("*`\"'").strip()
    if not text:
        return None
    # Option texts are matched without dropping articles: "A. MRI" must keep its letter A.
    norm_options = [_plain(o) for o in options]
    whole = _plain(text)
    if whole and norm_options.count(whole) == 1:
        return LETTERS[norm_options.index(whole)]
    if len(text) == 1 and text.upper() in valid:
        return text.upper()

    letters: set[str] = set()
    lead = re.match(r"^\(?([A-Z])\)?(?:[.:)]\s*|\s+|$)(.*)$", text, re.DOTALL)
    if lead:
        letter, rest = lead.group(1), lead.group(2).strip()
        delimited = re.match(r"^\(?[A-Z]\)?[.:)]", text) or text.startswith("(") or rest == ""
        rest_norm = _plain(rest.splitlines()[0]) if rest else ""
        if letter in valid and rest_norm:
            for i, opt in enumerate(norm_options):
                if rest_norm == opt or rest_norm.startswith(opt + " "):
                    if LETTERS[i] != letter:
                        return None  # "A. MRI" where MRI is option B: contradictory
                    delimited = True
        if delimited:
            letters.add(letter)
    for pattern in (r"\(([A-Z])\)", r"(?<![\w-])([A-Z])[.)](?=\s|$)",
                    r"\b(?i:answer|option|choice)\s*(?:(?i:is)|:)?\s*\(?([A-Z])\b"):
        letters.update(re.findall(pattern, text))
    letters &= valid
    return letters.pop() if len(letters) == 1 else None


def parse_number(answer: str) -> float | None:
    m = _NUMBER.search(answer)
    if m:
        try:
            return float(m.group(0).replace(",", ""))
        except ValueError:
            return None
    for word in normalize_text(answer).split():
        if word in _NUMBER_WORDS:
            return float(_NUMBER_WORDS[word])
    return None


@dataclass(frozen=True)
class Grade:
    """How one prediction scores against its gold answer."""

    correct: float  # 1.0 / 0.0 for closed questions; exact match for open ones
    extracted: str  # the answer text taken from the completion
    parsed: str | None  # the normalised choice/number/yes-no read from it
    f1: float
    recall: float


def gold_letter(answer: str, options: Sequence[str]) -> str | None:
    ans = answer.strip()
    if len(ans) == 1 and ans.upper() in LETTERS[: len(options)]:
        return ans.upper()
    norm = _plain(ans)
    for i, opt in enumerate(options):
        if _plain(opt) == norm:
            return LETTERS[i]
    return None


def grade(prediction: str, answer: str, qtype: str, options: Sequence[str] | None = None) -> Grade:
    """Grade a raw completion against the gold answer for its question type."""
    extracted = extract_answer(prediction)
    gold = str(answer)
    if qtype == "multiple_choice":
        opts = list(options or [])
        parsed = parse_choice(extracted, opts)
        target = gold_letter(gold, opts)
        gold_text = opts[LETTERS.index(target)] if target else gold
        ok = float(parsed is not None and parsed == target)
        return Grade(ok, extracted, parsed, ok if parsed else token_f1(extracted, gold_text), ok)
    if qtype == "yes_no":
        parsed = parse_yes_no(extracted)
        ok = float(parsed is not None and parsed == gold.strip().lower().rstrip("."))
        return Grade(ok, extracted, parsed, ok, ok)
    if qtype == "number":
        value, target = parse_number(extracted), parse_number(gold)
        ok = float(value is not None and target is not None and math.isclose(value, target, rel_tol=1e-6, abs_tol=1e-9))
        return Grade(ok, extracted, None if value is None else f"{value:g}", ok, ok)
    exact = float(bool(normalize_text(extracted)) and normalize_text(extracted) == normalize_text(gold))
    return Grade(exact, extracted, normalize_text(extracted), token_f1(extracted, gold), token_recall(extracted, gold))


# ----------------------------------------------------------------------------------------------------------------
# Reward functions (TRL signature)


def _column(values: Any, i: int) -> Any:
    if values is None:
        return None
    return values[i] if isinstance(values, (list, tuple)) else values


def think_format_reward(completions: list[Any], **_: Any) -> list[float]:
    """1.0 for exactly `<think>...</think><answer>...</answer>` (both non-empty, nothing around them)."""
    return [1.0 if _THINK_FORMAT.fullmatch(completion_text(c)) else 0.0 for c in completions]


def answer_format_reward(completions: list[Any], **_: Any) -> list[float]:
    """1.0 for exactly `<answer>...</answer>` (non-empty, no think block)."""
    return [1.0 if _ANSWER_FORMAT.fullmatch(completion_text(c)) else 0.0 for c in completions]


def accuracy_reward(completions: list[Any], answer: list[str], qtype: list[str], options: list[Any] | None = None,
                    **_: Any) -> list[float]:
    """1.0 for a right closed answer; for open questions exact match 1.0, else token F1 as partial credit."""
    out = []
    for i, c in enumerate(completions):
        g = grade(completion_text(c), str(_column(answer, i)), str(_column(qtype, i)), _column(options, i))
        out.append(g.correct if _column(qtype, i) != "open" else max(g.correct, g.f1))
    return out


def gated(accuracy: Callable[..., list[float]], fmt: Callable[..., list[float]], name: str) -> Callable[..., list[float]]:
    """Accuracy that only counts when the format reward is 1 (Med-R1 style gating)."""

    def reward(completions: list[Any], **columns: Any) -> list[float]:
        acc = accuracy(completions, **columns)
        ok = fmt(completions, **columns)
        return [a if f >= 1.0 else 0.0 for a, f in zip(acc, ok)]

    reward.__name__ = name
    return reward


REWARDS: dict[str, Callable[..., list[float]]] = {
    "accuracy": accuracy_reward,
    "think_format": think_format_reward,
    "answer_format": answer_format_reward,
    "accuracy_if_think_format": gated(accuracy_reward, think_format_reward, "accuracy_if_think_format"),
    "accuracy_if_answer_format": gated(accuracy_reward, answer_format_reward, "accuracy_if_answer_format"),
}


def reward_functions(names: Sequence[str]) -> list[Callable[..., list[float]]]:
    """Look up reward functions by name; unknown names are an error listing the known ones."""
    unknown = [n for n in names if n not in REWARDS]
    if unknown:
        raise ValueError(f"unknown reward(s) {unknown}; known: {sorted(REWARDS)}")
    return [REWARDS[n] for n in names]
