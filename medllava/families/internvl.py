"""InternVL (transformers' native `InternVLForConditionalGeneration`, e.g. OpenGVLab/InternVL3-*-hf; Lingshu-I):
an InternViT tower, a pixel-shuffle MLP projector, a Qwen2-style LLM.

An image is `<IMG_CONTEXT>` in the chat template and expands to `<img>`, `image_seq_length` context tokens per tile,
`</img>`: the processor crops each image into tiles by its aspect ratio (`crop_to_patches`), so the count follows
the image's shape. Tiles of all images stack along the first axis of `pixel_values`. Positions are 1-D.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from medllava.families.base import Family, save_tiny

# The chat template of transformers' InternVL conversion (the -hf checkpoints).
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\\n' }}{% elif content['type'] == 'video' %}{{ '<video>\\n' }}{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\\n' }}{% endif %}"
)

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]


def tiny_internvl(out_dir: str | Path, seed: int = 0, corpus: Iterable[str] | None = None) -> Path:
    """A tiny random-init InternVL (32-pixel tiles, 4 tokens a tile, up to 4 tiles + a thumbnail) with its
    processor."""
    import torch
    from transformers import (
        AutoModelForImageTextToText,
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLProcessor,
        InternVLVideoProcessor,
        Qwen2Tokenizer,
    )

    from medllava.presets import train_family_tokenizer

    torch.manual_seed(seed)
    tok = Qwen2Tokenizer(eos_token="<|im_end|>", pad_token="<|endoftext|>",
                         extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                                               "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})
    tok = train_family_tokenizer(tok, SPECIAL, INTERNVL_CHAT_TEMPLATE, byte_level=True, corpus=corpus)
    tile, patch, tokens = 32, 8, 4  # (32 / 8)^2 patches, pixel shuffle 0.5 -> 4 tokens a tile
    config = InternVLConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": [tile, tile], "patch_size": [patch, patch]},
        text_config={"model_type": "qwen2", "vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "max_position_embeddings": 2048, "eos_token_id": tok.eos_token_id,
                     "pad_token_id": tok.pad_token_id, "tie_word_embeddings": True},
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=tokens, downsample_ratio=0.5,
        vision_feature_layer=-1, vision_feature_select_strategy="default")
    model = AutoModelForImageTextToText.from_config(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    sizes = {"size": {"height": tile, "width": tile}, "crop_to_patches": True, "min_patches": 1, "max_patches": 4}
    processor = InternVLProcessor(image_processor=GotOcr2ImageProcessor(**sizes), tokenizer=tok,
                                  video_processor=InternVLVideoProcessor(size={"height": tile, "width": tile}),
                                  image_seq_length=tokens, chat_template=INTERNVL_CHAT_TEMPLATE)
    return save_tiny(model, processor, out_dir)


INTERNVL = Family(
    name="internvl", title="InternVL", model_types=("internvl",), processor_classes=("InternVLProcessor",),
    vision=("model.vision_tower",), projector=("model.multi_modal_projector",), language_model="model.language_model",
    dynamic_resolution=True, build_tiny=tiny_internvl,
)
