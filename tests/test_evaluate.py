"""The VQA scorer on hand-written predictions: word boundaries, open-question metrics, breakdowns."""

from __future__ import annotations

import pytest

from medllava.data.vqa import parse_vqa
from medllava.evaluate import chance_level, markdown_table, score, summary_table


def _row(qtype: str, answer: str, prediction: str, **extra) -> dict:
    return {"qtype": qtype, "answer": answer, "prediction": prediction, **extra}


def test_closed_questions_use_word_boundaries_not_substrings() -> None:
    rows = [
        _row("yes_no", "no", "The lung fields are abnormal."),  # LLaVA-Med's substring scorer counted this right
        _row("yes_no", "no", "No."),
        _row("yes_no", "yes", "Yes, there is a nodule."),
        _row("yes_no", "yes", "not yes"),
        _row("yes_no", "no", "I do not know"),  # "not" and "no" are different words
    ]
    m = score(rows)
    assert m["n_closed"] == 5 and m["accuracy"] == pytest.approx(2 / 5)
    assert m["by_qtype"]["yes_no"]["unparsed"] == 3


def test_multiple_choice_and_numbers() -> None:
    opts = ["CT", "MRI", "X-ray"]
    rows = [
        _row("multiple_choice", "B", "B", options=opts),
        _row("multiple_choice", "B", "MRI", options=opts),
        _row("multiple_choice", "B", "A or B", options=opts),
        _row("multiple_choice", "MRI", "(B) MRI", options=opts),
        _row("number", "3", "There are three lesions."),
        _row("number", "3", "2"),
    ]
    m = score(rows)
    assert m["by_qtype"]["multiple_choice"] == {"n": 4, "accuracy": 0.75, "unparsed": 1}
    assert m["by_qtype"]["number"]["accuracy"] == 0.5
    assert m["accuracy"] == pytest.approx(4 / 6, abs=1e-4)  # metrics are rounded to 4 places


def test_open_questions_recall_exact_and_f1() -> None:
    rows = [
        _row("open", "pleural effusion", "pleural effusion"),
        _row("open", "pleural effusion", "There is a large left pleural effusion."),
        _row("open", "right upper lobe", "upper lobe"),
        _row("open", "pneumothorax", "no acute findings"),
    ]
    m = score(rows)
    entry = m["by_qtype"]["open"]
    assert entry["exact_match"] == 0.25
    assert entry["recall"] == pytest.approx((1 + 1 + 2 / 3 + 0) / 4, abs=1e-4)
    f1_second = 2 * (2 / 6) * 1 / (2 / 6 + 1)  # "there is large left pleural effusion" vs "pleural effusion"
    assert entry["f1"] == pytest.approx((1 + f1_second + 0.8 + 0) / 4, abs=1e-4)
    assert m["n_closed"] == 0 and m["accuracy"] == 0.0


def test_breakdowns_by_modality_topic_and_organ() -> None:
    rows = [
        _row("yes_no", "yes", "yes", modality="CT", organ="Lung"),
        _row("yes_no", "no", "yes", modality="CT", organ="Liver"),
        _row("yes_no", "no", "no", modality="MRI", organ="Brain", topic="presence"),
    ]
    m = score(rows)
    assert m["by_modality"] == {"CT": {"n": 2, "accuracy": 0.5}, "MRI": {"n": 1, "accuracy": 1.0}}
    assert set(m["by_organ"]) == {"Lung", "Liver", "Brain"} and m["by_topic"]["presence"]["n"] == 1
    m["chance"] = 0.5
    table = markdown_table(m, "demo")
    assert "| modality: CT | 2 | 0.500 |" in table and "chance level (closed): 0.500" in table


def test_chance_level() -> None:
    assert chance_level(parse_vqa({"image": "x", "question": "q", "answer": "yes"})) == 0.5
    assert chance_level(parse_vqa({"image": "x", "question": "q", "options": ["a", "b", "c", "d"], "answer": "A"})) == 0.25
    assert chance_level(parse_vqa({"image": "x", "question": "q", "answer": "effusion"})) == 0.0


def test_summary_table() -> None:
    text = summary_table({"instruct": {"accuracy": 0.7, "chance": 0.4, "blind_accuracy": 0.35, "blind_gap": 0.35,
                                       "by_topic": {"side": 0.5}}}, seconds=90)
    assert "instruct" in text and "+0.350" in text and "side 0.50" in text and "1.5 min" in text
