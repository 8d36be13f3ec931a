"""What one image becomes in the token sequence, for any model family, read from the processor itself.

A rendered sample keeps one placeholder id per image (`processor.image_token`: `<image>` for Llava,
`<|image_pad|>` for Qwen-VL, `<start_of_image>` for Gemma 3). Loading the sample processes its images with the
processor's image processor and splices in, for each image, the ids of `processor.replace_image_token` (transformers'
own expansion: Qwen-VL's count follows the image's size, Gemma 3 wraps its soft tokens in begin/end markers).
Before training the renderer counts each image's tokens from its size alone (`count`), so the length limit is
checked on the real sequence and no image is ever cut.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import torch
from PIL import Image

from medllava.families import Family, family_of_processor

IGNORE_INDEX = -100
"""The label of a position that is not supervised (transformers' and PyTorch's ignore index)."""
FIXED_SIZE = (32, 32)  # families whose image token count does not depend on the size are counted on this blank


class ImageExpander:
    """The processor's image side: pixel inputs of a sample's images and the token ids each image expands to."""

    def __init__(self, processor: Any, family: Family | None = None) -> None:
        self.processor = processor
        self.family = family or family_of_processor(processor)
        self.tokenizer = processor.tokenizer
        self.placeholder = str(processor.image_token)
        ids = self.tokenizer.encode(self.placeholder, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"the image placeholder {self.placeholder!r} is {len(ids)} tokens, not one")
        self.placeholder_id = int(ids[0])
        self.input_names = set(processor.model_input_names)
        # The image settings a processor call applies on top of its image processor's own (InternVL: crop to
        # patches), so the pixels and token counts here are those the processor makes at inference.
        merged = processor._merge_kwargs(tokenizer_init_kwargs=self.tokenizer.init_kwargs, return_tensors="pt")
        self.images_kwargs = {k: v for k, v in merged["images_kwargs"].items() if v is not None}
        self._ids: dict[str, list[int]] = {}  # replacement text -> ids (few distinct ones: one per image size)
        self._counts: dict[tuple[int, int], int] = {}

    def fingerprint(self) -> str:
        """What decides the image tokens (family, image processor settings): part of the data cache key."""
        settings = {k: v for k, v in self.processor.image_processor.to_dict().items() if not k.startswith("_")}
        text = json.dumps({"family": self.family.name, "image_processor": settings}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def process(self, images: list[Image.Image]) -> tuple[dict[str, torch.Tensor], list[list[int]]]:
        """The model inputs of `images` (pixel_values and, per family, image_grid_thw ...; first axis per image,
        patch or tile, so a batch's images concatenate along it) and the ids each image expands to."""
        out = self.processor.image_processor(images=images, **self.images_kwargs)
        tiled = self.family.tiled_inputs  # one block for the sample, [1, tiles, ...]: its tiles along the first axis
        inputs = {k: v[0] if k in tiled else v for k, v in out.items() if k in self.input_names and torch.is_tensor(v)}
        return inputs, self.expansions(out, len(images))

    def expansions(self, processed: dict[str, Any], n_images: int) -> list[list[int]]:
        """The ids each of `n_images` processed images stands for in the sequence."""
        return [self._tokenize(self.processor.replace_image_token(processed, image_idx=i)) for i in range(n_images)]

    def _tokenize(self, text: str) -> list[int]:
        if text not in self._ids:
            self._ids[text] = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return self._ids[text]

    def count(self, size: tuple[int, int] | None) -> int:
        """Tokens an image of `size` (width, height) expands to; any size for families of fixed count."""
        key = size if self.family.dynamic_resolution and size is not None else FIXED_SIZE
        if key not in self._counts:
            blank = Image.new("RGB", key)
            processed = self.processor.image_processor(images=[blank], **self.images_kwargs)
            self._counts[key] = len(self.expansions(processed, 1)[0])
        return self._counts[key]

    def token_types(self, ids: np.ndarray) -> torch.Tensor | None:
        """Each token's modality (0 text, 1 image) under the family's input name, or None when it needs none."""
        if self.family.token_types_key is None:
            return None
        return torch.as_tensor(np.asarray(self.processor.create_mm_token_type_ids([ids.tolist()])[0]), dtype=torch.long)

    def splice(self, ids: np.ndarray, labels: np.ndarray, expansions: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Replace the i-th placeholder of `ids` with expansions[i] (labels there ignored)."""
        where = np.flatnonzero(ids == self.placeholder_id)
        if len(where) != len(expansions):
            raise ValueError(f"{len(where)} image placeholder(s) for {len(expansions)} image(s)")
        if not len(where):
            return ids, labels
        id_parts, label_parts, last = [], [], 0
        for pos, expansion in zip(where, expansions):
            id_parts += [ids[last:pos], np.asarray(expansion, dtype=ids.dtype)]
            label_parts += [labels[last:pos], np.full(len(expansion), IGNORE_INDEX, dtype=labels.dtype)]
            last = pos + 1
        id_parts.append(ids[last:])
        label_parts.append(labels[last:])
        return np.concatenate(id_parts), np.concatenate(label_parts)
