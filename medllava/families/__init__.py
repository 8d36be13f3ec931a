"""What differs between the model families medllava trains, described once per family.

A family description (`Family`) says which modules are the vision tower, the projector and the LLM, which input
carries each token's modality, how a packed row gets its positions, whether packing can be exact, and how to build
a tiny random-init model of the family for rehearsals and tests. Everything else (rendering, image expansion,
collation, LoRA targets, the QLoRA skip list, the projector learning rate) reads these descriptions; nothing else
in medllava asks which family a model is. Adding a family is one module here and its entry in `FAMILIES`.

Image tokens come from the processor itself (transformers' unified multimodal processor API): `processor.image_token`
is the placeholder the chat template writes for one image, `processor.replace_image_token` what it expands to for a
processed image, `processor.create_mm_token_type_ids` which tokens are image tokens.
"""

from __future__ import annotations

from medllava.families.base import Family, UnsupportedModelError, unwrap
from medllava.families.gemma3 import GEMMA3
from medllava.families.internvl import INTERNVL
from medllava.families.llava import LLAVA
from medllava.families.qwen_vl import QWEN2_5_VL, QWEN2_VL, QWEN3_VL
from medllava.families.smolvlm import SMOLVLM

FAMILIES: tuple[Family, ...] = (LLAVA, QWEN2_VL, QWEN2_5_VL, QWEN3_VL, GEMMA3, INTERNVL, SMOLVLM)
"""Every supported family, in the order README's table lists them."""

__all__ = ["FAMILIES", "Family", "UnsupportedModelError", "by_name", "family_of", "family_of_processor"]


def supported() -> str:
    return ", ".join(f"{f.title} ({'/'.join(f.model_types)})" for f in FAMILIES)


def by_name(name: str) -> Family:
    """The family called `name` (as `medllava tiny --family` spells it)."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise UnsupportedModelError(f"unknown model family {name!r}; supported: {', '.join(f.name for f in FAMILIES)}")


def family_of(model_or_config: object) -> Family:
    """The family of a model (in its training wrappers or not) or of its config, from `config.model_type`."""
    from transformers import PretrainedConfig

    config = model_or_config if isinstance(model_or_config, PretrainedConfig) else unwrap(model_or_config).config
    model_type = str(getattr(config, "model_type", ""))
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise UnsupportedModelError(f"model type {model_type!r} is not a model family medllava trains; supported: {supported()}")


def family_of_processor(processor: object) -> Family:
    """The family whose processor class `processor` is."""
    name = type(processor).__name__
    for family in FAMILIES:
        if name in family.processor_classes:
            return family
    raise UnsupportedModelError(f"processor {name} belongs to no model family medllava trains; supported: {supported()}")
