"""Verifiable rewards for medical VQA (TRL's signature `(completions, **dataset_columns) -> list[float]`).

Accuracy is graded by `medllava.grading` -- the rules shared with `medllava eval` and the pass-rate filter, written
out in that module's docstring. Format rewards check the `<think>`/`<answer>` layout exactly.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from medllava.grading import grade

_THINK_FORMAT = re.compile(r"\s*<think>(?P<think>(?:(?!<think>|</think>).)+)</think>\s*<answer>(?P<answer>(?:(?!<answer>|</answer>).)+)</answer>\s*", re.DOTALL)
_ANSWER_FORMAT = re.compile(r"\s*<answer>(?P<answer>(?:(?!<answer>|</answer>|<think>).)+)</answer>\s*", re.DOTALL)


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
