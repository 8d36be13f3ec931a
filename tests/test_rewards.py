"""The reward table: hand-written completions for every reward, right, wrong, malformed and adversarial."""

from __future__ import annotations

import pytest

from medllava.grading import extract_answer, grade, parse_choice, parse_number, parse_yes_no, token_f1, token_recall
from medllava.rewards import REWARDS, accuracy_reward, answer_format_reward, reward_functions, think_format_reward

OPTS = ["X-ray", "CT", "MRI", "Ultrasound"]

# (completion, gold letter, expected reward)
MULTIPLE_CHOICE = [
    ("B", "B", 1.0),
    ("(B)", "B", 1.0),
    ("B.", "B", 1.0),
    ("B)", "B", 1.0),
    ("B. CT", "B", 1.0),
    ("B: CT", "B", 1.0),
    ("CT", "B", 1.0),
    ("ct", "B", 1.0),
    ("b", "B", 1.0),
    ("The answer is B.", "B", 1.0),
    ("Answer: (B) CT", "B", 1.0),
    ("<think>It looks like a CT slice.</think><answer>B</answer>", "B", 1.0),
    ("<answer>A</answer> ... actually <answer>B</answer>", "B", 1.0),  # the last answer block counts
    ("I think it is B.", "B", 1.0),
    ("Option B", "B", 1.0),
    ("A", "B", 0.0),
    ("C. MRI", "B", 0.0),
    ("A or B", "B", 0.0),  # two letters
    ("A. X-ray B. CT", "B", 0.0),  # lists two options
    ("(A) (B)", "B", 0.0),
    ("A. CT", "B", 0.0),  # letter contradicted by another option's text
    ("B. MRI", "B", 0.0),
    ("A lesion is visible", "A", 0.0),  # the article "A" is not a choice
    ("E", "B", 0.0),  # not an option letter
    ("Computed tomography", "B", 0.0),  # not the exact option text
    ("", "B", 0.0),
    ("<answer></answer>", "B", 0.0),
    ("<think>B</think>", "B", 0.0),  # reasoning only, no answer
]


@pytest.mark.parametrize(("completion", "gold", "expected"), MULTIPLE_CHOICE)
def test_multiple_choice_accuracy(completion: str, gold: str, expected: float) -> None:
    got = accuracy_reward([completion], answer=[gold], qtype=["multiple_choice"], options=[OPTS])
    assert got == [expected]


def test_gold_may_be_the_option_text() -> None:
    assert accuracy_reward(["B"], answer=["CT"], qtype=["multiple_choice"], options=[OPTS]) == [1.0]
    assert accuracy_reward(["C"], answer=["CT"], qtype=["multiple_choice"], options=[OPTS]) == [0.0]


YES_NO = [
    ("yes", "yes", 1.0),
    ("Yes.", "yes", 1.0),
    ("YES", "yes", 1.0),
    ("Yes, there is a lesion in the left lung.", "yes", 1.0),
    ("No.", "no", 1.0),
    ("There is no lesion.", "no", 1.0),
    ("<answer>no</answer>", "no", 1.0),
    ("<think>the left lung has a nodule, so yes</think><answer>yes</answer>", "yes", 1.0),
    ("The answer is yes", "yes", 1.0),
    ("no", "yes", 0.0),
    ("yes", "no", 0.0),
    ("not yes", "yes", 0.0),  # negated
    ("It is not no.", "no", 0.0),
    ("yes and no", "yes", 0.0),  # both
    ("Yes. No.", "no", 0.0),
    ("The scan is abnormal.", "no", 0.0),  # "no" inside "abnormal" does not count
    ("Nothing remarkable", "no", 0.0),
    ("yesterday", "yes", 0.0),
    ("", "yes", 0.0),
    ("maybe", "no", 0.0),
]


@pytest.mark.parametrize(("completion", "gold", "expected"), YES_NO)
def test_yes_no_accuracy(completion: str, gold: str, expected: float) -> None:
    assert accuracy_reward([completion], answer=[gold], qtype=["yes_no"]) == [expected]


NUMBERS = [
    ("3", "3", 1.0),
    ("There are 3 lesions.", "3", 1.0),
    ("three", "3", 1.0),
    ("3.0", "3", 1.0),
    ("1,200", "1200", 1.0),
    ("<answer>12.5</answer>", "12.5", 1.0),
    ("2", "3", 0.0),
    ("about 30", "3", 0.0),
    ("none", "3", 0.0),
    ("", "0", 0.0),
]


@pytest.mark.parametrize(("completion", "gold", "expected"), NUMBERS)
def test_number_accuracy(completion: str, gold: str, expected: float) -> None:
    assert accuracy_reward([completion], answer=[gold], qtype=["number"]) == [expected]


OPEN = [
    ("pleural effusion", "pleural effusion", 1.0),
    ("Pleural effusion.", "pleural effusion", 1.0),
    ("<answer>the pleural effusion</answer>", "pleural effusion", 1.0),  # articles ignored
    ("left pleural effusion", "pleural effusion", 0.8),  # F1 partial credit
    ("effusion", "pleural effusion", 2 / 3),
    ("pneumothorax", "pleural effusion", 0.0),
    ("", "pleural effusion", 0.0),
]


@pytest.mark.parametrize(("completion", "gold", "expected"), OPEN)
def test_open_accuracy_is_exact_or_f1(completion: str, gold: str, expected: float) -> None:
    assert accuracy_reward([completion], answer=[gold], qtype=["open"]) == [pytest.approx(expected)]


THINK_FORMAT = [
    ("<think>reasoning</think><answer>B</answer>", 1.0),
    ("<think>a\nb</think>\n<answer>yes</answer>\n", 1.0),
    ("  <think>r</think> <answer>x</answer>", 1.0),
    ("<answer>B</answer>", 0.0),  # no think block
    ("<think>reasoning</think>B", 0.0),  # answer outside the tags
    ("<think></think><answer>B</answer>", 0.0),  # empty think
    ("<think>r</think><answer></answer>", 0.0),  # empty answer
    ("<answer>B</answer><think>r</think>", 0.0),  # wrong order
    ("<think>r</think><answer>B</answer> extra text", 0.0),  # trailing text
    ("prefix <think>r</think><answer>B</answer>", 0.0),
    ("<think>r</think><answer>A</answer><answer>B</answer>", 0.0),  # two answers
    ("<think>r<think>r</think><answer>B</answer>", 0.0),  # nested tag
    ("<think>r</think><answer>B", 0.0),  # unclosed
    ("", 0.0),
]


@pytest.mark.parametrize(("completion", "expected"), THINK_FORMAT)
def test_think_format(completion: str, expected: float) -> None:
    assert think_format_reward([completion]) == [expected]


ANSWER_FORMAT = [
    ("<answer>B</answer>", 1.0),
    (" <answer> yes </answer>\n", 1.0),
    ("<think>r</think><answer>B</answer>", 0.0),
    ("B", 0.0),
    ("<answer></answer>", 0.0),
    ("<answer>B</answer> because", 0.0),
    ("<answer>A</answer><answer>B</answer>", 0.0),
]


@pytest.mark.parametrize(("completion", "expected"), ANSWER_FORMAT)
def test_answer_format(completion: str, expected: float) -> None:
    assert answer_format_reward([completion]) == [expected]


def test_gated_accuracy_needs_the_format() -> None:
    gated = REWARDS["accuracy_if_think_format"]
    cols = {"answer": ["B", "B", "B"], "qtype": ["multiple_choice"] * 3, "options": [OPTS] * 3}
    completions = ["<think>r</think><answer>B</answer>", "B", "<think>r</think><answer>A</answer>"]
    assert gated(completions, **cols) == [1.0, 0.0, 0.0]
    assert REWARDS["accuracy_if_answer_format"](["<answer>B</answer>", "B"], **{k: v[:2] for k, v in cols.items()}) == [1.0, 0.0]


def test_conversational_completions_are_read() -> None:
    completions = [[{"role": "assistant", "content": "<answer>yes</answer>"}],
                   [{"role": "assistant", "content": [{"type": "text", "text": "no"}]}]]
    assert accuracy_reward(completions, answer=["yes", "yes"], qtype=["yes_no", "yes_no"]) == [1.0, 0.0]
    assert answer_format_reward(completions) == [1.0, 0.0]


def test_batch_with_mixed_types_and_missing_options() -> None:
    got = accuracy_reward(["B", "yes", "2"], answer=["B", "no", "2"], qtype=["multiple_choice", "yes_no", "number"],
                          options=[OPTS, None, None])
    assert got == [1.0, 0.0, 1.0]


def test_extraction_fallbacks() -> None:
    assert extract_answer("<think>long</think><answer> B </answer>") == "B"
    assert extract_answer("<think>x</think> So the final answer is C.") == "C."
    assert extract_answer("Answer: yes\nbecause ...") == "yes"
    assert extract_answer("<answer>unclosed yes") == "unclosed yes"
    assert extract_answer("<think>only thinking</think>") == ""
    assert extract_answer("plain text") == "plain text"


def test_parsers_directly() -> None:
    assert parse_choice("B. CT", OPTS) == "B"
    assert parse_choice("A. CT", OPTS) is None
    assert parse_yes_no("abnormal") is None
    assert parse_number("seven lesions") == 7.0
    assert token_f1("x y z", "x y") == pytest.approx(0.8)
    assert token_f1("a lesion", "the lesion") == 1.0  # articles are ignored
    assert token_recall("left pleural effusion seen", "pleural effusion") == 1.0


def test_grade_reports_what_it_read() -> None:
    g = grade("<think>r</think><answer>(C) MRI</answer>", "C", "multiple_choice", OPTS)
    assert (g.correct, g.extracted, g.parsed) == (1.0, "(C) MRI", "C")


def test_reward_lookup() -> None:
    assert reward_functions(["accuracy", "think_format"]) == [accuracy_reward, think_format_reward]
    with pytest.raises(ValueError, match="unknown reward"):
        reward_functions(["accuracy", "fluency"])
