"""The graded-case table: clinical phrasing as a careful clinician would grade it, for every question type.

Each row is (question type, completion, gold answer, options, expected score). The rules these cases follow are
written out once, in `medllava.grading`'s docstring; the GRPO reward, `medllava eval` and the pass-rate filter all
grade through `medllava.grading.grade`, so this table specifies all three.
"""

from __future__ import annotations

import pytest

from medllava.grading import grade, parse_number, parse_yes_no
from medllava.rewards import accuracy_reward

MODALITY = ["X-ray", "MRI", "CT", "Ultrasound"]
PLANES = ["Axial", "Coronal", "Sagittal"]
ORGANS = ["Liver", "Spleen", "Left kidney", "Kidney"]
DISSECTION = ["Type A dissection", "Type B dissection", "No dissection"]
COUNTS = ["1", "2", "3"]
SIDES = ["Left", "Right", "Both"]

YN, NUM, MC, OPEN = "yes_no", "number", "multiple_choice", "open"

CASES: list[tuple[str, str, str, list[str] | None, float]] = [
    # --- yes/no: the answer clause first ---------------------------------------------------------------------
    (YN, "Yes, there is no evidence of pleural effusion.", "yes", None, 1.0),  # issue 14: leading "Yes," decides
    (YN, "No, the heart size is normal.", "no", None, 1.0),
    (YN, "No pleural effusion.", "no", None, 1.0),
    (YN, "No evidence of pneumothorax.", "no", None, 1.0),
    (YN, "Yes. The lesion is in the right upper lobe.", "yes", None, 1.0),
    (YN, "Yes, although the margins are not well seen.", "yes", None, 1.0),
    (YN, "No, but a small effusion cannot be excluded.", "no", None, 1.0),
    (YN, "Yes there is consolidation in the left base", "yes", None, 1.0),
    (YN, "Yes. No.", "yes", None, 0.0),  # two answer clauses that disagree
    (YN, "yes and no", "yes", None, 0.0),
    (YN, "Yes or no, hard to tell.", "no", None, 0.0),
    # --- yes/no: negation scoped to its clause ---------------------------------------------------------------
    (YN, "I cannot say yes.", "yes", None, 0.0),  # issue 14: graded yes before
    (YN, "It is not no.", "no", None, 0.0),
    (YN, "I think yes.", "yes", None, 1.0),
    (YN, "Probably yes.", "yes", None, 1.0),  # an explicit yes counts even when hedged
    (YN, "There is no lesion.", "no", None, 1.0),
    (YN, "Without doubt, yes.", "yes", None, 1.0),  # "without" is in another clause
    # --- yes/no: statements ----------------------------------------------------------------------------------
    (YN, "There is a right-sided pneumothorax.", "yes", None, 1.0),
    (YN, "Pneumothorax is present.", "yes", None, 1.0),
    (YN, "A mass is seen in the liver.", "yes", None, 1.0),
    (YN, "Findings are consistent with pneumonia.", "yes", None, 1.0),
    (YN, "Cardiomegaly is likely.", "yes", None, 1.0),
    (YN, "Pneumothorax is not present.", "no", None, 1.0),
    (YN, "The pleural effusion is absent.", "no", None, 1.0),
    (YN, "Lungs are clear without effusion.", "no", None, 1.0),
    (YN, "Negative for fracture.", "no", None, 1.0),
    (YN, "Malignancy is unlikely.", "no", None, 1.0),
    (YN, "The mass isn't visible.", "no", None, 1.0),
    (YN, "There is a nodule, without calcification.", "yes", None, 1.0),  # the first clause answers
    (YN, "Pneumothorax is present.", "no", None, 0.0),
    (YN, "The pleural effusion is absent.", "yes", None, 0.0),
    # --- yes/no: hedges that do not commit -------------------------------------------------------------------
    (YN, "A small effusion cannot be excluded.", "yes", None, 0.0),
    (YN, "A small effusion cannot be excluded.", "no", None, 0.0),
    (YN, "Possibly a fracture.", "yes", None, 0.0),
    (YN, "There may be a small nodule.", "yes", None, 0.0),
    (YN, "The finding is indeterminate.", "no", None, 0.0),
    (YN, "I do not know.", "no", None, 0.0),  # "not" here is no finding's absence
    (YN, "Cannot determine from this image.", "no", None, 0.0),
    (YN, "The scan is abnormal.", "no", None, 0.0),  # "no" inside a word
    (YN, "Nothing to add.", "no", None, 0.0),
    (YN, "<think>The left costophrenic angle is blunted.</think><answer>Yes</answer>", "yes", None, 1.0),
    # --- yes/no: a pertinent negative after the answer is another finding, not the answer (issue 25) ---------
    (YN, "A right-sided pneumothorax is present; no mediastinal shift.", "yes", None, 1.0),
    (YN, "Yes, there is a fracture. No other abnormality is seen.", "yes", None, 1.0),
    (YN, "There is consolidation, with no effusion.", "yes", None, 1.0),
    (YN, "No fracture; there is soft tissue swelling.", "no", None, 1.0),
    (YN, "No, there is no fracture. Yes, the alignment is normal.", "no", None, 0.0),  # two answer words disagree
    (YN, "No it is not.", "no", None, 1.0),  # "no" answering, not "no <finding>"
    (YN, "No there isn't.", "no", None, 1.0),
    # a list of absent findings is one negation, not an even count of them
    (YN, "There is no effusion and no pneumothorax.", "no", None, 1.0),
    (YN, "No effusion and no pneumothorax.", "no", None, 1.0),
    (YN, "No effusion, no pneumothorax and no fracture.", "no", None, 1.0),
    (YN, "There is no effusion or pneumothorax.", "no", None, 1.0),
    (YN, "Neither effusion nor pneumothorax is seen.", "no", None, 1.0),
    (YN, "It is not true that there is no effusion.", "yes", None, 1.0),  # two cues of two kinds still cancel
    # --- numbers: the count, not measurements, sequences, dates or units -------------------------------------
    (NUM, "There are two lesions measuring 5 mm each.", "2", None, 1.0),  # issue 14: read 5 before
    (NUM, "On the T2 image there are 3 nodules.", "3", None, 1.0),  # issue 14: read 2 before
    (NUM, "Three nodules, the largest 2 cm.", "3", None, 1.0),
    (NUM, "A 3 x 4 cm mass and two satellite nodules.", "2", None, 1.0),
    (NUM, "Disc herniations at L4-L5 and L5-S1: 2 levels.", "2", None, 1.0),
    (NUM, "Fractures of the C5 and C6 vertebrae, 2 in total.", "2", None, 1.0),
    (NUM, "Compared with the study of 2021-03-04, there are 4 metastases.", "4", None, 1.0),
    (NUM, "Since March 3 there are now six lesions.", "6", None, 1.0),
    (NUM, "In 2019 the patient had 2 stents placed.", "2", None, 1.0),
    (NUM, "The 65-year-old has three fractured ribs.", "3", None, 1.0),
    (NUM, "1.5 T scanner; 4 lesions are seen.", "4", None, 1.0),
    (NUM, "A solitary nodule.", "1", None, 1.0),
    (NUM, "Twenty-one lymph nodes were examined.", "21", None, 1.0),
    (NUM, "There are no nodules.", "0", None, 1.0),
    (NUM, "none", "0", None, 1.0),
    (NUM, "5 mm", "5", None, 1.0),  # a measurement is read when nothing else is there
    (NUM, "The lesion measures 12.5 mm.", "12.5", None, 1.0),
    (NUM, "two", "2", None, 1.0),
    (NUM, "2-3 lesions", "2", None, 0.0),  # a range is not a count
    (NUM, "two to three nodules", "3", None, 0.0),
    (NUM, "The 3rd rib is fractured.", "3", None, 0.0),  # an ordinal names, it does not count
    (NUM, "There are two lesions measuring 5 mm each.", "5", None, 0.0),
    (NUM, "about 30", "3", None, 0.0),
    # --- multiple choice -------------------------------------------------------------------------------------
    (MC, "B is correct.", "B", MODALITY, 1.0),  # issue 14
    (MC, "(B) MRI, not A.", "B", MODALITY, 1.0),  # issue 14
    (MC, "It is B", "B", MODALITY, 1.0),
    (MC, "option b", "B", MODALITY, 1.0),
    (MC, "The answer is option C.", "C", MODALITY, 1.0),
    (MC, "This is an MRI scan.", "B", MODALITY, 1.0),  # the option's text
    (MC, "MRI rather than CT.", "B", MODALITY, 1.0),
    (MC, "CT is incorrect; the image is an MRI.", "B", MODALITY, 1.0),
    (MC, "I would choose (C).", "C", MODALITY, 1.0),
    (MC, "A lesion is visible on the CT.", "C", MODALITY, 1.0),  # "A" is the article here
    (MC, "Left kidney", "C", ORGANS, 1.0),  # the longer option wins over "Kidney"
    (MC, "The lesion is in the kidney.", "D", ORGANS, 1.0),
    (MC, "Type B dissection", "B", DISSECTION, 1.0),  # the letter inside the option text is not a second choice
    (MC, "B. Type B dissection", "B", DISSECTION, 1.0),
    (MC, "Sagittal plane", "C", PLANES, 1.0),
    (MC, "Two lesions.", "B", COUNTS, 1.0),  # numeric options read by value
    (MC, "There are 3 lesions, the largest 2 cm.", "C", COUNTS, 1.0),  # the count, not the measurement
    (MC, "B", "B", COUNTS, 1.0),
    (MC, "Two lesions.", "C", COUNTS, 0.0),
    # numeric options answered bare (issue 25: never read before)
    (MC, "2", "B", COUNTS, 1.0),
    (MC, "<answer>2</answer>", "B", COUNTS, 1.0),
    (MC, "The answer is 2", "B", COUNTS, 1.0),
    (MC, "Answer: 3", "C", COUNTS, 1.0),
    (MC, "I count 2.", "B", COUNTS, 1.0),
    (MC, "4", "B", COUNTS, 0.0),  # no such option
    (MC, "B. 2", "B", COUNTS, 1.0),
    (MC, "A. 2", "B", COUNTS, 0.0),  # label and value disagree
    (MC, "A. 2", "A", COUNTS, 0.0),
    # a labelled letter must be followed by its own option's text (issue 25: "A. MRI" to a left/right question)
    (MC, "A. MRI", "A", SIDES, 0.0),
    (MC, "C. Left", "C", SIDES, 0.0),  # C is Both
    (MC, "C. Left", "A", SIDES, 0.0),
    (MC, "C. Both", "C", SIDES, 1.0),
    (MC, "(A) Left", "A", SIDES, 1.0),
    (MC, "B) the right side", "B", SIDES, 1.0),
    (MC, "B. The image is an MRI.", "B", MODALITY, 1.0),
    (MC, "A or B", "B", MODALITY, 0.0),  # two options
    (MC, "Either CT or MRI.", "B", MODALITY, 0.0),
    (MC, "A. MRI", "B", MODALITY, 0.0),  # letter contradicted by another option's text
    (MC, "Not B.", "B", MODALITY, 0.0),
    (MC, "B is incorrect.", "B", MODALITY, 0.0),
    (MC, "E", "B", MODALITY, 0.0),  # not an option letter
    (MC, "Magnetic resonance", "B", MODALITY, 0.0),  # not an option's text
    # --- open ------------------------------------------------------------------------------------------------
    (OPEN, "Pleural effusion.", "pleural effusion", None, 1.0),
    (OPEN, "The pleural effusion", "pleural effusion", None, 1.0),
    (OPEN, "Left pleural effusion", "pleural effusion", None, 0.8),
    (OPEN, "Pneumothorax", "pleural effusion", None, 0.0),
]


@pytest.mark.parametrize(("qtype", "completion", "gold", "options", "expected"), CASES)
def test_graded_case(qtype: str, completion: str, gold: str, options: list[str] | None, expected: float) -> None:
    got = accuracy_reward([completion], answer=[gold], qtype=[qtype], options=[options])
    assert got == [pytest.approx(expected)], grade(completion, gold, qtype, options)


def test_the_table_is_large_and_spans_every_question_type() -> None:
    assert len(CASES) >= 80
    assert {c[0] for c in CASES} == {YN, NUM, MC, OPEN}


def test_eval_and_reward_read_alike() -> None:
    """The reward and evaluation share one grader: the same completion scores the same in both."""
    for qtype, completion, gold, options, _ in CASES:
        if qtype != OPEN:
            assert grade(completion, gold, qtype, options).correct == \
                accuracy_reward([completion], answer=[gold], qtype=[qtype], options=[options])[0]


def test_parsers_say_what_they_read() -> None:
    assert parse_yes_no("Yes, there is no evidence of pleural effusion.") == "yes"
    assert parse_yes_no("I cannot say yes.") is None
    assert parse_number("On the T2 image there are 3 nodules.") == 3.0
    assert parse_number("There are two lesions measuring 5 mm each.") == 2.0
