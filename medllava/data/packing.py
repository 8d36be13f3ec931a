"""Padding-free multimodal packing: each micro-batch is one row of samples, each attending only to itself.

Training packs each micro-batch (`SamplePackingCollator`): the per-device batch is a number of samples, as
without packing, and its samples are concatenated into one row with no padding at all. So the samples per
optimizer step are what the stage says whatever the packing, and rows differ every epoch (they follow the
sampler's shuffled order).

The row states its own sample boundaries: `cu_seq_lens_q/k` (cumulative sample lengths) and `max_length_q/k`,
the keyword arguments of flash-attention's variable-length kernel, and `position_ids` restarting at 0 for each
sample. It carries no attention mask. medllava.attention says who reads the boundaries (flash-attention's
variable-length kernel, or SDPA run sample by sample), so attention costs the sum of the samples' squared lengths
and no setting beside the batch (such as the KV cache) decides the isolation. `packing_isolates` checks on the
model about to train, on the training device and in its precision, with the training collator, that packed
logits equal separate ones.

The first label of every sample is ignored, so no prediction crosses a sample boundary: the set of
supervised predictions, and so the token-normalised loss, is exactly that of unpacked training.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from medllava.data.collate import IMAGE_ERRORS, token_type_keys, with_bookkeeping, with_image
from medllava.data.render import IGNORE_INDEX
from medllava.families import family_of

logger = logging.getLogger(__name__)


class SamplePackingCollator:
    """A micro-batch of samples -> one packed row with its sample boundaries (see the module docstring)."""

    def __init__(self, filler: dict[str, Any] | None = None) -> None:
        self.filler = filler  # a blank image for micro-batches without one (medllava.data.collate)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        features = with_image(features, self.filler)
        labels = []
        for f in features:
            lab = f["labels"].clone()
            lab[0] = IGNORE_INDEX  # the first token of a sample predicts nothing across the boundary
            labels.append(lab)
        lengths = torch.tensor([f["input_ids"].shape[0] for f in features])
        cu_seq_lens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        longest = int(lengths.max())
        batch = {
            "input_ids": torch.cat([f["input_ids"] for f in features])[None],
            "labels": torch.cat(labels)[None],
            "position_ids": torch.cat([torch.arange(int(n)) for n in lengths])[None],
            "cu_seq_lens_q": cu_seq_lens,
            "cu_seq_lens_k": cu_seq_lens,
            "max_length_q": longest,
            "max_length_k": longest,
        }
        for key in token_type_keys(features):
            batch[key] = torch.cat([f.get(key, torch.zeros_like(f["input_ids"])) for f in features])[None]
        return with_bookkeeping(batch, features)


def with_packed_positions(model: torch.nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
    """A packed batch with the positions its model family needs (M-RoPE's, computed sample by sample with the
    model: see Family.packed_positions); other batches, and families whose 1-D positions serve, unchanged."""
    positions = family_of(model).packed_positions
    if positions is None or "cu_seq_lens_q" not in batch:
        return batch
    return {**batch, "position_ids": positions(model, batch)}


BOUNDARY_KEYS = ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
"""What states a packed row's sample boundaries; without them the row is one long sequence."""


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
    or library version. The yardstick is the same row run without its boundaries (later samples then see
    earlier ones): isolation holds when the packed error is tiny in absolute terms or small next to that leak.
    Returns (isolated, max |packed - separate|, max |leaking - separate|).
    """
    import contextlib

    param = next(p for p in model.parameters() if p.is_floating_point())
    device = param.device
    generator = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, vocab_size, (n,), generator=generator) for n in (9, 6, 5)]
    collator = collator or SamplePackingCollator()
    batch = collator([{"input_ids": s, "labels": s.clone(), "sample_id": f"probe-{i}"} for i, s in enumerate(seqs)])
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()
              if k not in ("sample_ids", "labels", IMAGE_ERRORS)}
    was_training = model.training
    model.eval()
    try:
        with autocast if autocast is not None else contextlib.nullcontext():
            mixed = torch.is_autocast_enabled(device.type)
            separate = [model(input_ids=s[None].to(device), use_cache=False).logits[0].float() for s in seqs]
            packed = model(**with_packed_positions(model, inputs)).logits.float()
            plain = {k: v for k, v in inputs.items() if k not in (*BOUNDARY_KEYS, "attention_mask")}
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
