"""Training-throughput benchmark: medllava packed vs medllava padded vs TRL's SFTTrainer, same model, same data.

Architectures are built from configs with random weights (nothing is downloaded): CLIP ViT-L/14-336 with
Qwen2.5-0.5B / 1.5B / 7B or Mistral-7B shapes, and a tiny pair for CPU. Data is synthetic LLaVA-Med-like
conversations, one image each, with a skewed (log-normal) answer length. Every mode trains on the same samples
per step (`batch_size`): packed is the training path (each micro-batch one row, samples isolated by variable-length
attention), padded pads each micro-batch to its longest sample. Reported per mode: real tokens/s (image tokens
included, padding excluded), samples/s, step time, model FLOPs utilisation (vision forward + projector and LLM
forward/backward, counted analytically; on GPUs with a known peak), peak memory (GPU: allocator peak; CPU: the
process's peak resident set), and, measured in one step after the timed ones, the activations autograd keeps for
backward and the size of the LM head's output (logits). With `rounds` > 1 the modes alternate and each figure is
the median over the rounds.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import platform
import resource
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MistralConfig,
    Qwen2Config,
    TrainerCallback,
)

from medllava.attention import llm_attention, packed_implementation, set_llm_attention
from medllava.config import ConfigError, LoraSection, TrainableSection
from medllava.data.collate import SFTCollator, SFTDataset
from medllava.data.expand import ImageExpander
from medllava.data.packing import SamplePackingCollator
from medllava.data.render import Renderer
from medllava.data.validate import prepare_samples
from medllava.families import family_of
from medllava.model import NoGradForward, add_image_token, apply_trainable, finalize_generation_config
from medllava.presets import QWEN2_CHAT_TEMPLATE, tiny_corpus, train_tokenizer
from medllava.processor import build_processor, image_processor_for_tower, num_image_tokens

logger = logging.getLogger(__name__)

# Dense bf16 peak of the accelerators this project is measured on (FLOP/s).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}

CLIP_L336 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
             "image_size": 336, "patch_size": 14, "projection_dim": 768}
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"vision": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                        "image_size": 32, "patch_size": 8},
             "llm": ("llama", {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
                               "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512})},
    "clip-qwen2.5-0.5b": {"vision": CLIP_L336, "llm": ("qwen2", {
        "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
        "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True})},
    "clip-qwen2.5-1.5b": {"vision": CLIP_L336, "llm": ("qwen2", {
        "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
        "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True})},
    "clip-qwen2.5-7b": {"vision": CLIP_L336, "llm": ("qwen2", {
        "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
        "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False})},
    "clip-mistral-7b": {"vision": CLIP_L336, "llm": ("mistral", {
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "vocab_size": 32000, "tie_word_embeddings": False, "sliding_window": None})},
    # A stock Qwen2.5-VL (dynamic resolution, 3-D M-RoPE): 64x64 images become 64 merged tokens each.
    "tiny-qwen2.5-vl": {"family": "qwen2_5_vl", "hidden": 128, "layers": 4, "vision_hidden": 64,
                        "max_pixels": 64 * 64, "image_size": 64},
}
WORDS = ("the lesion is seen in the left lower lobe with mild surrounding edema and no effusion , "
         "findings are consistent with a benign process ; follow up imaging may help").split()


@dataclass
class BenchSettings:
    preset: str = "tiny"
    modes: tuple[str, ...] = ("packed", "padded", "trl")
    """packed, padded, trl, and liger (packed with Liger's kernels; last, as they patch the model in place)."""
    samples: int = 256
    steps: int = 10
    warmup: int = 2
    batch_size: int = 8
    """Samples per step, in every mode."""
    max_length: int = 2048
    median_answer_tokens: int = 150
    trainable: str = "full"
    """full (projector + LLM), lora (LLM LoRA + projector), qlora (4-bit LLM + LoRA)."""
    gradient_checkpointing: bool = False
    precision: str = "auto"
    attn_implementation: str | None = None
    seed: int = 0
    profile_steps: int = 0
    """Steps profiled with torch.profiler after the measured ones (top operators land in the report)."""
    supervised_head: bool = True
    """medllava modes: LM head and loss only where labels are supervised (False: over every position)."""
    rounds: int = 1
    """Times the modes run, alternating; each reported figure is the median over the rounds."""

    def check(self) -> None:
        """Refuse settings that cannot run here, before anything is built."""
        unknown = set(self.modes) - {"packed", "padded", "trl", "liger"}
        if unknown:
            raise ConfigError(f"bench: unknown mode(s) {sorted(unknown)} (packed, padded, trl, liger)")
        if "liger" in self.modes:
            if self.modes[-1] != "liger":
                raise ConfigError("bench: the liger mode must come last (Liger patches the model in place)")
            from medllava.train.common import liger_problem

            problem = liger_problem()
            if problem:
                raise ConfigError(f"bench: mode liger: {problem}")


@dataclass
class ModeResult:
    mode: str
    steps: int
    seconds: float
    samples: int
    tokens: int
    padded_tokens: int
    flops: float | None
    """Model FLOPs of the timed steps (None where not counted: see count_flops)."""
    peak_memory_gb: float | None
    activation_mb: float = 0.0
    """Saved for backward at the end of the forward pass (parameters excluded), one step after the timed ones."""
    logits_mb: float = 0.0
    """The LM head's output in that step."""
    tokens_per_s: float = 0.0
    samples_per_s: float = 0.0
    step_time_s: float = 0.0
    achieved_tflops: float | None = 0.0
    mfu: float | None = None
    padding_fraction: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def build_bench_model(preset: str, dtype: torch.dtype, device: torch.device,
                      attn_implementation: str | None = None) -> tuple[LlavaForConditionalGeneration, Any]:
    """A random-init Llava of the preset's shapes, with an in-process tokenizer and the LLaVA processor (or, for a
    preset that names a model family, a random-init stock model of that family)."""
    spec = PRESETS[preset]
    if "family" in spec:
        return build_family_bench_model(spec, dtype, device, attn_implementation)
    kind, text_kwargs = spec["llm"]
    tokenizer = train_tokenizer("qwen2" if kind == "qwen2" else "llama", tiny_corpus([" ".join(WORDS)] * 20), 400)
    if kind != "qwen2":
        tokenizer.chat_template = QWEN2_CHAT_TEMPLATE.replace("<|im_start|>", "[").replace("<|im_end|>", "]")
    image_token_id = add_image_token(tokenizer)
    text_cls = {"qwen2": Qwen2Config, "llama": LlamaConfig, "mistral": MistralConfig}[kind]
    text_config = text_cls(max_position_embeddings=max(4096, 2 * 2048), **text_kwargs)
    text_config.architectures = [{"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM",
                                  "mistral": "MistralForCausalLM"}[kind]]
    vision_config = CLIPVisionConfig(**spec["vision"])
    image_size, patch = vision_config.image_size, vision_config.patch_size
    image_processor = image_processor_for_tower(None, image_size, aspect="pad", model_type="clip_vision_model")
    processor = build_processor(image_processor, tokenizer, patch_size=patch, select_strategy="default",
                                num_additional_image_tokens=1, chat_template=tokenizer.chat_template)
    config = LlavaConfig(vision_config=vision_config, text_config=text_config, image_token_index=image_token_id,
                         image_seq_length=num_image_tokens(processor), vision_feature_layer=-2,
                         vision_feature_select_strategy="default")
    attn = attn_implementation or ("sdpa" if device.type == "cpu" else None)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation=attn or "sdpa")
    finalize_generation_config(model, processor)
    return model, processor


def build_family_bench_model(spec: dict[str, Any], dtype: torch.dtype, device: torch.device,
                             attn_implementation: str | None) -> tuple[Any, Any]:
    """A random-init stock model of `spec['family']` at the preset's sizes (saved by its tiny builder and loaded as
    any checkpoint is)."""
    from medllava.families.qwen_vl import _tiny_qwen
    from medllava.model import load_model

    with tempfile.TemporaryDirectory() as tmp:
        _tiny_qwen(spec["family"], tmp, corpus=tiny_corpus([" ".join(WORDS)] * 20), hidden=spec["hidden"],
                   layers=spec["layers"], vision_hidden=spec["vision_hidden"], max_pixels=spec["max_pixels"])
        model, processor = load_model(tmp, dtype=dtype, attn_implementation=attn_implementation or "sdpa")
    return model.to(device), processor


def synthetic_records(n: int, median_tokens: int, max_answer_tokens: int, image_dir: Path, image_size: int,
                      seed: int) -> Path:
    """n LLaVA-form records, one noise image each, answers log-normally long (skewed, like LLaVA-Med's)."""
    rng = np.random.default_rng(seed)
    image_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (image_size, image_size, 3), dtype=np.uint8)).save(image_dir / f"{i}.png")
        words = int(np.clip(rng.lognormal(math.log(median_tokens), 0.9), 8, max_answer_tokens))
        answer = " ".join(rng.choice(WORDS, size=words))
        rows.append({"id": f"s{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the findings in detail."}, {"from": "gpt", "value": answer}]})
    path = image_dir.parent / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def count_flops(model: Any, lengths: list[int], n_images: int, trainable: str) -> float | None:
    """Model FLOPs for one optimizer step over samples of the given (expanded) lengths.

    Frozen vision tower: forward only (2 x params per patch token + attention); projector: forward + backward;
    LLM: 6 x non-embedding params per token when trained in full, 4 x (forward and input gradients) with LoRA,
    plus causal attention 6 x layers x hidden x length per token. Counted for Llava models; None for the other
    families (their towers work at each image's own resolution: not counted here).
    """
    cfg = model.config
    if getattr(cfg, "model_type", "") != "llava":
        return None
    v, t = cfg.vision_config, cfg.text_config
    patches = (v.image_size // v.patch_size) ** 2 + 1
    vision_layers_used = v.num_hidden_layers + cfg.vision_feature_layer + 1 if cfg.vision_feature_layer < 0 else cfg.vision_feature_layer
    vision_params_per_layer = 4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size
    vision = n_images * (2 * vision_layers_used * vision_params_per_layer * patches
                         + 4 * vision_layers_used * v.hidden_size * patches**2)
    proj_params = sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    projector = 6 * proj_params * n_images * int(cfg.image_seq_length)
    head_dim = t.hidden_size // t.num_attention_heads
    kv = getattr(t, "num_key_value_heads", t.num_attention_heads) * head_dim
    llm_layer = t.hidden_size * (t.hidden_size + 2 * kv + t.hidden_size) + 3 * t.hidden_size * t.intermediate_size
    llm_params = t.num_hidden_layers * llm_layer + t.hidden_size * t.vocab_size  # + lm_head
    factor = 6 if trainable == "full" else 4
    tokens = sum(lengths)
    attention = sum(6 * t.num_hidden_layers * t.hidden_size * n * n for n in lengths)  # causal: half of 12
    return float(vision + projector + factor * llm_params * tokens + attention)


class StepWindow(TrainerCallback):
    """Times the measured steps (after warm-up), then measures memory in one step and, when asked, profiles a few.

    Steps [warmup, warmup + steps) are timed; step warmup + steps counts the activations (`ActivationMemory`);
    the `profile_steps` after it run under torch.profiler. Neither slows the measured window.
    """

    def __init__(self, warmup: int, steps: int, profile_steps: int = 0) -> None:
        self.warmup, self.steps, self.profile_steps = warmup, steps, profile_steps
        self.memory_step = warmup + steps
        self.total_steps = self.memory_step + 1 + profile_steps
        self.start: float | None = None
        self.end: float | None = None
        self.profile_table: str | None = None
        self._profiler: Any = None

    def measured(self, step: int) -> bool:
        return self.warmup <= step < self.warmup + self.steps

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.warmup:
            _sync()
            self.start = time.perf_counter()
        if self.profile_steps and state.global_step == self.memory_step + 1:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profiler = torch.profiler.profile(activities=activities)
            self._profiler.__enter__()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        step = state.global_step - 1  # global_step has already advanced past the step that just ended
        if self.measured(step):
            _sync()
            self.end = time.perf_counter()
        if self._profiler is not None and step == self.total_steps - 1:
            _sync()
            self._profiler.__exit__(None, None, None)
            sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
            self.profile_table = self._profiler.key_averages().table(sort_by=sort, row_limit=30)
            self._profiler = None


class ActivationMemory:
    """During one training step: the bytes autograd saves for backward in the forward pass (each storage once,
    parameters excluded), i.e. the activations held when backward starts, and the bytes of the LM head's output.

    Counted from the tensors themselves (saved-tensor hooks), so the figure is the same on any machine and
    comparable between modes in one process, unlike a process's resident set."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.saved: dict[int, int] = {}
        self.logits = 0
        self.forward_running = False
        self._stack = contextlib.ExitStack()

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.forward_running:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in self.parameters:
                self.saved[storage.data_ptr()] = max(self.saved.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    def _forward(self, running: bool) -> Any:
        def hook(*_: Any) -> None:
            self.forward_running = running
        return hook

    def _head_output(self, module: Any, args: Any, output: torch.Tensor) -> None:
        self.logits += output.numel() * output.element_size()

    def __enter__(self) -> ActivationMemory:
        head = self.model.get_output_embeddings()
        for handle in (self.model.register_forward_pre_hook(self._forward(True)),
                       self.model.register_forward_hook(self._forward(False), always_call=True),
                       head.register_forward_hook(self._head_output)):
            self._stack.callback(handle.remove)
        self._stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t))
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

    @property
    def activation_mb(self) -> float:
        return sum(self.saved.values()) / 2**20


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class BatchCounter:
    """Each measured sample's real length, the images, and the positions computed (padding included)."""

    def __init__(self) -> None:
        self.positions = self.images = 0
        self.lengths: list[int] = []

    def record(self, batch: dict[str, Any]) -> None:
        ids = batch["input_ids"]
        self.positions += ids.numel()
        pixels = batch.get("pixel_values")
        self.images += pixels.shape[0] if pixels is not None else 0
        if "position_ids" in batch:  # packed: a sample starts wherever positions restart; trailing padding has no labels
            for row_pos, row_labels in zip(batch["position_ids"].cpu(), batch["labels"].cpu()):
                starts = (row_pos == 0).nonzero().flatten().tolist() + [len(row_pos)]
                self.lengths += [b - a for a, b in zip(starts, starts[1:]) if (row_labels[a:b] != -100).any()]
        else:
            self.lengths += batch["attention_mask"].sum(1).tolist()


def counting(trainer_cls: type) -> type:
    """`trainer_cls` that records the batches of the measured steps in the main process (a collator wrapper would
    count inside dataloader workers, whose counts never come back)."""

    class Counting(trainer_cls):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, counter: BatchCounter, window: StepWindow, **kwargs: Any) -> None:
            super().__init__(*args, callbacks=[window], **kwargs)
            self.counter, self.window = counter, window

        def training_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            if self.window.measured(self.state.global_step):
                self.counter.record(inputs)
            if self.state.global_step == self.window.memory_step:
                with ActivationMemory(model) as self.memory:
                    return super().training_step(model, inputs, *args, **kwargs)
            return super().training_step(model, inputs, *args, **kwargs)

    Counting.__name__ = f"Counting{trainer_cls.__name__}"
    return Counting


def _peak_memory_gb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # CPU: peak resident set (process-wide)


def _reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_mode(mode: str, s: BenchSettings, model: Any, processor: Any, samples: list[Any], records: Path,
             image_folder: Path, device: torch.device, precision: str, workdir: Path, attention: str) -> ModeResult:
    """Train `warmup + steps` steps in one mode and measure the steps after warm-up (`attention`: the LLM's
    implementation as built, which packed modes switch to its packed counterpart)."""
    from transformers import TrainingArguments

    from medllava.train.common import checkpointing_arguments
    from medllava.train.sft import MedLlavaTrainer

    _reset_memory(device)
    window, counter = StepWindow(s.warmup, s.steps, s.profile_steps), BatchCounter()
    args_common = dict(output_dir=str(workdir / mode), max_steps=window.total_steps,
                       learning_rate=1e-5, logging_steps=10**6, save_strategy="no", report_to=[],
                       bf16=precision == "bf16", use_cpu=device.type == "cpu", remove_unused_columns=False,
                       disable_tqdm=True, dataloader_num_workers=4 if device.type == "cuda" else 0, seed=s.seed,
                       **checkpointing_arguments(s.gradient_checkpointing))
    pad = processor.tokenizer.pad_token_id
    packed = mode in ("packed", "liger")
    isolating = packed_implementation(attention) if packed else attention
    if isolating is None:
        raise ConfigError(f"bench: mode {mode}: attention {attention!r} cannot isolate packed samples")
    set_llm_attention(model, isolating)  # packed: the variable-length attention training uses; else as built
    if mode in ("packed", "padded", "liger"):
        dataset = SFTDataset(samples, ImageExpander(processor))
        collator = SamplePackingCollator() if packed else SFTCollator(pad)
        arguments = TrainingArguments(per_device_train_batch_size=s.batch_size, label_names=["labels"],
                                      use_liger_kernel=mode == "liger", **args_common)
        trainer = counting(MedLlavaTrainer)(model=model, args=arguments, train_dataset=dataset, data_collator=collator,
                                            processing_class=processor, counter=counter, window=window,
                                            supervised_head=s.supervised_head)
    elif mode == "trl":
        import datasets
        from trl import SFTConfig, SFTTrainer

        rows = [json.loads(line) for line in records.read_text().splitlines()]
        ds = datasets.Dataset.from_list([{
            "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["conversations"][0]["value"].replace("<image>\n", "")}]},
                         {"role": "assistant", "content": [{"type": "text", "text": r["conversations"][1]["value"]}]}],
            "images": [str(image_folder / r["image"])]} for r in rows]).cast_column("images", datasets.Sequence(datasets.Image()))
        trainer = counting(SFTTrainer)(model=model, args=SFTConfig(per_device_train_batch_size=s.batch_size,
                                                                   max_length=None, **args_common),
                                       train_dataset=ds, processing_class=processor, counter=counter, window=window)
    else:
        raise ConfigError(f"bench: unknown mode {mode!r} (packed, padded, trl, liger)")
    # medllava's modes run the frozen tower without autograd, as training does; TRL runs the stock model
    family = family_of(model)
    no_grad = [NoGradForward(m) for m in family.vision_modules(model)
               if not any(p.requires_grad for p in m.parameters())] if mode != "trl" else []
    try:
        trainer.train()
    finally:
        for hooks in no_grad:
            hooks.remove()
    seconds = (window.end or 0.0) - (window.start or 0.0)
    lengths = counter.lengths
    flops = count_flops(model, lengths, counter.images, s.trainable)
    result = ModeResult(mode=mode, steps=s.steps, seconds=seconds, samples=len(lengths), tokens=sum(lengths),
                        padded_tokens=counter.positions, flops=flops, peak_memory_gb=_peak_memory_gb(device),
                        activation_mb=trainer.memory.activation_mb, logits_mb=trainer.memory.logits / 2**20)
    result.tokens_per_s = result.tokens / seconds if seconds else 0.0
    result.samples_per_s = result.samples / seconds if seconds else 0.0
    result.step_time_s = seconds / s.steps if s.steps else 0.0
    result.achieved_tflops = flops / seconds / 1e12 if seconds and flops is not None else None
    result.padding_fraction = 1 - result.tokens / result.padded_tokens if result.padded_tokens else 0.0
    peak = next((v for k, v in PEAK_FLOPS.items() if device.type == "cuda" and k in torch.cuda.get_device_name()), None)
    result.mfu = flops / seconds / peak if peak and seconds and flops is not None else None
    if window.profile_table:
        result.extra["profile"] = window.profile_table
    del trainer
    return result


def median_result(results: list[ModeResult]) -> ModeResult:
    """The round with the median throughput (its own figures, so they stay consistent with each other), with every
    round's tokens/s in `extra`."""
    ordered = sorted(results, key=lambda r: r.tokens_per_s)
    middle = ordered[(len(ordered) - 1) // 2]
    if len(results) > 1:
        middle.extra["tokens_per_s_rounds"] = [round(r.tokens_per_s, 1) for r in results]
    return middle


def run_benchmark(s: BenchSettings) -> dict[str, Any]:
    """Build the model and data once, run every mode, return a JSON-ready report."""
    s.check()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = s.precision if s.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    torch.manual_seed(s.seed)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model, processor = build_bench_model(s.preset, dtype, device, s.attn_implementation)
        if s.trainable == "qlora":  # the real QLoRA path: a saved model reloaded with a 4-bit NF4 LLM
            from medllava.config import QuantizationSection
            from medllava.model import load_model, quantization_config, save_model

            save_model(model, processor, workdir / "base")
            del model
            _reset_memory(device)
            model, processor = load_model(workdir / "base", dtype=dtype, attn_implementation=s.attn_implementation,
                                          quantization=quantization_config(QuantizationSection(bits=4), dtype))
        image_size = PRESETS[s.preset].get("image_size") or model.config.vision_config.image_size
        image_tokens = ImageExpander(processor).count((image_size, image_size))
        records = synthetic_records(s.samples, s.median_answer_tokens, s.max_length - image_tokens - 64,
                                    workdir / "images", image_size, s.seed)
        renderer = Renderer(processor, "chat", s.max_length)
        samples, _ = prepare_samples([str(records)], renderer, image_folder=workdir / "images", progress=False,
                                     skip_invalid=True)
        trainable = TrainableSection(vision="frozen", projector="full", llm="full" if s.trainable == "full" else "lora")
        model = apply_trainable(model, trainable, LoraSection(r=64, alpha=128, dropout=0.0),
                                gradient_checkpointing=s.gradient_checkpointing, frozen_tower_without_grad=False)
        attention = llm_attention(model)
        rounds: dict[str, list[ModeResult]] = {mode: [] for mode in s.modes}
        for r in range(s.rounds):
            for mode in s.modes:
                logger.info("bench: %s (round %d of %d)", mode, r + 1, s.rounds)
                rounds[mode].append(run_mode(mode, s, model, processor, samples, records, workdir / "images", device,
                                             precision, workdir / f"round{r}", attention))
        results = [median_result(rs) for rs in rounds.values()]
    lengths = [x.length for x in samples]
    return {
        "settings": asdict(s),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.processor() or 'x86_64'}, "
                                                                            f"{torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "precision": precision,
        "parameters": sum(p.numel() for p in model.parameters()),
        "length_mix": {"samples": len(lengths), "mean": float(np.mean(lengths)), "median": float(np.median(lengths)),
                       "p90": float(np.percentile(lengths, 90)), "max": int(max(lengths))},
        "results": [asdict(r) for r in results],
    }


def markdown(report: dict[str, Any]) -> str:
    """A table of a benchmark report (speed-ups relative to TRL and to padded)."""
    res = {r["mode"]: r for r in report["results"]}
    lines = [f"### {report['settings']['preset']} on {report['device']} ({report['precision']}, "
             f"{report['settings']['trainable']})", "",
             f"{report['parameters'] / 1e6:.1f}M parameters; {report['length_mix']['samples']} samples, length mean "
             f"{report['length_mix']['mean']:.0f}, median {report['length_mix']['median']:.0f}, p90 "
             f"{report['length_mix']['p90']:.0f}, max {report['length_mix']['max']} tokens", "",
             "| mode | tokens/s | samples/s | step s | padding | TFLOP/s | MFU | peak mem GB | activations MB | "
             "logits MB | vs padded | vs TRL |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    def ratio(r: dict[str, Any], other: str) -> str:
        base = res.get(other, {}).get("tokens_per_s")
        return f"{r['tokens_per_s'] / base:.2f}x" if base else "-"

    for mode, r in res.items():
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        mem = f"{r['peak_memory_gb']:.1f}" if r["peak_memory_gb"] is not None else "-"
        logits = f"{r['logits_mb']:,.1f}" if r["logits_mb"] else "-"  # '-': the head's output never materialised
        tflops = f"{r['achieved_tflops']:.3f}" if r["achieved_tflops"] is not None else "-"
        lines.append(f"| {mode} | {r['tokens_per_s']:,.0f} | {r['samples_per_s']:.1f} | {r['step_time_s']:.3f} | "
                     f"{100 * r['padding_fraction']:.0f}% | {tflops} | {mfu} | {mem} | "
                     f"{r['activation_mb']:,.1f} | {logits} | {ratio(r, 'padded')} | {ratio(r, 'trl')} |")
    settings = report["settings"]
    rounds = settings.get("rounds", 1)
    head = "on supervised positions only" if settings.get("supervised_head", True) else "on every position"
    lines += ["", f"{settings['batch_size']} samples per step in every mode; {settings['steps']} timed steps after "
              f"{settings['warmup']} of warm-up" + (f", median of {rounds} alternating rounds" if rounds > 1 else "")
              + f"; medllava modes: LM head and loss {head}. Activations: bytes autograd keeps for backward at the end "
              "of the forward pass, parameters excluded; logits: the LM head's output (both from one step after the "
              "timed ones; '-' where the head's output is never materialised, as in TRL's fused head)."]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], table: str, out: str | Path) -> Path:
    """Write a benchmark report as JSON at `out` and its markdown table beside it (same stem, .md)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text(table, encoding="utf-8")
    return out
