"""The SFT stage runner (alignment and instruction tuning), on the Hugging Face Trainer.

Reads top to bottom: resolve precision -> load or assemble the model -> check and render every record ->
apply the trainable spec -> train (resuming from the newest checkpoint) -> save model, config and log.
The only Trainer customisation is the optimizer's parameter groups (separate projector learning rate).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments, set_seed

from medllava.config import StageConfig
from medllava.data.collate import SFTCollator, SFTDataset
from medllava.data.render import Renderer
from medllava.data.validate import prepare_samples
from medllava.model import apply_trainable
from medllava.processor import num_image_tokens
from medllava.train.common import (
    load_stage_model,
    resolve_precision,
    resume_checkpoint,
    save_base_if_needed,
    save_stage_output,
)

logger = logging.getLogger(__name__)


class MedLlavaTrainer(Trainer):
    """Trainer with one extra: the projector may have its own learning rate."""

    def __init__(self, *args: Any, projector_lr: float | None = None, **kwargs: Any) -> None:
        self.projector_lr = projector_lr
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
        for name, param in opt_model.named_parameters():
            if not param.requires_grad:
                continue
            lr = self.args.learning_rate
            if self.projector_lr is not None and "multi_modal_projector" in name:
                lr = self.projector_lr
            wd = self.args.weight_decay if name in decay else 0.0
            groups.setdefault((lr, wd), []).append(param)
        param_groups = [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        optimizer_kwargs.pop("lr", None)
        self.optimizer = optimizer_cls(param_groups, lr=self.args.learning_rate, **optimizer_kwargs)
        return self.optimizer

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        """Resume full-model weights through `from_pretrained`, strictly.

        transformers saves Llava checkpoints in the original (llava-hf) key layout but the Trainer reloads them
        with a plain non-strict `load_state_dict`, so every key misses and training silently restarts from the
        initial weights (transformers issue #43701). `from_pretrained` applies the key conversion; the strict
        copy makes any remaining mismatch an error. Adapters, DeepSpeed and FSDP keep the Trainer's own paths.
        """
        model = self.model if model is None else model
        plain = not (self.is_deepspeed_enabled or self.is_fsdp_enabled or hasattr(model, "peft_config"))
        folder = Path(resume_from_checkpoint)
        has_weights = (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()
        if not (plain and has_weights):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        saved = type(model).from_pretrained(resume_from_checkpoint, dtype=dtype, use_safetensors=True)
        model.load_state_dict(saved.state_dict(), strict=True)
        logger.info("restored model weights from %s", folder)

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> Any:
        inputs = {k: v for k, v in inputs.items() if k != "sample_ids"}
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)


def checkpointing_arguments(enabled: bool) -> dict[str, Any]:
    """Activation (gradient) checkpointing, under whichever name this transformers version uses."""
    kwargs = {"use_reentrant": False} if enabled else None
    if "activation_checkpointing" in {f.name for f in dataclasses.fields(TrainingArguments)}:
        return {"activation_checkpointing": enabled, "activation_checkpointing_kwargs": kwargs}
    return {"gradient_checkpointing": enabled, "gradient_checkpointing_kwargs": kwargs}


def training_arguments(cfg: StageConfig, precision: str) -> TrainingArguments:
    """Map the stage config onto TrainingArguments (one place, so every knob is visible)."""
    o, r = cfg.optim, cfg.run
    return TrainingArguments(
        output_dir=r.output_dir,
        per_device_train_batch_size=o.per_device_batch_size,
        gradient_accumulation_steps=o.grad_accum,
        num_train_epochs=o.epochs,
        max_steps=o.max_steps,
        learning_rate=o.lr,
        weight_decay=o.weight_decay,
        warmup_steps=o.warmup_ratio,
        lr_scheduler_type=o.scheduler,
        optim=o.optimizer,
        max_grad_norm=o.max_grad_norm,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        **checkpointing_arguments(r.gradient_checkpointing),
        deepspeed=r.deepspeed,
        report_to=[] if r.report_to == "none" else [r.report_to],
        run_name=cfg.name,
        logging_steps=r.logging_steps,
        save_strategy="steps",
        save_steps=r.save_steps,
        save_total_limit=r.save_total_limit,
        seed=r.seed,
        data_seed=r.seed,
        use_cpu=r.use_cpu,
        dataloader_num_workers=cfg.data.num_workers,
        dataloader_pin_memory=torch.cuda.is_available() and not r.use_cpu,
        remove_unused_columns=False,
        label_names=["labels"],
        ddp_find_unused_parameters=False,
        disable_tqdm=False,
    )


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
    out = Path(cfg.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.run.seed)
    precision = resolve_precision(cfg.run.precision, cfg.run.use_cpu)
    logger.info("stage %s: precision %s, output %s", cfg.name, precision, out)

    model, processor, base_ref = load_stage_model(cfg, precision)
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
    if precision != "fp32" and not cfg.run.deepspeed:
        # Mixed precision without DeepSpeed: trainable weights stay fp32, autocast computes in 16 bits.
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()

    dataset = SFTDataset(samples, processor.image_processor, renderer.image_token_id, num_image_tokens(processor))
    trainer = MedLlavaTrainer(
        model=model,
        args=training_arguments(cfg, precision),
        train_dataset=dataset,
        data_collator=SFTCollator(processor.tokenizer.pad_token_id),
        processing_class=processor,
        projector_lr=cfg.optim.projector_lr,
    )
    return SFTRun(cfg, trainer, processor, base_ref, resume_checkpoint(cfg))


def run_sft(cfg: StageConfig) -> Path:
    """Run one SFT stage end to end; returns the output folder."""
    run = prepare_sft(cfg)
    if run.checkpoint:
        logger.info("resuming from %s", run.checkpoint)
    run.trainer.train(resume_from_checkpoint=run.checkpoint)
    return save_stage_output(cfg, run.trainer, run.processor, run.base_ref)
