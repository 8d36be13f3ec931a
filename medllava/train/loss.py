"""The SFT loss computed only where labels are supervised: the LM head and cross-entropy skip every other position.

Image tokens, prompts and system text carry ignored labels, yet the stock forward projects every position onto
the vocabulary and takes the cross-entropy of all of them. Here the trainer asks the model for the logits of the
supervised positions alone (`logits_to_keep` as an index tensor, a stock argument of every transformers causal
LM) and the loss is transformers' own `fixed_cross_entropy` over them: the same sum, divided by the same
`num_items_in_batch`, so gradient accumulation and the Trainer's scaling across ranks are unchanged. With Liger
the patched forward takes the same positions (`shift_labels`) and fuses the head with the loss.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.loss.loss_utils import fixed_cross_entropy

from medllava.data.render import IGNORE_INDEX


def supervised_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep, targets): the positions whose next token is supervised in any row, and those next tokens
    ([rows, len(keep)], ignored where a row is not supervised there). Never empty: a batch with nothing
    supervised keeps one ignored position, so the head still takes part in the graph (DDP expects it to)."""
    supervised = (labels[:, 1:] != IGNORE_INDEX).any(dim=0)
    keep = supervised.nonzero().flatten()
    if keep.numel() == 0:
        keep = torch.zeros(1, dtype=torch.long, device=labels.device)
        return keep, torch.full((labels.shape[0], 1), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
    return keep, labels[:, keep + 1]


def head_inputs(labels: torch.Tensor, liger: bool = False) -> dict[str, Any]:
    """What replaces `labels` in the model's inputs: the positions to project and the targets there (as
    `labels` for `supervised_loss`, as `shift_labels` for Liger's fused head and loss)."""
    keep, targets = supervised_positions(labels)
    return {"logits_to_keep": keep, "shift_labels" if liger else "labels": targets}


def supervised_loss(outputs: Any, labels: torch.Tensor | None, num_items_in_batch: Any = None) -> torch.Tensor:
    """The Trainer's `compute_loss_func`: cross-entropy of the kept logits against their targets (or the loss
    Liger's fused forward already computed on the same positions), normalised as transformers normalises it."""
    loss = outputs.get("loss") if isinstance(outputs, dict) else None
    if loss is not None:
        return loss
    logits = outputs["logits"].float()
    return fixed_cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).to(logits.device),
                               num_items_in_batch, IGNORE_INDEX)
