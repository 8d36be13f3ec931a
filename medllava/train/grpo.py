"""The GRPO stage runner (RL with verifiable rewards), a thin layer over TRL's GRPOTrainer.

Reads top to bottom: load the previous stage's model -> read and check the RL questions (long prompts are
filtered and counted) -> apply the trainable spec (full / LoRA / QLoRA) -> reward functions from the config
(weighted, or accuracy gated on format) -> train -> save like every other stage.
TRL logs each reward function's mean, completion lengths and the fraction of groups whose rewards have no
spread (`frac_reward_zero_std`); sampled completions go to completions.jsonl every N steps.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from medllava import dist as ranks
from medllava.config import StageConfig
from medllava.data.cache import build_once, cache_key, tokenizer_fingerprint
from medllava.data.rl import build_rl_rows, rl_dataset
from medllava.data.validate import REPORT_NAME
from medllava.grading import grade
from medllava.imaging import Window, store_image
from medllava.model import apply_trainable
from medllava.rewards import REWARDS, completion_text
from medllava.train.common import (
    MedLlavaTrainerMixin,
    StageRun,
    begin_stage,
    cast_trainable,
    cast_trainable_to_fp32,
    guard_kwargs,
    resume_checkpoint,
    save_base_if_needed,
    slices_key,
    trainer_kwargs,
)

logger = logging.getLogger(__name__)

COMPLETIONS_LOG = "completions.jsonl"


def _grpo_trainer_class() -> type:
    from trl import GRPOTrainer

    class MedLlavaGRPOTrainer(MedLlavaTrainerMixin, GRPOTrainer):
        """TRL's GRPOTrainer with medllava's optimizer groups, guard and strict resume; it also logs how much of
        each step goes to generating completions (timing/generation_s) versus the rest (timing/train_s)."""

        # seconds and steps since the last log line (immutable defaults; each instance assigns its own)
        _generation_seconds = 0.0
        _step_seconds = 0.0
        _timed_steps = 0

        def _generate(self, prompts: list[Any]) -> Any:
            start = time.perf_counter()
            try:
                return super()._generate(prompts)
            finally:
                self._generation_seconds += time.perf_counter() - start

        def training_step(self, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return super().training_step(*args, **kwargs)
            finally:
                self._step_seconds += time.perf_counter() - start
                self._timed_steps += 1

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            if self._timed_steps and "loss" in logs:
                generation = self._generation_seconds / self._timed_steps
                logs["timing/generation_s"] = generation
                logs["timing/train_s"] = self._step_seconds / self._timed_steps - generation
                self._generation_seconds = self._step_seconds = 0.0
                self._timed_steps = 0
            super().log(logs, start_time)

    return MedLlavaGRPOTrainer


class CompletionSampler:
    """Wraps a reward function; every `every` steps it appends a few sampled completions to a JSONL file."""

    def __init__(self, fn: Callable[..., list[float]], path: Path, every: int, per_step: int = 8) -> None:
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", "reward")
        self.path = path
        self.every = every
        self.per_step = per_step
        self._last_step = -1

    def __call__(self, completions: list[Any], **columns: Any) -> list[float]:
        rewards = self.fn(completions, **columns)
        state = columns.get("trainer_state")
        step = int(getattr(state, "global_step", 0))
        if self.every <= 0 or step % self.every or step == self._last_step:
            return rewards
        if state is not None and not getattr(state, "is_world_process_zero", True):
            return rewards
        self._last_step = step
        with self.path.open("a", encoding="utf-8") as fh:
            for i in range(min(self.per_step, len(completions))):
                text = completion_text(completions[i])
                options = (columns.get("options") or [None] * len(completions))[i]
                g = grade(text, columns["answer"][i], columns["qtype"][i], options)
                fh.write(json.dumps({
                    "step": step, "id": columns.get("id", [None] * len(completions))[i],
                    "question": completion_text(columns["prompts"][i]) if "prompts" in columns else None,
                    "answer": columns["answer"][i], "completion": text, "extracted": g.extracted,
                    "correct": g.correct, self.__name__: rewards[i],
                }, ensure_ascii=False) + "\n")
        return rewards


def reward_setup(cfg: StageConfig, out_dir: Path) -> tuple[list[Callable[..., list[float]]], list[float]]:
    """Reward functions and weights from the config (names and gating checked by StageConfig.validate); with
    gating, accuracy counts only when the format holds."""
    g = cfg.grpo
    names = list(g.rewards)
    if g.gate_accuracy_on_format:
        gated = f"accuracy_if_{g.prompt}_format"
        names = [gated if n == "accuracy" else n for n in names]
        weights = [g.rewards["accuracy" if n == gated else n] for n in names]
    else:
        weights = [g.rewards[n] for n in names]
    funcs: list[Callable[..., list[float]]] = [REWARDS[n] for n in names]
    funcs[0] = CompletionSampler(funcs[0], out_dir / COMPLETIONS_LOG, g.log_completions_every)
    return funcs, weights


def grpo_arguments(cfg: StageConfig, precision: str, weights: list[float]) -> Any:
    """GRPOConfig from the stage config: the shared Trainer fields plus the GRPO ones."""
    from trl import GRPOConfig

    g = cfg.grpo
    extra: dict[str, Any] = {"loss_type": g.loss_type} if g.loss_type else {}
    return GRPOConfig(
        **trainer_kwargs(cfg, precision),
        num_generations=g.num_generations,
        max_completion_length=g.max_completion_length,
        temperature=g.temperature,
        top_p=g.top_p,
        beta=g.beta,
        epsilon=g.epsilon,
        num_iterations=g.num_iterations,
        scale_rewards=g.scale_rewards,
        mask_truncated_completions=g.mask_truncated_completions,
        reward_weights=weights,
        use_vllm=g.use_vllm,
        log_completions=False,
        **extra,
    )


def prepared_rows(cfg: StageConfig, processor: Any, out: Path) -> list[dict[str, Any]]:
    """The checked RL rows, built once per data version by the writer (cached as JSONL) and read by every rank."""
    d, g = cfg.data, cfg.grpo
    key = cache_key(d.train_files, image_folder=str(Path(d.image_folder).resolve()), prompt=g.prompt,
                    instruction=g.instruction, system_prompt=d.system_prompt, max_length=d.max_length,
                    skip_invalid=d.skip_invalid, allow_absolute_paths=d.allow_absolute_paths, max_samples=d.max_samples,
                    tokenizer=tokenizer_fingerprint(processor.tokenizer), chat_template=str(processor.chat_template),
                    rows="images",  # rows carry an image list (older caches: one image)
                    **slices_key(cfg))
    folder = Path(d.cache_dir or out / ".data_cache") / f"rl-{key}"

    def build() -> None:
        def write(staging: Path) -> None:
            staging.mkdir(parents=True)

            def store(image: Any) -> str:  # an embedded image: a file in the cache, named by its content
                return str((folder / "images" / store_image(image, staging / "images")).resolve())

            report_dir = out if ranks.is_writer() else staging  # beside the run: written by the job's writer only
            rows, _report = build_rl_rows(
                d.train_files, processor, image_folder=d.image_folder, mode=g.prompt, instruction=g.instruction,
                system_prompt=d.system_prompt, max_prompt_length=d.max_length, skip_invalid=d.skip_invalid,
                allow_absolute_paths=d.allow_absolute_paths, max_samples=d.max_samples, report_dir=report_dir,
                store_embedded=store, slices=cfg.slice_spec(),
            )
            with (staging / "rows.jsonl").open("w", encoding="utf-8") as fh:
                for row in rows:
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            if report_dir != staging:
                (staging / REPORT_NAME).write_bytes((out / REPORT_NAME).read_bytes())

        # another job (or node) on the same cache_dir may be making it: build_once waits for it and reuses it
        if not build_once(folder, write):
            logger.info("data: reusing the checked RL rows in %s", folder)
            if ranks.is_writer():
                (out / REPORT_NAME).write_bytes((folder / REPORT_NAME).read_bytes())

    # once per node: the cache may be on each node's own disk (data.cache_dir on local scratch)
    ranks.on_node_writer(build, "checking the RL data")
    with (folder / "rows.jsonl").open(encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    logger.info("data: %d RL questions (checked once, cached in %s)", len(rows), folder)
    return rows


def prepare_grpo(cfg: StageConfig) -> StageRun:
    """Load the model, build the RL dataset and rewards, apply the trainable spec, and build the trainer."""
    out, precision, model, processor, base_ref = begin_stage(cfg)
    rows = prepared_rows(cfg, processor, out)
    # A full-model run with a KL term rebuilds its reference from the model's folder: it must exist on disk.
    needs_folder = cfg.grpo.beta > 0 and "lora" not in (cfg.trainable.vision, cfg.trainable.llm)
    base_ref = save_base_if_needed(cfg, model, processor, base_ref, needed=needs_folder)
    if base_ref is not None:
        model.config._name_or_path = base_ref
    model = apply_trainable(model, cfg.trainable, cfg.lora, gradient_checkpointing=cfg.run.gradient_checkpointing)
    cast_trainable_to_fp32(model, precision, cfg.run.deepspeed)
    funcs, weights = reward_setup(cfg, out)
    # TRL left-pads the prompts it generates from, and takes the image inputs beside them (Qwen-VL's
    # mm_token_type_ids, Gemma 3's token_type_ids) from a processor call that pads on the tokenizer's side: a
    # right-padding tokenizer misaligns them with prompts of unequal length (wrong M-RoPE positions, or a shape
    # error). TRL loads its own processors left-padded; ours is set the same way.
    processor.tokenizer.padding_side = "left"
    trainer = _grpo_trainer_class()(
        model=model,
        reward_funcs=funcs,
        args=grpo_arguments(cfg, precision, weights),
        train_dataset=rl_dataset(rows, Window.parse(cfg.data.window) if cfg.data.window else None),
        processing_class=processor,
        **guard_kwargs(cfg),
    )
    if precision == "fp32":
        # TRL casts a quantized model's trainable weights to bf16 (its QLoRA convention); an fp32 run has no
        # autocast to reconcile that with fp32 activations, so they go back to fp32.
        cast_trainable(trainer.model, torch.float32)
    return StageRun(cfg, trainer, processor, base_ref, resume_checkpoint(cfg))

