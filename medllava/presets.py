"""Tiny random-init vision towers and LLMs, saved as ordinary local model folders, for tests and the CPU demo.

Nothing is downloaded: the tokenizer is trained in-process on a small corpus, the weights are random. The
folders are what a hub checkpoint would be (config, safetensors, tokenizer with its chat template, image
processor config), so `build_model` goes through the same `from_pretrained` paths as with real models.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import torch
from tokenizers import pre_tokenizers, trainers
from transformers import (
    AddedToken,
    AutoTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaTokenizer,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2Tokenizer,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

VisionKind = Literal["clip", "siglip"]
LLMKind = Literal["llama", "mistral", "qwen2"]

# Mistral-Instruct-v0.2 style (the LLaVA-Med v1.5 family): [INST] ... [/INST] answer</s>
LLAMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# Qwen2.5-Instruct style ChatML with a default system prompt.
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

BASE_CORPUS = [
    "[INST] Describe the image. [/INST] The chest X-ray shows clear lungs.",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is shown?<|im_end|>\n",
    "<|im_start|>assistant\nAn axial CT slice of the abdomen.<|im_end|>\n",
    "Is there a lesion? Yes, there is a lesion in the left lung. No, there is no lesion.",
    "Which side is affected? Answer with the letter. A) left B) right C) both",
    "The MRI of the brain shows a bright round lesion on the right side.",
    "How many lesions are visible? One, two, three lesions. 1 2 3 4 5 6 7 8 9 0",
    "The patient image is normal. Findings: no abnormality, no mass, no nodule, no effusion.",
    "Question: what modality is this? Answer: X-ray, CT, MRI, ultrasound, histology, pathology.",
]


def tiny_corpus(extra: Iterable[str] = ()) -> list[str]:
    """The built-in corpus (chat-template words, radiology phrases) plus any extra lines."""
    return [*BASE_CORPUS, *extra]


def train_tokenizer(kind: LLMKind, corpus: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerBase:
    """Train a BPE tokenizer of the LLM family's own class (sentencepiece-style Llama, byte-level Qwen2)."""
    texts = list(corpus)
    if kind in ("llama", "mistral"):
        tok = LlamaTokenizer()
        special = ["<unk>", "<s>", "</s>"]
        alphabet: list[str] = []
    elif kind == "qwen2":
        tok = Qwen2Tokenizer(eos_token="<|im_end|>", pad_token="<|endoftext|>")
        special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        raise ValueError(f"unknown tiny LLM kind {kind!r}")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=alphabet, show_progress=False
    )
    tok._tokenizer.train_from_iterator(texts, trainer=trainer)
    tok.chat_template = QWEN2_CHAT_TEMPLATE if kind == "qwen2" else LLAMA_CHAT_TEMPLATE
    # The in-memory object keeps the special-token ids it had before training; a save/load round-trip
    # gives the consistent tokenizer that every later `from_pretrained` sees.
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        return AutoTokenizer.from_pretrained(tmp)


def make_tiny_vision(
    kind: VisionKind,
    out_dir: str | Path,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 32,
    num_layers: int = 2,
    position_std: float = 0.5,
    seed: int = 0,
) -> Path:
    """Save a random-init CLIP-like (with CLS) or SigLIP-like (no CLS) vision tower folder."""
    torch.manual_seed(seed)
    common = {
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_hidden_layers": num_layers,
        "num_attention_heads": max(1, hidden_size // 16),
        "image_size": image_size,
        "patch_size": patch_size,
    }
    out = Path(out_dir)
    if kind == "clip":
        model = CLIPVisionModel(CLIPVisionConfig(projection_dim=hidden_size, **common))
        mean, std = list(OPENAI_CLIP_MEAN), list(OPENAI_CLIP_STD)
    elif kind == "siglip":
        model = SiglipVisionModel(SiglipVisionConfig(**common))
        mean, std = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
    else:
        raise ValueError(f"unknown tiny vision kind {kind!r}")
    # Random init gives position embeddings ~10x weaker than patch content; a pretrained tower's are strong.
    # Scaling them up keeps "where" in every patch feature, as a real tower does.
    with torch.no_grad():
        model.embeddings.position_embedding.weight.normal_(0.0, position_std)
    model.save_pretrained(out)
    from medllava.processor import image_processor_for_tower

    proc = image_processor_for_tower(str(out), image_size, aspect="resize", model_type=kind)
    proc.image_mean, proc.image_std = mean, std
    proc.save_pretrained(out)
    return out


def make_tiny_llm(
    kind: LLMKind,
    out_dir: str | Path,
    *,
    corpus: Iterable[str] | None = None,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
) -> Path:
    """Save a random-init Llama-, Mistral- or Qwen2-like causal LM with an in-process trained tokenizer (Mistral:
    the Llama tokenizer and Mistral-Instruct's [INST] template, as Mistral-7B-Instruct-v0.2 ships)."""
    torch.manual_seed(seed)
    tok = train_tokenizer(kind, corpus if corpus is not None else tiny_corpus(), vocab_size=vocab_size)
    common = {
        "vocab_size": len(tok),
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": max(1, num_heads // 2),
        "max_position_embeddings": 2048,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **common))
    elif kind == "mistral":
        model = MistralForCausalLM(MistralConfig(tie_word_embeddings=False, sliding_window=None, **common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=True, **common))
    out = Path(out_dir)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_tiny_pair(
    out_dir: str | Path,
    vision: VisionKind = "clip",
    llm: LLMKind = "llama",
    *,
    corpus: Iterable[str] | None = None,
    image_size: int = 32,
    patch_size: int = 8,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    llm_hidden: int = 64,
    llm_layers: int = 2,
    vocab_size: int = 512,
    seed: int = 0,
) -> tuple[Path, Path]:
    """Save a tiny tower + LLM pair under out_dir/{vision,llm}; returns the two folders."""
    out = Path(out_dir)
    vision_dir = make_tiny_vision(
        vision, out / "vision", image_size=image_size, patch_size=patch_size,
        hidden_size=vision_hidden, num_layers=vision_layers, seed=seed,
    )
    llm_dir = make_tiny_llm(
        llm, out / "llm", corpus=corpus, vocab_size=vocab_size, hidden_size=llm_hidden,
        num_layers=llm_layers, seed=seed + 1,
    )
    return vision_dir, llm_dir


def train_family_tokenizer(tok: PreTrainedTokenizerBase, special: list[str], chat_template: str, *,
                           byte_level: bool, corpus: Iterable[str] | None = None,
                           vocab_size: int = 512) -> PreTrainedTokenizerBase:
    """Train a VLM family's own tokenizer class in-process on the tiny corpus, with the family's special tokens
    (first, so their ids are small) and its published chat template; returned after a save/load round trip."""
    alphabet = pre_tokenizers.ByteLevel.alphabet() if byte_level else []
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, initial_alphabet=alphabet,
                                  show_progress=False)
    tok._tokenizer.train_from_iterator(list(corpus if corpus is not None else tiny_corpus()), trainer=trainer)
    # registered as special (atomic) tokens, as the published tokenizers have them; their ids do not change
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in special], special_tokens=True)
    tok.chat_template = chat_template
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        return AutoTokenizer.from_pretrained(tmp)
