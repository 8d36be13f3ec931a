"""Llava: any vision tower + any LLM joined by LLaVA-1.5's projector (stage 1 builds it), and llava-hf checkpoints
(LLaVA-1.5, HF-converted LLaVA-Med v1.5 and HuatuoGPT-Vision).

Records keep the `<image>` placeholder in their text and the LLM's own chat template (wrapped by
medllava.processor) renders it; each image becomes a fixed number of `<image>` tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from medllava.families.base import Family


def tiny_llava(out_dir: str | Path, seed: int = 0, corpus: Iterable[str] | None = None) -> Path:
    """A tiny random-init Llava (CLIP-like tower + Qwen2-like LLM) with its processor."""
    import tempfile

    from medllava.model import build_model, save_model
    from medllava.presets import make_tiny_pair

    with tempfile.TemporaryDirectory() as tmp:
        vision, llm = make_tiny_pair(tmp, "clip", "qwen2", seed=seed, corpus=corpus)
        model, processor = build_model(str(vision), str(llm), image_aspect="resize")
        save_model(model, processor, out_dir)
    return Path(out_dir)


LLAVA = Family(
    name="llava", title="Llava (any tower + LLM; llava-hf, LLaVA-Med v1.5)", model_types=("llava",),
    processor_classes=("LlavaProcessor",), vision=("model.vision_tower",), projector=("model.multi_modal_projector",),
    language_model="model.language_model", assembled=True, structured_content=False, build_tiny=tiny_llava,
)
