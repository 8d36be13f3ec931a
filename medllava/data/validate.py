"""Check every record before training and report the bad ones by file, line, id and reason.

`prepare_samples` reads the configured files, checks structure (roles, placeholders, empty answers), checks
that every image resolves inside the image folder and decodes, renders each record (length limit), and
returns the rendered samples with a ValidationReport. With `skip_invalid: false` any bad record stops the
run with the report; with `true` bad records are skipped, counted, and the report is written next to the run.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from medllava.data.records import Record, RecordError, expand_placeholders, iter_raw, normalize
from medllava.data.render import Rendered, Renderer
from medllava.imaging import ImageError, load_image, probe_image
from medllava.processor import IMAGE_TOKEN
from medllava.volumes import SliceSpec, expand_images

logger = logging.getLogger(__name__)

REPORT_NAME = "data_report.json"


class DataValidationError(RuntimeError):
    """Raised before training when records are invalid and skip_invalid is off."""

    def __init__(self, report: ValidationReport, report_path: Path | None = None, limit: int = 50):
        self.report = report
        self.report_path = report_path
        lines = [f"{len(report.errors)} invalid record(s) out of {report.total} ({report.summary()}):"]
        lines += [f"  {e.describe()}" for e in report.errors[:limit]]
        if len(report.errors) > limit:
            lines.append(f"  ... and {len(report.errors) - limit} more")
        if report_path is not None:
            lines.append(f"full report: {report_path}")
        lines.append("fix the records, or set data.skip_invalid: true to skip (and count) them")
        super().__init__("\n".join(lines))


@dataclass
class ValidationReport:
    total: int = 0
    valid: int = 0
    errors: list[RecordError] = field(default_factory=list)
    skipped: bool = False
    sources: dict[str, int] = field(default_factory=dict)
    """Records read per data source (file or datasets spec)."""

    def counts(self) -> dict[str, int]:
        return dict(Counter(e.kind for e in self.errors))

    def summary(self) -> str:
        return ", ".join(f"{k}: {v}" for k, v in sorted(self.counts().items())) or "no errors"

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "valid": self.valid,
            "invalid": len(self.errors),
            "skipped_invalid": self.skipped,
            "sources": self.sources,
            "counts": self.counts(),
            "errors": [e.to_dict() for e in self.errors],
        }

    def write(self, out_dir: str | Path) -> Path:
        path = Path(out_dir) / REPORT_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False), encoding="utf-8")
        return path


def check_structure(record: Record) -> None:
    """Roles alternate user/assistant after optional system turns, start with the user, end with the assistant;
    no empty answers; placeholders only in user/system turns and as many as images."""

    def fail(kind: str, reason: str) -> RecordError:
        return RecordError(kind, reason, source=record.source, line=record.line, record_id=record.id)

    turns = record.turns
    if not turns:
        raise fail("empty_conversation", "no turns")
    body = list(turns)
    while body and body[0].role == "system":
        body.pop(0)
    if not body:
        raise fail("empty_conversation", "only system turns")
    for i, turn in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if turn.role != expected:
            raise fail("bad_roles", f"turn {i + len(turns) - len(body)} is {turn.role!r}, expected {expected!r}")
    if body[-1].role != "assistant":
        raise fail("bad_roles", "conversation ends with a user turn (no answer to learn)")
    for i, turn in enumerate(turns):
        if turn.role == "assistant":
            if not turn.text.strip():
                raise fail("empty_answer", f"turn {i} (assistant) is empty")
            if IMAGE_TOKEN in turn.text:
                raise fail("image_count_mismatch", f"turn {i}: {IMAGE_TOKEN} in an assistant turn")
    placeholders = sum(t.text.count(IMAGE_TOKEN) for t in turns)
    if placeholders != len(record.images):
        raise fail("image_count_mismatch", f"{placeholders} {IMAGE_TOKEN} placeholder(s) for {len(record.images)} image(s)")


def resolve_image(ref: Any, image_folder: str | Path, *, allow_absolute: bool = False) -> Any:
    """A record's image reference as a path inside the image folder (or an in-memory image as is).

    Containment is judged on the path as written, not on where symlinks lead: a link the data owner placed in
    the folder (a Hugging Face snapshot's links into ../blobs, DVC, git-annex, a folder of links to a shared
    store) is theirs to place, while a `..` that climbs out of the folder is refused.
    Raises RecordError(image_outside_root) for `..` escapes and for absolute paths unless allowed.
    """
    if not isinstance(ref, (str, Path)):
        return ref  # datasets Image feature, PIL image, bytes
    root = Path(os.path.abspath(image_folder))
    path = Path(ref)
    if path.is_absolute():
        if not allow_absolute:
            raise RecordError("image_outside_root", f"absolute image path {ref!r} (set data.allow_absolute_paths: true to allow)")
        return path
    full = Path(os.path.normpath(root / path))
    if not full.is_relative_to(root):
        raise RecordError("image_outside_root", f"image path {ref!r} escapes the image folder {root}")
    return full


IMAGE_CHECKS = ("header", "full", "none")


def _check_image(ref: Any, level: str) -> ImageError | None:
    try:
        if level == "full":
            load_image(ref)
        else:
            probe_image(ref)
    except ImageError as err:
        return err
    return None


def image_key(ref: Any) -> Any:
    """How `check_images` keys a failure: a path by itself, an in-memory (embedded) image by its identity."""
    return ref if isinstance(ref, (str, Path)) else id(ref)


def first_failure(refs: Iterable[Any], failures: dict[Any, ImageError]) -> ImageError | None:
    """The failure of the first of a record's images that failed its check, if any."""
    return next((failures[image_key(r)] for r in refs if image_key(r) in failures), None)


def check_images(refs: Iterable[Any], *, level: str = "header", workers: int = 8,
                 progress: bool = True) -> dict[Any, ImageError]:
    """Check every distinct image once (threads; decoding releases the GIL); return the failures by `image_key`.

    level 'header': exists, inside the folder (already resolved), header readable, size within the pixel limit,
    without decoding pixels (what scales to millions of images; a file whose pixels are corrupt is then found
    by the data loader, which skips, counts and names it). 'full': decode every image. 'none': no check."""
    if level not in IMAGE_CHECKS:
        raise ValueError(f"image check {level!r}: expected one of {IMAGE_CHECKS}")
    refs = list(refs)
    if level == "none":
        return {}
    unique = list(dict.fromkeys(r for r in refs if isinstance(r, (str, Path))))
    others = [r for r in refs if not isinstance(r, (str, Path))]
    failures: dict[Any, ImageError] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(_check_image, unique, [level] * len(unique))
        for ref, err in tqdm(zip(unique, results), total=len(unique), desc=f"checking images ({level})",
                             disable=not progress, leave=False):
            if err is not None:
                failures[ref] = err
    for ref in others:
        err = _check_image(ref, level)
        if err is not None:
            failures[image_key(ref)] = err
    return failures


def load_records(files: Iterable[str], *, max_samples: int | None = None,
                 counts: dict[str, int] | None = None) -> tuple[list[Record], list[RecordError], int]:
    """Read and normalise every record of the files; returns (records, errors, total seen). `counts`, when
    given, receives the number of records read per file."""
    counts = {} if counts is None else counts
    records: list[Record] = []
    errors: list[RecordError] = []
    total = 0
    for file in files:
        for raw in iter_raw(file):
            if max_samples is not None and total >= max_samples:
                break
            total += 1
            counts[str(file)] = counts.get(str(file), 0) + 1
            if raw.error is not None:
                errors.append(raw.error)
                continue
            try:
                records.append(normalize(raw))
            except RecordError as err:
                errors.append(err)
    return records, errors, total


def _render_chunk(renderer: Renderer, records: list[Record]) -> list[Rendered | RecordError]:
    out: list[Rendered | RecordError] = []
    for record in records:
        try:
            out.append(renderer.render(record))
        except RecordError as err:
            out.append(err)
    return out


def render_records(records: list[Record], renderer: Renderer, *, workers: int = 1, progress: bool = True,
                   min_chunk: int = 500) -> list[Rendered | RecordError]:
    """Each record rendered (or its RecordError), in order; across `workers` processes for large sets (the
    chat template and tokenizer are the start-up's main cost: about 2 ms a two-turn record on one core)."""
    if workers <= 1 or len(records) < 4 * min_chunk:
        return _render_chunk(renderer, records)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")  # fork: no re-import
    size = max(min_chunk, -(-len(records) // (workers * 8)))
    chunks = [records[i:i + size] for i in range(0, len(records), size)]
    out: list[Rendered | RecordError] = []
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        for part in tqdm(pool.map(_render_chunk, [renderer] * len(chunks), chunks), total=len(chunks),
                         desc=f"rendering ({workers} processes)", disable=not progress, leave=False):
            out.extend(part)
    return out


def default_workers() -> int:
    """Processes for start-up rendering: the CPUs this process may use, at most 8."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus))


def prepare_samples(
    files: Iterable[str],
    renderer: Renderer,
    *,
    image_folder: str | Path = ".",
    allow_absolute_paths: bool = False,
    skip_invalid: bool = False,
    report_dir: str | Path | None = None,
    max_samples: int | None = None,
    image_check: str = "header",
    workers: int | None = None,
    progress: bool = True,
    slices: SliceSpec | None = None,
) -> tuple[list[Rendered], ValidationReport]:
    """Read, check and render every record; raise DataValidationError on bad records unless skipping.
    `image_check`: see `check_images`; `workers`: rendering processes (default `default_workers()`); `slices`: how
    a series or volume image becomes slices (medllava.volumes; its placeholder is repeated per slice)."""
    sources: dict[str, int] = {}
    records, errors, total = load_records(files, max_samples=max_samples, counts=sources)
    staged: list[Record] = []
    for record in records:
        try:
            check_structure(record)
            record.images = [resolve_image(r, image_folder, allow_absolute=allow_absolute_paths) for r in record.images]
            expand_series_images(record, slices)
            staged.append(record)
        except RecordError as err:
            errors.append(err if err.source else err.located(record.source, record.line, record.id))

    failures = check_images([r for rec in staged for r in rec.images], level=image_check, progress=progress)
    usable: list[Record] = []
    for record in staged:
        bad = first_failure(record.images, failures)
        if bad is not None:
            errors.append(RecordError(bad.kind, bad.reason + f" ({bad.path})", source=record.source, line=record.line, record_id=record.id))
            continue
        usable.append(record)
    samples: list[Rendered] = []
    for result in render_records(usable, renderer, workers=default_workers() if workers is None else workers,
                                 progress=progress):
        if isinstance(result, RecordError):
            errors.append(result)
        else:
            samples.append(result)

    report = finish_report(total, len(samples), errors, skip_invalid=skip_invalid, report_dir=report_dir, sources=sources)
    logger.info("data: %d records ready (%d skipped)", len(samples), len(errors))
    return samples, report


def expand_series_refs(refs: list[Any], texts: list[str], slices: SliceSpec | None = None,
                       what: str = "") -> tuple[list[Any], list[str], list[int]]:
    """Resolved image references with each series or volume as its slices (medllava.volumes), the texts with the
    placeholder written for one repeated per slice, and how many images each reference became. The one expansion
    of SFT records, VQA records and each side of a DPO pair. Raises a RecordError (`what` in front of the reason)
    for a series that cannot be read or ordered."""
    try:
        flat, counts = expand_images(refs, slices)
    except ImageError as err:
        raise RecordError(err.kind, f"{what}{err.reason} ({err.path})") from None
    return flat, expand_placeholders(texts, counts), counts


def expand_series_images(record: Record, slices: SliceSpec | None = None) -> Record:
    """A record's series and volume images replaced by their slices (in place), each placeholder written for one
    repeated per slice across its turns (see expand_series_refs)."""
    record.images, texts, _ = expand_series_refs(record.images, [turn.text for turn in record.turns], slices)
    for turn, text in zip(record.turns, texts):
        turn.text = text
    return record


def finish_report(total: int, valid: int, errors: list[RecordError], *, skip_invalid: bool,
                  report_dir: str | Path | None, always_skipped: list[RecordError] | None = None,
                  sources: dict[str, int] | None = None) -> ValidationReport:
    """Write the report; stop on bad records unless skipping. `always_skipped` errors (e.g. over-long RL
    prompts) are filtered whatever `skip_invalid` says, and counted like the rest."""
    filtered = always_skipped or []
    report = ValidationReport(total=total, valid=valid, skipped=skip_invalid, sources=dict(sources or {}),
                              errors=sorted(errors + filtered, key=lambda e: (e.source, e.line)))
    report_path = report.write(report_dir) if report_dir is not None else None
    if errors and not skip_invalid:
        raise DataValidationError(report, report_path)
    if errors or filtered:
        logger.warning("skipped %d record(s) of %d (%s); report: %s", len(errors) + len(filtered), total,
                       report.summary(), report_path)
    if not valid:
        raise DataValidationError(report, report_path)
    return report
