"""Model assembly: stock Llava classes, tower defaults, `<image>` token, loading without medllava, trainable spec."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from medllava.config import LoraSection, TrainableSection
from medllava.model import apply_trainable, build_model, component_of, load_model, parameter_counts
from medllava.processor import IMAGE_TOKEN, num_image_tokens, parts_to_text

from .conftest import PAIRS


@pytest.fixture(scope="module", params=PAIRS, ids=lambda p: f"{p[0]}+{p[1]}")
def built(request: pytest.FixtureRequest, tiny_pair_dirs: dict) -> tuple:
    vision_dir, llm_dir = tiny_pair_dirs[request.param]
    model, processor = build_model(str(vision_dir), str(llm_dir))
    return request.param, model, processor


def test_build_gives_stock_classes_and_tower_defaults(built: tuple) -> None:
    (vision, _llm), model, processor = built
    assert type(model) is LlavaForConditionalGeneration
    assert type(processor) is LlavaProcessor
    n_params = sum(p.numel() for p in model.parameters())
    assert 50_000 < n_params < 1_000_000
    if vision == "clip":  # has a CLS token: LLaVA-1.5 defaults
        assert model.config.vision_feature_select_strategy == "default"
        assert model.config.vision_feature_layer == -2
    else:  # SigLIP: no CLS token
        assert model.config.vision_feature_select_strategy == "full"
        assert model.config.vision_feature_layer == -1
    assert model.config.text_config.architectures
    proj = model.model.multi_modal_projector
    assert isinstance(proj.act, torch.nn.GELU) or "gelu" in type(proj.act).__name__.lower()


def test_image_token_count_equals_projector_output(built: tuple) -> None:
    _, model, processor = built
    image = Image.new("RGB", (50, 30), (120, 40, 200))
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a lesion?"}]}],
        add_generation_prompt=True,
    )
    inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    n_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    feats = model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True).pooler_output
    assert n_tokens == feats[0].shape[0] == num_image_tokens(processor) == model.config.image_seq_length
    out = model(**inputs)
    assert torch.isfinite(out.logits).all()


def test_image_token_is_a_real_token_with_mean_embedding(built: tuple) -> None:
    _, model, processor = built
    tok = processor.tokenizer
    ids = tok.encode(IMAGE_TOKEN, add_special_tokens=False)
    assert ids == [model.config.image_token_id]
    emb = model.get_input_embeddings().weight
    others = emb[: model.config.image_token_id].float().mean(0)
    assert torch.allclose(emb[model.config.image_token_id].float(), others, atol=1e-6)
    assert tok.pad_token_id is not None


def test_chat_template_renders_image_parts_like_parts_to_text(built: tuple) -> None:
    _, _, processor = built
    parts = [{"type": "image"}, {"type": "text", "text": "What is shown?"}]
    structured = processor.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True)
    flat = processor.apply_chat_template([{"role": "user", "content": parts_to_text(parts)}], add_generation_prompt=True)
    assert structured == flat
    assert f"{IMAGE_TOKEN}\nWhat is shown?" in structured


STOCK_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor
    path = sys.argv[1]
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    assert type(model).__name__ == "LlavaForConditionalGeneration", type(model)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a lesion?"}]}],
        add_generation_prompt=True)
    inputs = processor(images=[Image.new("RGB", (40, 40), (90, 90, 90))], text=[prompt], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    assert not any(m == "medllava" or m.startswith("medllava.") for m in sys.modules), "medllava was imported"
    print("STOCK_OK", processor.decode(out[0, inputs["input_ids"].shape[1]:]))
    """
)


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"{p[0]}+{p[1]}")
def test_saved_model_loads_and_generates_with_stock_transformers(pair: tuple, base_models: dict, tmp_path: Path) -> None:
    script = tmp_path / "stock.py"
    script.write_text(STOCK_SCRIPT, encoding="utf-8")
    result = subprocess.run([sys.executable, str(script), str(base_models[pair])], capture_output=True, text=True,
                            cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "STOCK_OK" in result.stdout
    assert (base_models[pair] / "model.safetensors").is_file()


def test_load_model_roundtrip(base_models: dict) -> None:
    model, processor = load_model(base_models[("clip", "llama")])
    assert type(model) is LlavaForConditionalGeneration
    assert processor.chat_template


def test_load_model_missing_folder_is_clear(tmp_path: Path) -> None:
    from medllava.model import ModelLoadError

    with pytest.raises(ModelLoadError, match="no such model folder"):
        load_model(tmp_path / "missing" / "model")


@pytest.mark.parametrize(("path", "missing"), [
    ("llava-hf/llava-1.5-7b-hf", False), ("microsoft/llava-med-v1.5-mistral-7b", False), ("gpt2", False),
    ("no/such/model", True), ("./model", True), ("../runs/x", True), ("/abs/model", True), ("~/model", True),
])
def test_a_hub_id_is_not_taken_for_a_missing_folder(path: str, missing: bool) -> None:
    from medllava.config import missing_model_folder

    assert missing_model_folder(path) is missing


def test_loading_a_hub_id_offline_names_the_id(tmp_path: Path) -> None:
    """A Hub id goes to from_pretrained (it used to be refused as a missing folder); offline, its failure is one
    clear ModelLoadError."""
    from medllava.model import ModelLoadError, load_for_inference

    with pytest.raises(ModelLoadError, match="cannot load model 'medllava-test/no-such-model'"):
        load_for_inference("medllava-test/no-such-model", device="cpu")


def test_component_names() -> None:
    assert component_of("model.vision_tower.encoder.layers.0.mlp.fc1.weight") == "vision"
    assert component_of("base_model.model.model.vision_tower.x") == "vision"
    assert component_of("model.multi_modal_projector.linear_1.weight") == "projector"
    assert component_of("model.language_model.layers.0.self_attn.q_proj.weight") == "llm"
    assert component_of("lm_head.weight") == "llm"


def test_apply_trainable_full_and_frozen(base_models: dict) -> None:
    model, _ = load_model(base_models[("clip", "llama")])
    model = apply_trainable(model, TrainableSection(vision="frozen", projector="full", llm="frozen"), LoraSection())
    for name, p in model.named_parameters():
        assert p.requires_grad == (component_of(name) == "projector"), name


def test_unused_vision_layers_stay_frozen_when_vision_trains(base_models: dict) -> None:
    # CLIP-like with feature layer -2: the last encoder layer and post-layernorm get no gradient.
    model, _ = load_model(base_models[("clip", "llama")])
    model = apply_trainable(model, TrainableSection(vision="full", projector="full", llm="frozen"), LoraSection())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and component_of(n) == "vision"}
    assert any("encoder.layers.0." in n for n in trainable)
    assert not any("encoder.layers.1." in n for n in trainable)
    assert not any("post_layernorm" in n for n in trainable)


def test_apply_trainable_lora_targets_only_the_llm(base_models: dict) -> None:
    model, _ = load_model(base_models[("siglip", "qwen2")])
    model = apply_trainable(model, TrainableSection(vision="frozen", projector="full", llm="lora"),
                            LoraSection(r=4, alpha=8, dropout=0.0))
    lora_names = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert lora_names and all("language_model" in n for n in lora_names)
    counts = parameter_counts(model)
    assert counts["lora"]["trainable"] > 0
    assert counts["projector"]["trainable"] == counts["projector"]["total"] // 2  # modules_to_save keeps a frozen copy
    assert counts["llm"]["trainable"] == 0
    assert counts["vision"]["trainable"] == 0
