"""How an answer is read and graded: the one set of rules behind the GRPO rewards, `medllava eval` and the filter.

Extraction: the last `<answer>...</answer>` block; else an unclosed `<answer>` to the end; else a stated answer
("the answer is X", "Answer: X", first line of it); else the whole text with any `<think>` block removed.

Clauses: the extracted text is cut at sentence and clause marks (`. ; : ! ? ,` followed by a space or the end, new
lines) and at "but", "however", "although", "though", "whereas". Negation is scoped to its clause.

yes_no (first rule that applies decides). "no" is an answer word when it stands alone or is followed by a word
that continues an answer ("No.", "No, ...", "No it is not", "No there isn't"); followed by a finding ("no
mediastinal shift", "no evidence of ...") it is that finding's negation, read under rule 4, never an answer word.
1. Answer clauses: clauses whose first word is the answer word "yes" or "no" ("Yes, there is no evidence of
   effusion." is yes). If they disagree ("Yes. No.") or one reads "yes and/or no", the answer is unread. A pertinent
   negative after the answer is another finding ("Yes, there is a fracture. No other abnormality is seen." is yes).
2. Otherwise every answer word "yes"/"no": one negated by a cue earlier in its clause ("I cannot say yes", "not
   no") leaves the answer unread; both present is unread; else that word ("I think yes"). An explicit yes/no
   counts even when hedged ("probably yes").
3. Otherwise a statement: a clause that refuses to commit ("cannot be excluded", "cannot be ruled out", "possible",
   "possibly", "may", "might", "uncertain", "unclear", "indeterminate", "equivocal", "questionable", "not sure")
   makes the answer unread -- a hedge that does not commit earns nothing. Hedges of degree keep the direction
   ("likely present" is yes, "unlikely" is no).
4. The first clause with a negation cue ("not", "n't", "cannot", "never", "without", "absent", "no <finding>",
   "negative for", "free of", "ruled out", "excluded", "none", "unlikely", "incorrect", "false"; the "no" of
   a list of absent findings, "no effusion and no pneumothorax", "neither ... nor ...", counts once) or a presence cue
   ("there is/are", "present", "seen", "visible", "noted", "identified", "evidence of", "positive for", "shows",
   "demonstrates", "consistent with", "suggestive of", "likely", "probable", "has", "correct", "true") decides:
   an odd number of negation cues is no, otherwise yes ("No pleural effusion." is no; "A right-sided pneumothorax
   is present; no mediastinal shift." is yes: the first clause answers). Statements are read as answers to "is the
   finding there?", the way VQA-RAD, SLAKE and PathVQA phrase closed questions; anything else is unread.

number (counts and values):
- Candidates in order of appearance: digits ("3", "1,200", "12.5") and number words ("zero" ... "twenty", tens,
  "twenty-one", "single"/"solitary" = 1).
- Never a count: sequence and level names glued to letters ("T2", "C5", "L4-L5", "3rd", "2D"), dates
  ("2021-03-04", "3/4/2021", "March 3", "in 2019"), clock times ("10:30").
- Measurements: a number followed by a unit (mm, cm, ml, mg, %, HU, years, weeks, "year-old", T, ...) or part of a
  dimension ("3 x 4 cm"). A plain number is preferred to a measurement ("two lesions measuring 5 mm" is 2); a
  measurement is read only when no plain number is there ("5 mm" is 5).
- A range of plain numbers ("2-3", "two to three") leaves the answer unread; with no number at all, "none" or
  "no <word>" reads 0.

multiple_choice:
- Option texts are found first, longest first, as whole words ("The modality is CT", "(B) MRI"); a found text is
  removed before letters are read, so a letter inside an option's text ("Hepatitis B") is not a choice.
- Letters: a single capital letter standing alone ("B", "(B)", "B.", "B is correct", "It is B"), a lower-case one
  only as the whole answer, in parentheses, or after "option"/"choice"/"answer"/"letter". "A" and "I" followed by
  a lower-case word are the article and the pronoun, not choices ("A lesion is visible"; "I think it is B").
  Letters outside the options are ignored.
- Rejected options do not count: a letter or option text right after "not", "n't", "rather than", "instead of",
  "other than", "except", "excluding", "unlike", or followed by "is incorrect/wrong/unlikely/excluded/false".
- Options that are all plain numbers ("1", "2", "3") are read by letter, else by value under the count rules
  above: "2", "<answer>2</answer>", "The answer is 2", "I count 2." and "Two lesions." pick the option "2"; "3
  lesions, the largest 2 cm" picks "3".
- A labelled letter at the start ("A. ...", "(A) ...", "A) ...", "A: ...") must be followed by its own option's
  text (or value): "A. MRI" to a left/right question, "C. Left" where C is Both and "A. 2" where A is 1 are
  incoherent and unread, in eval and in the reward alike.
- The answer is the one option left; two different options (letters, texts, or a letter contradicted by another
  option's text as in "A. CT" where CT is B) leave the answer unread.

open: normalised exact match (lower case, no punctuation or articles); token F1 as partial credit; recall of gold
tokens (LLaVA-Med's open-question metric).

An unread answer scores 0. The table of graded cases in tests/test_grading.py is the specification by example.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

LETTERS = string.ascii_uppercase

_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_OPEN_ANSWER = re.compile(r"<answer>((?:(?!</answer>).)*)$", re.DOTALL | re.IGNORECASE)
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_STATED = re.compile(r"(?:final answer|the answer|answer)\s*(?:is|:)\s*(.+)", re.IGNORECASE)
_ARTICLES = re.compile(r"\b(a|an|the)\b")

_CLAUSE_BREAK = re.compile(r"[.;:!?,](?=\s|$)|\n|\b(?:but|however|although|though|whereas)\b", re.IGNORECASE)
_ANSWERING = (r"(?:it|it's|its|there|this|that|these|those|they|i|we|he|she|you|the|is|are|was|were|definitely"
              r"|certainly|not|sir)")
# "no" as an answer word ("No.", "No, ...", "No it is not"), not the determiner of a finding ("no mediastinal shift")
_NO_WORD = rf"no(?!\s+(?!{_ANSWERING}\b)[a-z])"
_POLAR = re.compile(rf"\b(yes|{_NO_WORD})\b", re.IGNORECASE)
_LEADING = re.compile(rf"^\W*(yes|{_NO_WORD})\b", re.IGNORECASE)
_BOTH = re.compile(r"^\W*(?:yes|no)\W*(?:and|or|/)\W*(?:yes|no)\b", re.IGNORECASE)
# "no <finding>" / "neither": the determiner of an absent finding; a list of them ("no effusion and no
# pneumothorax", "neither effusion nor pneumothorax") is one negation, however many findings it names
_NO_FINDING = re.compile(rf"\bno\s+(?!{_ANSWERING}\b)(?=[a-z])|\bneither\b", re.IGNORECASE)
_NEGATION_WORD = re.compile(
    r"\bnot\b|n't\b|\bcannot\b|\bnever\b|\bwithout\b|\babsent\b|\bnegative for\b|\bfree of\b"
    r"|\bruled out\b|\bexcluded\b|\bnone\b|\bunlikely\b|\bincorrect\b|\bfalse\b", re.IGNORECASE)
_NEGATION = re.compile(f"{_NEGATION_WORD.pattern}|{_NO_FINDING.pattern}", re.IGNORECASE)
_UNCOMMITTED = re.compile(
    r"\b(?:cannot|can't|can not|not) (?:be )?(?:excluded|ruled out)\b|\bpossibl[ey]\b|\bmay\b|\bmight\b"
    r"|\buncertain\b|\bunclear\b|\bindeterminate\b|\bequivocal\b|\bquestionable\b|\bnot sure\b|\bunsure\b"
    r"|\b(?:do not|don't|cannot|can't|can not) (?:know|tell|say|determine|assess)\b|\bunknown\b",
    re.IGNORECASE)
_PRESENCE = re.compile(
    r"\bthere (?:is|are|was|were)\b|\bpresent\b|\bseen\b|\bvisible\b|\bnoted\b|\bidentified\b|\bevidence of\b"
    r"|\bpositive for\b|\bshows?\b|\bdemonstrates?\b|\bconsistent with\b|\bsuggestive of\b|\blikely\b"
    r"|\bprobabl[ey]\b|\bhas\b|\bhave\b|\bcorrect\b|\btrue\b", re.IGNORECASE)

_UNITS = (
    r"mm|cm|km|m|µm|um|nm|ml|mL|cc|l|L|liters?|litres?|g|kg|mg|mcg|µg|ug|lbs?|%|percent|hu|HU|mmhg|mmHg|bpm|gy|Gy"
    r"|mgy|mGy|sv|msv|mSv|t|T|tesla|mmol|mol|s|sec|secs|seconds?|min|mins|minutes?|h|hr|hrs|hours?|days?|d|weeks?"
    r"|wks?|months?|mo|years?|yrs?|y|yo|year-old|years-old|degrees?|°|°C|°F|inch(?:es)?|in|ft|feet|millimet(?:er|re)s?"
    r"|centimet(?:er|re)s?|met(?:er|re)s?|grams?|kilograms?|milligrams?|milliliters?|millilitres?|pixels?|px|slices?")
_UNIT_AFTER = re.compile(rf"^[\s-]?(?:{_UNITS})(?![\w])", re.IGNORECASE)
_DIMENSION_AFTER = re.compile(r"^\s*[x×*]\s*\d")
_DIMENSION_BEFORE = re.compile(r"\d\s*[x×*]\s*$")
_RANGE_AFTER = re.compile(r"^\s*(?:-|–|to)\s*(?:\d|zero|one|two|three|four|five|six|seven|eight|nine|ten)\b",
                          re.IGNORECASE)
_RANGE_BEFORE = re.compile(r"(?:\d|\b(?:zero|one|two|three|four|five|six|seven|eight|nine|ten))\s*(?:-|–|\bto)\s*$",
                           re.IGNORECASE)
_MONTH = (r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|sep(?:t(?:ember)?)?"
          r"|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)")
_DATES = re.compile(
    r"\b\d{4}-\d{1,2}-\d{1,2}\b|\b\d{1,2}[/.]\d{1,2}[/.]\d{2,4}\b|\b\d{1,2}:\d{2}(?::\d{2})?\b"
    rf"|\b{_MONTH}\.?\s+\d{{1,2}}(?:st|nd|rd|th)?(?:,?\s+\d{{4}})?\b|\b\d{{1,2}}(?:st|nd|rd|th)?\s+{_MONTH}\b(?:\s+\d{{4}})?"
    rf"|\b{_MONTH}\s+\d{{4}}\b|\b(?:in|since|from|during|until|by|year)\s+(?:19|20)\d{{2}}\b",
    re.IGNORECASE)
_DIGITS = re.compile(r"(?<![\w.,])(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|(?<![\w.])\.\d+")
_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
_TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90}
_ONE_WORDS = {"single": 1, "solitary": 1}
_NUMBER_WORD = re.compile(
    r"\b(?:(twenty|thirty|forty|fifty|sixty|seventy|eighty|ninety)[\s-](one|two|three|four|five|six|seven|eight|nine)"
    r"|(" + "|".join(list(_WORDS) + list(_TENS)[1:] + list(_ONE_WORDS)) + r"))\b", re.IGNORECASE)
_ZERO = re.compile(r"\bnone\b|\bno\s+[a-z]", re.IGNORECASE)

_REJECT_BEFORE = re.compile(
    r"(?:\bnot|n't|\brather than|\binstead of|\bother than|\bexcept|\bexcluding|\bunlike)\s+"
    r"(?:(?:option|choice|answer)\s+)?(?:an?\s+|the\s+)?\(?$", re.IGNORECASE)
_REJECT_AFTER = re.compile(r"^\)?\s*(?:is|was|seems|appears)\s+(?:incorrect|wrong|unlikely|excluded|false)\b",
                           re.IGNORECASE)
_LETTER = re.compile(r"(?<![\w'’-])\(?([A-Za-z])\)?(?![\w'’-])")
_LABEL = re.compile(r"^\(?([A-Za-z])(?:\)|[.:])[ \t]*(.*)", re.DOTALL)
_KEYWORD_BEFORE = re.compile(r"\b(?:option|choice|answer|letter)\s*(?:is\s*|:\s*)?\(?$", re.IGNORECASE)
_VERB_AFTER_ARTICLE = re.compile(r"^\s+(?:is|was|or|and|nor|seems|appears|would|should|must)\b")


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
    """SQuAD token F1 between normalised texts."""
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


def clauses(text: str) -> list[str]:
    """The text cut into clauses (see module docstring), empty ones dropped."""
    return [c.strip() for c in _CLAUSE_BREAK.split(text) if c and c.strip(" \t\"'*()[]")]


def parse_yes_no(answer: str) -> str | None:
    """'yes' or 'no' read by the module docstring's rules; None when the answer does not commit."""
    parts = clauses(answer)
    leading = []
    for part in parts:
        first = _LEADING.match(part)
        if first:
            if _BOTH.match(part):
                return None
            leading.append(first.group(1).lower())
    if leading:
        return leading[0] if len(set(leading)) == 1 else None
    found = set()
    for part in parts:
        for m in _POLAR.finditer(part):
            if _NEGATION.search(part[: m.start()]):
                return None
            found.add(m.group(1).lower())
    if found:
        return found.pop() if len(found) == 1 else None
    if any(_UNCOMMITTED.search(part) for part in parts):
        return None
    for part in parts:
        negations = len(_NEGATION_WORD.findall(part)) + (1 if _NO_FINDING.search(part) else 0)
        if negations:
            return "no" if negations % 2 else "yes"
        if _PRESENCE.search(part):
            return "yes"
    return None


def _number_candidates(text: str) -> tuple[list[tuple[int, float]], list[tuple[int, float]], bool]:
    """(plain numbers, measurements, saw a range) with their positions, dates and glued names left out."""
    blocked = [m.span() for m in _DATES.finditer(text)]
    plain: list[tuple[int, float]] = []
    measures: list[tuple[int, float]] = []
    ranged = False
    found: list[tuple[int, int, float]] = []
    for m in _DIGITS.finditer(text):
        found.append((m.start(), m.end(), float(m.group(0).replace(",", ""))))
    for m in _NUMBER_WORD.finditer(text):
        if m.group(1):
            value = _TENS[m.group(1).lower()] + _WORDS[m.group(2).lower()]
        else:
            word = m.group(3).lower()
            value = _WORDS.get(word, _TENS.get(word, _ONE_WORDS.get(word, 0)))
        found.append((m.start(), m.end(), float(value)))
    for start, end, value in sorted(found):
        if any(s <= start < e for s, e in blocked):
            continue
        after, before = text[end:], text[:start]
        if re.match(r"^[A-Za-z]", after) and not _UNIT_AFTER.match(after):
            continue  # "3rd", "2D", "T2w": a name, not a count
        if before.endswith("-") and re.search(r"[A-Za-z]\d*-$", before):
            continue  # "L4-L5" style level ranges
        if _UNIT_AFTER.match(after) or _DIMENSION_AFTER.match(after) or _DIMENSION_BEFORE.search(before):
            measures.append((start, value))
        elif _RANGE_AFTER.match(after) or _RANGE_BEFORE.search(before):
            ranged = True
        else:
            plain.append((start, value))
    return plain, measures, ranged


def parse_number(answer: str) -> float | None:
    """The count or value an answer states (module docstring), or None."""
    plain, measures, ranged = _number_candidates(answer)
    if plain:
        return plain[0][1]
    if ranged:
        return None
    if measures:
        return measures[0][1]
    if _ZERO.search(answer):
        return 0.0
    return None


def _option_pattern(option: str) -> re.Pattern[str] | None:
    words = re.findall(r"\w+", option)
    if not words:
        return None
    return re.compile(r"(?<!\w)" + r"[\W_]*".join(re.escape(w) for w in words) + r"(?!\w)", re.IGNORECASE)


def _rejected(text: str, start: int, end: int) -> bool:
    return bool(_REJECT_BEFORE.search(text[:start]) or _REJECT_AFTER.match(text[end:]))


def parse_choice(answer: str, options: Sequence[str]) -> str | None:
    """The chosen letter of a multiple-choice answer (module docstring), or None when absent or ambiguous."""
    valid = set(LETTERS[: len(options)])
    text = answer.strip().strip("*`\"'").strip()
    if not text:
        return None
    numeric = bool(options) and all(re.fullmatch(r"\s*\d+(?:\.\d+)?\s*", str(o)) for o in options)
    if len(text) == 1 and text.isalpha():
        return text.upper() if text.upper() in valid else None
    label = _LABEL.match(text)
    if label and label.group(1).upper() in valid and label.group(2).strip():
        if not _names_option(label.group(2).splitlines()[0], options, LETTERS.index(label.group(1).upper()), numeric):
            return None  # "A. MRI" to a left/right question: the letter and its text disagree
    chosen: set[str] = set()
    order = [] if numeric else sorted(range(len(options)), key=lambda i: -len(str(options[i])))
    for i in order:
        pattern = _option_pattern(str(options[i]))
        if pattern is None:
            continue
        for m in list(pattern.finditer(text)):
            if not _rejected(text, m.start(), m.end()):
                chosen.add(LETTERS[i])
            text = text[: m.start()] + " " * (m.end() - m.start()) + text[m.end():]
    for m in _LETTER.finditer(text):
        letter, start, end = m.group(1), m.start(), m.end()
        before, after = text[:start], text[end:]
        if letter.islower():
            if not (m.group(0).startswith("(") or _KEYWORD_BEFORE.search(before)):
                continue
            letter = letter.upper()
        elif letter in "AI" and not m.group(0).startswith("(") and re.match(r"^\s+[a-z]", after) \
                and not _VERB_AFTER_ARTICLE.match(after):
            continue  # the article "A" or the pronoun "I"
        if letter not in valid or _rejected(text, start, end):
            continue
        chosen.add(letter)
    if not chosen and numeric:
        value = parse_number(answer)  # numeric options read by value: "Two lesions." picks the option "2"
        matches = [i for i, o in enumerate(options) if value is not None and float(o) == value]
        if len(matches) == 1:
            chosen.add(LETTERS[matches[0]])
    return chosen.pop() if len(chosen) == 1 else None


def _names_option(text: str, options: Sequence[str], index: int, numeric: bool) -> bool:
    """Whether `text` (what follows a labelled letter) names option `index`: its text, or its value."""
    if numeric:
        value = parse_number(text)
        return value is not None and float(options[index]) == value
    pattern = _option_pattern(str(options[index]))
    return bool(pattern and any(not _rejected(text, m.start(), m.end()) for m in pattern.finditer(text)))


def gold_letter(answer: str, options: Sequence[str]) -> str | None:
    """The gold answer as a letter: the letter itself or the exact text of one option."""
    ans = answer.strip()
    if len(ans) == 1 and ans.upper() in LETTERS[: len(options)]:
        return ans.upper()
    norm = _plain(ans)
    for i, opt in enumerate(options):
        if _plain(opt) == norm:
            return LETTERS[i]
    return None


@dataclass(frozen=True)
class Grade:
    """How one prediction scores against its gold answer."""

    correct: float  # 1.0 / 0.0 for closed questions; exact match for open ones
    extracted: str  # the answer text taken from the completion
    parsed: str | None  # the normalised choice/number/yes-no read from it
    f1: float
    recall: float


def grade(prediction: str, answer: str, qtype: str, options: Sequence[Any] | None = None) -> Grade:
    """Grade a raw completion against the gold answer for its question type."""
    extracted = extract_answer(prediction)
    gold = str(answer)
    if qtype == "multiple_choice":
        opts = [str(o) for o in (options or [])]
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
