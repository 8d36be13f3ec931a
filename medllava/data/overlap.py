"""Contamination check: the images and (image, question) pairs an evaluation set shares with training files.

- exact image: the same decoded pixels (sha256 of the RGB pixels and the size), so a re-saved PNG or a copy under
  another name is found;
- near image: the grey image shrunk to 16 x 16 pixels, its mean removed and scaled to unit length (a perceptual
  fingerprint that survives re-encoding, resizing and changes of brightness or contrast); two images whose
  fingerprints have a cosine similarity of at least `min_similarity` are one image;
- repeated pair: an evaluation question asked in training about the same image (exact or near), after the text
  prior's normalisation of questions (`medllava.prior.question_key`).

Training files may be VQA records or conversations (LLaVA `conversations`, `messages`), like the text prior's.
Images that cannot be read or decoded are counted and reported, never silently passed as clean.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from medllava.data.records import RawRecord, RecordError, iter_raw, normalize
from medllava.data.validate import resolve_image
from medllava.data.vqa import parse_vqa, read_vqa
from medllava.imaging import ImageError, load_image
from medllava.prior import question_key
from medllava.volumes import SliceSpec, expand_images

logger = logging.getLogger(__name__)

THUMB = 16
"""Fingerprint side: THUMB x THUMB grey pixels."""
MIN_SIMILARITY = 0.99
"""Cosine similarity from which two fingerprints are one image. Measured on 200 phantom images (2-core AMD EPYC):
a JPEG re-encoding at quality 75 keeps at least 0.9996, a resize to half size 0.995, to double size 0.9999, a
brightness change of 10% 0.9997 and a contrast change of 10% 0.9999. Distinct images can be closer than that
when they are alike: the phantom set's lesion-free images of one modality differ only in noise (up to 0.99995),
and they are reported as near duplicates, which for a model they are. Raise it (`--min-similarity`) for corpora
of look-alike studies."""


@dataclass(frozen=True)
class ImageKey:
    """What identifies an image's content: the pixels' sha256 and the perceptual fingerprint."""

    sha256: str
    fingerprint: np.ndarray
    """THUMB * THUMB float32 values, mean 0, unit length (all zero for a flat image)."""


def fingerprint(image: Image.Image) -> np.ndarray:
    grey = np.asarray(image.convert("L").resize((THUMB, THUMB), Image.Resampling.BILINEAR), dtype=np.float64)
    grey = grey.flatten() - grey.mean()
    norm = np.linalg.norm(grey)
    return (grey / norm if norm else grey).astype(np.float32)


def image_key(ref: Any) -> ImageKey:
    """The key of an image (a path, or an embedded image); raises ImageError when it does not decode."""
    image = load_image(ref)
    pixels = np.asarray(image.convert("RGB"))
    digest = hashlib.sha256(f"{pixels.shape}".encode() + pixels.tobytes()).hexdigest()
    return ImageKey(digest, fingerprint(image))


@dataclass
class _Entry:
    record_id: str
    images: list[Any]
    questions: list[str]


def _entries(path: str | Path) -> Iterator[_Entry | RecordError]:
    """Every record of a training or evaluation file: its id, image references and questions."""
    for raw in iter_raw(path):
        if raw.error is not None:
            yield raw.error
            continue
        data = raw.data or {}
        try:
            if "conversations" in data or "messages" in data:
                record = normalize(RawRecord(raw.source, raw.line, data))
                questions = [question_key(t.text) for t in record.turns if t.role == "user"]
                yield _Entry(record.id, list(record.images), [q for q in questions if q])
            else:
                rec = parse_vqa(data, raw.source, raw.line)
                yield _Entry(rec.id, list(rec.images), [question_key(rec.question)])
        except RecordError as err:
            yield err.located(raw.source, raw.line, None) if not err.source else err


@dataclass
class TrainingIndex:
    """The training side: image keys with the questions asked about each."""

    sources: list[str]
    exact: dict[str, list[int]] = field(default_factory=dict)
    """pixel sha256 -> image indices"""
    fingerprints: list[np.ndarray] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    questions: list[set[str]] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)

    def matrix(self) -> np.ndarray:
        """The fingerprints as rows ([images, THUMB * THUMB])."""
        if not self.fingerprints:
            return np.zeros((0, THUMB * THUMB), dtype=np.float32)
        return np.stack(self.fingerprints)


def index_training(paths: Sequence[str | Path], image_folder: str | Path, *, progress: bool = True,
                   slices: SliceSpec | None = None) -> TrainingIndex:
    """Hash every training image once (an image used by several records is one entry with all their questions); a
    series or volume by the slices `slices` takes."""
    index = TrainingIndex([str(p) for p in paths])
    seen: dict[str, int] = {}
    entries = [e for p in paths for e in _entries(p)]
    for entry in tqdm(entries, desc="overlap: training images", disable=not progress, leave=False):
        if isinstance(entry, RecordError):
            index.unreadable.append(entry.describe())
            continue
        try:  # a series or volume is compared slice by slice
            refs = expand_images([resolve_image(ref, image_folder) for ref in entry.images], slices)[0]
        except (RecordError, ImageError) as err:
            index.unreadable.append(f"{entry.record_id}: {err}")
            continue
        for resolved in refs:
            try:
                name = str(resolved) if isinstance(resolved, (str, Path)) else None
                if name is not None and name in seen:
                    index.questions[seen[name]].update(entry.questions)
                    continue
                key = image_key(resolved)
            except ImageError as err:
                index.unreadable.append(f"{entry.record_id}: {err}")
                continue
            i = len(index.fingerprints)
            index.exact.setdefault(key.sha256, []).append(i)
            index.fingerprints.append(key.fingerprint)
            index.ids.append(entry.record_id)
            index.questions.append(set(entry.questions))
            if name is not None:
                seen[name] = i
    if index.unreadable:
        logger.warning("overlap: %d training record(s) or image(s) could not be read: %s", len(index.unreadable),
                       "; ".join(index.unreadable[:5]))
    return index


def check_overlap(train: TrainingIndex, eval_file: str | Path, image_folder: str | Path, *,
                  min_similarity: float = MIN_SIMILARITY, progress: bool = True,
                  slices: SliceSpec | None = None) -> dict[str, Any]:
    """What the evaluation set shares with the training files (see the module docstring), with record ids."""
    matrix = train.matrix()
    exact, near, pairs, unreadable, unreadable_ids = [], [], [], [], []
    examples: dict[str, dict[str, str]] = {}
    n = 0
    for rec in tqdm(list(read_vqa(eval_file)), desc="overlap: evaluation images", disable=not progress, leave=False):
        if isinstance(rec, RecordError):
            unreadable.append(rec.describe())
            continue
        n += 1
        try:  # a question with several images overlaps where any of them does
            refs = expand_images([resolve_image(ref, image_folder) for ref in rec.images], slices)[0]
            keys = [image_key(ref) for ref in refs]
        except (RecordError, ImageError) as err:
            unreadable.append(f"{rec.id}: {err}")
            unreadable_ids.append(rec.id)
            continue
        same = [i for key in keys for i in train.exact.get(key.sha256, [])]
        close = [i for key in keys if key.fingerprint.any()
                 for i in np.flatnonzero(matrix @ key.fingerprint >= min_similarity).tolist()]
        if same:
            exact.append(rec.id)
            examples[rec.id] = {"kind": "exact_image", "train_record": train.ids[same[0]]}
        elif close:
            near.append(rec.id)
            examples[rec.id] = {"kind": "near_image", "train_record": train.ids[close[0]]}
        question = question_key(rec.question)
        if question and any(question in train.questions[i] for i in set(same) | set(close)):
            pairs.append(rec.id)
    flagged = sorted(set(exact) | set(near))
    return {
        "train_files": train.sources, "eval_file": str(eval_file), "eval_records": n,
        "train_images": len(train.fingerprints), "min_similarity": min_similarity,
        "exact_image": {"count": len(exact), "ids": exact},
        "near_image": {"count": len(near), "ids": near},
        "repeated_pair": {"count": len(pairs), "ids": pairs},
        "contaminated": {"count": len(flagged), "ids": flagged},
        "examples": dict(list(examples.items())[:20]),
        "unreadable_train": len(train.unreadable), "unreadable_eval": len(unreadable),
        # records whose image could not be compared: whether they overlap is unknown, so no clean subset has them
        "unreadable_eval_ids": unreadable_ids,
    }


def overlap_line(report: dict[str, Any]) -> str:
    """One line for tables and logs."""
    return (f"overlap with training: {report['contaminated']['count']} of {report['eval_records']} evaluation records "
            f"share an image with the training files ({report['exact_image']['count']} exact, "
            f"{report['near_image']['count']} near); {report['repeated_pair']['count']} repeat a training "
            f"(image, question) pair")
