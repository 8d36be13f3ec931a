"""The SFT stage runner (alignment and instruction tuning), on the Hugging Face Trainer.

Reads top to bottom: resolve precision -> load or assemble the model -> check and render every record ->
apply the trainable spec -> train (resuming from the newest checkpoint) -> save model, config and log.
The Trainer customisations (projector learning rate, strict resume) live in train/common.py.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

from medllava import dist as ranks
from medllava.attention import llm_attention, packed_implementation, set_llm_attention
from medllava.config import ConfigError, StageConfig
from medllava.data.cache import CachedSamples, build_once, cache_key, tokenizer_fingerprint, write_samples
from medllava.data.collate import SFTCollator, SFTDataset
from medllava.data.packing import SamplePackingCollator, packing_isolates, with_packed_positions
from medllava.data.render import Rendered, Renderer
from medllava.data.validate import REPORT_NAME, prepare_samples
from medllava.imaging import Window
from medllava.model import apply_trainable, default_attn_implementation
from medllava.train.common import (
    LOADER_SKIPS,
    MedLlavaTrainerMixin,
    StageRun,
    begin_stage,
    cast_trainable_to_fp32,
    guard_kwargs,
    resume_checkpoint,
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
    """Checked and rendered samples, prepared once per data version by the writer and read by every rank.

    The cache (medllava.data.cache) is keyed by the data files' identity and everything the rendering reads;
    the data report of the preparation is copied into the output folder.
    """
    d = cfg.data
    key = cache_key(d.train_files, image_folder=str(Path(d.image_folder).resolve()), format=d.format,
                    max_length=d.max_length, system_prompt=d.system_prompt, skip_invalid=d.skip_invalid,
                    allow_absolute_paths=d.allow_absolute_paths, max_samples=d.max_samples, image_check=d.image_check,
                    tokenizer=tokenizer_fingerprint(renderer.tokenizer), chat_template=str(renderer.template),
                    image_tokens=renderer.images.fingerprint())
    folder = Path(d.cache_dir or out / ".data_cache") / f"sft-{key}"

    def build() -> None:
        def write(staging: Path) -> None:
            # The report goes beside the run (also when bad records stop it; written by the job's writer only),
            # and into the cache with the samples.
            samples, report = prepare_samples(d.train_files, renderer, image_folder=d.image_folder,
                                              allow_absolute_paths=d.allow_absolute_paths, skip_invalid=d.skip_invalid,
                                              report_dir=out if ranks.is_writer() else None,
                                              max_samples=d.max_samples, image_check=d.image_check,
                                              workers=d.preprocess_workers)
            write_samples(samples, staging, folder, report.to_dict())

        # another job (or node) on the same cache_dir may be making it: build_once waits for it and reuses it
        if not build_once(folder, write):
            logger.info("data: reusing the checked and rendered samples in %s", folder)
            if ranks.is_writer():
                (out / REPORT_NAME).write_text(json.dumps(CachedSamples(folder).report(), indent=2,
                                                          ensure_ascii=False), encoding="utf-8")

    # once per node: the cache may be on each node's own disk (data.cache_dir on local scratch)
    ranks.on_node_writer(build, "checking and rendering the data")
    samples = CachedSamples(folder)
    logger.info("data: %d samples (rendered once, cached in %s)", len(samples), folder)
    return samples


def prepare_sft(cfg: StageConfig) -> StageRun:
    """Load the model, check and render the data, apply the trainable spec, and build the trainer."""
    out, precision, model, processor, base_ref = begin_stage(cfg)
    checkpoint = resume_checkpoint(cfg)
    if checkpoint is None:  # a fresh run reports only its own loader-time skips
        ranks.on_writer(lambda: shutil.rmtree(out / LOADER_SKIPS, ignore_errors=True), "clearing old loader skips")
    renderer = Renderer(processor, cfg.data.format, cfg.data.max_length, cfg.data.system_prompt)
    samples = prepared_samples(cfg, renderer, out)
    base_ref = save_base_if_needed(cfg, model, processor, base_ref)
    model = apply_trainable(model, cfg.trainable, cfg.lora, gradient_checkpointing=cfg.run.gradient_checkpointing)
    cast_trainable_to_fp32(model, precision, cfg.run.deepspeed)

    window = Window.parse(cfg.data.window) if cfg.data.window else None
    dataset = SFTDataset(samples, renderer.images, window=window)
    collator = batching(cfg, model, processor, dataset)
    trainer = MedLlavaTrainer(
        model=model,
        args=training_arguments(cfg, precision),
        train_dataset=dataset,
        data_collator=collator,
        processing_class=processor,
        **guard_kwargs(cfg),
    )
    check_packing(cfg, trainer, processor)
    return StageRun(cfg, trainer, processor, base_ref, checkpoint)

