"""Padding-free multimodal packing: several samples per row, each attending only to itself.

Training packs each micro-batch (`SamplePackingCollator`): the per-device batch is a number of samples, as
without packing, and its samples go into as few rows of at most `pack_length` tokens as first fit finds. So
the samples per optimizer step are what the stage says whatever the packing, and bins differ every epoch
(they follow the sampler's shuffled order). `PackedDataset` (fixed bins over the whole set, rows counted
per batch) remains for the throughput benchmark's token-budget mode.

A packed row concatenates samples; `position_ids` restart at 0 for each sample, the row carries no
`attention_mask`, and the KV cache is off. From restarting positions transformers builds a block-diagonal
causal mask (SDPA, eager, flex) or variable-length flash-attention calls, so samples never see each other.
Transformers only looks for packed rows when there is neither a 2D attention mask nor a cache: with either,
samples silently attend across boundaries. Hence `use_cache=False` in every packed batch, and
`packing_isolates`, which checks on the model about to train, on the training device and in its precision, with
the training collator's own layout, that packed logits equal separate ones. Under flash-attention transformers
isolates packed samples only in a batch of one row, so there every micro-batch is packed into one row
(`one_row_layout`); SDPA, eager and flex take several rows.

The first label of every sample is ignored, so no prediction crosses a sample boundary: the set of
supervised predictions, and so the token-normalised loss, is exactly that of unpacked training.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from medllava.data.collate import FILLER_ID, IMAGE_ERRORS, add_pixels, image_errors, pad_right, with_image
from medllava.data.render import IGNORE_INDEX

logger = logging.getLogger(__name__)


def pack_bins(lengths: Sequence[int], capacity: int, seed: int | None = None) -> list[list[int]]:
    """Sample indices grouped into bins of at most `capacity` tokens.

    seed=None: first-fit decreasing (tightest, but each bin mixes long samples with the shortest ones).
    With a seed: first-fit over a shuffled order, so every row is a random mixture of samples, as a padded
    batch would be (what training wants); rows still fill well when samples are much shorter than a row.
    """
    if seed is None:
        order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    else:
        order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    bins: list[list[int]] = []
    room = FreeRoom(len(lengths))
    for i in order:
        if lengths[i] > capacity:
            raise ValueError(f"sample {i} has {lengths[i]} tokens, more than the packing capacity {capacity}")
        b = room.first_fit(lengths[i])
        if b is None:
            b = len(bins)
            bins.append([])
            room.set(b, capacity)
        bins[b].append(i)
        room.set(b, room.get(b) - lengths[i])
    return [sorted(b) for b in bins]


class FreeRoom:
    """Free tokens per bin in a max segment tree, so first fit (the lowest-numbered bin with enough room) takes
    O(log bins) instead of a scan over every bin: packing a 500k-sample alignment set stays a matter of seconds."""

    def __init__(self, max_bins: int) -> None:
        self.size = 1 << max(0, max_bins - 1).bit_length()
        self.tree = [-1] * (2 * self.size)  # leaves: room of bin i at size + i (-1: bin not open)

    def get(self, b: int) -> int:
        return self.tree[self.size + b]

    def set(self, b: int, free: int) -> None:
        i = self.size + b
        self.tree[i] = free
        while i > 1:
            i //= 2
            self.tree[i] = max(self.tree[2 * i], self.tree[2 * i + 1])

    def first_fit(self, need: int) -> int | None:
        if self.tree[1] < need:
            return None
        i = 1
        while i < self.size:
            i = 2 * i if self.tree[2 * i] >= need else 2 * i + 1
        return i - self.size


def pack_items(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate dataset items into one packed row (positions restart, first label of each sample ignored)."""
    ids, labels, positions, sample_ids = [], [], [], []
    for item in items:
        n = item["input_ids"].shape[0]
        ids.append(item["input_ids"])
        lab = item["labels"].clone()
        lab[0] = IGNORE_INDEX
        labels.append(lab)
        positions.append(torch.arange(n, dtype=torch.long))
        sample_ids.append(item["sample_id"])
    row: dict[str, Any] = {
        "input_ids": torch.cat(ids),
        "labels": torch.cat(labels),
        "position_ids": torch.cat(positions),
        "sample_id": sample_ids,
    }
    add_pixels(row, items)
    if errors := image_errors(items):
        row[IMAGE_ERRORS] = errors
    return row


class PackedDataset(Dataset):
    """Rows of packed samples over an SFT dataset (whose `lengths` are the expanded sample lengths)."""

    def __init__(self, base: Any, capacity: int, seed: int | None = 0) -> None:
        self.base = base
        self.capacity = capacity
        sample_lengths = base.lengths
        self.bins = pack_bins(sample_lengths, capacity, seed)
        self.lengths = [sum(sample_lengths[i] for i in b) for b in self.bins]
        n, rows = len(base), len(self.bins)
        fill = sum(self.lengths) / (rows * capacity) if rows else 0.0
        logger.info("packing: %d samples -> %d rows of <= %d tokens (%.1f%% full)", n, rows, capacity, 100 * fill)

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return pack_items([self.base[i] for i in self.bins[index]])


class PackedCollator:
    """Batch packed rows: pad each to the longest with a separate position run, ignored labels; no attention mask."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        longest = max(r["input_ids"].shape[0] for r in rows)
        input_ids, labels = pad_right(rows, longest, self.pad_token_id)
        position_ids = torch.zeros_like(input_ids)
        for k, r in enumerate(rows):
            n = r["input_ids"].shape[0]
            position_ids[k, :n] = r["position_ids"]
            position_ids[k, n:] = torch.arange(longest - n)  # padding is its own (ignored) sequence
        out: dict[str, Any] = {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": position_ids,
            "use_cache": False,  # a cache (or a 2D mask) turns off transformers' packed-sequence masking
            "sample_ids": [sid for r in rows for sid in r["sample_id"] if sid != FILLER_ID],
        }
        add_pixels(out, rows)
        if errors := image_errors(rows):
            out[IMAGE_ERRORS] = errors
        return out


class SamplePackingCollator:
    """A micro-batch of samples -> packed rows of at most `capacity` tokens (first fit decreasing), or one row
    holding every sample (`one_row`: the layout flash-attention needs, see `one_row_layout`)."""

    def __init__(self, pad_token_id: int, capacity: int, filler: dict[str, Any] | None = None,
                 one_row: bool = False) -> None:
        self.rows = PackedCollator(pad_token_id)
        self.capacity = capacity
        self.filler = filler  # a blank image for micro-batches without one (medllava.data.collate)
        self.one_row = one_row

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        features = with_image(features, self.filler)
        if self.one_row:
            return self.rows([pack_items(features)])
        bins = pack_bins([f["input_ids"].shape[0] for f in features], self.capacity)
        return self.rows([pack_items([features[i] for i in b]) for b in bins])


def one_row_layout(model: torch.nn.Module) -> bool:
    """Whether packed samples must share one row on this model: transformers isolates packed samples under
    flash-attention only in a batch of one row (`_is_packed_sequence` checks `batch_size == 1`, then calls the
    variable-length kernel with the sequence boundaries read from the restarting positions); with more rows it
    runs plain causal attention across the samples. SDPA, eager and flex build a block-diagonal mask per row from
    the positions, so several rows are fine there."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    impl = str(getattr(text, "_attn_implementation", None) or getattr(config, "_attn_implementation", None) or "")
    return "flash" in impl


def _locate(rows: torch.Tensor, seq: torch.Tensor) -> tuple[int, int]:
    n = len(seq)
    for r in range(rows.shape[0]):
        for start in range(rows.shape[1] - n + 1):
            if torch.equal(rows[r, start:start + n], seq):
                return r, start
    raise ValueError("probe sample not found in the packed batch")


@torch.no_grad()
def packing_isolates(model: torch.nn.Module, vocab_size: int, collator: Any = None,
                     autocast: Any = None) -> tuple[bool, float, float]:
    """Short text samples run separately and packed by `collator` (the training collator: its exact layout, its
    image filler); True when every sample's packed logits agree with its separate ones.

    Runs where the model is (the training device, its dtypes) under `autocast` (the trainer's mixed precision),
    so it checks the kernel and layout training will use, whatever the model family, attention implementation
    or library version. The yardstick is the same rows run without restarting positions (later samples then see
    earlier ones): isolation holds when the packed error is tiny in absolute terms or small next to that leak.
    Returns (isolated, max |packed - separate|, max |leaking - separate|).
    """
    import contextlib

    param = next(p for p in model.parameters() if p.is_floating_point())
    device = param.device
    generator = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, vocab_size, (n,), generator=generator) for n in (9, 6, 5)]
    collator = collator or SamplePackingCollator(0, sum(len(s) for s in seqs), one_row=True)
    batch = collator([{"input_ids": s, "labels": s.clone(), "sample_id": f"probe-{i}"} for i, s in enumerate(seqs)])
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()
              if k not in ("sample_ids", "labels", IMAGE_ERRORS)}
    was_training = model.training
    model.eval()
    try:
        with autocast if autocast is not None else contextlib.nullcontext():
            mixed = torch.is_autocast_enabled(device.type)
            separate = [model(input_ids=s[None].to(device), use_cache=False).logits[0].float() for s in seqs]
            packed = model(**inputs).logits.float()
            plain = {k: v for k, v in inputs.items() if k not in ("position_ids", "attention_mask")}
            leaking = model(**plain).logits.float()
    finally:
        model.train(was_training)
    diff = leak = 0.0
    for seq, sep in zip(seqs, separate):
        row, start = _locate(batch["input_ids"], seq)
        diff = max(diff, (packed[row, start:start + len(seq)] - sep).abs().max().item())
        leak = max(leak, (leaking[row, start:start + len(seq)] - sep).abs().max().item())
    floor = 1e-4 if param.dtype == torch.float32 and not mixed else 2e-2
    return diff <= floor or diff <= 0.05 * leak, diff, leak
