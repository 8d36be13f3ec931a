"""SmolVLM and Idefics3 (HuggingFaceTB/SmolVLM-*, SmolVLM2-*, HuggingFaceM4/Idefics3-8B-Llama3): a SigLIP tower,
a pixel-shuffle connector, a Llama-style LLM.

An image is `<image>` in the chat template and expands to its tiles: the processor resizes it so its longest edge
is at most `size.longest_edge`, splits it into `max_image_size` tiles (rows x columns by its shape) plus a global
view, and writes `<fake_token_around_image><row_r_col_c>` + `image_seq_len` image tokens for each tile. The count
follows the image's shape. The processor returns each sample's tiles as one padded block ([samples, tiles, 3, H, W]
and a pixel mask): medllava keeps a sample's tiles along the first axis and gives the model a batch's tiles as one
block (`Family.tiled_inputs`); the model drops padding tiles and fills the image tokens in order, so a batch's
tiles need not line up with its rows. Positions are 1-D; the tower sees one tile at a time, so packing is exact.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from medllava.families.base import Family, save_tiny

GRID = 4  # row/column tokens a tiny model's tokenizer holds (<row_1_col_1> ... <row_4_col_4>)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<end_of_utterance>", "<fake_token_around_image>",
           "<image>", "<global-img>", *(f"<row_{r}_col_{c}>" for r in range(1, GRID + 1) for c in range(1, GRID + 1))]


def tiny_smolvlm(out_dir: str | Path, seed: int = 0, corpus: Iterable[str] | None = None) -> Path:
    """A tiny random-init SmolVLM (32-pixel tiles, 4 tokens a tile, images up to 64 pixels: up to 2 x 2 tiles + the
    global view) with its processor and SmolVLM's published chat template."""
    import torch
    from transformers import (
        AutoModelForImageTextToText,
        GPT2Tokenizer,
        SmolVLMConfig,
        SmolVLMImageProcessor,
        SmolVLMProcessor,
        SmolVLMVideoProcessor,
    )
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

    from medllava.presets import train_family_tokenizer

    torch.manual_seed(seed)
    tok = GPT2Tokenizer(bos_token="<|im_start|>", eos_token="<end_of_utterance>", pad_token="<|im_end|>",
                        unk_token="<|endoftext|>",
                        extra_special_tokens={"fake_image_token": "<fake_token_around_image>", "image_token": "<image>",
                                              "global_image_token": "<global-img>",
                                              "end_of_utterance_token": "<end_of_utterance>"})
    tok = train_family_tokenizer(tok, SPECIAL, DEFAULT_CHAT_TEMPLATE, byte_level=True, corpus=corpus)
    tile, patch, scale = 32, 8, 2
    tokens = (tile // patch) ** 2 // scale ** 2  # pixel shuffle by 2: 16 patches -> 4 tokens a tile
    config = SmolVLMConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": tile, "patch_size": patch},
        text_config={"model_type": "llama", "vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "max_position_embeddings": 2048, "bos_token_id": tok.bos_token_id,
                     "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id, "tie_word_embeddings": True},
        scale_factor=scale, image_token_id=tok.convert_tokens_to_ids("<image>"), pad_token_id=tok.pad_token_id)
    model = AutoModelForImageTextToText.from_config(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    image_processor = SmolVLMImageProcessor(size={"longest_edge": 2 * tile}, max_image_size={"longest_edge": tile},
                                            do_image_splitting=True)
    video_processor = SmolVLMVideoProcessor(size={"longest_edge": tile}, max_image_size={"longest_edge": tile})
    processor = SmolVLMProcessor(image_processor=image_processor, tokenizer=tok, video_processor=video_processor,
                                 image_seq_len=tokens, chat_template=DEFAULT_CHAT_TEMPLATE)
    return save_tiny(model, processor, out_dir)


def longest_edge(processor: Any, min_pixels: int | None, max_pixels: int | None) -> None:
    """SmolVLM's resolution setting: an image is resized so its longest edge is `size.longest_edge` (a multiple of
    the tile size), so `max_pixels` sets that edge to the largest tile multiple whose square fits in it; it has no
    lower bound."""
    if min_pixels is not None:
        raise ValueError("SmolVLM / Idefics3 resize every image to size.longest_edge; they have no min_pixels")
    if max_pixels is None:
        return
    image_processor = processor.image_processor
    tile = int(image_processor.max_image_size["longest_edge"])
    edge = math.isqrt(int(max_pixels)) // tile * tile
    if edge < tile:
        raise ValueError(f"max_pixels {max_pixels} is below one {tile} x {tile} tile")
    image_processor.size = {**dict(image_processor.size), "longest_edge": edge}


SMOLVLM = Family(
    name="smolvlm", title="SmolVLM / Idefics3", model_types=("smolvlm", "idefics3"),
    processor_classes=("SmolVLMProcessor", "Idefics3Processor"), vision=("model.vision_model",),
    projector=("model.connector",), language_model="model.text_model", dynamic_resolution=True,
    tiled_inputs=("pixel_values", "pixel_attention_mask"), set_pixel_limits=longest_edge, build_tiny=tiny_smolvlm,
)
