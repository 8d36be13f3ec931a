"""Turn rendered samples into model batches: load and process images, expand each placeholder, pad.

The batch is exactly what the model family's forward takes (input_ids, attention_mask, labels, pixel_values and,
per family, image_grid_thw and the token-type ids that mark image tokens), plus `sample_ids` for error messages,
which the trainer removes before the forward pass.

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

from medllava.data.expand import ImageExpander
from medllava.data.render import IGNORE_INDEX, Rendered
from medllava.imaging import ImageError, Window, load_image

FILLER_ID = "<image filler>"
IMAGE_INPUTS = "image_inputs"
"""Feature key of a sample's processed images (pixel_values, image_grid_thw, ...): concatenated across the batch."""
TILED_INPUTS = "tiled_inputs"
"""Feature key naming the image inputs the model takes as one block of tiles (Family.tiled_inputs)."""
TOKEN_TYPE_KEYS = ("mm_token_type_ids", "token_type_ids")
"""Per-token inputs beside input_ids that some families take (see Family.token_types_key): padded with 0 (text)."""


def with_image(features: list[dict[str, Any]], filler: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The features, plus the image filler when none of them has an image."""
    if filler is None or any(IMAGE_INPUTS in f for f in features):
        return features
    return [*features, filler]


def real_ids(features: Sequence[dict[str, Any]]) -> list[str]:
    return [f["sample_id"] for f in features if f["sample_id"] != FILLER_ID]


def image_errors(features: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The samples of a batch whose image failed to decode in the loader (see SFTDataset.__getitem__)."""
    return [e for f in features for e in ([f["image_error"]] if "image_error" in f else f.get(IMAGE_ERRORS, []))]


IMAGE_ERRORS = "image_errors"
"""Batch key of image_errors(); like `sample_ids`, the trainer takes it out before the forward pass."""


class SFTDataset(Dataset):
    """Rendered samples -> tensors; images are decoded and preprocessed on access (in DataLoader workers)."""

    def __init__(self, samples: Sequence[Rendered], images: ImageExpander, window: Window | None = None):
        self.samples = samples
        self.window = window  # DICOM display window for every image (data.window)
        self.images = images
        self.image_token_id = images.placeholder_id
        self._gc_frozen = False  # set in each DataLoader worker, see __getitem__

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def lengths(self) -> list[int]:
        stored = getattr(self.samples, "lengths", None)  # a CachedSamples keeps them as one array
        return list(stored) if stored is not None else [s.length for s in self.samples]

    def image_filler(self) -> dict[str, Any]:
        """A blank image's tokens with every label ignored (see the module docstring)."""
        ids = np.asarray([self.image_token_id], dtype=np.int64)
        return self._item(FILLER_ID, ids, np.full(1, IGNORE_INDEX, dtype=np.int64), [Image.new("RGB", (32, 32))])

    def _item(self, sample_id: str, ids: np.ndarray, labels: np.ndarray, images: list[Image.Image]) -> dict[str, Any]:
        """A sample's tensors: each placeholder expanded for its processed image, the family's token types."""
        item: dict[str, Any] = {"sample_id": sample_id}
        if images:
            inputs, expansions = self.images.process(images)
            ids, labels = self.images.splice(ids, labels, expansions)
            item[IMAGE_INPUTS] = inputs
            if self.images.family.tiled_inputs:
                item[TILED_INPUTS] = self.images.family.tiled_inputs
        item["input_ids"] = torch.from_numpy(ids)
        item["labels"] = torch.from_numpy(labels)
        types = self.images.token_types(ids)
        if types is not None:
            item[self.images.family.token_types_key] = types
        return item

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not self._gc_frozen and get_worker_info() is not None:
            # A forked DataLoader worker shares the parent's memory until it writes to it, and Python's garbage
            # collector writes to every object it walks: over a long pass it would copy the parent's whole heap
            # into each worker. Frozen, the inherited objects are never walked (their pages stay shared).
            gc.freeze()
            self._gc_frozen = True
        sample = self.samples[index]
        labels = sample.labels
        error = None
        try:
            images = [load_image(ref, window=self.window) for ref in sample.images]
        except ImageError as err:
            # Found here, not before training (data.image_check: header): the sample keeps its place with
            # blank images and no supervised token, and the error travels with the batch to the report.
            images = [Image.new("RGB", (32, 32))] * len(sample.images)
            labels = np.full_like(labels, IGNORE_INDEX)
            error = {"id": sample.id, "source": sample.source, "line": sample.line,
                     "kind": err.kind, "reason": err.reason, "path": err.path}
        item = self._item(sample.id, np.asarray(sample.input_ids), np.asarray(labels), images)
        if error is not None:
            item["image_error"] = error
        elif len(item["input_ids"]) != sample.length:
            raise RuntimeError(f"{sample.source}:{sample.line} ({sample.id}): its images expand to "
                               f"{len(item['input_ids'])} tokens, {sample.length} when it was checked (an image "
                               "changed since, or the processor's settings did); clear the data cache")
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
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        for key in token_type_keys(features):
            batch[key] = torch.zeros_like(input_ids)
            for row, f in enumerate(features):
                if key in f:
                    batch[key][row, : f[key].shape[0]] = f[key]
        return with_bookkeeping(batch, features)


def token_type_keys(features: Sequence[dict[str, Any]]) -> list[str]:
    """The per-token type inputs any of the features carry (see TOKEN_TYPE_KEYS; a feature without one is text)."""
    return [k for k in TOKEN_TYPE_KEYS if any(k in f for f in features)]


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
    """The features' processed images, each input concatenated in order along its first axis (pixel_values and,
    per family, image_grid_thw ...), when there are any. Tiled inputs (see Family.tiled_inputs) become one block
    [1, tiles, ...]: the model fills the batch's image tokens with its tiles in order, so the block needs none of
    the padding tiles the processor adds to line samples up."""
    inputs = [f[IMAGE_INPUTS] for f in features if IMAGE_INPUTS in f]
    tiled = next((f[TILED_INPUTS] for f in features if TILED_INPUTS in f), ())
    for key in inputs[0] if inputs else []:
        value = torch.cat([i[key] for i in inputs], dim=0)
        batch[key] = value[None] if key in tiled else value


PAIR_WEIGHTS = "pair_weights"
"""Batch key of the pairs' weights (DPO); the DPO trainer takes it out before the forward pass."""
PAIR_BATCHES = "pair_batches"
"""Batch key of one sub-batch per pair, present in every batch when the data's pair weights differ (the loss is
then weighted per pair: TRL's loss is a mean over the pairs of a batch)."""


class PreferenceCollator:
    """Preference pairs -> one batch in TRL's DPO layout: rows chosen_0 .. chosen_{B-1}, rejected_0 .. rejected_{B-1},
    each row with its own images in row order, and `completion_mask` on each side's final answer.

    A rejected side with images of its own (a corrupted image, another study) sees those pixels, never the chosen
    side's (TRL's vision collator repeats the chosen images for both halves). The sides come from an SFTDataset
    over the pairs' sides (pair i = items 2i, 2i+1), so every family's image expansion and token types are SFT's.
    A pair whose image (either side's) fails to decode in the loader is replaced by the next pair that decodes and
    reported like SFT's loader skips: a pair is never trained on one side, and the batch keeps its size on every
    rank (TRL gathers per-pair metrics across ranks). When the data's weights differ, the batch holds one
    sub-batch per pair instead of the joint rows (PAIR_BATCHES)."""

    def __init__(self, sides: SFTDataset, weights: Sequence[float], pad_token_id: int):
        self.sides = sides
        self.weights = list(weights)
        self.pad = SFTCollator(pad_token_id)
        # decided for the data, not per batch: every rank then runs the same collectives in every step
        self.per_pair = len(set(self.weights)) > 1

    def rows(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A padded SFT batch as DPO rows: labels become the completion mask."""
        batch["completion_mask"] = (batch.pop("labels") != IGNORE_INDEX).long()
        return batch

    def pair(self, index: int, errors: list[dict[str, Any]]) -> tuple[int, dict[str, Any], dict[str, Any]]:
        """Pair `index`'s two sides, or the next pair's whose images decode (the failures go to `errors`)."""
        n = len(self.weights)
        for k in range(n):
            i = (index + k) % n
            chosen, rejected = self.sides[2 * i], self.sides[2 * i + 1]
            failed = [side["image_error"] for side in (chosen, rejected) if "image_error" in side]
            if not failed:
                return i, chosen, rejected
            errors.extend(failed)
        raise RuntimeError(f"no preference pair's images decode ({errors[0]['source']}:{errors[0]['line']}: "
                           f"{errors[0]['reason']}, ...)")

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        errors: list[dict[str, Any]] = []
        pairs = [self.pair(int(f["pair"]), errors) for f in features]
        index = [i for i, _, _ in pairs]
        weights = torch.tensor([self.weights[i] for i in index], dtype=torch.float32)
        if self.per_pair:
            batch: dict[str, Any] = {PAIR_BATCHES: [
                {k: v for k, v in self.rows(self.pad([c, r])).items() if k != "sample_ids"} for _, c, r in pairs]}
            batch["sample_ids"] = [c["sample_id"] for _, c, _ in pairs]
        else:
            batch = self.rows(self.pad([c for _, c, _ in pairs] + [r for _, _, r in pairs]))
        batch[PAIR_WEIGHTS] = weights
        if errors:
            batch[IMAGE_ERRORS] = errors
        return batch
