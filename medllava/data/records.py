"""Read training records and normalise them to one form: id, images, turns (system/user/assistant text).

Accepted layouts, from JSON (a list), JSONL (one object per line) or any `datasets` source:
- LLaVA / LLaVA-Med: {"id", "image": str | [str], "conversations": [{"from": "human"|"gpt", "value"}]}
- messages: {"id", "images": [...], "messages": [{"role": "user"|"assistant"|"system", "content": str | parts}]}
Text holds `<image>` placeholders. Every problem is a RecordError naming the file, the line and the id.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medllava.processor import IMAGE_TOKEN, parts_to_text

# Every kind of bad record, with what it means. Tests assert each kind is produced by its case.
ERROR_KINDS: dict[str, str] = {
    "invalid_json": "the line (or file) is not valid JSON",
    "invalid_encoding": "the line is not UTF-8 text",
    "not_an_object": "the record is not a JSON object",
    "missing_field": "a required field is missing or has the wrong type",
    "unknown_role": "a turn has a role other than system/user/assistant (human/gpt)",
    "empty_conversation": "the record has no turns",
    "bad_roles": "roles do not alternate user/assistant starting with the user",
    "empty_answer": "an assistant turn (or caption) is empty",
    "image_count_mismatch": "the number of <image> placeholders differs from the number of images",
    "image_outside_root": "the image path escapes the image folder (or is absolute where not allowed)",
    "missing_image": "the image file does not exist",
    "empty_file": "the image file is empty",
    "unreadable_image": "the image cannot be decoded",
    "unsupported_format": "the image format is not supported",
    "image_too_large": "the image exceeds the pixel limit (decompression-bomb guard)",
    "no_pixel_data": "the DICOM file has no pixel data",
    "bad_frame": "the requested frame does not exist",
    "too_long": "the rendered sample exceeds max_length (never truncated through image tokens)",
    "template_error": "the chat template cannot render the conversation",
    "bad_answer": "an RL/eval record's answer does not fit its question type",
    "same_pair": "a preference pair's chosen and rejected sides are the same answer with the same images",
    "bad_weight": "a preference pair's weight is not a finite number >= 0",
}

ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "system": "system",
}


class RecordError(ValueError):
    """One bad record: kind (a key of ERROR_KINDS), reason, and where it came from."""

    def __init__(self, kind: str, reason: str, *, source: str = "", line: int = 0, record_id: str | None = None):
        if kind not in ERROR_KINDS:
            raise ValueError(f"unknown record error kind {kind!r}")
        self.kind = kind
        self.reason = reason
        self.source = source
        self.line = line
        self.record_id = record_id
        super().__init__(self.describe())

    def located(self, source: str, line: int, record_id: str | None) -> RecordError:
        """The same error with its location filled in."""
        return RecordError(self.kind, self.reason, source=source, line=line, record_id=record_id)

    def where(self) -> str:
        loc = f"{self.source}:{self.line}" if self.line else self.source
        return f"{loc} (id {self.record_id})" if self.record_id is not None else loc

    def describe(self) -> str:
        return f"{self.where()}: {self.kind}: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "line": self.line, "id": self.record_id, "kind": self.kind, "reason": self.reason}


@dataclass
class Turn:
    role: str
    text: str


@dataclass
class Record:
    """A normalised record. `line` is the 1-based JSONL line, JSON array item, or dataset row."""

    id: str
    images: list[Any]
    turns: list[Turn]
    source: str = ""
    line: int = 0
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class RawRecord:
    """A parsed JSON object (or a read error) with its location."""

    source: str
    line: int
    data: dict[str, Any] | None
    error: RecordError | None = None


def _iter_jsonl(path: Path) -> Iterator[RawRecord]:
    source = str(path)
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield RawRecord(source, lineno, None, RecordError("invalid_encoding", f"not UTF-8 ({err.reason} at byte {err.start})", source=source, line=lineno))
                continue
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as err:
                yield RawRecord(source, lineno, None, RecordError("invalid_json", err.msg + f" (column {err.colno})", source=source, line=lineno))
                continue
            if not isinstance(obj, dict):
                yield RawRecord(source, lineno, None, RecordError("not_an_object", f"got {type(obj).__name__}", source=source, line=lineno))
                continue
            yield RawRecord(source, lineno, obj)


def _iter_json(path: Path) -> Iterator[RawRecord]:
    source = str(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        yield RawRecord(source, 0, None, RecordError("invalid_encoding", f"file is not UTF-8 ({err.reason} at byte {err.start})", source=source))
        return
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        yield RawRecord(source, err.lineno, None, RecordError("invalid_json", f"{err.msg} (column {err.colno}); the whole file is unreadable", source=source, line=err.lineno))
        return
    if isinstance(obj, dict):
        obj = [obj]
    if not isinstance(obj, list):
        yield RawRecord(source, 0, None, RecordError("not_an_object", "top level must be a list of records", source=source))
        return
    for index, item in enumerate(obj, start=1):
        if not isinstance(item, dict):
            yield RawRecord(source, index, None, RecordError("not_an_object", f"item {index} is {type(item).__name__}", source=source, line=index))
            continue
        yield RawRecord(source, index, item)


def hf_dataset(spec: str) -> Any:
    """The `datasets` split an `hf:NAME[:SPLIT]` source names (from the local cache when offline)."""
    import datasets

    name, _, split = spec[3:].partition(":")
    return datasets.load_dataset(name, split=split or "train")


def _iter_datasets(spec: str) -> Iterator[RawRecord]:
    """`hf:NAME[:SPLIT]`, a saved dataset folder, or a parquet/csv/arrow file, through `datasets`."""
    import datasets

    if spec.startswith("hf:"):
        ds = hf_dataset(spec)
    elif Path(spec).is_dir():
        ds = datasets.load_from_disk(spec)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"]
    else:
        suffix = Path(spec).suffix.lstrip(".")
        ds = datasets.load_dataset({"arrow": "arrow", "parquet": "parquet", "csv": "csv"}[suffix], data_files=spec, split="train")
    for index, row in enumerate(undecoded_images(ds), start=1):
        yield RawRecord(spec, index, dict(row))


def undecoded_images(ds: Any) -> Any:
    """The dataset with its image columns left encoded: rows carry {"bytes", "path"} (decoded by
    `medllava.imaging.load_image` when a batch needs them), so reading a corpus never holds its decoded pixels."""
    import datasets

    for name, feature in ds.features.items():
        if isinstance(feature, datasets.Image) and feature.decode:
            ds = ds.cast_column(name, datasets.Image(decode=False))
        elif isinstance(feature, (datasets.Sequence, datasets.List)) and isinstance(feature.feature, datasets.Image):
            ds = ds.cast_column(name, datasets.List(datasets.Image(decode=False)))
    return ds


def iter_raw(source: str | Path) -> Iterator[RawRecord]:
    """Every JSON object of a data source, with its location; read errors come as RawRecord.error."""
    spec = str(source)
    path = Path(spec)
    if spec.startswith("hf:") or path.is_dir() or path.suffix in (".parquet", ".arrow", ".csv"):
        yield from _iter_datasets(spec)
        return
    if not path.is_file():
        raise FileNotFoundError(f"{spec}: no such data file")
    if path.suffix == ".json":
        yield from _iter_json(path)
    else:
        yield from _iter_jsonl(path)


def has_embedded_bytes(value: Any) -> bool:
    """Whether a record's value holds encoded bytes (an embedded image), which JSON cannot carry."""
    if isinstance(value, (bytes, bytearray)):
        return True
    if isinstance(value, dict):
        return any(has_embedded_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(has_embedded_bytes(v) for v in value)
    return False


def check_writable(rows: list[dict[str, Any]], path: str | Path) -> None:
    """Raise ValueError when `write_records` could not write these rows to `path` (embedded images into JSON)."""
    if Path(path).suffix in (".jsonl", ".json") and any(has_embedded_bytes(r) for r in rows):
        raise ValueError(f"{path}: the records carry embedded images, which JSON cannot hold; write .parquet "
                         "(or a folder, a saved dataset) instead")


def write_records(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Write records whole or not at all (staged, then renamed) in the form the path names: JSONL (`.jsonl`), a
    JSON list (`.json`), parquet (`.parquet`, embedded images kept as image columns) or a saved dataset (any other
    path, a folder). Rows holding embedded images need parquet or a folder: JSON cannot carry their bytes."""
    import shutil

    path = Path(path)
    check_writable(rows, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".partial")
    if path.suffix in (".jsonl", ".json"):
        with staging.open("w", encoding="utf-8") as fh:
            if path.suffix == ".json":
                json.dump(rows, fh, ensure_ascii=False, indent=1)
            else:
                for row in rows:
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        staging.replace(path)
        return path
    import datasets

    columns = list(dict.fromkeys(k for row in rows for k in row))  # a column for every field any record has
    ds = datasets.Dataset.from_list([{k: row.get(k) for k in columns} for row in rows])
    for name, feature in ds.features.items():  # {bytes, path} structs are images: keep them typed as such
        if isinstance(feature, dict) and set(feature) == {"bytes", "path"}:
            ds = ds.cast_column(name, datasets.Image())
    if staging.exists():
        shutil.rmtree(staging) if staging.is_dir() else staging.unlink()
    if path.suffix == ".parquet":
        ds.to_parquet(str(staging))
    else:
        ds.save_to_disk(str(staging))
    if path.is_dir():
        shutil.rmtree(path)
    staging.replace(path)
    return path


def expand_placeholders(texts: list[str], counts: list[int]) -> list[str]:
    """The texts with their i-th `<image>` placeholder (counted across the texts, in order) written counts[i] times
    (a series that became several slices: one placeholder per slice, each on its own line). Texts with fewer
    placeholders than counts are left as they are for the caller's count check."""
    if all(c == 1 for c in counts):
        return list(texts)
    out, i = [], 0
    for text in texts:
        pieces = text.split(IMAGE_TOKEN)
        rebuilt = pieces[0]
        for piece in pieces[1:]:
            n = counts[i] if i < len(counts) else 1
            rebuilt += "\n".join([IMAGE_TOKEN] * n) + piece
            i += 1
        out.append(rebuilt)
    return out


def record_images(data: dict[str, Any]) -> list[Any]:
    """A raw record's images: its `images`, or its `image` where `images` is absent or null (rows of one and of
    several images written to one parquet file get both columns, null where unused)."""
    return as_list(data.get("images") if data.get("images") is not None else data.get("image"))


def image_fields(images: list[Any]) -> dict[str, Any]:
    """How a record written by medllava names its images: {"image": ref} for one, {"images": [...]} otherwise."""
    return {"image": images[0]} if len(images) == 1 else {"images": list(images)}


def as_list(value: Any) -> list[Any]:
    """None -> [], a list or tuple -> a list, anything else -> [it] (a record's one image or several)."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def normalize(raw: RawRecord) -> Record:
    """Turn a parsed object into a Record, or raise a located RecordError."""
    data = raw.data or {}
    rid = data.get("id", data.get("question_id"))
    rid = str(rid) if rid is not None else f"{Path(raw.source).name}:{raw.line}"

    def fail(kind: str, reason: str) -> RecordError:
        return RecordError(kind, reason, source=raw.source, line=raw.line, record_id=rid)

    images = record_images(data)
    turns: list[Turn] = []
    if "conversations" in data:
        convs = data["conversations"]
        if not isinstance(convs, list):
            raise fail("missing_field", "'conversations' must be a list")
        for i, turn in enumerate(convs):
            if not isinstance(turn, dict) or "value" not in turn or "from" not in turn:
                raise fail("missing_field", f"turn {i} needs 'from' and 'value'")
            role = ROLE_ALIASES.get(str(turn["from"]).lower())
            if role is None:
                raise fail("unknown_role", f"turn {i} has role {turn['from']!r}")
            if not isinstance(turn["value"], str):
                raise fail("missing_field", f"turn {i}: 'value' must be text")
            turns.append(Turn(role, turn["value"]))
    elif "messages" in data:
        msgs = data["messages"]
        if not isinstance(msgs, list):
            raise fail("missing_field", "'messages' must be a list")
        for i, msg in enumerate(msgs):
            if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
                raise fail("missing_field", f"message {i} needs 'role' and 'content'")
            role = ROLE_ALIASES.get(str(msg["role"]).lower())
            if role is None:
                raise fail("unknown_role", f"message {i} has role {msg['role']!r}")
            content = msg["content"]
            if isinstance(content, list):
                for part in content:
                    if isinstance(part, dict) and part.get("type") == "image":
                        ref = part.get("image", part.get("path"))
                        if ref is not None and "images" not in data and "image" not in data:
                            images.append(ref)
                try:
                    content = parts_to_text(content)
                except (ValueError, AttributeError) as err:
                    raise fail("missing_field", f"message {i}: {err}") from None
            elif content is None:
                content = ""
            elif not isinstance(content, str):
                raise fail("missing_field", f"message {i}: content must be text or a list of parts")
            turns.append(Turn(role, content))
    else:
        raise fail("missing_field", "record has neither 'conversations' nor 'messages'")
    meta = {k: v for k, v in data.items() if k not in ("id", "image", "images", "conversations", "messages")}
    return Record(id=rid, images=images, turns=turns, source=raw.source, line=raw.line, meta=meta)
