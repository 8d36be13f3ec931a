"""Typed configuration of a training stage: YAML file -> dataclasses -> `--section.key=value` overrides.

A stage is data. Every field a recipe may set lives here with its type and default; unknown keys and
wrong types are errors that name the offending key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

if TYPE_CHECKING:
    from medllava.imaging import Window

Precision = Literal["auto", "bf16", "fp16", "fp32"]
Trainability = Literal["frozen", "full", "lora"]


class ConfigError(ValueError):
    """A stage configuration is invalid; the message names the key and the file."""


@dataclass
class ModelSection:
    """Where the model comes from and how it is assembled."""

    init_from: str | None = None
    """A previous stage's output folder (full model, or LoRA adapter with its base)."""
    vision_tower: str | None = None
    """Hub id or local folder of any AutoModel vision encoder (CLIP, SigLIP, ...), used with `llm`."""
    llm: str | None = None
    """Hub id or local folder of any AutoModelForCausalLM, used with `vision_tower`."""
    vision_feature_layer: int | None = None
    """Hidden layer the projector reads; None picks the tower's default (-2 for CLS towers, -1 for SigLIP)."""
    vision_feature_select_strategy: Literal["default", "full"] | None = None
    """'default' drops the CLS token, 'full' keeps every token; None picks by tower (CLS-less towers: 'full')."""
    image_aspect: Literal["pad", "resize"] | None = None
    """'pad' = LLaVA expand2square with the mean colour, 'resize' = stretch; None keeps the processor's setting."""
    chat_template: str | None = None
    """A Jinja chat template to use instead of the LLM's own (image parts are still rendered as <image>)."""
    min_pixels: int | None = None
    """Dynamic-resolution families (Qwen-VL): the fewest pixels an image is resized to (None: the processor's)."""
    max_pixels: int | None = None
    """Dynamic-resolution families (Qwen-VL): the most pixels an image is resized to, so the most tokens it becomes
    (Med-R1: 401408). Part of the data cache key; every image's token count is checked against max_length."""
    attn_implementation: str | None = None
    """'sdpa', 'eager', 'flash_attention_2', ...; None = flash_attention_2 when installed on CUDA, else sdpa."""
    trust_remote_code: bool = False
    """Run code shipped with a hub model (off unless you trust its source)."""
    allow_pickle: bool = False
    """Load pickle (.bin/.pt) weights; they can execute code when loaded, so only safetensors by default."""
    revision: str | None = None


@dataclass
class SlicesSection:
    """Which slices of a CT/MR series (a folder of DICOM files) or a NIfTI volume a record's image becomes
    (medllava.volumes): each slice is then one image of the record."""

    count: int = 8
    """Slices taken (all of them when the volume has fewer)."""
    spacing: Literal["uniform"] | float = "uniform"
    """uniform: spread evenly from the first slice to the last; a number: millimetres apart around the middle."""


@dataclass
class DataSection:
    """Which records are read and how they are rendered."""

    train_files: list[str] = field(default_factory=list)
    """JSON / JSONL files, or `hf:NAME[:SPLIT]` for a `datasets` source."""
    image_folder: str = "."
    """Images in records are relative to this folder."""
    format: Literal["plain", "chat"] = "chat"
    """'plain': image then caption, loss on the caption (alignment); 'chat': chat template, loss on assistant turns."""
    max_length: int = 2048
    """Rendered length (text + image tokens); longer records are invalid, never truncated."""
    skip_invalid: bool = False
    """False: any bad record stops the run before training. True: skip, count and report bad records."""
    system_prompt: str | None = None
    """Prepended as a system turn to every chat record that has none (only if the template accepts one)."""
    allow_absolute_paths: bool = False
    """Allow absolute image paths in records (otherwise they must stay inside image_folder)."""
    packing: Literal["auto"] | bool = "auto"
    """Each micro-batch's samples packed into one row without padding, attention isolated per sample by the row's
    sample boundaries (medllava.attention). auto: on when the LLM's attention can isolate them and a start-up
    probe shows packed logits equal separate ones (else padded, with a warning); true: both must hold. Batch
    sizes count samples either way."""
    num_workers: int = 0
    """DataLoader worker processes."""
    max_samples: int | None = None
    """Use only the first N records of the training set (quick runs)."""
    made_by: str | None = None
    """The command that produces train_files (named in the error when they are missing)."""
    window: str | None = None
    """DICOM/NIfTI display window for every image: a preset (lung, mediastinum, bone, brain, abdomen, wide, ...),
    'CENTER,WIDTH', or three joined by '+' stacked as the R, G, B channels ('wide+mediastinum+brain';
    medgemma_ct is MedGemma's CT mapping). None: the file's own VOI LUT / window, else min-max (see
    medllava.imaging)."""
    slices: SlicesSection = field(default_factory=SlicesSection)
    """For images that are series or volumes (a DICOM folder, a .nii/.nii.gz file): how many slices, and which."""
    cache_dir: str | None = None
    """Where checked and rendered samples are cached, keyed by data version (default: OUTPUT/.data_cache)."""
    image_check: Literal["header", "full", "none"] = "header"
    """Image check before training. header: exists, inside image_folder, header readable, size within the pixel
    limit (no decoding; scales to millions of images), and an image whose pixels then fail to decode in the data
    loader is skipped (blank image, no supervised token), counted and named in data_report.json. full: decode
    every image before training (threads). none: no check. GRPO questions are always decoded before training."""
    preprocess_workers: int | None = None
    """Processes that render the records at start-up (once per data version); None: the CPUs available, at most 8."""


@dataclass
class TrainableSection:
    """What trains; the one place that decides requires_grad (see medllava.model.apply_trainable)."""

    vision: Trainability = "frozen"
    projector: Literal["frozen", "full"] = "full"
    llm: Trainability = "frozen"


@dataclass
class LoraSection:
    """LoRA adapter settings, used by every component whose trainable mode is 'lora'."""

    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"
    """'all-linear' or a list of module-name suffixes (q_proj, v_proj, ...), restricted to the LoRA components."""


@dataclass
class QuantizationSection:
    """QLoRA: load the LLM's linear layers in 4 or 8 bits through bitsandbytes."""

    bits: Literal[4, 8] | None = None
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True


@dataclass
class OptimSection:
    """Optimizer and schedule."""

    lr: float = 2e-5
    projector_lr: float | None = None
    """Learning rate of the projector; None = `lr`."""
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    """Share of the optimizer steps the learning rate warms up over, 0 to 1 (1: all of them)."""
    scheduler: str = "cosine"
    optimizer: str = "adamw_torch"
    epochs: float = 1.0
    max_steps: int = -1
    """Positive: stop after this many optimizer steps (overrides epochs)."""
    per_device_batch_size: int = 4
    grad_accum: int = 1
    """Micro-batches per optimizer step; leave at 1 when global_batch_size is set (it is then derived)."""
    global_batch_size: int | None = None
    """Samples per optimizer step over all ranks (GRPO: completions). Set, it holds on any number of GPUs:
    grad_accum = global_batch_size / (per_device_batch_size x ranks), which must divide evenly."""
    max_grad_norm: float = 1.0
    liger_kernel: bool = False
    """Liger's Triton kernels on the LLM (RMSNorm, RoPE, SwiGLU; in SFT also the fused linear cross-entropy,
    which never materialises the logits). Needs `pip install liger-kernel` and a CUDA GPU."""


@dataclass
class RunSection:
    """Where the run writes and how it executes."""

    output_dir: str = "runs/stage"
    precision: Precision = "auto"
    """'auto': bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."""
    gradient_checkpointing: bool = False
    deepspeed: str | None = None
    """A DeepSpeed JSON file, e.g. deepspeed_configs/zero2.json."""
    report_to: Literal["none", "tensorboard", "wandb"] = "none"
    resume: str = "auto"
    """'auto': continue from the newest complete checkpoint in output_dir if any (refused, naming the changed keys,
    when the stage config differs from the one that wrote it); 'force': the same even if the config changed;
    'never'; or a checkpoint path."""
    seed: int = 42
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: int = 2
    use_cpu: bool = False
    """Force CPU even where a GPU is visible."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A non-finite loss or gradient: 'stop' names the step and samples; 'skip' drops that update (counted)."""
    max_nonfinite_skips: int = 20
    """With 'skip': stop anyway after this many skipped batches (the run has diverged)."""
    hang_timeout_s: float = 1800.0
    """With several ranks: a rank whose training makes no progress for this long (a step, its generation and its
    checkpoint included) ends the job with a message naming the step and the ranks that fell silent. Collectives
    outside training (ranks waiting while rank 0 builds the data cache) wait up to max(1 h, 2 x this)."""
    shared_output_wait_s: float = 30.0
    """With several ranks: how long each rank looks for the probe rank 0 writes into output_dir before the stage
    stops with "output_dir is not shared" (a network file system may serve a cached listing that long)."""


@dataclass
class PassRateFilterSection:
    """How `python -m data_recipes.pass_rate_filter --stage` makes a GRPO stage's data.train_files[0]: it samples the
    starting model on `source` with this stage's prompt, generations, temperature and completion length, and
    keeps the questions whose pass rate lies strictly between the bounds. `./train.sh stages/<family>` runs it
    before the stage."""

    source: list[str] = field(default_factory=list)
    """The unfiltered VQA files (JSON / JSONL / datasets sources); images relative to data.image_folder."""
    min_rate: float = 0.0
    max_rate: float = 1.0
    batch_size: int = 32
    """Questions per generation batch."""


@dataclass
class GRPOSection:
    """Group Relative Policy Optimization (TRL's GRPOTrainer) with verifiable rewards (medllava.rewards)."""

    prompt: Literal["plain", "answer", "think"] = "think"
    """How questions are asked: 'plain' (as in the instruction data), 'answer' (<answer> tags), or 'think'
    (<think> reasoning, then <answer>, Med-R1 / MedVLThinker style)."""
    instruction: str | None = None
    """Overrides the instruction text that 'answer'/'think' append to the question."""
    rewards: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0, "think_format": 0.5})
    """Reward name -> weight; names from medllava.rewards.REWARDS (accuracy, think_format, answer_format, ...)."""
    gate_accuracy_on_format: bool = False
    """True: accuracy only counts when the prompt's format (think/answer tags) holds."""
    num_generations: int = 8
    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    beta: float = 0.0
    """KL coefficient against the starting model (0 = no reference model)."""
    epsilon: float = 0.2
    num_iterations: int = 1
    scale_rewards: Literal["group", "batch", "none"] = "group"
    loss_type: str | None = None
    """TRL loss type (grpo, dr_grpo, dapo, bnpo, ...); None keeps TRL's default."""
    mask_truncated_completions: bool = False
    log_completions_every: int = 50
    """Write sampled completions (question, answer, completion, reward) to completions.jsonl every N steps."""
    use_vllm: bool = False
    pass_rate_filter: PassRateFilterSection = field(default_factory=PassRateFilterSection)


REJECT_KINDS = ("text", "image:blank", "image:noise", "image:lesion", "image:swap", "image:order")
"""What the rejected side of a pair made by data_recipes/preference_pairs.py is (see that module)."""


@dataclass
class PreferencePairsSection:
    """How `python -m data_recipes.preference_pairs --stage` makes a DPO stage's data.train_files[0] from VQA records
    and the starting model; `./train.sh stages/<family>` runs it before the stage."""

    source: list[str] = field(default_factory=list)
    """The VQA files (JSON / JSONL / datasets sources); images relative to data.image_folder."""
    rejects: list[str] = field(default_factory=lambda: ["image:blank", "image:lesion", "text"])
    """Reject kinds, each making one pair per question where it can (see REJECT_KINDS)."""
    n: int = 4
    """Answers sampled per question (the chosen side is a right one; text rejects are wrong ones)."""
    temperature: float = 1.0
    max_new_tokens: int = 64
    max_records: int | None = None
    """Only the first N questions of the source."""
    weight: Literal["none", "difficulty"] = "none"
    """difficulty: each pair weighs 1 + the share of wrong samples."""
    batch_size: int = 32


DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
"""TRL's DPO loss types (trl.DPOConfig.loss_type); a test keeps this list equal to the ones TRL's trainer accepts."""


@dataclass
class DPOSection:
    """Direct preference optimisation on preference pairs (TRL's DPOTrainer; pairs read by medllava.data.preference,
    each side with its own images). The knobs named as in trl.DPOConfig mean what they mean there."""

    beta: float = 0.1
    """How far the policy may move from the reference (TRL's beta; IPO's tau)."""
    loss_type: list[str] | str = "sigmoid"
    """TRL loss type(s); several are summed with `loss_weights` (MPO: [sigmoid, bco_pair, sft])."""
    loss_weights: list[float] | None = None
    """One weight per loss type (None: 1 each)."""
    sft_weight: float = 0.0
    """RPO: add the chosen answers' negative log-likelihood (TRL's 'sft' loss) with this weight; 0: none."""
    label_smoothing: float = 0.0
    """Robust / EXO / cDPO: the assumed share of flipped preferences."""
    f_divergence_type: Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"] = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    """alpha of the alpha-divergence (f_divergence_type: alpha_divergence)."""
    ld_alpha: float | None = None
    """LD-DPO: weight of the tokens past the shorter answer's length (None: plain sums)."""
    use_weighting: bool = False
    """WPO: weight each pair by the policy's probability of both answers."""
    pairs: PreferencePairsSection = field(default_factory=PreferencePairsSection)
    pair_weights: bool = True
    """Multiply each pair's loss by its record's `weight` (MMedPO's clinical-relevance weighting; 1 when absent).
    When the data's weights differ, each pair of a micro-batch runs its own forward pass (TRL's loss is a mean
    over a batch's pairs): exact, at the cost of batching; per_device_batch_size 1 loses nothing."""

    def loss_types(self) -> list[str]:
        """The loss types TRL runs, RPO's 'sft' term included."""
        types_ = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        return [*types_, "sft"] if self.sft_weight > 0 else types_

    def weights(self) -> list[float] | None:
        """TRL's loss_weights for loss_types() (None: 1 each)."""
        if self.sft_weight <= 0:
            return self.loss_weights
        return [*(self.loss_weights or [1.0] * (len(self.loss_types()) - 1)), self.sft_weight]

    def validate(self) -> None:
        given = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        unknown = [t for t in given if t not in DPO_LOSS_TYPES]
        if not given or unknown:
            raise ConfigError(f"dpo.loss_type: unknown {unknown or 'empty list'}; known: {list(DPO_LOSS_TYPES)}")
        if self.beta <= 0:
            raise ConfigError(f"dpo.beta: {self.beta} must be positive")
        if self.loss_weights is not None and len(self.loss_weights) != len(given):
            raise ConfigError(f"dpo.loss_weights: {len(self.loss_weights)} weight(s) for {len(given)} loss type(s) {given}")
        if self.sft_weight < 0:
            raise ConfigError(f"dpo.sft_weight: {self.sft_weight} must be >= 0")
        if self.sft_weight > 0 and "sft" in given:
            raise ConfigError("dpo.sft_weight: the loss types already hold 'sft'; give its weight in loss_weights")
        unknown = [k for k in self.pairs.rejects if k not in REJECT_KINDS]
        if unknown or not self.pairs.rejects:
            raise ConfigError(f"dpo.pairs.rejects: unknown {unknown or 'empty list'}; known: {list(REJECT_KINDS)}")
        if self.pairs.n < 1:
            raise ConfigError("dpo.pairs.n must be at least 1")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing: {self.label_smoothing} must lie in [0, 0.5)")
        if "exo_pair" in given and self.label_smoothing == 0.0:
            raise ConfigError("dpo.loss_type exo_pair needs dpo.label_smoothing > 0 (EXO's epsilon, e.g. 1e-3)")
        if self.ld_alpha is not None and not 0.0 <= self.ld_alpha <= 1.0:
            raise ConfigError(f"dpo.ld_alpha: {self.ld_alpha} must lie in [0, 1]")
        f_div_losses = {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
        if self.f_divergence_type != "reverse_kl" and not set(self.loss_types()) <= f_div_losses:
            raise ConfigError(f"dpo.f_divergence_type {self.f_divergence_type} works with the loss types "
                              f"{sorted(f_div_losses)} only, not {sorted(set(self.loss_types()) - f_div_losses)}")
        if self.use_weighting and any(t.startswith("aot") for t in given):
            raise ConfigError("dpo.use_weighting (WPO) cannot follow aot's sorted pairs; drop one of them")
        if self.pair_weights and any(t.startswith("aot") for t in given):
            raise ConfigError("dpo.loss_type aot sorts the batch's pairs, so per-pair weights cannot follow them; "
                              "set dpo.pair_weights: false")


@dataclass
class StageConfig:
    """One training stage: everything needed to reproduce it."""

    name: str = "stage"
    kind: Literal["sft", "grpo", "dpo"] = "sft"
    """What the stage trains (one entry of medllava.train.stage.STAGE_KINDS each)."""
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    trainable: TrainableSection = field(default_factory=TrainableSection)
    lora: LoraSection = field(default_factory=LoraSection)
    quantization: QuantizationSection = field(default_factory=QuantizationSection)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)
    grpo: GRPOSection = field(default_factory=GRPOSection)
    dpo: DPOSection = field(default_factory=DPOSection)

    def slice_spec(self) -> Any:
        """data.slices as a medllava.volumes.SliceSpec (ValueError naming the field when it is not valid)."""
        from medllava.volumes import SliceSpec

        return SliceSpec(int(self.data.slices.count), self.data.slices.spacing)

    def validate(self) -> None:
        """Cross-field checks that types alone cannot express."""
        m = self.model
        if not m.init_from and not (m.vision_tower and m.llm):
            raise ConfigError("model: set `init_from`, or both `vision_tower` and `llm`")
        if m.init_from and (m.vision_tower or m.llm):
            raise ConfigError("model: `init_from` excludes `vision_tower`/`llm` (the model comes from the folder)")
        if self.quantization.bits is not None and self.trainable.llm == "full":
            raise ConfigError("quantization: a quantized LLM cannot be trained in full; use `trainable.llm: lora`")
        if self.quantization.bits is not None and self.trainable.llm == "frozen" and self.trainable.projector == "frozen":
            raise ConfigError("quantization: nothing would train")
        if not self.data.train_files:
            raise ConfigError("data.train_files: at least one file is required")
        if self.kind == "grpo":
            g = self.grpo
            if g.num_generations < 2:
                raise ConfigError("grpo.num_generations must be at least 2 (advantages compare completions)")
            batch = self.optim.global_batch_size or self.optim.per_device_batch_size * self.optim.grad_accum
            if batch % g.num_generations:
                what = "global_batch_size" if self.optim.global_batch_size else "per_device_batch_size x grad_accum"
                raise ConfigError(
                    f"grpo: {what} ({batch}) must be a multiple of num_generations "
                    f"({g.num_generations}); the batch counts completions"
                )
            if not g.rewards:
                raise ConfigError("grpo.rewards: at least one reward")
            from medllava.rewards import REWARDS

            unknown = [n for n in g.rewards if n not in REWARDS]
            if unknown:
                raise ConfigError(f"grpo.rewards: unknown reward(s) {unknown}; known: {sorted(REWARDS)}")
            if g.gate_accuracy_on_format and g.prompt == "plain":
                raise ConfigError("grpo.gate_accuracy_on_format needs prompt 'answer' or 'think' (a format to gate on)")
        if self.kind == "dpo":
            self.dpo.validate()
            if self.data.packing is True:
                raise ConfigError("data.packing: a DPO batch holds each pair's two sides as rows of their own; "
                                  "packing applies to SFT stages (set it to auto or false)")
        if self.data.max_length <= 0:
            raise ConfigError("data.max_length must be positive")
        try:
            self.slice_spec()
        except ValueError as err:
            raise ConfigError(f"data.{err}") from None
        if self.data.window is not None:
            from medllava.imaging import Window

            try:
                Window.parse(self.data.window)
            except ValueError as err:
                raise ConfigError(f"data.window: {err}") from None
        if self.run.shared_output_wait_s < 0:
            raise ConfigError(f"run.shared_output_wait_s: {self.run.shared_output_wait_s} must be >= 0 (seconds)")
        if self.run.hang_timeout_s <= 0:
            raise ConfigError(f"run.hang_timeout_s: {self.run.hang_timeout_s} must be positive (seconds)")
        if self.optim.per_device_batch_size <= 0 or self.optim.grad_accum <= 0:
            raise ConfigError("optim: batch size and grad_accum must be positive")
        if not 0.0 <= self.optim.warmup_ratio <= 1.0:
            raise ConfigError(f"optim.warmup_ratio: {self.optim.warmup_ratio} is not a share of the steps (0 to 1)")
        if self.optim.global_batch_size is not None:
            if self.optim.global_batch_size <= 0:
                raise ConfigError("optim.global_batch_size must be positive")
            if self.optim.grad_accum != 1:
                raise ConfigError("optim: set global_batch_size or grad_accum, not both (accumulation is derived "
                                  "from the global batch, the per-device batch and the number of ranks)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def accumulation(self, world_size: int) -> int:
        """Micro-batches per optimizer step on `world_size` ranks (the global batch, when set, holds)."""
        o = self.optim
        if o.global_batch_size is None:
            return o.grad_accum
        per_step = o.per_device_batch_size * world_size
        if o.global_batch_size % per_step:
            raise ConfigError(
                f"optim.global_batch_size {o.global_batch_size} is not a multiple of per_device_batch_size "
                f"{o.per_device_batch_size} x {world_size} rank(s) = {per_step}; change one so that it divides"
            )
        return o.global_batch_size // per_step

    def global_batch(self, world_size: int) -> int:
        """Samples (GRPO: completions) per optimizer step on `world_size` ranks."""
        return self.optim.per_device_batch_size * world_size * self.accumulation(world_size)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and gently convert) `value` against the annotation `tp`; raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: {value!r} matches none of {_type_name(tp)}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        if not args:
            return dict(value)
        return {_coerce(k, args[0], key): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "2e-5" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {_type_name(tp)}")


RETIRED = types.MappingProxyType({
    "data.pack_length": "no longer used: packing puts each micro-batch in one row whose samples attend only to "
                        "themselves (variable-length attention); remove the key",
})
"""Keys earlier versions accepted, with what to do instead (an unknown key would only list the known ones)."""


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        for key in (where + u for u in unknown):
            if key in RETIRED:
                raise ConfigError(f"{key}: {RETIRED[key]}")
        raise ConfigError(f"unknown key(s) {', '.join(where + u for u in unknown)}; known: {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse `--section.key=value` (or `section.key=value`) into a key path and a YAML-typed value."""
    body = text[2:] if text.startswith("--") else text
    if "=" not in body:
        raise ConfigError(f"override {text!r}: expected --section.key=value")
    key, raw = body.split("=", 1)
    path = [p for p in key.replace("-", "_").split(".") if p]
    if not path:
        raise ConfigError(f"override {text!r}: empty key")
    return path, yaml.safe_load(raw) if raw != "" else ""


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of a raw config mapping with dotted overrides applied."""
    out = yaml.safe_load(yaml.safe_dump(data)) or {}
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return out


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> StageConfig:
    """Build and validate a StageConfig from a raw mapping."""
    try:
        cfg = _build(StageConfig, data)
        cfg.validate()
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> StageConfig:
    """Read a stage YAML file, apply `--section.key=value` overrides and validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return config_from_dict(apply_overrides(raw, overrides or []), source=str(path))


def save_config(cfg: StageConfig, path: str | Path) -> None:
    """Write the resolved configuration (every field, defaults included) as YAML."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
"""A Hugging Face Hub model id: `name` or `org/name`."""


def missing_model_folder(path: str | Path) -> bool:
    """True when nothing is at `path` and it cannot be a Hub id (`org/name`, checked only by loading it): a
    missing `no/such/model`, `./model` or `/abs/model` is the user's typo. Light on purpose: callers check before
    importing torch."""
    text = str(path)
    return not Path(text).expanduser().exists() and not HUB_ID.fullmatch(text)


def require_model_folder(path: str | Path, error: type[Exception] = ConfigError) -> None:
    """Raise `error` naming `path` when `missing_model_folder(path)`."""
    if missing_model_folder(path):
        raise error(f"{path}: no such model folder")


def window_option(text: str | None, option: str = "--window") -> Window | None:
    """A command's window option parsed (None when unset); a bad value is a ConfigError naming the option."""
    if not text:
        return None
    from medllava.imaging import Window

    try:
        return Window.parse(text)
    except ValueError as err:
        raise ConfigError(f"{option}: {err}") from None


def slices_option(text: str | None, stage: dict[str, Any] | None = None, option: str = "--slices") -> Any:
    """A command's slices option ('COUNT' or 'COUNT,SPACING' with SPACING 'uniform' or millimetres) as a
    medllava.volumes.SliceSpec; unset: the stage's data.slices (`stage`), else the defaults. A bad value is a
    ConfigError naming the option."""
    from medllava.volumes import SliceSpec

    try:
        if text:
            count, _, spacing = text.partition(",")
            spacing = spacing.strip().lower() or "uniform"
            return SliceSpec(int(count), spacing if spacing == "uniform" else float(spacing))
        stage = stage or {}
        return SliceSpec(int(stage.get("count", 8)), stage.get("spacing", "uniform"))
    except ValueError as err:
        raise ConfigError(f"{option} {text or stage!r}: {err} (expected COUNT or COUNT,SPACING: 8, 8,uniform, 8,2.5)") from None


def stage_slices(model_dir: str | Path) -> dict[str, Any] | None:
    """The data.slices a stage output (medllava_stage.yaml) or an export (medllava_eval.json) was trained with, read
    without importing torch; None when neither says (a Hub id, a plain checkpoint)."""
    import json

    import yaml

    folder = Path(model_dir)
    try:
        if (folder / "medllava_stage.yaml").is_file():
            stage = yaml.safe_load((folder / "medllava_stage.yaml").read_text(encoding="utf-8")) or {}
            return (stage.get("data") or {}).get("slices")
        if (folder / "medllava_eval.json").is_file():
            return json.loads((folder / "medllava_eval.json").read_text(encoding="utf-8")).get("slices")
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return None
