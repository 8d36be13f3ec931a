"""Gemma 3 (MedGemma): a SigLIP tower, an average-pooling projector, and bidirectional attention inside an image.

An image is `<start_of_image>` in the chat template and expands to a fixed number of `<image_soft_token>`s between
`<start_of_image>` and `<end_of_image>`. `token_type_ids` mark image tokens: Gemma 3 lets the tokens of one image
attend to each other in both directions. The per-sample causal kernels that isolate packed samples (flash
attention's variable-length kernel, medllava's per-sample SDPA) are causal only, so Gemma 3 trains on padded
batches, which run the model's own mask.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from medllava.families.base import Family, save_tiny

# gemma-3-4b-it's (and MedGemma's) published chat template.
GEMMA3_CHAT_TEMPLATE = (
    '{{ bos_token }}\n'
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    '    {%- else -%}\n'
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    '    {%- endif -%}\n'
    '    {%- set loop_messages = messages[1:] -%}\n'
    '{%- else -%}\n'
    '    {%- set first_user_prefix = "" -%}\n'
    '    {%- set loop_messages = messages -%}\n'
    '{%- endif -%}\n'
    '{%- for message in loop_messages -%}\n'
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    '        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}\n'
    '    {%- endif -%}\n'
    "    {%- if (message['role'] == 'assistant') -%}\n"
    '        {%- set role = "model" -%}\n'
    '    {%- else -%}\n'
    "        {%- set role = message['role'] -%}\n"
    '    {%- endif -%}\n'
    '    {{ \'<start_of_turn>\' + role + \'\\n\' + (first_user_prefix if loop.first else "") }}\n'
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    '            {%- endif -%}\n'
    '        {%- endfor -%}\n'
    '    {%- else -%}\n'
    '        {{ raise_exception("Invalid content type") }}\n'
    '    {%- endif -%}\n'
    "    {{ '<end_of_turn>\\n' }}\n"
    '{%- endfor -%}\n'
    '{%- if add_generation_prompt -%}\n'
    "    {{'<start_of_turn>model\\n'}}\n"
    '{%- endif -%}'
)

# In the order GemmaTokenizer registers its own special tokens (their ids must stay those), then the turn markers.
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_image>", "<end_of_image>", "<image_soft_token>",
           "<start_of_turn>", "<end_of_turn>"]


def tiny_gemma3(out_dir: str | Path, seed: int = 0, corpus: Iterable[str] | None = None) -> Path:
    """A tiny random-init Gemma 3 vision-language model with its processor (4 tokens an image)."""
    import torch
    from tokenizers import pre_tokenizers
    from transformers import (
        AutoModelForImageTextToText,
        Gemma3Config,
        Gemma3ImageProcessor,
        Gemma3Processor,
        GemmaTokenizer,
    )

    from medllava.presets import train_family_tokenizer

    torch.manual_seed(seed)
    tok = GemmaTokenizer(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
                         extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                               "image_token": "<image_soft_token>"})
    # Gemma's vocabulary keeps newlines apart from words, as its published tokenizer does ("\n", "\n\n" tokens)
    tok._tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("\n", "isolated"), tok._tokenizer.pre_tokenizer])
    tok = train_family_tokenizer(tok, SPECIAL, GEMMA3_CHAT_TEMPLATE, byte_level=False, corpus=corpus)
    image_size, patch, tokens = 32, 8, 4
    config = Gemma3Config(
        text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "sliding_window": 64,
                     "max_position_embeddings": 2048, "pad_token_id": tok.pad_token_id,
                     "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": image_size, "patch_size": patch},
        mm_tokens_per_image=tokens, boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"), image_token_index=tok.image_token_id)
    model = AutoModelForImageTextToText.from_config(config)
    model.generation_config.eos_token_id = [tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")]
    model.generation_config.pad_token_id = tok.pad_token_id
    processor = Gemma3Processor(image_processor=Gemma3ImageProcessor(size={"height": image_size, "width": image_size}),
                                tokenizer=tok, chat_template=GEMMA3_CHAT_TEMPLATE, image_seq_length=tokens)
    return save_tiny(model, processor, out_dir)


GEMMA3 = Family(
    name="gemma3", title="Gemma 3 / MedGemma", model_types=("gemma3",), processor_classes=("Gemma3Processor",),
    vision=("model.vision_tower",), projector=("model.multi_modal_projector",), language_model="model.language_model",
    token_types_key="token_type_ids",
    packing_refusal="Gemma 3 attends bidirectionally inside each image, which the per-sample causal kernels that "
                    "isolate packed samples cannot express",
    build_tiny=tiny_gemma3,
)
