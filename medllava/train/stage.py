"""The table of stage kinds: for each `kind:` of a stage config, the function that prepares its run and how its
outputs describe themselves.

Every kind runs one skeleton (train/common.py): `begin_stage` (checks, ranks, model) -> the kind's data -> the
trainable spec -> the kind's trainer -> `train_and_save` (resume, checkpoints, output folder). A new kind is its
`prepare_*` function returning a StageRun, its config section (checked in StageConfig.validate) and one entry here.
Light on purpose: the config, export and evaluation read this table without importing torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from medllava.config import StageConfig


@dataclass(frozen=True)
class StageKind:
    """One kind of stage."""

    name: str
    runner: str
    """'module:function' that prepares the run (loads the model, data and trainer) and returns a StageRun."""
    batch_unit: str
    """What the global batch counts (samples, completions, pairs)."""
    loader_images: bool
    """Images are decoded in the data loader: failures there are skipped, counted and merged into the report."""
    packs: bool
    """Micro-batches may be packed into one row (data.packing)."""

    def prepare(self, cfg: StageConfig) -> Any:
        module, function = self.runner.split(":")
        return getattr(importlib.import_module(module), function)(cfg)


STAGE_KINDS = MappingProxyType({
    "sft": StageKind("sft", "medllava.train.sft:prepare_sft", "samples", loader_images=True, packs=True),
    "grpo": StageKind("grpo", "medllava.train.grpo:prepare_grpo", "completions", loader_images=False, packs=False),
    "dpo": StageKind("dpo", "medllava.train.dpo:prepare_dpo", "pairs", loader_images=True, packs=False),
})


def run_stage(cfg: StageConfig) -> Path:
    """Run one stage end to end (resuming where a checkpoint exists); returns its output folder."""
    from medllava.train.common import train_and_save

    return train_and_save(STAGE_KINDS[cfg.kind].prepare(cfg))
