"""Turn rendered samples into model batches: expand `<image>` to the feature count, load pixels, pad.

The batch is exactly what `LlavaForConditionalGeneration.forward` takes (input_ids, attention_mask, labels,
pixel_values), plus `sample_ids` for error messages, which the trainer removes before the forward pass.

A micro-batch without any image (text-only records) gets one filler sample: a blank image's tokens, every label
ignored. Every rank then runs the vision tower and projector in every step, in the model's own order: under
ZeRO-3 a rank that skips the tower leaves the others waiting in its parameter all-gather (the hang LLaVA-family
trainers are known for), and under DDP the projector would get no gradient there. The filler adds nothing to
the loss or its normalisation (no supervised token), and rows never attend to each other.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, get_worker_info

from medllava.data.render import IGNORE_INDEX, Rendered
from medllava.imaging import ImageError, Window, load_image

FILLER_ID = "<image filler>"


def with_image(features: list[dict[str, Any]], filler: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The features, plus the image filler when none of them has an image."""
    if filler is None or any("pixel_values" in f for f in features):
        return features
    return [*features, filler]


def real_ids(features: Sequence[dict[str, Any]]) -> list[str]:
    return [f["sample_id"] for f in features if f["sample_id"] != FILLER_ID]


def image_errors(features: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The samples of a batch whose image failed to decode in the loader (see SFTDataset.__getitem__)."""
    return [e for f in features for e in ([f["image_error"]] if "image_error" in f else f.get(IMAGE_ERRORS, []))]


IMAGE_ERRORS = "image_errors"
"""Batch key of image_errors(); like `sample_ids`, the trainer takes it out before the forward pass."""


def expand_image_tokens(ids: np.ndarray, labels: np.ndarray, image_token_id: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Repeat each image placeholder n times (labels there are ignored)."""
    repeats = np.where(ids == image_token_id, n, 1)
    out_ids = np.repeat(ids, repeats)
    out_labels = np.repeat(labels, repeats)
    out_labels[out_ids == image_token_id] = IGNORE_INDEX
    return out_ids, out_labels


class SFTDataset(Dataset):
    """Rendered samples -> tensors; images are decoded and preprocessed on access (in DataLoader workers)."""

    def __init__(self, samples: Sequence[Rendered], image_processor: Any, image_token_id: int, tokens_per_image: int,
                 window: Window | None = None):
        self.samples = samples
        self.window = window  # DICOM display window for every image (data.window)
        self.image_processor = image_processor
        self.image_token_id = image_token_id
        self.tokens_per_image = tokens_per_image
        self._gc_frozen = False  # set in each DataLoader worker, see __getitem__

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def lengths(self) -> list[int]:
        stored = getattr(self.samples, "lengths", None)  # a CachedSamples keeps them as one array
        return list(stored) if stored is not None else [s.length for s in self.samples]

    def image_filler(self) -> dict[str, Any]:
        """A blank image's tokens with every label ignored (see the module docstring)."""
        ids = np.full(self.tokens_per_image, self.image_token_id, dtype=np.int64)
        pixels = self.image_processor(images=[Image.new("RGB", (32, 32))], return_tensors="pt")["pixel_values"]
        return {"input_ids": torch.from_numpy(ids), "labels": torch.full((len(ids),), IGNORE_INDEX, dtype=torch.long),
                "sample_id": FILLER_ID, "pixel_values": pixels}

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not self._gc_frozen and get_worker_info() is not None:
            # A forked DataLoader worker shares the parent's memory until it writes to it, and Python's garbage
            # collector writes to every object it walks: over a long pass it would copy the parent's whole heap
            # into each worker. Frozen, the inherited objects are never walked (their pages stay shared).
            gc.freeze()
            self._gc_frozen = True
        sample = self.samples[index]
        ids, labels = expand_image_tokens(sample.input_ids, sample.labels, self.image_token_id, self.tokens_per_image)
        item: dict[str, Any] = {
            "input_ids": torch.from_numpy(ids),
            "labels": torch.from_numpy(labels),
            "sample_id": sample.id,
        }
        if sample.images:
            try:
                images = [load_image(ref, window=self.window) for ref in sample.images]
            except ImageError as err:
                # Found here, not before training (data.image_check: header): the sample keeps its place with
                # blank images and no supervised token, and the error travels with the batch to the report.
                images = [Image.new("RGB", (32, 32))] * len(sample.images)
                item["labels"] = torch.full_like(item["labels"], IGNORE_INDEX)
                item["image_error"] = {"id": sample.id, "source": sample.source, "line": sample.line,
                                       "kind": err.kind, "reason": err.reason, "path": err.path}
            item["pixel_values"] = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return item


class SFTCollator:
    """Right-pad ids (pad token) and labels (-100); concatenate the images of the batch in order."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None,
                 filler: dict[str, Any] | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.filler = filler

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        features = with_image(features, self.filler)
        longest = max(f["input_ids"].shape[0] for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = (longest + m - 1) // m * m
        input_ids, labels = pad_right(features, longest, self.pad_token_id)
        attention_mask = torch.zeros_like(input_ids)
        for row, f in enumerate(features):
            attention_mask[row, : f["input_ids"].shape[0]] = 1
        return with_bookkeeping({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}, features)


def with_bookkeeping(batch: dict[str, Any], features: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The batch with its features' images (in order), their sample ids and any loader-time image errors."""
    batch["sample_ids"] = real_ids(features)
    add_pixels(batch, features)
    if errors := image_errors(features):
        batch[IMAGE_ERRORS] = errors
    return batch


def pad_right(features: Sequence[dict[str, Any]], longest: int, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and labels of the features, right-padded to `longest` (pad token; ignored labels)."""
    input_ids = torch.full((len(features), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long)
    for row, f in enumerate(features):
        n = f["input_ids"].shape[0]
        input_ids[row, :n] = f["input_ids"]
        labels[row, :n] = f["labels"]
    return input_ids, labels


def add_pixels(batch: dict[str, Any], features: Sequence[dict[str, Any]]) -> None:
    """The features' images, concatenated in order, as batch["pixel_values"] (when there are any)."""
    pixels = [f["pixel_values"] for f in features if "pixel_values" in f]
    if pixels:
        batch["pixel_values"] = torch.cat(pixels, dim=0)
