"""The DPO stage runner (preference optimisation on image-grounded pairs), on TRL's DPOTrainer.

Reads top to bottom: load the previous stage's model -> read, check and render both sides of every pair (SFT's
rules; cached per data version) -> keep a frozen reference (a copy of the starting model; with LoRA no second
model: TRL keeps a frozen copy of the starting adapter) -> apply the trainable spec -> TRL's DPO losses on
batches in which each side carries its own images (medllava.data.collate.PreferenceCollator) -> save like every
stage. Each pair's loss is multiplied by its record's weight (MMedPO's clinical-relevance weighting).
TRL logs rewards/chosen, rewards/rejected, rewards/accuracies and rewards/margins per logging step.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import torch

from medllava import dist as ranks
from medllava.config import ConfigError, StageConfig
from medllava.data.cache import CachedSamples
from medllava.data.collate import PAIR_BATCHES, PAIR_WEIGHTS, PreferenceCollator, SFTDataset
from medllava.data.preference import prepare_pairs
from medllava.data.render import Renderer
from medllava.imaging import Window
from medllava.model import apply_trainable
from medllava.train.common import (
    MedLlavaTrainerMixin,
    StageRun,
    begin_rendering_stage,
    cached_rendering,
    cast_trainable,
    cast_trainable_to_fp32,
    guard_kwargs,
    save_base_if_needed,
    trainer_kwargs,
    uses_lora,
)

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "weights.json"


def _dpo_trainer_class() -> type:
    from trl import DPOTrainer

    class WeightedDPOTrainer(DPOTrainer):
        """TRL's DPO loss with each pair's loss multiplied by its record's weight."""

        def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: torch.Tensor | int | None = None) -> Any:
            weights = inputs.pop(PAIR_WEIGHTS, None)
            per_pair = inputs.pop(PAIR_BATCHES, None)
            if per_pair is not None:
                # the data's weights differ and TRL's loss is a mean over a batch's pairs: each pair runs alone
                # and is weighted (in every batch on every rank alike, so the ranks' metric gathers stay in step)
                losses = [super(WeightedDPOTrainer, self).compute_loss(model, sub, False, num_items_in_batch) * w
                          for sub, w in zip(per_pair, weights, strict=True)]
                return torch.stack(losses).mean()
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if weights is None:
                return loss
            if not bool((weights == weights[0]).all()):
                raise ValueError("pairs of different weights need their per-pair batches (PreferenceCollator)")
            # every pair of the data has this weight: the batch's mean loss times it
            return (loss[0] * weights[0], loss[1]) if return_outputs else loss * weights[0]

    class MedLlavaDPOTrainer(MedLlavaTrainerMixin, WeightedDPOTrainer):
        """TRL's DPOTrainer with medllava's optimizer groups, guard (once per micro-batch, on its weighted loss),
        atomic checkpoints and strict resume."""

        def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
            unwrapped = self.accelerator.unwrap_model(self.model)
            if not _internal_call and "ref" in getattr(unwrapped, "peft_config", {}):
                # TRL's frozen copy of the starting adapter is the reference, not part of the stage's output
                unwrapped.delete_adapter("ref")
            super().save_model(output_dir, _internal_call)

    return MedLlavaDPOTrainer


def dpo_arguments(cfg: StageConfig, precision: str) -> Any:
    """DPOConfig from the stage config: the shared Trainer fields plus the DPO ones (TRL's names)."""
    from trl import DPOConfig

    d = cfg.dpo
    return DPOConfig(
        **trainer_kwargs(cfg, precision),
        beta=d.beta,
        loss_type=d.loss_types(),
        loss_weights=d.weights(),
        label_smoothing=d.label_smoothing,
        f_divergence_type=d.f_divergence_type,
        f_alpha_divergence_coef=d.f_alpha_divergence_coef,
        ld_alpha=d.ld_alpha,
        use_weighting=d.use_weighting,
        max_length=None,  # over-long pairs are invalid records (data.max_length), never truncated
        precompute_ref_log_probs=False,
    )


def prepared_pairs(cfg: StageConfig, renderer: Renderer, out: Path) -> tuple[CachedSamples, list[float]]:
    """Both sides of every checked and rendered pair (pair i = sides 2i, 2i+1) and the pairs' weights, prepared
    once per data version (train/common.cached_rendering) and read by every rank."""
    d = cfg.data

    def make(report_dir: Path | None) -> tuple[list[Any], dict[str, Any], dict[str, str]]:
        samples, weights, report = prepare_pairs(
            d.train_files, renderer, image_folder=d.image_folder, allow_absolute_paths=d.allow_absolute_paths,
            skip_invalid=d.skip_invalid, report_dir=report_dir, max_samples=d.max_samples,
            image_check=d.image_check, workers=d.preprocess_workers, slices=cfg.slice_spec())
        return samples, report.to_dict(), {WEIGHTS_FILE: json.dumps(weights)}

    folder = cached_rendering(cfg, renderer, out, "dpo", "preference pairs", make)
    weights = json.loads((folder / WEIGHTS_FILE).read_text(encoding="utf-8"))
    logger.info("data: %d preference pairs (rendered once, cached in %s)", len(weights), folder)
    return CachedSamples(folder), weights


def check_images_on_every_side(sides: CachedSamples) -> None:
    """With several ranks every side needs an image: a micro-batch without one would leave the vision tower and
    projector out of its step (under DDP the projector's gradient is then missing; under ZeRO-3 the ranks'
    parameter gathers part ways). SFT adds a blank-image filler row there; a DPO batch's rows come in chosen /
    rejected halves, so text-only pairs are refused instead (one rank trains them)."""
    if ranks.world_size() == 1:
        return
    text_only = [m for m in (sides.meta(i) for i in range(len(sides))) if not m["images"]]
    if text_only:
        named = ", ".join(f"{m['source']}:{m['line']} ({m['id']})" for m in text_only[:5])
        raise ConfigError(f"data.train_files: {len(text_only)} pair side(s) without an image ({named}"
                          f"{', ...' if len(text_only) > 5 else ''}); DPO on several ranks needs an image on every "
                          "side (train text-only pairs on one rank, or give them their images)")


def pair_index(sides: CachedSamples, n: int) -> Any:
    """The `datasets` table TRL's trainer iterates: one row per pair (its index, and the chosen side's images,
    which mark the set as a vision one for TRL: it then leaves the rows to the collator)."""
    from datasets import Dataset

    return Dataset.from_dict({"pair": list(range(n)), "images": [[str(r) for r in sides.meta(2 * i)["images"]]
                                                                 for i in range(n)]})


def prepare_dpo(cfg: StageConfig) -> StageRun:
    """Load the model, check and render the pairs, keep the reference, apply the trainable spec, build the trainer."""
    start = begin_rendering_stage(cfg)
    processor, precision = start.processor, start.precision
    sides, weights = prepared_pairs(cfg, start.renderer, start.out)
    check_images_on_every_side(sides)
    base_ref = save_base_if_needed(cfg, start.model, processor, start.base_ref)
    # Full or projector-only training keeps a frozen copy of the starting model as the reference; LoRA needs none
    # (TRL adds a frozen copy of the starting adapter).
    reference = None if uses_lora(cfg) else copy.deepcopy(start.model).eval().requires_grad_(False)
    model = apply_trainable(start.model, cfg.trainable, cfg.lora, gradient_checkpointing=cfg.run.gradient_checkpointing)
    cast_trainable_to_fp32(model, precision, cfg.run.deepspeed)
    window = Window.parse(cfg.data.window) if cfg.data.window else None
    collator = PreferenceCollator(SFTDataset(sides, start.renderer.images, window=window),
                                  weights if cfg.dpo.pair_weights else [1.0] * len(weights),
                                  processor.tokenizer.pad_token_id)
    trainer = _dpo_trainer_class()(
        model=model,
        ref_model=reference,
        args=dpo_arguments(cfg, precision),
        train_dataset=pair_index(sides, len(weights)),
        data_collator=collator,
        processing_class=processor,
        **guard_kwargs(cfg),
    )
    if precision == "fp32":  # TRL casts a quantized model's trainable weights to bf16 (see grpo.py)
        cast_trainable(trainer.model, torch.float32)
    return StageRun(cfg, trainer, processor, base_ref, start.checkpoint)
