"""Checked and rendered samples on disk, prepared once per data version and read by every rank.

The key covers what the rendering depends on: each data file's identity (path, size, modification time; for an
`hf:` source the loaded dataset's fingerprint, which follows its revision), the image folder, the tokenizer, the
chat template the renderer uses (`model.chat_template` replaces the tokenizer's), the rendering format,
max_length, system prompt and the invalid-record policy. A changed key is a new folder (rebuilt); a complete folder is reused. The stored form is
flat: token ids and labels as two memory-mapped arrays with offsets, so DataLoader workers share pages instead
of copying Python objects. In-memory images (embedded in a `datasets` source) are written as files named by
their content.

    <cache>/<key>/ids.npy labels.npy offsets.npy lengths.npy meta.jsonl meta_offsets.npy data_report.json COMPLETE

Several jobs may share one cache folder: a folder is made under a file lock beside it (`<key>.lock`), in a
staging folder of its writer's own (host, process, random suffix) renamed into place when whole; a second job
waits for the lock and reuses what the first made (`build_once`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medllava.data.render import Rendered

logger = logging.getLogger(__name__)

CACHE_VERSION = 2
COMPLETE = "COMPLETE"


def file_identity(spec: str) -> dict[str, Any]:
    """What identifies a data source's version: size and mtime of a file (every file of a folder)."""
    path = Path(spec)
    if path.is_file():
        st = path.stat()
        return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return {"path": str(path.resolve()), "files": [(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                                                       for p in files]}
    if spec.startswith("hf:"):  # the version the datasets library loads (a new revision, a new fingerprint)
        from medllava.data.records import hf_dataset

        return {"path": spec, "fingerprint": hf_dataset(spec)._fingerprint}
    return {"path": spec}


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def source_sha256(spec: str | Path) -> str:
    """A content hash of a data source: a file's bytes; a dataset folder's files, by name; for an `hf:` source, the
    fingerprint of the version the datasets library loads."""
    path = Path(spec)
    if path.is_file():
        return file_sha256(path)
    digest = hashlib.sha256()
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(f"{f.relative_to(path)}:{file_sha256(f)}\n".encode())
    else:
        digest.update(json.dumps(file_identity(str(spec)), sort_keys=True).encode())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of the tokenizer's vocabulary, merges, special tokens and chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([str(tokenizer.chat_template), tokenizer.all_special_tokens], sort_keys=True).encode())
    return h.hexdigest()[:16]


def cache_key(files: Sequence[str], **settings: Any) -> str:
    blob = json.dumps({"version": CACHE_VERSION, "files": [file_identity(f) for f in files], **settings},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE).is_file()


def build_once(folder: Path, write: Callable[[Path], None]) -> bool:
    """Make `folder` unless it is complete: under a file lock beside it, `write(staging)` fills a staging folder of
    this writer's own, which is marked COMPLETE and renamed to `folder` (an incomplete leftover of a killed writer
    is replaced). A concurrent job on the same cache waits for the lock, then finds the folder complete. Returns
    True when this call made it."""
    from filelock import FileLock

    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if is_complete(folder):
            return False
        staging = folder.with_name(f"{folder.name}.staging-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            write(staging)
            (staging / COMPLETE).write_text("ok\n", encoding="utf-8")
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(staging, folder)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return True


def _image_ref(ref: Any, staging: Path, final: Path) -> str:
    """A path as is; an in-memory image written under staging/images, named by its content (its path once the
    staging folder is renamed to final)."""
    if isinstance(ref, (str, Path)):
        return str(ref)
    from medllava.imaging import store_image

    name = store_image(ref, staging / "images")
    return str((final / "images" / name).resolve())


def save_samples(samples: Sequence[Rendered], folder: Path, report: dict[str, Any] | None = None) -> Path:
    """Write samples as the cache folder `folder` (staged, then renamed, so readers never see half a cache)."""
    if folder.exists():
        shutil.rmtree(folder)
    build_once(folder, lambda staging: write_samples(samples, staging, folder, report))
    return folder


def write_samples(samples: Sequence[Rendered], staging: Path, folder: Path, report: dict[str, Any] | None = None) -> None:
    """Write samples into `staging`, which will become `folder` (embedded images are referred to by their path
    there); `build_once` marks it complete and renames it."""
    staging.mkdir(parents=True)
    lengths = np.asarray([len(s.input_ids) for s in samples], dtype=np.int64)
    offsets = np.zeros(len(samples) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.concatenate([s.input_ids for s in samples]) if samples else np.zeros(0, dtype=np.int64)
    labels = np.concatenate([s.labels for s in samples]) if samples else np.zeros(0, dtype=np.int64)
    np.save(staging / "ids.npy", ids.astype(np.int32))
    np.save(staging / "labels.npy", labels.astype(np.int32))
    np.save(staging / "offsets.npy", offsets)
    np.save(staging / "lengths.npy", np.asarray([s.length for s in samples], dtype=np.int64))
    meta_offsets = np.zeros(len(samples) + 1, dtype=np.int64)
    with (staging / "meta.jsonl").open("wb") as fh:
        for i, s in enumerate(samples):
            images = [_image_ref(ref, staging, folder) for ref in s.images]
            line = json.dumps({"id": s.id, "images": images, "source": s.source, "line": s.line},
                              ensure_ascii=False).encode("utf-8") + b"\n"
            fh.write(line)
            meta_offsets[i + 1] = meta_offsets[i] + len(line)
    np.save(staging / "meta_offsets.npy", meta_offsets)
    if report is not None:
        (staging / "data_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")


class CachedSamples(Sequence[Rendered]):
    """Read-only samples over a cache folder. Everything is memory-mapped (ids, labels, and each sample's
    metadata line, parsed on access): opening half a million samples takes a fraction of a second, and DataLoader
    workers share the pages instead of each copying a list of Python objects."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._ids = np.load(self.folder / "ids.npy", mmap_mode="r")
        self._labels = np.load(self.folder / "labels.npy", mmap_mode="r")
        self._offsets = np.load(self.folder / "offsets.npy", mmap_mode="r")
        self.lengths = np.load(self.folder / "lengths.npy", mmap_mode="r")
        self._meta_offsets = np.load(self.folder / "meta_offsets.npy", mmap_mode="r")
        size = int(self._meta_offsets[-1])
        self._meta = np.memmap(self.folder / "meta.jsonl", dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self._meta_offsets) - 1

    def meta(self, index: int) -> dict[str, Any]:
        """A sample's id, image paths, source file and line."""
        lo, hi = int(self._meta_offsets[index]), int(self._meta_offsets[index + 1])
        return json.loads(self._meta[lo:hi].tobytes())

    def __getitem__(self, index: int) -> Rendered:  # type: ignore[override]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        lo, hi = int(self._offsets[index]), int(self._offsets[index + 1])
        meta = self.meta(index)
        return Rendered(id=meta["id"], input_ids=np.asarray(self._ids[lo:hi], dtype=np.int64),
                        labels=np.asarray(self._labels[lo:hi], dtype=np.int64), images=list(meta["images"]),
                        length=int(self.lengths[index]), source=meta["source"], line=int(meta["line"]))

    def __iter__(self) -> Iterator[Rendered]:
        for i in range(len(self)):
            yield self[i]

    def report(self) -> dict[str, Any] | None:
        path = self.folder / "data_report.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
