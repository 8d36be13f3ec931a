"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: a ViT with a patch merger as projector, dynamic resolution, 3-D M-RoPE.

Each image becomes `<|vision_start|><|image_pad|>...<|vision_end|>`, one `<|image_pad|>` per merged patch, so the
count follows the image's size within the processor's `min_pixels` / `max_pixels`. Positions are 3-D (temporal,
height, width); a packed row gets them sample by sample from the model's own `get_rope_index` (so each sample's
positions are those it has alone), with the text positions restarting at every sample boundary in front of them,
the 4-row layout transformers' Qwen-VL models read for packed rows.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medllava.families.base import Family, save_tiny, unwrap

if TYPE_CHECKING:
    import torch

# Qwen2-VL-7B-Instruct's and Qwen2.5-VL's published chat template.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3-VL-Instruct's published template, without its tool-calling branches (no system prompt by default).
QWEN3_VL_CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) -%}{%- set video_count = namespace(value=0) -%}"
    "{%- for message in messages -%}<|im_start|>{{ message['role'] }}\n"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for content in message['content'] -%}"
    "{%- if content['type'] == 'image' or 'image' in content or 'image_url' in content -%}"
    "{%- set image_count.value = image_count.value + 1 -%}{%- if add_vision_id -%}Picture {{ image_count.value }}: "
    "{%- endif -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif content['type'] == 'video' or 'video' in content -%}{%- set video_count.value = video_count.value + 1 -%}"
    "{%- if add_vision_id -%}Video {{ video_count.value }}: {%- endif -%}<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif 'text' in content -%}{{ content['text'] }}{%- endif -%}{%- endfor -%}{%- endif -%}<|im_end|>\n"
    "{%- endfor -%}{%- if add_generation_prompt -%}<|im_start|>assistant\n{%- endif -%}"
)

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>"]


def mrope_positions(model: Any, inputs: dict[str, Any]) -> torch.Tensor:
    """[4, 1, L] positions of a packed row: text positions restarting per sample, then the 3-D M-RoPE positions
    that `get_rope_index` gives each sample alone, concatenated."""
    import torch

    core = unwrap(model).model
    ids, types = inputs["input_ids"], inputs["mm_token_type_ids"]
    bounds = [int(b) for b in inputs["cu_seq_lens_q"].tolist()]
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    longest = max(lengths)
    rows = len(lengths)
    padded = ids.new_zeros(rows, longest)
    padded_types = types.new_zeros(rows, longest)
    mask = ids.new_zeros(rows, longest)
    for r, (start, n) in enumerate(zip(bounds, lengths)):
        padded[r, :n] = ids[0, start:start + n]
        padded_types[r, :n] = types[0, start:start + n]
        mask[r, :n] = 1
    positions, _ = core.get_rope_index(input_ids=padded, mm_token_type_ids=padded_types,
                                       image_grid_thw=inputs.get("image_grid_thw"), attention_mask=mask)
    spatial = torch.cat([positions[:, r, :n] for r, n in enumerate(lengths)], dim=1)[:, None, :]
    text = inputs["position_ids"].to(spatial.device)[None]
    return torch.cat([text, spatial.to(text.dtype)], dim=0)


def pixel_limits(processor: Any, min_pixels: int | None, max_pixels: int | None) -> None:
    """Qwen-VL's dynamic-resolution range: each image is resized to a multiple of patch x merge size with its pixel
    count within [min_pixels, max_pixels] (Med-R1 trains at max_pixels 401408)."""
    image_processor = processor.image_processor
    size = dict(image_processor.size)
    if min_pixels is not None:
        size["shortest_edge"] = int(min_pixels)
    if max_pixels is not None:
        size["longest_edge"] = int(max_pixels)
    if size["shortest_edge"] > size["longest_edge"]:
        raise ValueError(f"min_pixels {size['shortest_edge']} > max_pixels {size['longest_edge']}")
    image_processor.size = size


def _tiny_qwen(kind: str, out_dir: str | Path, seed: int = 0, corpus: Iterable[str] | None = None, *,
               hidden: int = 32, layers: int = 2, vision_hidden: int = 32, max_pixels: int = 48 * 48) -> Path:
    """A tiny random-init Qwen-VL model of `kind` (qwen2_vl, qwen2_5_vl, qwen3_vl) with its processor (the
    benchmark's preset passes larger sizes)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, Qwen2Tokenizer, Qwen2VLImageProcessor

    from medllava.presets import train_family_tokenizer

    torch.manual_seed(seed)
    template = QWEN3_VL_CHAT_TEMPLATE if kind == "qwen3_vl" else QWEN2_VL_CHAT_TEMPLATE
    tok = train_family_tokenizer(Qwen2Tokenizer(eos_token="<|im_end|>", pad_token="<|endoftext|>"), SPECIAL,
                                 template, byte_level=True, corpus=corpus)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}
    patch, merge, temporal = 4, 2, 2
    pixels = {"min_pixels": 16 * 16, "max_pixels": max_pixels, "patch_size": patch, "merge_size": merge,
              "temporal_patch_size": temporal}
    text = {"vocab_size": len(tok), "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048,
            "bos_token_id": None, "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"]}
    half = hidden // 4 // 2 if kind != "qwen3_vl" else 4  # head_dim / 2 (4 heads; Qwen3-VL: head_dim 8)
    section = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]  # t, h, w like [16, 24, 24]
    vision: dict[str, Any] = {"depth": 2, "patch_size": patch, "spatial_merge_size": merge,
                              "temporal_patch_size": temporal}
    if kind == "qwen2_vl":
        from transformers import Qwen2VLProcessor as Processor
        from transformers import Qwen2VLVideoProcessor as VideoProcessor

        text["rope_parameters"] = {"rope_type": "default", "mrope_section": section, "rope_theta": 10000.0}
        text["tie_word_embeddings"] = True
        vision.update(embed_dim=vision_hidden, hidden_size=hidden, num_heads=2, mlp_ratio=2)
    elif kind == "qwen2_5_vl":
        from transformers import Qwen2_5_VLProcessor as Processor
        from transformers import Qwen2VLVideoProcessor as VideoProcessor

        text["rope_parameters"] = {"rope_type": "default", "mrope_section": section, "rope_theta": 10000.0}
        text["tie_word_embeddings"] = True
        vision.update(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_heads=2,
                      out_hidden_size=hidden, window_size=16, fullatt_block_indexes=[1])
    else:
        from transformers import Qwen3VLProcessor as Processor
        from transformers import Qwen3VLVideoProcessor as VideoProcessor

        text.update(head_dim=8, tie_word_embeddings=True,
                    rope_parameters={"rope_type": "default", "mrope_section": section, "mrope_interleaved": True,
                                     "rope_theta": 10000.0})
        vision.update(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_heads=2,
                      out_hidden_size=hidden, num_position_embeddings=16, deepstack_visual_indexes=[0])
    config = AutoConfig.for_model(
        kind, text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True)
    model = AutoModelForImageTextToText.from_config(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    processor = Processor(image_processor=Qwen2VLImageProcessor(**pixels), tokenizer=tok,
                          video_processor=VideoProcessor(**pixels), chat_template=template)
    return save_tiny(model, processor, out_dir)


def tiny_qwen2_vl(out_dir: str | Path, seed: int = 0, corpus: Iterable[str] | None = None) -> Path:
    return _tiny_qwen("qwen2_vl", out_dir, seed, corpus)


def tiny_qwen2_5_vl(out_dir: str | Path, seed: int = 0, corpus: Iterable[str] | None = None) -> Path:
    return _tiny_qwen("qwen2_5_vl", out_dir, seed, corpus)


def tiny_qwen3_vl(out_dir: str | Path, seed: int = 0, corpus: Iterable[str] | None = None) -> Path:
    return _tiny_qwen("qwen3_vl", out_dir, seed, corpus)


_COMMON = dict(language_model="model.language_model", token_types_key="mm_token_type_ids", dynamic_resolution=True,
               packed_positions=mrope_positions, set_pixel_limits=pixel_limits)

QWEN2_VL = Family(name="qwen2_vl", title="Qwen2-VL", model_types=("qwen2_vl",), processor_classes=("Qwen2VLProcessor",),
                  vision=("model.visual",), projector=("model.visual.merger",), build_tiny=tiny_qwen2_vl, **_COMMON)
QWEN2_5_VL = Family(name="qwen2_5_vl", title="Qwen2.5-VL", model_types=("qwen2_5_vl",),
                    processor_classes=("Qwen2_5_VLProcessor",), vision=("model.visual",),
                    projector=("model.visual.merger",), build_tiny=tiny_qwen2_5_vl, **_COMMON)
QWEN3_VL = Family(name="qwen3_vl", title="Qwen3-VL", model_types=("qwen3_vl",), processor_classes=("Qwen3VLProcessor",),
                  vision=("model.visual",), projector=("model.visual.merger", "model.visual.deepstack_merger_list"),
                  build_tiny=tiny_qwen3_vl, **_COMMON)
