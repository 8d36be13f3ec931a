"""Attention over packed rows: each sample attends only to itself, at the cost of its own length squared.

A packed micro-batch is one row of concatenated samples that states its own boundaries (`cu_seq_lens_q/k`,
`max_length_q/k`, the keyword arguments of flash-attention's variable-length kernel, and positions restarting
per sample; see medllava.data.packing). Who reads the boundaries depends on the LLM's attention implementation:

- flash_attention_2/3/4: transformers calls the variable-length kernel with them (no mask at all);
- sdpa and eager: the LLM is switched, for training, to `VARLEN_SDPA`, registered here through transformers'
  `AttentionInterface`: PyTorch SDPA run once per sample with `is_causal`, so the work is the sum of the samples'
  squared lengths (a dense block-diagonal mask over the row costs the row's length squared, most of it masked),
  and no L x L mask is ever built;
- anything else (flex attention, hub kernels): packing is not offered (`packed_implementation` returns None).

Isolation comes from the batch alone: no attention mask, KV-cache flag or other side setting is involved, so the
same packed batch is isolated with the cache on or off. `VARLEN_SDPA` outside packed rows is plain causal SDPA;
it refuses padded batches (a 2D padding mask), which training with packing never makes.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

from medllava.families import family_of

VARLEN_SDPA = "medllava_varlen_sdpa"
FLASH_PREFIX = "flash_attention"
SWITCHED = ("sdpa", "eager")
"""Implementations that packed training runs as VARLEN_SDPA (eager computes the same attention, only slower)."""


def segment_bounds(cu_seq_lens: torch.Tensor | None, position_ids: torch.Tensor | None,
                   length: int) -> list[int] | None:
    """Sample boundaries of a packed row: from `cu_seq_lens` when the batch states them, else (as transformers'
    flash path does for one row) wherever the positions restart; None for an ordinary sequence."""
    if cu_seq_lens is not None:
        bounds = [int(b) for b in cu_seq_lens.tolist()]
        if bounds[0] != 0 or bounds[-1] != length or any(b <= a for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"cu_seq_lens {bounds} do not cut a row of {length} tokens into samples")
        return bounds
    if position_ids is None or position_ids.shape[0] != 1 or position_ids.shape[-1] != length:
        return None
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    if starts[:1] != [0] or len(starts) == 1:
        return None
    return [*starts, length]


def _window_mask(n: int, window: int, device: torch.device) -> torch.Tensor:
    """Causal and at most `window` tokens back (transformers' sliding-window rule), as a boolean [1, 1, n, n]."""
    q = torch.arange(n, device=device)[:, None]
    k = torch.arange(n, device=device)[None, :]
    return ((k <= q) & (k > q - window))[None, None]


def varlen_sdpa_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                        sliding_window: int | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention of one packed row, sample by sample (query/key/value: [batch, heads, length, head_dim]).

    Returns [batch, length, heads, head_dim] as every transformers attention function does."""
    if attention_mask is not None:
        raise ValueError(f"{VARLEN_SDPA} takes packed rows (no padding mask); padded batches use sdpa")
    length = query.shape[2]
    bounds = None
    if key.shape[2] == length and query.shape[0] == 1:
        bounds = segment_bounds(kwargs.get("cu_seq_lens_q"), kwargs.get("position_ids"), length)
        cu_k = kwargs.get("cu_seq_lens_k")
        if bounds is not None and cu_k is not None and [int(b) for b in cu_k.tolist()] != bounds:
            raise ValueError("cu_seq_lens_k differ from cu_seq_lens_q: packed self-attention needs them equal")
    elif kwargs.get("cu_seq_lens_q") is not None:
        raise ValueError(f"packed rows come one per batch with keys as long as queries (got query {tuple(query.shape)},"
                         f" key {tuple(key.shape)})")
    if bounds is None:
        bounds = [0, length]
    sizes = [end - start for start, end in zip(bounds, bounds[1:])]
    outputs = []
    # split (not slices): its backward is one concatenation, where each slice's backward would fill a zero
    # tensor of the whole row
    for q, k, v in zip(query.split(sizes, dim=2), key.split(sizes, dim=2), value.split(sizes, dim=2)):
        n = q.shape[2]
        mask = _window_mask(n, sliding_window, q.device) if sliding_window is not None and n > sliding_window else None
        out, _ = sdpa_attention_forward(module, q, k, v, mask, dropout=dropout, scaling=scaling, is_causal=mask is None)
        outputs.append(out)
    return (outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)), None


def register() -> None:
    """Make `VARLEN_SDPA` a name transformers accepts (idempotent). Its mask function is flash-attention's:
    no mask for packed rows, so the row's L x L mask is never built."""
    AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_forward)
    AttentionMaskInterface.register(VARLEN_SDPA, flash_attention_mask)


def llm_of(model: torch.nn.Module) -> Any:
    """The decoder (the LLM without its head) of a model of any family, PEFT-wrapped or not."""
    return family_of(model).language_model_of(model)


def llm_attention(model: torch.nn.Module) -> str:
    """The attention implementation the model's LLM runs."""
    return str(llm_of(model).config._attn_implementation or "")


def packed_implementation(implementation: str) -> str | None:
    """The implementation that isolates packed samples for an LLM running `implementation`, or None."""
    if implementation.startswith(FLASH_PREFIX) or implementation == VARLEN_SDPA:
        return implementation
    if implementation in SWITCHED:
        return VARLEN_SDPA
    return None


def set_llm_attention(model: torch.nn.Module, implementation: str) -> str:
    """Switch the LLM (not the vision tower) to `implementation`; returns the one it ran before.

    The implementation is a run-time setting (`config.json` never records it), so saved models load with the
    default implementation wherever they go."""
    llm = llm_of(model)
    before = str(llm.config._attn_implementation or "")
    if implementation != before:
        if implementation == VARLEN_SDPA:
            register()
        llm.set_attn_implementation(implementation)
    return before
