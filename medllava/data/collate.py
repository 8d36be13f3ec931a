"""Turn rendered samples into model batches: expand `<image>` to the feature count, load pixels, pad.

The batch is exactly what `LlavaForConditionalGeneration.forward` takes (input_ids, attention_mask, labels,
pixel_values), plus `sample_ids` for error messages, which the trainer removes before the forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from medllava.data.render import IGNORE_INDEX, Rendered
from medllava.imaging import load_image


def expand_image_tokens(ids: np.ndarray, labels: np.ndarray, image_token_id: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Repeat each image placeholder n times (labels there are ignored)."""
    repeats = np.where(ids == image_token_id, n, 1)
    out_ids = np.repeat(ids, repeats)
    out_labels = np.repeat(labels, repeats)
    out_labels[out_ids == image_token_id] = IGNORE_INDEX
    return out_ids, out_labels


class SFTDataset(Dataset):
    """Rendered samples -> tensors; images are decoded and preprocessed on access (in DataLoader workers)."""

    def __init__(self, samples: Sequence[Rendered], image_processor: Any, image_token_id: int, tokens_per_image: int):
        self.samples = samples
        self.image_processor = image_processor
        self.image_token_id = image_token_id
        self.tokens_per_image = tokens_per_image

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def lengths(self) -> list[int]:
        return [s.length for s in self.samples]

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        ids, labels = expand_image_tokens(sample.input_ids, sample.labels, self.image_token_id, self.tokens_per_image)
        item: dict[str, Any] = {
            "input_ids": torch.from_numpy(ids),
            "labels": torch.from_numpy(labels),
            "sample_id": sample.id,
        }
        if sample.images:
            images = [load_image(ref) for ref in sample.images]
            item["pixel_values"] = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return item


class SFTCollator:
    """Right-pad ids (pad token) and labels (-100); concatenate the images of the batch in order."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        longest = max(f["input_ids"].shape[0] for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = (longest + m - 1) // m * m
        input_ids, labels = pad_right(features, longest, self.pad_token_id)
        attention_mask = torch.zeros_like(input_ids)
        for row, f in enumerate(features):
            attention_mask[row, : f["input_ids"].shape[0]] = 1
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "sample_ids": [f["sample_id"] for f in features],
        }
        add_pixels(batch, features)
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
