"""Model assembly, loading, saving, and the one function that decides what trains.

Every model here is a stock transformers model of its own family (medllava.families): `build_model` joins any
AutoModel vision encoder and any AutoModelForCausalLM into a `LlavaForConditionalGeneration` with a freshly
initialised LLaVA-1.5 projector; `load_model` reads any supported family's folder (a stage output, an export, a
downloaded checkpoint: full model, or LoRA adapter + its base) with `AutoModelForImageTextToText`/`AutoProcessor`;
`apply_trainable` turns a `trainable:` spec into requires_grad flags / LoRA adapters on the family's modules.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jinja2 import TemplateError
from torch import nn
from transformers import (
    AddedToken,
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    BitsAndBytesConfig,
    GenerationConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerBase,
)
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector
from transformers.utils import is_flash_attn_2_available

from medllava.config import LoraSection, QuantizationSection, TrainableSection, require_model_folder
from medllava.dist import local_rank, world_size
from medllava.families import LLAVA, Family, UnsupportedModelError, family_of
from medllava.families.base import unwrap
from medllava.processor import (
    IMAGE_TOKEN,
    build_processor,
    image_processor_for_tower,
    llm_chat_template,
    num_image_tokens,
)

logger = logging.getLogger(__name__)

COMPONENTS = ("vision", "projector", "llm")
ADAPTER_CONFIG = "adapter_config.json"


class ModelLoadError(RuntimeError):
    """A model folder or hub id cannot be used; the message says which and why."""


def component_of(name: str, family: Family = LLAVA) -> str:
    """Which part of a model of `family` a parameter/module name belongs to: vision, projector or llm."""
    return family.component_of(name)


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda, then mps, then cpu; any other name is used as given."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_attn_implementation() -> str:
    """flash-attention 2 where it is installed and a GPU is present, otherwise PyTorch SDPA."""
    if torch.cuda.is_available() and is_flash_attn_2_available():
        return "flash_attention_2"
    return "sdpa"


def quantization_config(quant: QuantizationSection, compute_dtype: torch.dtype,
                        family: Family = LLAVA) -> BitsAndBytesConfig | None:
    """bitsandbytes settings for QLoRA (None when the section asks for no quantization): only the LLM's linear
    layers are quantized; the family's tower, projector and the head stay in 16 bits (transformers matches the
    skip list from the start of the full module name, so the family gives full prefixes)."""
    if quant.bits is None:
        return None
    skip = family.quant_skip_modules()
    if quant.bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant.quant_type,
            bnb_4bit_use_double_quant=quant.double_quant,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_quant_storage=compute_dtype,
            llm_int8_skip_modules=skip,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


def quantized_device_map() -> dict[str, Any] | str:
    """Where a quantized model must live: this process's GPU (one per rank), or the CPU."""
    if torch.cuda.is_available():
        return {"": local_rank() if world_size() > 1 else torch.cuda.current_device()}
    return "cpu"


@dataclass(frozen=True)
class TowerDefaults:
    """Feature layer, select strategy and extra (non-patch) tokens of a vision tower."""

    feature_layer: int
    select_strategy: str
    extra_tokens: int


def probe_tower(tower: nn.Module, image_size: int, patch_size: int) -> TowerDefaults:
    """Count the tower's non-patch tokens (CLS, registers) with one forward pass and pick LLaVA defaults.

    Towers with a CLS token use layer -2 and drop the CLS ('default', LLaVA-1.5); CLS-less towers
    (SigLIP) keep every token ('full') and read the last layer (as LLaVA-OneVision does).
    """
    param = next(tower.parameters())
    pixels = torch.zeros(1, 3, image_size, image_size, dtype=param.dtype, device=param.device)
    with torch.no_grad():
        out = tower(pixel_values=pixels, output_hidden_states=True, return_dict=True)
    extra = out.hidden_states[-1].shape[1] - (image_size // patch_size) ** 2
    if extra < 0:
        raise ModelLoadError(f"vision tower returned fewer tokens than patches ({extra}); unsupported tower")
    if extra == 0:
        return TowerDefaults(feature_layer=-1, select_strategy="full", extra_tokens=0)
    return TowerDefaults(feature_layer=-2, select_strategy="default", extra_tokens=extra)


def add_image_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """Add `<image>` as a special token (idempotent) and make sure a pad token exists; return its id."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    ids = tokenizer.encode(IMAGE_TOKEN, add_special_tokens=False)
    if len(ids) != 1:
        raise ModelLoadError(f"tokenizer splits {IMAGE_TOKEN} into {len(ids)} tokens")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    return ids[0]


def _init_new_embedding_rows(model: LlavaForConditionalGeneration, token_ids: list[int], n_old: int) -> None:
    """Set embedding (and untied output) rows of new tokens to the mean of the existing rows."""
    with torch.no_grad():
        for emb in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings())}.values():
            weight = emb.weight
            mean = weight[:n_old].float().mean(dim=0).to(weight.dtype)
            for tid in token_ids:
                weight[tid] = mean


def build_model(
    vision_tower: str,
    llm: str,
    *,
    vision_feature_layer: int | None = None,
    vision_feature_select_strategy: str | None = None,
    image_aspect: str = "pad",
    chat_template: str | None = None,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    allow_pickle: bool = False,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Assemble a stock LlavaForConditionalGeneration + LlavaProcessor from a vision tower and an LLM.

    Both towers keep their pretrained weights; the projector (LLaVA-1.5 2-layer GELU MLP) is fresh; `<image>`
    joins the tokenizer with its embedding set to the mean of the existing ones. (QLoRA stages start from a
    saved model: see `load_model`.)
    """
    attn = attn_implementation or default_attn_implementation()
    common: dict[str, Any] = {"trust_remote_code": trust_remote_code, "revision": revision}
    for source in (vision_tower, llm):
        refuse_pickle_only(source, allow_pickle)
    try:
        vcfg_full = AutoConfig.from_pretrained(vision_tower, **common)
        vision_config = getattr(vcfg_full, "vision_config", None) or vcfg_full
        tower = AutoModel.from_pretrained(
            vision_tower, config=vision_config, dtype=dtype, attn_implementation=attn,
            use_safetensors=not allow_pickle, **common
        )
        lm = AutoModelForCausalLM.from_pretrained(
            llm, dtype=dtype, attn_implementation=attn, use_safetensors=not allow_pickle, **common
        )
        tokenizer = AutoTokenizer.from_pretrained(llm, **common)
    except OSError as err:
        raise ModelLoadError(f"cannot load vision tower {vision_tower!r} / LLM {llm!r}: {err}") from err

    image_size = int(tower.config.image_size)
    patch_size = int(tower.config.patch_size)
    defaults = probe_tower(tower, image_size, patch_size)
    layer = defaults.feature_layer if vision_feature_layer is None else vision_feature_layer
    strategy = vision_feature_select_strategy or defaults.select_strategy
    if strategy == "default" and defaults.extra_tokens == 0:
        raise ModelLoadError(
            f"vision tower {vision_tower!r} has no CLS token: use vision_feature_select_strategy 'full'"
        )

    n_vocab_before = len(tokenizer)
    image_token_id = add_image_token(tokenizer)
    image_processor = image_processor_for_tower(
        vision_tower, image_size, aspect=image_aspect, model_type=vision_config.model_type, **common
    )
    processor = build_processor(
        image_processor,
        tokenizer,
        patch_size=patch_size,
        select_strategy=strategy,
        num_additional_image_tokens=defaults.extra_tokens,
        chat_template=llm_chat_template(tokenizer, chat_template),
    )

    text_config = lm.config
    if not getattr(text_config, "architectures", None):
        text_config.architectures = [type(lm).__name__]
    config = LlavaConfig(
        vision_config=tower.config,
        text_config=text_config,
        image_token_index=image_token_id,
        image_seq_length=num_image_tokens(processor),
        vision_feature_layer=layer,
        vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
    )
    # The skeleton is built on the meta device (no memory), then the pretrained towers are moved in.
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = tower
    model.model.language_model = getattr(lm, lm.base_model_prefix)
    model.lm_head = lm.get_output_embeddings()
    device = next(lm.parameters()).device
    model.model.multi_modal_projector = LlavaMultiModalProjector(config).to(device=device, dtype=dtype)
    model.generation_config = lm.generation_config
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()

    if image_token_id >= model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    _init_new_embedding_rows(model, [image_token_id], n_vocab_before)
    finalize_generation_config(model, processor)
    model.config._name_or_path = ""
    return model, processor


def end_of_turn_ids(processor: LlavaProcessor) -> list[int]:
    """Token ids that end an assistant turn under the chat template (eos, <|im_end|>, <end_of_turn>, ...)."""
    tok = processor.tokenizer
    ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
    probe = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "medllava-probe-answer"}]
    try:
        text = processor.apply_chat_template(probe, tokenize=False)
    except TemplateError as err:
        logger.warning("chat template could not render a probe conversation: %s", err)
        return ids
    tail = text.split("medllava-probe-answer", 1)[-1]
    # named special tokens and added special ones (Gemma's <end_of_turn> is only the latter)
    special = set(tok.all_special_tokens) | {t.content for t in tok.added_tokens_decoder.values() if t.special}
    for token in tok.tokenize(tail.strip()) if tail.strip() else []:
        if token in special:
            tid = tok.convert_tokens_to_ids(token)
            if tid not in ids:
                ids.append(tid)
            break
    return ids


def decoding_config(model: Any, max_new_tokens: int, *, temperature: float = 0.0,
                    num_return_sequences: int = 1) -> GenerationConfig:
    """Plain decoding for eval, chat and the pass-rate filter: greedy (temperature 0) or pure sampling at
    `temperature`, and none of the extras an LLM's shipped generation config may carry (Qwen2.5: repetition
    penalty 1.05, top-k 20, top-p 0.8). Only the stop, pad and start tokens come from the model's own config."""
    own = model.generation_config
    sampling = temperature > 0
    # transformers fills every field left None from the model's own generation config: so every field that
    # shapes the output gets its neutral value explicitly (penalties off, no n-gram blocking, no suppression).
    neutral = {k: v for k, v in GenerationConfig()._get_default_generation_params().items() if v is not None}
    neutral.update(suppress_tokens=[], begin_suppress_tokens=[], min_new_tokens=0)
    neutral.update(
        max_new_tokens=max_new_tokens, num_beams=1, num_return_sequences=num_return_sequences, do_sample=sampling,
        temperature=temperature if sampling else 1.0, top_p=1.0, top_k=0, use_cache=True,
        eos_token_id=own.eos_token_id, pad_token_id=own.pad_token_id, bos_token_id=own.bos_token_id,
    )
    neutral.pop("max_length", None)  # max_new_tokens decides the length
    neutral.pop("min_length", None)  # min_new_tokens (0) decides, and takes precedence over a shipped min_length
    return GenerationConfig(**neutral)


def finalize_generation_config(model: LlavaForConditionalGeneration, processor: LlavaProcessor) -> None:
    """Stop generation at the end-of-turn token(s), pad with the pad token, decode plainly greedy by default:
    the LLM's shipped sampling and penalty settings are dropped, so an export decodes the same everywhere."""
    gen = model.generation_config = GenerationConfig(eos_token_id=model.generation_config.eos_token_id,
                                                     bos_token_id=model.generation_config.bos_token_id)
    stop = end_of_turn_ids(processor)
    existing = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    merged = [i for i in existing if i is not None] + [i for i in stop if i not in existing]
    gen.eos_token_id = merged if len(merged) > 1 else (merged[0] if merged else None)
    gen.pad_token_id = processor.tokenizer.pad_token_id
    text_config = model.config.get_text_config()
    text_config.pad_token_id = processor.tokenizer.pad_token_id
    if processor.tokenizer.bos_token_id is not None:
        text_config.bos_token_id = gen.bos_token_id = processor.tokenizer.bos_token_id
    gen.do_sample = False
    gen.temperature = None
    gen.top_p = None
    gen.top_k = None


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def refuse_pickle_only(source: str | Path, allow_pickle: bool) -> None:
    """A local folder whose weights exist only as pickles is refused unless pickles are allowed."""
    folder = Path(source)
    if allow_pickle or not folder.is_dir():
        return
    files = [p.name for p in folder.iterdir() if p.is_file()]
    if any(f.endswith(".safetensors") for f in files):
        return
    pickles = sorted(f for f in files if f.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise ModelLoadError(
            f"{folder}: weights are pickle files ({', '.join(pickles)}), which can run code when loaded; medllava "
            "loads safetensors only. Convert them, or pass --allow-pickle (model.allow_pickle: true) if you trust them"
        )


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base_path(adapter_dir: str | Path) -> str:
    """The base model an adapter folder was trained on; relative paths resolve against the adapter folder."""
    adapter_dir = Path(adapter_dir)
    cfg = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise ModelLoadError(f"{adapter_dir}/{ADAPTER_CONFIG}: no base_model_name_or_path")
    candidate = (adapter_dir / base).resolve()
    if not os.path.isabs(base) and candidate.exists():
        return str(candidate)
    return base


def load_model(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    quantization: BitsAndBytesConfig | None = None,
    attn_implementation: str | None = None,
    adapter: str = "merge",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    device_map: Any = None,
) -> tuple[Any, LlavaProcessor]:
    """Load a stage output or exported folder (or hub id): a full model, or a LoRA adapter with its base.

    `adapter`: 'merge' merges the adapter into the base (inference, further full training),
    'trainable' keeps it as a trainable PeftModel, 'frozen' keeps it as a frozen PeftModel.
    Weights load from safetensors only unless `allow_pickle`.
    """
    path = str(path)
    require_model_folder(path, ModelLoadError)
    refuse_pickle_only(path, allow_pickle)
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "attn_implementation": attn_implementation or default_attn_implementation(),
        "use_safetensors": not allow_pickle,
        "trust_remote_code": trust_remote_code,
    }
    if quantization is not None:
        kwargs.update(quantization_config=quantization, device_map=device_map or quantized_device_map())
    elif device_map is not None:
        kwargs["device_map"] = device_map
    try:
        if is_adapter_dir(path):
            from peft import PeftModel

            base_path = adapter_base_path(path)
            refuse_pickle_only(base_path, allow_pickle)
            if quantization is not None and adapter == "merge":
                raise ModelLoadError("cannot merge a LoRA adapter into a quantized base; load it in 16-bit first")
            family_of_source(base_path, trust_remote_code=trust_remote_code)
            base = AutoModelForImageTextToText.from_pretrained(base_path, **kwargs)
            model = PeftModel.from_pretrained(base, path, is_trainable=adapter == "trainable")
            if adapter == "merge":
                model = model.merge_and_unload()
                model.config._name_or_path = path
            proc_source = path if (Path(path) / "processor_config.json").exists() else base_path
        else:
            family_of_source(path, trust_remote_code=trust_remote_code)
            model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
            proc_source = path
        processor = AutoProcessor.from_pretrained(proc_source, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise ModelLoadError(f"cannot load model {path!r}: {err}") from err
    return model, processor


def family_of_source(path: str | Path, *, trust_remote_code: bool = False) -> Family:
    """The model family of a folder or hub id (an adapter folder: of its base), from its config alone; a model of
    no supported family is one ModelLoadError naming the supported ones."""
    path = str(path)
    if is_adapter_dir(path):
        path = adapter_base_path(path)
    try:
        return family_of(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code))
    except UnsupportedModelError as err:
        raise ModelLoadError(f"{path}: {err}") from None
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load model {path!r}: {err}") from err


def widest_dtype(dtypes: Any) -> torch.dtype:
    """The floating dtype with the most bits (fp32 over bf16/fp16): every value of the others fits it exactly."""
    return max(dtypes, key=lambda d: torch.finfo(d).bits)


def inference_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU that supports it (a 7B model is then 14 GB, not 28), fp32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def load_for_inference(path: str | Path, *, bits: int | None = None, device: str = "auto",
                       allow_pickle: bool = False) -> tuple[Any, LlavaProcessor]:
    """Load a stage output / exported folder for generation (chat, eval, the pass-rate filter) on the chosen
    device, in bf16 where the device supports it, optionally quantized to 4 or 8 bits; in eval mode."""
    path = str(path)
    require_model_folder(path, ModelLoadError)
    target = pick_device(device)
    dtype = inference_dtype(target)
    quant = quantization_config(QuantizationSection(bits=bits), dtype, family_of_source(path)) if bits else None
    device_map = ({"": target.index or 0} if target.type == "cuda" else "cpu") if quant is not None else None
    model, processor = load_model(path, dtype=dtype, quantization=quant, device_map=device_map, allow_pickle=allow_pickle)
    if quant is None:
        model.to(target)
    model.eval()
    return model, processor


def merge_adapter_to_folder(adapter_dir: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32,
                            allow_pickle: bool = False) -> Path:
    """Merge a LoRA adapter into its 16/32-bit base and save the result as a standalone model folder."""
    model, processor = load_model(adapter_dir, dtype=dtype, adapter="merge", allow_pickle=allow_pickle)
    save_model(model, processor, out_dir)
    return Path(out_dir)


def save_model(model: Any, processor: LlavaProcessor, out_dir: str | Path, max_shard_size: str = "5GB") -> None:
    """Save weights (safetensors), config, generation config and processor so plain transformers loads them."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    check_reloadable(model)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    processor.save_pretrained(out_dir)


def check_reloadable(model: Any) -> None:
    """A Llava assembled here needs its text config's architecture named, or the saved model would not reload
    (`model` in its training wrappers or not)."""
    if family_of(model).assembled and not getattr(unwrap(model).config.get_text_config(), "architectures", None):
        raise ModelLoadError("text_config.architectures is unset; the saved model would not reload")


# ----------------------------------------------------------------------------------------------------------------
# What trains


def unused_vision_parameters(model: LlavaForConditionalGeneration) -> set[str]:
    """Vision-tower parameters that get no gradient given the feature layer (layers above it, pooling heads).

    Found with one backward pass through the image-feature path, so it holds for any tower. They stay frozen:
    training them is a no-op, and DDP fails on parameters that never receive a gradient.
    """
    if not family_of(model).assembled:
        return set()  # the family's own checkpoints feed every tower layer forward
    tower = model.model.vision_tower
    params = dict(tower.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(p.is_floating_point())
        p.grad = None
    size = int(model.config.vision_config.image_size)
    ref = next(iter(params.values()))
    pixels = torch.zeros(1, 3, size, size, dtype=ref.dtype, device=ref.device)
    out = model.model.get_image_features(pixel_values=pixels, return_dict=True)
    torch.stack([f.float().sum() for f in out.pooler_output]).sum().backward()
    unused = {n for n, p in params.items() if p.grad is None}
    for n, p in params.items():
        p.grad = None
        p.requires_grad_(flags[n])
    for p in model.model.multi_modal_projector.parameters():
        p.grad = None
    return unused


def keep_4bit_training_layout(model: nn.Module) -> None:
    """Keep every 4-bit layer in the layout training runs through.

    On a CPU with AVX512-BF16, bitsandbytes rewrites a 4-bit weight into an inference-only layout the first time
    its layer runs in eval mode without gradients (the packing probe, a generation), and never back: every later
    training step then takes the inference kernel and fails ("a view of a leaf Variable that requires grad is being
    used in an in-place operation"). The switch is the layer's own `support_avx512bf16_for_cpu` attribute."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def lora_target_names(model: nn.Module, components: set[str], target_modules: list[str] | str, exclude: set[str],
                      family: Family = LLAVA) -> list[str]:
    """Full names of the linear layers that get LoRA adapters: inside `components` (never the projector, which
    trains fully or not at all), matching `target_modules`."""
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name.endswith("lm_head") or name in exclude:
            continue
        part = family.component_of(name)
        if part not in components or part == "projector":
            continue
        if target_modules != "all-linear" and name.rsplit(".", 1)[-1] not in target_modules:
            continue
        names.append(name)
    return names


def parameter_counts(model: nn.Module) -> dict[str, dict[str, int]]:
    """Trainable and total parameter counts per component (vision, projector, llm, lora)."""
    family = family_of(model)
    counts = {c: {"trainable": 0, "total": 0} for c in (*COMPONENTS, "lora")}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel() * (2 if p.__class__.__name__ == "Params4bit" else 1)
        key = "lora" if "lora_" in name else family.component_of(name)
        counts[key]["total"] += n
        if p.requires_grad:
            counts[key]["trainable"] += n
    return counts


def apply_trainable(
    model: LlavaForConditionalGeneration,
    trainable: TrainableSection,
    lora: LoraSection,
    *,
    gradient_checkpointing: bool = False,
    frozen_tower_without_grad: bool = True,
) -> nn.Module:
    """Set what trains from a `trainable:` spec; wrap in LoRA adapters where asked. Logs the counts.

    A vision tower with nothing trainable then runs its forward without autograd (`NoGradForward`;
    `frozen_tower_without_grad=False` keeps the plain behaviour, for tests that compare the two).

    vision/llm: frozen | full | lora; projector: frozen | full. With any LoRA component, full components are
    saved alongside the adapter (`modules_to_save`), so the adapter folder holds everything that changed.
    """
    modes = {"vision": trainable.vision, "projector": trainable.projector, "llm": trainable.llm}
    family = family_of(model)
    quantized = bool(getattr(model, "is_quantized", False))
    unused = unused_vision_parameters(model) if modes["vision"] != "frozen" else set()
    if quantized:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
        keep_4bit_training_layout(model)
    for name, p in model.named_parameters():
        comp = family.component_of(name)
        used = comp != "vision" or name.split("vision_tower.", 1)[-1] not in unused
        p.requires_grad_(modes[comp] == "full" and used and p.is_floating_point())

    lora_components = {c for c, m in modes.items() if m == "lora"}
    if lora_components:
        from peft import LoraConfig, get_peft_model

        unused_modules = {f"model.vision_tower.{n.rsplit('.', 1)[0]}" for n in unused}
        targets = lora_target_names(model, lora_components, lora.target_modules, unused_modules, family)
        if not targets:
            raise ValueError(f"LoRA: no linear layer matches target_modules={lora.target_modules!r}")
        to_save = []
        if modes["projector"] == "full":
            to_save += family.saved_names(model, family.projector)
        if modes["vision"] == "full":
            to_save += family.saved_names(model, family.vision)
        if modes["llm"] == "full":
            raise ValueError("trainable: llm 'full' with vision 'lora' is not supported; use llm 'lora'")
        peft_config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=targets,
            modules_to_save=to_save or None,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, peft_config)
        if unused and modes["vision"] == "full":
            for name, p in model.named_parameters():
                if "vision_tower" in name and any(name.endswith(u) for u in unused):
                    p.requires_grad_(False)
    counts = parameter_counts(model)
    total_trainable = sum(c["trainable"] for c in counts.values())
    if total_trainable == 0:
        raise ValueError("trainable: nothing would train")
    for comp, c in counts.items():
        if c["total"]:
            mode = modes.get(comp, "adapter")
            logger.info("%-9s %-6s trainable %12s / %12s", comp, mode, f"{c['trainable']:,}", f"{c['total']:,}")
    if unused:
        logger.info("vision: %d parameter tensors above the feature layer stay frozen (they get no gradient)", len(unused))
    if frozen_tower_without_grad:
        for tower in family.vision_modules(model):
            if not any(p.requires_grad for p in tower.parameters()):  # (Qwen's projector sits inside its tower)
                NoGradForward(tower)
    return model


class NoGradForward:
    """Runs a module's forward with autograd off: for a frozen vision tower, which nothing below trains.

    A frozen tower needs no graph, but one is recorded all the same once anything makes its input require grad:
    `enable_input_require_grads` (gradient checkpointing, PEFT) hooks every sub-model's input embeddings, the
    tower's patch embedding included, and then the whole tower's activations are kept and its backward runs,
    for gradients nobody reads. Forward hooks (module API, no patching) switch grad mode off around the tower's
    forward and restore it after, also when the forward raises; the projector above runs with autograd as before.
    """

    def __init__(self, module: nn.Module) -> None:
        self.modes: list[bool] = []  # a stack: a module may run inside itself (nested or re-entered forwards)
        self.handles = [module.register_forward_pre_hook(self.enter),
                        module.register_forward_hook(self.exit, always_call=True)]

    def enter(self, module: nn.Module, args: Any) -> None:
        self.modes.append(torch.is_grad_enabled())
        torch.set_grad_enabled(False)

    def exit(self, module: nn.Module, args: Any, output: Any) -> None:
        torch.set_grad_enabled(self.modes.pop())

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
