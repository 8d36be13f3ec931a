"""The SFT stage runner (alignment and instruction tuning), on the Hugging Face Trainer.

Reads top to bottom: resolve precision -> load or assemble the model -> check and render every record ->
apply the trainable spec -> train (resuming from the newest checkpoint) -> save model, config and log.
The Trainer customisations (projector learning rate, strict resume) live in train/common.py.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

from medllava.attention import llm_attention, packed_implementation, set_llm_attention
from medllava.config import ConfigError, StageConfig
from medllava.data.cache import CachedSamples
from medllava.data.collate import SFTCollator, SFTDataset
from medllava.data.packing import SamplePackingCollator, packing_isolates, with_packed_positions
from medllava.data.render import Rendered, Renderer
from medllava.data.validate import prepare_samples
from medllava.imaging import Window
from medllava.model import apply_trainable, default_attn_implementation
from medllava.train.common import (
    MedLlavaTrainerMixin,
    StageRun,
    begin_rendering_stage,
    cached_rendering,
    cast_trainable_to_fp32,
    guard_kwargs,
    save_base_if_needed,
    trainer_kwargs,
)
from medllava.train.loss import head_inputs, supervised_loss

logger = logging.getLogger(__name__)


class MedLlavaTrainer(MedLlavaTrainerMixin, Trainer):
    """The HF Trainer with medllava's optimizer groups, guarded loss, atomic checkpoints and strict resume; the LM
    head and loss run only where labels are supervised (medllava.train.loss; `supervised_head=False` runs the
    stock forward over every position, the reference the tests compare with)."""

    def __init__(self, *args: Any, supervised_head: bool = True, **kwargs: Any) -> None:
        self.supervised_head = supervised_head
        if supervised_head:
            kwargs["compute_loss_func"] = supervised_loss
        super().__init__(*args, **kwargs)

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> Any:
        inputs = with_packed_positions(model, inputs)
        if self.supervised_head and "labels" in inputs:
            inputs = {**inputs, **head_inputs(inputs["labels"], liger=bool(self.args.use_liger_kernel))}
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)


def training_arguments(cfg: StageConfig, precision: str) -> TrainingArguments:
    """TrainingArguments for an SFT stage (every knob comes from the stage config)."""
    return TrainingArguments(**trainer_kwargs(cfg, precision), label_names=["labels"])


def batching(cfg: StageConfig, model: Any, processor: Any, dataset: SFTDataset) -> Any:
    """The collator: each micro-batch packed into one row (the LLM switched to the attention that reads the row's
    sample boundaries, see medllava.attention) unless packing is off or no such attention exists for this LLM;
    `check_packing` then probes it on the placed model."""
    filler = dataset.image_filler()
    refusal = dataset.images.family.packing_refusal
    if cfg.data.packing is not False and refusal is not None:
        packing_off(cfg, refusal)
    elif cfg.data.packing is not False:
        running = llm_attention(model)
        isolating = packed_implementation(running)
        if isolating is not None:
            set_llm_attention(model, isolating)
            return SamplePackingCollator(filler)
        packing_off(cfg, f"the LLM's attention implementation {running!r} cannot isolate packed samples (sdpa, "
                         "eager and flash_attention_2/3 can)")
    return SFTCollator(processor.tokenizer.pad_token_id, filler=filler)


def packing_off(cfg: StageConfig, reason: str) -> None:
    """Packing cannot run: an error when the stage asks for it (`packing: true`), else a warning."""
    if cfg.data.packing is True:
        raise ConfigError(f"data.packing: {reason}")
    logger.warning("packing off: %s", reason)


def check_packing(cfg: StageConfig, trainer: Any, processor: Any) -> None:
    """Probe packed isolation with the trainer's model where it will train (device, dtypes, mixed precision) and
    its collator's layout; with packing 'auto' a failing probe falls back to padded batches with a warning."""
    collator = trainer.data_collator
    if not isinstance(collator, SamplePackingCollator):
        return
    isolated, diff, leak = packing_isolates(trainer.model, len(processor.tokenizer), collator,
                                            autocast=trainer.accelerator.autocast())
    if isolated:
        logger.info("packing on: one row per micro-batch, attention %s; isolation checked on %s (max |logit diff| "
                    "%.2e, leak would be %.2e)", llm_attention(trainer.model), trainer.args.device, diff, leak)
        return
    packing_off(cfg, f"packed samples are not isolated on this model (max |logit diff| {diff:.2e} vs {leak:.2e} when "
                     f"leaking, attention {llm_attention(trainer.model)!r}); check the attention implementation")
    set_llm_attention(trainer.model, cfg.model.attn_implementation or default_attn_implementation())
    trainer.data_collator = SFTCollator(processor.tokenizer.pad_token_id, filler=collator.filler)


def prepared_samples(cfg: StageConfig, renderer: Renderer, out: Path) -> Sequence[Rendered]:
    """Checked and rendered samples, prepared once per data version (train/common.cached_rendering) and read by
    every rank; the data report of the preparation is copied into the output folder."""
    d = cfg.data

    def make(report_dir: Path | None) -> tuple[Sequence[Rendered], dict[str, Any], dict[str, str]]:
        samples, report = prepare_samples(d.train_files, renderer, image_folder=d.image_folder,
                                          allow_absolute_paths=d.allow_absolute_paths, skip_invalid=d.skip_invalid,
                                          report_dir=report_dir, max_samples=d.max_samples,
                                          image_check=d.image_check, workers=d.preprocess_workers,
                                          slices=cfg.slice_spec())
        return samples, report.to_dict(), {}

    folder = cached_rendering(cfg, renderer, out, "sft", "samples", make)
    samples = CachedSamples(folder)
    logger.info("data: %d samples (rendered once, cached in %s)", len(samples), folder)
    return samples


def prepare_sft(cfg: StageConfig) -> StageRun:
    """Load the model, check and render the data, apply the trainable spec, and build the trainer."""
    start = begin_rendering_stage(cfg)
    processor = start.processor
    samples = prepared_samples(cfg, start.renderer, start.out)
    base_ref = save_base_if_needed(cfg, start.model, processor, start.base_ref)
    model = apply_trainable(start.model, cfg.trainable, cfg.lora, gradient_checkpointing=cfg.run.gradient_checkpointing)
    cast_trainable_to_fp32(model, start.precision, cfg.run.deepspeed)

    window = Window.parse(cfg.data.window) if cfg.data.window else None
    dataset = SFTDataset(samples, start.renderer.images, window=window)
    collator = batching(cfg, model, processor, dataset)
    trainer = MedLlavaTrainer(
        model=model,
        args=training_arguments(cfg, start.precision),
        train_dataset=dataset,
        data_collator=collator,
        processing_class=processor,
        **guard_kwargs(cfg),
    )
    check_packing(cfg, trainer, processor)
    return StageRun(cfg, trainer, processor, base_ref, start.checkpoint)

