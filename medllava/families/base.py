"""The `Family` description: the few facts about a model family that the rest of medllava reads."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where it is used: the CLI names the families without loading it
    import torch
    from torch import nn

PEFT_PREFIX = "base_model.model."


class UnsupportedModelError(ValueError):
    """A model, processor or family name that medllava does not train; the message names the supported ones."""


def unwrap(model: Any) -> Any:
    """The transformers model inside its training wrappers (DDP, a DeepSpeed engine: `.module`; PEFT), or the
    model itself."""
    while hasattr(model, "module") and not hasattr(getattr(model, "config", None), "model_type"):
        model = model.module  # (a DeepSpeed engine has a `config` of its own)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def submodule(model: Any, path: str) -> nn.Module:
    """`model.model.visual` from 'model.visual' (on the unwrapped model)."""
    return unwrap(model).get_submodule(path)


def save_tiny(model: Any, processor: Any, out_dir: str | Path) -> Path:
    """Save a tiny model and its processor with plain transformers, as a downloaded checkpoint looks."""
    out = Path(out_dir)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@dataclass(frozen=True)
class Family:
    """One model family (see the package docstring).

    Module paths are as `named_modules()` of the stock `...ForConditionalGeneration` spells them.
    """

    name: str
    """As `medllava tiny --family` and the README spell it."""
    title: str
    model_types: tuple[str, ...]
    """`config.model_type` values of the family."""
    processor_classes: tuple[str, ...]
    vision: tuple[str, ...]
    """The vision tower's modules (parameters under them are `vision`, unless they are projector ones)."""
    projector: tuple[str, ...]
    """The projector's modules: trained by `trainable.projector`, at `optim.projector_lr`, never quantized."""
    language_model: str
    """The decoder without its head."""
    assembled: bool = False
    """medllava assembles models of this family from a tower + LLM (stage 1): their saved text config must name its
    architecture, and tower layers above the feature layer get no gradient (found with a probe, kept frozen)."""
    structured_content: bool = True
    """Records are rendered as structured content (image parts) through the processor's own chat template; False
    keeps medllava's Llava rendering (the `<image>` placeholder written in the text)."""
    token_types_key: str | None = None
    """The model input that marks image tokens (Qwen-VL: mm_token_type_ids for M-RoPE; Gemma 3: token_type_ids for
    bidirectional attention inside an image); None when the model needs none."""
    dynamic_resolution: bool = False
    """An image's token count depends on its size (Qwen-VL's min_pixels/max_pixels), so the renderer reads each
    image's size to count its tokens before training."""
    tiled_inputs: tuple[str, ...] = ()
    """Pixel inputs the processor returns as one padded block per sample, [samples, tiles, ...] (SmolVLM /
    Idefics3: pixel_values, pixel_attention_mask). A processed sample keeps its tiles along the first axis, as the
    other families' pixel inputs are; a batch gives the model all its tiles as one block [1, tiles, ...]."""
    packing_refusal: str | None = None
    """Why packed rows cannot be exact for this family (then training uses padded batches and says so)."""
    packed_positions: Callable[[Any, dict[str, Any]], torch.Tensor] | None = None
    """Positions of a packed row computed with the model (M-RoPE); None: the collator's 1-D positions serve."""
    set_pixel_limits: Callable[[Any, int | None, int | None], None] | None = None
    """Sets the processor's dynamic-resolution range (`model.min_pixels` / `model.max_pixels`); None: fixed size."""
    build_tiny: Callable[..., Path] | None = None
    """`build_tiny(out_dir, seed=0, corpus=None)` saves a tiny random-init model + processor of the family (plain transformers)."""

    def component_of(self, name: str) -> str:
        """Which part a parameter or module name belongs to: 'vision', 'projector' or 'llm'."""
        name = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
        if _under(name, self.projector):
            return "projector"
        if _under(name, self.vision):
            return "vision"
        return "llm"

    def quant_skip_modules(self) -> list[str]:
        """What bitsandbytes must leave in 16 bits: tower, projector and head (only the LLM's linears quantize)."""
        return [*self.vision, *self.projector, "lm_head"]

    def language_model_of(self, model: Any) -> nn.Module:
        return submodule(model, self.language_model)

    def vision_modules(self, model: Any) -> list[nn.Module]:
        return [submodule(model, p) for p in self.vision]

    def saved_names(self, model: Any, paths: tuple[str, ...]) -> list[str]:
        """PEFT `modules_to_save` names of the modules at `paths` (a module list by its members: PEFT saves modules)."""
        from torch import nn

        names = []
        for path in paths:
            module, last = submodule(model, path), path.rsplit(".", 1)[-1]
            names += [f"{last}.{i}" for i in range(len(module))] if isinstance(module, nn.ModuleList) else [last]
        return names
