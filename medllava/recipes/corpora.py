"""Converters from public medical VQA / caption corpora, as published, to medllava's formats.

VQA corpora become VQA records ({id, image, question, answer, qtype, options?, modality?}, usable for GRPO
and evaluation) and optionally instruction records (one question per conversation); caption and
conversation corpora become LLaVA-form instruction records. Inputs are the published files (JSON / CSV) or
`datasets` sources (`hf:NAME`, parquet) whose images are embedded; embedded images are written under the
output folder. Every converter counts what it read, wrote and skipped, with a reason per skip.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medllava.data.records import RecordError, image_fields, iter_raw, record_images
from medllava.data.vqa import LETTERS, format_question, parse_vqa
from medllava.imaging import store_image
from medllava.processor import IMAGE_TOKEN

YES_NO = {"yes", "no"}


@dataclass
class ConversionReport:
    """Counts of a conversion; every skipped record has a reason."""

    read: int = 0
    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, where)

    def to_dict(self) -> dict[str, Any]:
        return {"read": self.read, "written": self.written, "skipped": dict(self.skipped),
                "skip_examples": self.examples}


class JsonlWriter:
    """Writes records to a JSONL file (one per line) and counts them."""

    def __init__(self, path: Path, report: ConversionReport):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = path.open("w", encoding="utf-8")
        self.report = report

    def write(self, row: dict[str, Any]) -> None:
        self.fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.report.written += 1

    def close(self) -> None:
        self.fh.close()


def closed_or_open(answer: str) -> str:
    """yes_no when the answer is yes/no (most of LLaVA-Med's CLOSED questions), else open."""
    if answer.strip().lower().rstrip(".") in YES_NO:
        return "yes_no"
    return "open"


def json_source(source: str | Path) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """(line, object or None, read error) for each record of a JSON/JSONL file or `datasets` source."""
    for raw in iter_raw(source):
        yield raw.line, raw.data, (raw.error.describe() if raw.error else None)


def csv_source(path: str | Path) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """(line, row, None) for each row of a CSV file; the line number counts the header as line 1."""
    with open(path, newline="", encoding="utf-8") as fh:
        for i, row in enumerate(csv.DictReader(fh), start=2):
            yield i, row, None


def _emit_vqa(row: dict[str, Any], writer: JsonlWriter, report: ConversionReport, where: str,
              instruct: JsonlWriter | None) -> None:
    try:
        rec = parse_vqa(row)
    except RecordError as err:
        report.skip(err.kind, f"{where}: {err.reason}")
        return
    writer.write(row)
    if instruct is not None:
        answer = rec.answer
        if rec.qtype == "multiple_choice" and rec.options:
            letter = rec.answer_letter
            answer = f"{letter}. {rec.options[LETTERS.index(letter)]}"
        instruct.write({"id": rec.id, **image_fields(rec.images), "conversations": [
            {"from": "human", "value": format_question(rec.question, rec.options, n_images=len(rec.images))},
            {"from": "gpt", "value": answer}]})


Reader = Callable[[str | Path], Iterator[tuple[int, dict[str, Any] | None, str | None]]]


def convert_vqa(
    sources: Iterable[str | Path],
    reader: Reader,
    map_row: Callable[[int, dict[str, Any]], dict[str, Any] | str],
    out: Path,
    *,
    instruct_out: Path | None = None,
    image_check: Callable[[str], bool] | None = None,
) -> ConversionReport:
    """Generic VQA conversion: `map_row` returns a VQA record or a skip reason; `instruct_out` also writes
    each question as a one-turn LLaVA conversation (same wording as everywhere else)."""
    report = ConversionReport()
    writer = JsonlWriter(out, report)
    instruct = JsonlWriter(instruct_out, ConversionReport()) if instruct_out else None
    try:
        for source, (line, data, error) in ((src, row) for src in sources for row in reader(src)):
            report.read += 1
            where = f"{source}:{line}"
            if error is not None:
                report.skip("unreadable_record", error)
                continue
            mapped = map_row(line, data or {})
            if isinstance(mapped, str):
                report.skip(mapped, where)
                continue
            missing = [ref for ref in record_images(mapped) if image_check is not None and not image_check(ref)]
            if missing:
                report.skip("missing_image", f"{where}: {missing[0]}")
                continue
            _emit_vqa(mapped, writer, report, where, instruct)
    finally:
        writer.close()
        if instruct is not None:
            instruct.close()
    return report


def image_exists_in(folder: str | Path | None) -> Callable[[str], bool] | None:
    if folder is None:
        return None
    root = Path(folder)
    return lambda rel: (root / rel).is_file()


# --------------------------------------------------------------------------------------------------------------
# Per-corpus row mappers (the published field names live here and nowhere else)


def vqa_rad_row(split: str | None) -> Callable[[int, dict[str, Any]], dict[str, Any] | str]:
    """VQA-RAD public JSON: qid, image_name, question, answer, answer_type (CLOSED/OPEN), image_organ,
    phrase_type (test_* marks the test split)."""

    def mapper(line: int, r: dict[str, Any]) -> dict[str, Any] | str:
        if not r.get("image_name") or r.get("question") in (None, "") or r.get("answer") in (None, ""):
            return "missing_field"
        phrase = str(r.get("phrase_type", ""))
        if split == "test" and not phrase.startswith("test"):
            return "other_split"
        if split == "train" and phrase.startswith("test"):
            return "other_split"
        answer = str(r["answer"]).strip()
        row = {"id": f"vqarad_{r.get('qid', line)}", "image": r["image_name"], "question": str(r["question"]).strip(),
               "answer": answer, "qtype": closed_or_open(answer)}
        for key, name in (("image_organ", "organ"), ("answer_type", "answer_type"), ("question_type", "question_type")):
            if r.get(key):
                row[name] = str(r[key]).strip().upper() if name == "answer_type" else str(r[key]).strip()
        return row

    return mapper


def slake_row(line: int, r: dict[str, Any]) -> dict[str, Any] | str:
    """SLAKE 1.0 JSON: qid, img_name, question, answer, q_lang (en/zh), modality, location, answer_type."""
    if str(r.get("q_lang", "en")).lower() != "en":
        return "not_english"
    if not r.get("img_name") or r.get("question") in (None, "") or r.get("answer") in (None, ""):
        return "missing_field"
    answer = str(r["answer"]).strip()
    row = {"id": f"slake_{r.get('qid', line)}", "image": r["img_name"], "question": str(r["question"]).strip(),
           "answer": answer, "qtype": closed_or_open(answer),
           # SLAKE ships each image's segmentation (organs and lesions) beside it: the region DPO pairs noise
           "mask": str(Path(r["img_name"]).parent / "mask.png")}
    for key, name in (("modality", "modality"), ("location", "organ"), ("answer_type", "answer_type"),
                      ("content_type", "content_type")):
        if r.get(key):
            row[name] = str(r[key]).strip().upper() if name == "answer_type" else str(r[key]).strip()
    return row


def embedded_vqa_row(prefix: str, images_dir: Path) -> Callable[[int, dict[str, Any]], dict[str, Any] | str]:
    """`datasets` layouts with an embedded image (PathVQA and VQA-RAD on the Hub): image, question, answer."""

    def mapper(line: int, r: dict[str, Any]) -> dict[str, Any] | str:
        if r.get("image") is None or not r.get("question") or r.get("answer") in (None, ""):
            return "missing_field"
        try:
            rel = store_image(r["image"], images_dir, prefix)
        except (ValueError, OSError):
            return "unreadable_image"
        answer = str(r["answer"]).strip()
        question = str(r["question"]).strip()
        # The id names the image content and the question, so it stays unique across splits converted apart.
        digest = hashlib.sha256(f"{rel}\n{question}".encode()).hexdigest()[:12]
        row = {"id": f"{prefix}_{digest}", "image": rel, "question": question, "answer": answer,
               "qtype": closed_or_open(answer)}
        for key, value in r.items():  # dataset-side fields (answer_type, modality, organ, ...) for the breakdowns
            if key not in row and isinstance(value, (str, int, float, bool)) and value != "":
                row[key] = str(value).strip().upper() if key == "answer_type" else value
        return row

    return mapper


_CHOICE_PREFIX = re.compile(r"^\s*\(?[A-Da-d]\s*[:.)]\s*")


def pmc_vqa_row(line: int, r: dict[str, Any]) -> dict[str, Any] | str:
    """PMC-VQA CSV: Figure_path, Question, Answer, Choice A..D (" A:text"), Answer_label."""
    options = [_CHOICE_PREFIX.sub("", str(r.get(f"Choice {c}") or "")).strip() for c in "ABCD"]
    if not r.get("Figure_path") or not r.get("Question") or not all(options):
        return "missing_field"
    label = str(r.get("Answer_label") or "").strip().upper()
    if label not in ("A", "B", "C", "D"):
        answer = str(r.get("Answer") or "").strip()
        matches = [LETTERS[i] for i, o in enumerate(options) if o.lower() == answer.lower()]
        if len(matches) != 1:
            return "bad_answer"
        label = matches[0]
    return {"id": f"pmcvqa_{line}", "image": r["Figure_path"], "question": str(r["Question"]).strip(),
            "options": options, "answer": label, "qtype": "multiple_choice"}


def omnimedvqa_row(line: int, r: dict[str, Any]) -> dict[str, Any] | str:
    """OmniMedVQA QA JSON: question_id, image_path, question, option_A..D, gt_answer (text), modality_type, dataset."""
    options = [str(r[f"option_{c}"]).strip() for c in "ABCD" if r.get(f"option_{c}") not in (None, "")]
    if not r.get("image_path") or not r.get("question") or len(options) < 2 or r.get("gt_answer") in (None, ""):
        return "missing_field"
    gt = str(r["gt_answer"]).strip()
    matches = [LETTERS[i] for i, o in enumerate(options) if o.lower() == gt.lower()]
    if len(matches) != 1:
        return "bad_answer"
    row = {"id": f"omni_{r.get('question_id', line)}", "image": r["image_path"], "question": str(r["question"]).strip(),
           "options": options, "answer": matches[0], "qtype": "multiple_choice"}
    if r.get("modality_type"):
        row["modality"] = str(r["modality_type"]).strip()
    if r.get("dataset"):
        row["source_dataset"] = str(r["dataset"]).strip()
    if r.get("question_type"):
        row["question_type"] = str(r["question_type"]).strip()
    return row


MEDFRAMEQA_FRAMES = re.compile(r"^image_(\d+)$")
MEDFRAMEQA_META = ("system", "organ", "keyword", "modality", "video_id")


def medframeqa_row(images_dir: Path) -> Callable[[int, dict[str, Any]], dict[str, Any] | str]:
    """MedFrameQA (`hf:SuhaoYu1020/MedFrameQA:test`, parquet): question_id, system, organ, keyword, modality,
    video_id, question, options (option texts, 4 or more), correct_answer (a letter), image_1..image_5 (embedded
    frames of one video in order, unused ones empty) and image_url (the source's address, not an image). The
    re-published layout with `image` (a list of frames) and `answer` is read too. The question names the frames
    in order ("the first image", "the second image"), so they are given first, in column order."""

    def mapper(line: int, r: dict[str, Any]) -> dict[str, Any] | str:
        if isinstance(r.get("image"), list):
            frames = [im for im in r["image"] if im]
        else:
            numbered = sorted((int(m[1]), key) for key in r if (m := MEDFRAMEQA_FRAMES.match(key)))
            frames = [r[key] for _, key in numbered if r[key]]
        options = [str(o).strip() for o in (r.get("options") or [])]
        answer = str(r.get("correct_answer", r.get("answer")) or "").strip().upper()
        if not frames or not r.get("question") or len(options) < 2 or not answer:
            return "missing_field"
        if len(answer) != 1 or answer not in LETTERS[:len(options)]:
            return "bad_answer"
        qid = str(r.get("question_id") or line)
        try:
            images = [store_image(frame, images_dir, "medframeqa") for frame in frames]
        except (ValueError, OSError):
            return "unreadable_image"
        row = {"id": f"medframeqa_{qid}", "images": images, "question": str(r["question"]).strip(),
               "options": options, "answer": answer, "qtype": "multiple_choice"}
        for key in MEDFRAMEQA_META:
            if r.get(key) not in (None, ""):
                row[key] = str(r[key]).strip()
        return row

    return mapper


# --------------------------------------------------------------------------------------------------------------
# LLaVA-Med conversation corpora (already in LLaVA form: validate, normalise the placeholder, write JSONL)


def convert_llava_med(source: str | Path, out: Path, *, kind: str, image_folder: str | Path | None = None) -> ConversionReport:
    """LLaVA-Med alignment (figure-caption) or instruct (60K) JSON -> LLaVA-form JSONL with one `<image>`
    at the start of the first human turn; records without an image, with broken roles or empty answers are
    skipped with their reason."""
    report = ConversionReport()
    writer = JsonlWriter(out, report)
    exists = image_exists_in(image_folder)
    try:
        for line, data, error in json_source(source):
            report.read += 1
            where = f"{source}:{line}"
            if error is not None:
                report.skip("unreadable_record", error)
                continue
            convs = (data or {}).get("conversations")
            image = (data or {}).get("image")
            if not image:
                report.skip("no_image", where)
                continue
            if not isinstance(convs, list) or len(convs) < 2:
                report.skip("no_conversation", where)
                continue
            turns = []
            bad = None
            for i, t in enumerate(convs):
                role = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}.get(str(t.get("from", "")).lower())
                value = t.get("value")
                if role is None or not isinstance(value, str):
                    bad = "bad_turn"
                    break
                if role != ("human" if i % 2 == 0 else "gpt"):
                    bad = "bad_roles"
                    break
                if role == "gpt" and not value.strip():
                    bad = "empty_answer"
                    break
                turns.append({"from": role, "value": value.replace(IMAGE_TOKEN, "").strip()})
            if bad is None and turns[-1]["from"] != "gpt":
                bad = "bad_roles"
            if bad is not None:
                report.skip(bad, where)
                continue
            if exists is not None and not exists(image):
                report.skip("missing_image", f"{where}: {image}")
                continue
            turns[0]["value"] = f"{IMAGE_TOKEN}\n{turns[0]['value']}".rstrip()
            if kind == "align":
                turns = [turns[0], turns[1]]
            writer.write({"id": str(data.get("id", line)), "image": image, "conversations": turns})
    finally:
        writer.close()
    return report


def vqa_recipe_main(argv: list[str] | None, description: str, reader: Reader,
                    map_row: Callable[[int, dict[str, Any]], dict[str, Any] | str], *, in_help: str,
                    image_help: str) -> int:
    """The command line of a data recipe that converts published VQA files with `convert_vqa`:
    --in FILE..., --out, --image-folder (check every image exists), --instruct-out."""
    import argparse

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--in", dest="inp", nargs="+", required=True, help=in_help)
    parser.add_argument("--out", required=True, type=Path, help="VQA JSONL to write")
    parser.add_argument("--image-folder", default=None, help=image_help)
    parser.add_argument("--instruct-out", type=Path, default=None, help="also write one-turn LLaVA conversations")
    args = parser.parse_args(argv)
    report = convert_vqa(args.inp, reader, map_row, args.out, instruct_out=args.instruct_out,
                         image_check=image_exists_in(args.image_folder))
    finish(report, args.out)
    return 0


def embedded_recipe_main(argv: list[str] | None, description: str,
                         make_mapper: Callable[[Path], Callable[[int, dict[str, Any]], dict[str, Any] | str]]) -> int:
    """The command line of a recipe reading a `datasets` release with embedded images (--in hf:NAME[:SPLIT] or
    parquet, --out, --instruct-out): `make_mapper(OUT_DIR/images)` maps its rows, images written under that folder."""
    import argparse

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--in", dest="inp", nargs="+", required=True, help="hf:NAME[:SPLIT] or parquet file(s)")
    parser.add_argument("--out", required=True, type=Path, help="VQA JSONL to write")
    parser.add_argument("--instruct-out", type=Path, default=None, help="also write one-turn LLaVA conversations")
    args = parser.parse_args(argv)
    report = convert_vqa(args.inp, json_source, make_mapper(args.out.parent / "images"), args.out,
                         instruct_out=args.instruct_out)
    finish(report, args.out)
    return 0


def finish(report: ConversionReport, out: Path) -> dict[str, Any]:
    """Write OUT.report.json beside the output, print the counts, and return them."""
    summary = {"out": str(out), **report.to_dict()}
    out.with_suffix(".report.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: summary[k] for k in ("out", "read", "written", "skipped")}))
    return summary
