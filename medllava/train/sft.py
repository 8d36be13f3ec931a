"""The SFT stage runner (alignment and instruction tuning), on the Hugging Face Trainer.

Reads top to bottom: resolve precision -> load or assemble the model -> check and render every record ->
apply the trainable spec -> train (resuming from the newest checkpoint) -> save model, config and log.
The Trainer customisations (projector learning rate, strict resume) live in train/common.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainingArguments

from medllava.config import StageConfig
from medllava.data.collate import SFTCollator, SFTDataset
from medllava.data.render import Renderer
from medllava.data.validate import prepare_samples
from medllava.model import apply_trainable
from medllava.processor import num_image_tokens
from medllava.train.common import (
    MedLlavaTrainerMixin,
    begin_stage,
    cast_trainable_to_fp32,
    resume_checkpoint,
    save_base_if_needed,
    save_stage_output,
    trainer_kwargs,
)

logger = logging.getLogger(__name__)


class MedLlavaTrainer(MedLlavaTrainerMixin, Trainer):
    """The HF Trainer with medllava's optimizer groups, guarded loss, atomic checkpoints and strict resume."""


def training_arguments(cfg: StageConfig, precision: str) -> TrainingArguments:
    """TrainingArguments for an SFT stage (every knob comes from the stage config)."""
    return TrainingArguments(**trainer_kwargs(cfg, precision), label_names=["labels"])


@dataclass
class SFTRun:
    """Everything a prepared SFT stage needs to train and save."""

    cfg: StageConfig
    trainer: MedLlavaTrainer
    processor: Any
    base_ref: str | None
    checkpoint: str | None


def prepare_sft(cfg: StageConfig) -> SFTRun:
    """Load the model, check and render the data, apply the trainable spec, and build the trainer."""
    out, precision, model, processor, base_ref = begin_stage(cfg)
    renderer = Renderer(processor, cfg.data.format, cfg.data.max_length, cfg.data.system_prompt)
    samples, _report = prepare_samples(
        cfg.data.train_files,
        renderer,
        image_folder=cfg.data.image_folder,
        allow_absolute_paths=cfg.data.allow_absolute_paths,
        skip_invalid=cfg.data.skip_invalid,
        report_dir=out,
        max_samples=cfg.data.max_samples,
    )
    base_ref = save_base_if_needed(cfg, model, processor, base_ref)
    model = apply_trainable(model, cfg.trainable, cfg.lora, gradient_checkpointing=cfg.run.gradient_checkpointing)
    cast_trainable_to_fp32(model, precision, cfg.run.deepspeed)

    dataset = SFTDataset(samples, processor.image_processor, renderer.image_token_id, num_image_tokens(processor))
    trainer = MedLlavaTrainer(
        model=model,
        args=training_arguments(cfg, precision),
        train_dataset=dataset,
        data_collator=SFTCollator(processor.tokenizer.pad_token_id),
        processing_class=processor,
        projector_lr=cfg.optim.projector_lr,
        on_nonfinite=cfg.run.on_nonfinite,
        max_nonfinite_skips=cfg.run.max_nonfinite_skips,
    )
    return SFTRun(cfg, trainer, processor, base_ref, resume_checkpoint(cfg))


def run_sft(cfg: StageConfig) -> Path:
    """Run one SFT stage end to end; returns the output folder."""
    run = prepare_sft(cfg)
    if run.checkpoint:
        logger.info("resuming from %s", run.checkpoint)
    run.trainer.train(resume_from_checkpoint=run.checkpoint)
    return save_stage_output(cfg, run.trainer, run.processor, run.base_ref)
