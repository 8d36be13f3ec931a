"""What every stage runner shares (see train/stage.py for the table of kinds): precision, loading the stage's model, and writing its outputs."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import ProcessorMixin, TrainingArguments, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from medllava import dist as ranks
from medllava.config import ConfigError, StageConfig, save_config
from medllava.data.cache import CachedSamples, build_once, cache_key, file_sha256, tokenizer_fingerprint, write_samples
from medllava.data.collate import IMAGE_ERRORS
from medllava.data.render import Renderer
from medllava.data.validate import REPORT_NAME
from medllava.families import LLAVA, family_of
from medllava.model import (
    ADAPTER_CONFIG,
    build_model,
    check_reloadable,
    family_of_source,
    is_adapter_dir,
    load_model,
    merge_adapter_to_folder,
    quantization_config,
    save_model,
    widest_dtype,
)
from medllava.processor import set_image_aspect, wrap_chat_template
from medllava.train.safety import (
    CHECKPOINT_RE,
    STAGING,
    DivergenceGuard,
    HangCallback,
    fsync_tree,
    is_complete_checkpoint,
    last_complete_checkpoint,
    publish_folder,
    remove_empty_staging,
)
from medllava.train.stage import STAGE_KINDS
from medllava.volumes import SliceSpec

logger = logging.getLogger(__name__)

STAGE_CONFIG_NAME = "medllava_stage.yaml"
LOG_HISTORY_NAME = "train_log.json"
RESUME_INFO = "medllava_resume.json"
RUN_FACTS = "medllava_run.json"  # what the config alone does not say: ranks, batch used, packing, data hashes
# Fields that may change between a run and its resume (where the run logs, how often it saves, how it reads):
# everything else in the resolved config must match the checkpoint's, unless run.resume is 'force'.
RESUMABLE_CHANGES = frozenset({
    "name", "run.output_dir", "run.logging_steps", "run.report_to", "run.resume", "run.save_steps",
    "run.save_total_limit", "run.on_nonfinite", "run.max_nonfinite_skips", "run.hang_timeout_s",
    "run.shared_output_wait_s", "data.num_workers", "data.cache_dir",
    "data.made_by", "data.preprocess_workers", "grpo.log_completions_every",
})
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class MedLlavaTrainerMixin:
    """What medllava's SFT and GRPO trainers add to the HF Trainer: a separate projector learning rate, and a
    strict resume of full-model checkpoints."""

    def __init__(self, *args: Any, projector_lr: float | None = None, on_nonfinite: str = "stop",
                 max_nonfinite_skips: int = 20, hang_timeout_s: float = 1800.0,
                 stage_config: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.projector_lr = projector_lr
        self.stage_config = stage_config
        self._staging = False
        self.guard = DivergenceGuard(on_nonfinite, max_nonfinite_skips)
        if kwargs.get("args") is not None:  # before the Trainer sizes its batches from the GPU count
            ranks.one_device_per_process(kwargs["args"])
        super().__init__(*args, **kwargs)
        self.guard.deepspeed_engine = lambda: self.model_wrapped if self.is_deepspeed_enabled else None
        self.guard.loss_scaler = lambda: getattr(self.accelerator, "scaler", None)
        self.add_callback(self.guard)
        self.hang_watchdog = ranks.HangWatchdog(hang_timeout_s)
        self.add_callback(HangCallback(self.hang_watchdog))

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> Any:
        """The usual loss, checked: a non-finite loss stops the run, or (skip) contributes nothing."""
        sample_ids = inputs.get("sample_ids") if isinstance(inputs, dict) else None
        if isinstance(inputs, dict):  # the collators' bookkeeping never reaches the model
            if inputs.get(IMAGE_ERRORS):
                record_loader_skips(Path(self.args.output_dir), inputs[IMAGE_ERRORS])
            inputs = {k: v for k, v in inputs.items() if k not in ("sample_ids", IMAGE_ERRORS)}
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        loss = result[0] if return_outputs else result
        if self.guard.loss_ok(loss, self.state.global_step + 1, sample_ids):
            return result
        zero = loss.detach().new_zeros(()).requires_grad_(True)  # no graph behind it: no gradient, no update
        return (zero, result[1]) if return_outputs else zero

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.guard.events:
            logs["nonfinite_skipped"] = len(self.guard.events)
        super().log(logs, start_time)

    def _get_output_dir(self, trial: Any) -> str:
        real = super()._get_output_dir(trial)
        return str(Path(real) / STAGING) if self._staging else real

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        """Write the checkpoint under OUTPUT/.staging, then rename it into place and rotate the real ones."""
        real = Path(super()._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save and (real / STAGING / name).exists():
            shutil.rmtree(real / STAGING / name)
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            staged, target = real / STAGING / name, real / name
            if self.stage_config is not None:  # what a resume must match (see resume_checkpoint)
                (staged / RESUME_INFO).write_text(json.dumps(resume_info(self.stage_config), indent=1, default=str),
                                                  encoding="utf-8")
            fsync_tree(staged)
            if target.exists():  # an incomplete leftover of an interrupted run
                shutil.rmtree(target)
            os.replace(staged, target)
            remove_empty_staging(real)
            rotate_checkpoints(output_dir=str(real), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        family = family_of(opt_model)
        decay = set(self.get_decay_parameter_names(opt_model))
        groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
        for name, param in opt_model.named_parameters():
            if not param.requires_grad:
                continue
            lr = self.args.learning_rate
            if self.projector_lr is not None and family.component_of(name) == "projector":
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
        # Load in the widest dtype the model holds (fp32 when trainable weights are fp32 beside a bf16 tower): every
        # saved tensor then arrives exactly and is copied back into each parameter in that parameter's own dtype.
        dtype = widest_dtype({p.dtype for p in model.parameters() if p.is_floating_point()})
        saved = type(model).from_pretrained(resume_from_checkpoint, dtype=dtype, use_safetensors=True)
        model.load_state_dict(saved.state_dict(), strict=True)
        logger.info("restored model weights from %s", folder)


def checkpointing_arguments(enabled: bool) -> dict[str, Any]:
    """Activation (gradient) checkpointing, under whichever name this transformers version uses."""
    kwargs = {"use_reentrant": False} if enabled else None
    if "activation_checkpointing" in {f.name for f in dataclasses.fields(TrainingArguments)}:
        return {"activation_checkpointing": enabled, "activation_checkpointing_kwargs": kwargs}
    return {"gradient_checkpointing": enabled, "gradient_checkpointing_kwargs": kwargs}


def on_cpu(cfg: StageConfig) -> bool:
    """A stage runs on the CPU when asked to or when no GPU is visible (then several ranks are one gloo job)."""
    return cfg.run.use_cpu or not torch.cuda.is_available()


def warmup_share(ratio: float) -> float:
    """`optim.warmup_ratio` as TrainingArguments' `warmup_steps`, which reads a value below 1 as a share of the
    steps (rounded up) and 1 or more as a step count: a ratio of 1 (warm up over every step) would be one step, so
    it becomes the largest share that still rounds up to every step (below a billion steps)."""
    return min(ratio, 1.0 - 1e-9)


def trainer_kwargs(cfg: StageConfig, precision: str) -> dict[str, Any]:
    """TrainingArguments fields shared by the SFT and GRPO stages (one place, so every knob is visible)."""
    o, r = cfg.optim, cfg.run
    return dict(
        output_dir=r.output_dir,
        per_device_train_batch_size=o.per_device_batch_size,
        gradient_accumulation_steps=cfg.accumulation(ranks.world_size()),
        num_train_epochs=o.epochs,
        max_steps=o.max_steps,
        learning_rate=o.lr,
        weight_decay=o.weight_decay,
        warmup_steps=warmup_share(o.warmup_ratio),
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
        use_cpu=on_cpu(cfg),
        dataloader_num_workers=cfg.data.num_workers,
        # Workers forked once for the run, not again at each epoch: a fork while the last epoch's loader threads
        # exit can leave a worker locked forever in CPython 3.11's after-fork thread cleanup (seen in a 2-rank
        # ZeRO-3 rehearsal: one rank waiting on its worker, the other in the next all_gather).
        dataloader_persistent_workers=cfg.data.num_workers > 0,
        dataloader_pin_memory=torch.cuda.is_available() and not r.use_cpu,
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,
        logging_nan_inf_filter=False,  # a NaN loss is reported, never averaged away
        disable_tqdm=False,
        use_liger_kernel=cfg.optim.liger_kernel,  # checked by begin_stage, before the model loads
    )


def liger_problem(use_cpu: bool = False) -> str | None:
    """Why Liger's kernels cannot run here, or None when they can."""
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install liger-kernel)"
    if use_cpu or not torch.cuda.is_available():
        return "Liger's kernels are Triton kernels and need a CUDA GPU"
    return None


def check_liger(cfg: StageConfig) -> None:
    """optim.liger_kernel asked for where the kernels cannot run (not installed, no CUDA) is an error, never a
    silent fallback."""
    problem = liger_problem(cfg.run.use_cpu) if cfg.optim.liger_kernel else None
    if problem:
        raise ConfigError(f"optim.liger_kernel: {problem}")


def cast_trainable(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> None:
    """Give every trainable weight `dtype` (frozen weights keep theirs)."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)


def cast_trainable_to_fp32(model: torch.nn.Module, precision: str, deepspeed: str | None) -> None:
    """Mixed precision without DeepSpeed: trainable weights stay fp32, autocast computes in 16 bits."""
    if precision != "fp32" and not deepspeed:
        cast_trainable(model, torch.float32)


def begin_stage(cfg: StageConfig) -> tuple[Path, str, Any, ProcessorMixin, str | None]:
    """Check the inputs, join the ranks, seed everything, resolve precision, load the starting model."""
    check_liger(cfg)  # before the (possibly long) model load
    check_inputs(cfg)
    world = ranks.world_size()
    accumulation = cfg.accumulation(world)  # a global batch that does not divide fails here, not after loading
    ranks.ensure_process_group(deepspeed=bool(cfg.run.deepspeed), timeout_s=max(3600.0, 2 * cfg.run.hang_timeout_s))
    out = Path(cfg.run.output_dir)
    # makes the folder; one the ranks do not share fails here, before the model loads, not mid-run
    ranks.check_shared_output(out, cfg.run.shared_output_wait_s)
    set_seed(cfg.run.seed)
    precision = resolve_precision(cfg.run.precision, on_cpu(cfg))
    unit = STAGE_KINDS[cfg.kind].batch_unit
    logger.info("stage %s (%s): precision %s, output %s", cfg.name, cfg.kind, precision, out)
    logger.info("global batch: %d %s per optimizer step = %d per device x %d rank(s) x %d accumulation",
                cfg.global_batch(world), unit, cfg.optim.per_device_batch_size, world, accumulation)
    model, processor, base_ref = load_stage_model(cfg, precision)
    return out, precision, model, processor, base_ref


@dataclass
class RenderingStart:
    """What a stage that renders conversations (SFT, DPO) starts from: begin_stage's model, the checkpoint it
    resumes from and the renderer."""

    out: Path
    precision: str
    model: Any
    processor: ProcessorMixin
    base_ref: str | None
    checkpoint: str | None
    renderer: Renderer


def begin_rendering_stage(cfg: StageConfig) -> RenderingStart:
    """begin_stage, then the checkpoint to resume (a fresh run reports only its own loader-time skips: older ones
    are cleared) and the renderer of the stage's records."""
    out, precision, model, processor, base_ref = begin_stage(cfg)
    checkpoint = resume_checkpoint(cfg)
    if checkpoint is None:
        ranks.on_writer(lambda: shutil.rmtree(out / LOADER_SKIPS, ignore_errors=True), "clearing old loader skips")
    renderer = Renderer(processor, cfg.data.format, cfg.data.max_length, cfg.data.system_prompt)
    return RenderingStart(out, precision, model, processor, base_ref, checkpoint, renderer)


REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_deepspeed_file(path: str) -> str:
    """A DeepSpeed JSON path as given, or (relative and absent here) the one shipped in the repository."""
    if Path(path).is_file():
        return path
    shipped = REPO_ROOT / path
    if not Path(path).is_absolute() and shipped.is_file():
        return str(shipped)
    raise ConfigError(f"run.deepspeed: {path} does not exist")


def check_inputs(cfg: StageConfig) -> None:
    """Fail before any model is downloaded or loaded: data files, image folder and DeepSpeed file must exist.

    The message names what is missing and the command that makes it (data.made_by, or for a GRPO stage with a
    pass-rate filter, the filter command).
    """
    d = cfg.data
    missing = [f for f in d.train_files if not f.startswith("hf:") and not Path(f).exists()]
    problems = []
    if missing:
        f = cfg.grpo.pass_rate_filter
        if cfg.kind == "grpo" and f.source and missing == d.train_files[:1]:
            absent = [s for s in f.source if not s.startswith("hf:") and not Path(s).exists()]
            hint = (f"made by `python -m data_recipes.pass_rate_filter --stage THIS_STAGE.yaml --model "
                    f"{cfg.model.init_from or 'PREVIOUS_STAGE'}` from {f.source}"
                    + (f", of which {absent} are missing too" + (f" ({d.made_by})" if d.made_by else "") if absent else "")
                    + "; ./train.sh stages/<family> runs it before the stage")
        else:
            hint = f"made by: {d.made_by}" if d.made_by else "see data_recipes/ for the converters of public corpora"
        problems.append(f"data.train_files: {', '.join(missing)} not found ({hint})")
    if not Path(d.image_folder).is_dir():
        problems.append(f"data.image_folder: {d.image_folder} is not a folder"
                        + (f" (made by: {d.made_by})" if d.made_by else ""))
    tracker = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(cfg.run.report_to)
    if tracker and importlib.util.find_spec(tracker) is None:
        problems.append(f"run.report_to: {cfg.run.report_to} is not installed (pip install 'medllava[tracking]', or "
                        "--run.report_to=none)")
    if problems:
        raise ConfigError("; ".join(problems))
    if cfg.run.deepspeed:
        cfg.run.deepspeed = resolve_deepspeed_file(cfg.run.deepspeed)


@dataclass
class StageRun:
    """A prepared stage: its trainer, and what saving its output needs."""

    cfg: StageConfig
    trainer: Any
    processor: ProcessorMixin
    base_ref: str | None
    checkpoint: str | None


def guard_kwargs(cfg: StageConfig) -> dict[str, Any]:
    """The MedLlavaTrainerMixin arguments a stage config sets."""
    return {"projector_lr": cfg.optim.projector_lr, "on_nonfinite": cfg.run.on_nonfinite,
            "max_nonfinite_skips": cfg.run.max_nonfinite_skips, "hang_timeout_s": cfg.run.hang_timeout_s,
            "stage_config": cfg.to_dict()}


def flat_config(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config mapping as {"section.key": value}."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value) and name != "grpo.rewards":
            out.update(flat_config(value, f"{name}."))
        else:
            out[name] = value
    return out


def resume_info(config: dict[str, Any]) -> dict[str, Any]:
    """The resolved config fields a resume must match, and their hash."""
    fields = {k: v for k, v in flat_config(config).items() if k not in RESUMABLE_CHANGES}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()
    return {"config_hash": digest, "fields": fields}


def check_resume_config(cfg: StageConfig, checkpoint: str) -> None:
    """Refuse to resume from a checkpoint written under another config (naming the changed keys), unless
    run.resume is 'force'. Checkpoints from before medllava recorded its config are resumed with a warning."""
    path = Path(checkpoint) / RESUME_INFO
    if not path.is_file():
        logger.warning("%s records no stage config; resuming without checking that the config is unchanged", checkpoint)
        return
    saved = json.loads(path.read_text(encoding="utf-8"))
    now = resume_info(cfg.to_dict())
    if saved.get("config_hash") == now["config_hash"]:
        return
    old, new = saved.get("fields", {}), now["fields"]
    changed = sorted(k for k in set(old) | set(new) if json.dumps(old.get(k), default=str) != json.dumps(new.get(k), default=str))
    if not changed:  # only keys added or retired since, at their defaults
        return
    detail = ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in changed[:8]) + (" ..." if len(changed) > 8 else "")
    if cfg.run.resume == "force":
        logger.warning("resuming from %s although the config changed: %s (run.resume: force)", checkpoint, detail)
        return
    raise ConfigError(f"the stage config changed since {checkpoint} was written: {', '.join(changed)} "
                      f"[{detail}]; undo the change, start a new output_dir, or set run.resume: force to resume anyway")


def train_and_save(run: StageRun) -> Path:
    """Train (resuming from the newest complete checkpoint when there is one) and publish the output folder."""
    if run.checkpoint:
        logger.info("resuming from %s", run.checkpoint)
    try:
        run.trainer.train(resume_from_checkpoint=run.checkpoint)
    finally:  # a run that fails (divergence, out of memory) must not be ended later as "hung" during teardown
        run.trainer.hang_watchdog.stop()
    return save_stage_output(run.cfg, run.trainer, run.processor, run.base_ref)


LOADER_SKIPS = "loader_skips"  # OUTPUT/loader_skips/rank<N>.jsonl: samples whose image failed in the data loader


def record_loader_skips(out: Path, errors: list[dict[str, Any]]) -> None:
    """Append this rank's loader-time image failures (one JSON line each) for the data report."""
    folder = out / LOADER_SKIPS
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / f"rank{ranks.rank()}.jsonl").open("a", encoding="utf-8") as fh:
        for err in errors:
            fh.write(json.dumps(err, ensure_ascii=False) + "\n")


def merge_loader_skips(out: Path) -> int:
    """Fold every rank's loader-time skips into OUTPUT/data_report.json (each sample once, however many epochs
    met it): `loader_skipped`, `loader_skipped_counts` by kind and `loader_errors`. Returns the number."""
    folder = out / LOADER_SKIPS
    seen: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.glob("rank*.jsonl")) if folder.is_dir() else []:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                err = json.loads(line)
                seen.setdefault(f"{err['source']}:{err['line']}:{err['id']}", err)
    report_path = out / "data_report.json"
    report = json.loads(report_path.read_text(encoding="utf-8")) if report_path.is_file() else {}
    errors = sorted(seen.values(), key=lambda e: (e["source"], e["line"]))
    counts = dict(Counter(err["kind"] for err in errors))
    report.update(loader_skipped=len(errors), loader_skipped_counts=counts, loader_errors=errors)
    report_path.write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    if errors:
        logger.warning("data: %d sample(s) skipped in the data loader because their image did not decode (%s); "
                       "they are named in %s", len(errors), ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())),
                       report_path)
    return len(errors)


def run_facts(cfg: StageConfig, trainer: Any, out: Path) -> dict[str, Any]:
    """What reproducing the run needs beyond its config: ranks and the batch they made, packing as it ran, and
    each data file with its record count and content hash (for the model card)."""
    world = ranks.world_size()
    report_path = out / "data_report.json"
    report = json.loads(report_path.read_text(encoding="utf-8")) if report_path.is_file() else {}
    counts = report.get("sources") or {}
    files = []
    for spec in cfg.data.train_files:
        path = Path(spec)
        entry: dict[str, Any] = {"file": spec, "records": counts.get(spec)}
        if path.is_file():
            entry.update(bytes=path.stat().st_size, sha256=file_sha256(path))
        files.append(entry)
    collator = type(getattr(trainer, "data_collator", None)).__name__
    recipes = {}  # how DPO pairs were made: data_recipes/preference_pairs.py's report beside the pairs file
    for spec in cfg.data.train_files if cfg.kind == "dpo" else []:
        made_by = Path(spec).with_name(Path(spec).stem + ".report.json")
        if made_by.is_file():
            recipe = json.loads(made_by.read_text(encoding="utf-8"))
            recipes[spec] = {k: v for k, v in recipe.items() if k not in ("skipped_ids", "invalid_records")}
    return {"world_size": world, "accumulation": cfg.accumulation(world), "global_batch": cfg.global_batch(world),
            "batch_unit": STAGE_KINDS[cfg.kind].batch_unit,
            "packing": collator == "SamplePackingCollator" if STAGE_KINDS[cfg.kind].packs else None,
            "valid_records": report.get("valid"), "data_files": files, **({"pair_recipes": recipes} if recipes else {})}


def slices_key(cfg: StageConfig) -> dict[str, str]:
    """data.slices as part of a data cache key: absent at the defaults, so caches made before it stay valid."""
    spec = cfg.slice_spec()
    return {} if spec == SliceSpec() else {"slices": str(spec)}


def cached_rendering(cfg: StageConfig, renderer: Renderer, out: Path, kind: str, what: str,
                     make: Callable[[Path | None], tuple[Sequence[Any], dict[str, Any], dict[str, str]]]) -> Path:
    """The cache folder of a stage's checked and rendered samples, made once per data version by each node's writer
    and read by every rank. The key (medllava.data.cache) holds the data files' identity and everything the
    rendering reads. `make(report_dir)` returns the samples, the data report and extra files for the folder; the
    report goes beside the run (also when bad records stop it; written by the job's writer only) and into the
    cache."""
    d = cfg.data
    key = cache_key(d.train_files, image_folder=str(Path(d.image_folder).resolve()), format=d.format,
                    max_length=d.max_length, system_prompt=d.system_prompt, skip_invalid=d.skip_invalid,
                    allow_absolute_paths=d.allow_absolute_paths, max_samples=d.max_samples, image_check=d.image_check,
                    tokenizer=tokenizer_fingerprint(renderer.tokenizer), chat_template=str(renderer.template),
                    image_tokens=renderer.images.fingerprint(), **({} if kind == "sft" else {"kind": kind}),
                    **slices_key(cfg))
    folder = Path(d.cache_dir or out / ".data_cache") / f"{kind}-{key}"

    def build() -> None:
        def write(staging: Path) -> None:
            samples, report, extra = make(out if ranks.is_writer() else None)
            write_samples(samples, staging, folder, report)
            for name, text in extra.items():
                (staging / name).write_text(text, encoding="utf-8")

        # another job (or node) on the same cache_dir may be making it: build_once waits for it and reuses it
        if not build_once(folder, write):
            logger.info("data: reusing the checked and rendered %s in %s", what, folder)
            if ranks.is_writer():
                (out / REPORT_NAME).write_text(json.dumps(CachedSamples(folder).report(), indent=2,
                                                          ensure_ascii=False), encoding="utf-8")

    # once per node: the cache may be on each node's own disk (data.cache_dir on local scratch)
    ranks.on_node_writer(build, f"checking and rendering the {what}")
    return folder


def resolve_precision(precision: str, use_cpu: bool = False) -> str:
    """'auto' -> bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."""
    on_gpu = torch.cuda.is_available() and not use_cpu
    if precision == "auto":
        if not on_gpu:
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and not on_gpu:
        raise ConfigError("run.precision fp16 needs a GPU; use fp32 or bf16 on CPU")
    return precision


def load_stage_model(cfg: StageConfig, precision: str) -> tuple[Any, ProcessorMixin, str | None]:
    """The stage's starting model and processor, and the folder it came from (None when assembled in memory)."""
    m = cfg.model
    dtype = DTYPES[precision]
    quantized = cfg.quantization.bits is not None
    common = {"attn_implementation": m.attn_implementation, "trust_remote_code": m.trust_remote_code,
              "allow_pickle": m.allow_pickle}
    base_ref: str | None
    if m.init_from:
        source = m.init_from
        if not Path(source).exists() and os.sep in source:
            raise ConfigError(f"model.init_from: {source} does not exist (run the previous stage first)")
        check_stage_output(source)
        family = family_of_source(source, trust_remote_code=m.trust_remote_code) if quantized else LLAVA
        quant = quantization_config(cfg.quantization, dtype, family)
        if is_adapter_dir(source):
            # A LoRA stage output: merge it into its base. A quantized stage needs the merged weights on disk.
            if quant is not None:
                merged = Path(cfg.run.output_dir) / "init_merged"
                def merge() -> None:
                    if not (merged / "config.json").is_file():
                        logger.info("merging adapter %s into its base -> %s (for quantized loading)", source, merged)
                        staging = merged.with_name(merged.name + ".staging")
                        merge_adapter_to_folder(source, staging, dtype=dtype, allow_pickle=m.allow_pickle)
                        os.replace(staging, merged)

                ranks.on_writer(merge, "merging the starting adapter")
                source = str(merged)
                model, processor = load_model(source, dtype=dtype, quantization=quant, **common)
                base_ref = source
            else:
                model, processor = load_model(source, dtype=dtype, adapter="merge", **common)
                base_ref = None
        else:
            model, processor = load_model(source, dtype=dtype, quantization=quant, **common)
            base_ref = source
    else:
        if quantized:
            raise ConfigError(
                "quantization needs model.init_from (a saved full-precision model, e.g. the align stage output)"
            )
        model, processor = build_model(
            m.vision_tower,
            m.llm,
            vision_feature_layer=m.vision_feature_layer,
            vision_feature_select_strategy=m.vision_feature_select_strategy,
            image_aspect=m.image_aspect or "pad",
            chat_template=m.chat_template,
            dtype=dtype,
            attn_implementation=m.attn_implementation,
            trust_remote_code=m.trust_remote_code,
            revision=m.revision,
            allow_pickle=m.allow_pickle,
        )
        base_ref = None
    family = family_of(model)
    if m.image_aspect is not None:
        set_image_aspect(processor, m.image_aspect)
    if m.init_from and m.chat_template:
        processor.chat_template = m.chat_template if family.structured_content else wrap_chat_template(m.chat_template)
    if m.min_pixels is not None or m.max_pixels is not None:
        if family.set_pixel_limits is None:
            raise ConfigError(f"model.min_pixels/max_pixels: {family.title} resizes every image to one size; the "
                              "pixel range applies to Qwen-VL (min/max pixels) and SmolVLM (max_pixels: its longest edge)")
        try:
            family.set_pixel_limits(processor, m.min_pixels, m.max_pixels)
        except ValueError as err:
            raise ConfigError(f"model.min_pixels/max_pixels: {err}") from None
    return model, processor, base_ref


def uses_lora(cfg: StageConfig) -> bool:
    return "lora" in (cfg.trainable.vision, cfg.trainable.llm)


def save_base_if_needed(cfg: StageConfig, model: Any, processor: ProcessorMixin, base_ref: str | None,
                        needed: bool = False) -> str | None:
    """A stage whose starting model exists only in memory (assembled, or merged from an adapter) saves it under
    output_dir/base when something must refer to it on disk: a LoRA adapter's base, or (`needed`) a reference."""
    if not (uses_lora(cfg) or needed) or base_ref is not None:
        return base_ref
    base_dir = Path(cfg.run.output_dir) / "base"

    def save() -> None:
        if not (base_dir / "config.json").is_file():
            logger.info("saving the in-memory base model to %s (the adapter refers to it)", base_dir)
            staging = base_dir.with_name("base.staging")
            if staging.exists():
                shutil.rmtree(staging)
            save_model(model, processor, staging)
            if base_dir.exists():
                shutil.rmtree(base_dir)
            os.replace(staging, base_dir)

    ranks.on_writer(save, "saving the base model")
    return str(base_dir)


def resume_checkpoint(cfg: StageConfig) -> str | None:
    """'auto' -> newest complete checkpoint in output_dir (or None), 'never' -> None, 'force' -> as auto even if
    the config changed, else the given path. The checkpoint's recorded config must match (check_resume_config)."""
    resume = cfg.run.resume
    if resume == "never":
        return None
    if resume in ("auto", "force"):
        # The writer sets incomplete checkpoints aside; then every rank picks the same newest complete one.
        ranks.on_writer(lambda: last_complete_checkpoint(Path(cfg.run.output_dir), quarantine=True), "scanning checkpoints")
        checkpoint = last_complete_checkpoint(Path(cfg.run.output_dir))
    else:
        if not Path(resume).is_dir():
            raise ConfigError(f"run.resume: checkpoint {resume} does not exist")
        if not is_complete_checkpoint(Path(resume)):
            raise ConfigError(f"run.resume: {resume} is incomplete (no trainer_state.json)")
        checkpoint = resume
    if checkpoint is not None:
        check_resume_config(cfg, checkpoint)
    return checkpoint


def save_stage_output(cfg: StageConfig, trainer: Any, processor: ProcessorMixin, base_ref: str | None) -> Path:
    """Write the stage's model (or adapter + base reference), processor, resolved config and training log.

    Everything is written to OUTPUT/.staging/final and then moved into OUTPUT, config and stage marker last.
    """
    out = Path(cfg.run.output_dir)
    staging = out / STAGING / "final"
    if trainer.is_world_process_zero() and staging.exists():
        shutil.rmtree(staging)
    trainer.accelerator.wait_for_everyone()
    model = trainer.accelerator.unwrap_model(trainer.model)
    is_adapter = hasattr(model, "peft_config")
    if is_adapter:
        if base_ref is None:
            raise RuntimeError("a LoRA stage output needs a base model folder")
        for peft_cfg in model.peft_config.values():
            peft_cfg.base_model_name_or_path = str(Path(base_ref).resolve())
    trainer.save_model(str(staging))  # gathers ZeRO-3 shards, writes adapters for LoRA, and the processor
    if trainer.is_world_process_zero():
        if STAGE_KINDS[cfg.kind].loader_images:
            merge_loader_skips(out)
        # The Trainer pickles its arguments beside the weights; the resolved YAML is our record of the run.
        (staging / "training_args.bin").unlink(missing_ok=True)
        if is_adapter:
            # Refer to the base relative to the final folder, so a runs/ tree can move as a whole.
            adapter_cfg = staging / ADAPTER_CONFIG
            data = json.loads(adapter_cfg.read_text(encoding="utf-8"))
            data["base_model_name_or_path"] = os.path.relpath(Path(base_ref).resolve(), out.resolve())
            adapter_cfg.write_text(json.dumps(data, indent=2), encoding="utf-8")
        check_reloadable(model)
        processor.save_pretrained(staging)
        save_config(cfg, staging / STAGE_CONFIG_NAME)
        (staging / RUN_FACTS).write_text(json.dumps(run_facts(cfg, trainer, out), indent=2), encoding="utf-8")
        history = trainer.state.log_history
        (staging / LOG_HISTORY_NAME).write_text(json.dumps(history, indent=1), encoding="utf-8")
        plot_training_curves(history, staging / "training_curves.png", title=cfg.name)
        publish_folder(staging, out, last=("config.json", ADAPTER_CONFIG, STAGE_CONFIG_NAME))
    trainer.accelerator.wait_for_everyone()
    return out


def check_stage_output(folder: str | Path) -> None:
    """A previous stage's folder must be complete: interrupted runs have checkpoints but no stage marker."""
    folder = Path(folder)
    if not folder.is_dir() or (folder / STAGE_CONFIG_NAME).is_file():
        return
    unfinished = [p.name for p in folder.iterdir() if CHECKPOINT_RE.match(p.name) or p.name == STAGING]
    if unfinished:
        raise ConfigError(f"model.init_from: {folder} is an unfinished stage (found {sorted(unfinished)} but no "
                          f"{STAGE_CONFIG_NAME}); rerun that stage to resume and finish it")


def plot_training_curves(log_history: list[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """Loss (and learning rate) against step, as a PNG beside the model."""
    points = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs = [(h["step"], h["learning_rate"]) for h in log_history if "learning_rate" in h and "step" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(*zip(*points), label="train loss", color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    if lrs:
        ax2 = ax.twinx()
        ax2.plot(*zip(*lrs), color="tab:orange", alpha=0.6, label="learning rate")
        ax2.set_ylabel("learning rate")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
