"""Data: reading both record layouts, rendering (plain/chat labels), validation errors by kind, batching."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medllava.data.collate import SFTCollator, SFTDataset
from medllava.data.expand import ImageExpander
from medllava.data.records import Record, RecordError, Turn, iter_raw, normalize
from medllava.data.render import IGNORE_INDEX, Renderer
from medllava.data.validate import DataValidationError, prepare_samples
from medllava.model import end_of_turn_ids, load_model
from medllava.processor import IMAGE_TOKEN, num_image_tokens

from .conftest import PAIRS, write_jsonl


@pytest.fixture(scope="module", params=PAIRS, ids=lambda p: f"{p[0]}+{p[1]}")
def processor(request: pytest.FixtureRequest, base_models: dict):
    _, proc = load_model(base_models[request.param])
    return proc


def _record(turns: list[tuple[str, str]], images: int = 1) -> Record:
    return Record(id="r1", images=["x.png"] * images, turns=[Turn(r, t) for r, t in turns], source="mem.jsonl", line=1)


def _supervised_text(processor, rendered) -> str:
    ids = rendered.input_ids[rendered.labels != IGNORE_INDEX]
    return processor.tokenizer.decode(ids.tolist(), skip_special_tokens=False)


def test_chat_labels_are_exactly_the_assistant_text_and_end_of_turn(processor) -> None:
    turns = [("user", f"{IMAGE_TOKEN}\nIs there a lesion?"), ("assistant", "Yes."),
             ("user", "Which side of the image?"), ("assistant", "B. right")]
    rendered = Renderer(processor, "chat", 512).render(_record(turns))
    tok = processor.tokenizer
    eot = tok.convert_ids_to_tokens(end_of_turn_ids(processor)[-1])
    # Exactly the answers with their end-of-turn token, nothing of the prompts.
    assert _supervised_text(processor, rendered).replace(" ", "") == f"Yes.{eot}B.right{eot}".replace(" ", "")
    # The supervised tokens are the tokenisation of the answers as they appear in the rendered conversation.
    full = processor.tokenizer.apply_chat_template(
        [{"role": r, "content": t} for r, t in turns], chat_template=processor.chat_template, tokenize=False)
    assert tok(full, add_special_tokens=False)["input_ids"] == rendered.input_ids.tolist()
    assert int((rendered.input_ids == tok.convert_tokens_to_ids(IMAGE_TOKEN)).sum()) == 1
    assert rendered.labels[rendered.input_ids == tok.convert_tokens_to_ids(IMAGE_TOKEN)].tolist() == [IGNORE_INDEX]
    assert rendered.length == len(rendered.input_ids) + num_image_tokens(processor) - 1


def test_chat_supervision_boundaries_token_by_token(processor) -> None:
    """Each maximal run of supervised tokens decodes to one answer + end-of-turn, in order."""
    answers = ["No.", "A. X-ray", "An X-ray image with no lesion."]
    turns = [("user", f"{IMAGE_TOKEN}\nq1"), ("assistant", answers[0]), ("user", "q2"), ("assistant", answers[1]),
             ("user", "q3"), ("assistant", answers[2])]
    rendered = Renderer(processor, "chat", 512).render(_record(turns))
    runs, current = [], []
    for tid, lab in zip(rendered.input_ids.tolist(), rendered.labels.tolist()):
        if lab != IGNORE_INDEX:
            assert lab == tid
            current.append(tid)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    tok = processor.tokenizer
    decoded = [tok.decode(r, skip_special_tokens=True).strip() for r in runs]
    assert decoded == answers
    assert all(r[-1] in end_of_turn_ids(processor) for r in runs)


def test_plain_rendering_is_image_then_caption(processor) -> None:
    record = _record([("user", f"{IMAGE_TOKEN}\nDescribe the image."), ("assistant", "CT image with no lesion.")])
    rendered = Renderer(processor, "plain", 512).render(record)
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    ids = rendered.input_ids.tolist()
    prefix = ([tok.bos_token_id] if tok.bos_token_id is not None else []) + [image_id]
    assert ids[: len(prefix)] == prefix
    assert ids[-1] == tok.eos_token_id
    assert "Describe" not in tok.decode(ids)  # the instruction is dropped in the plain form
    supervised = rendered.input_ids[rendered.labels != IGNORE_INDEX].tolist()
    assert supervised == ids[len(prefix):]
    assert tok.decode(supervised, skip_special_tokens=True).strip() == "CT image with no lesion."


def test_system_prompt_is_added_when_the_template_accepts_it(base_models: dict) -> None:
    _, proc = load_model(base_models[("siglip", "qwen2")])
    turns = [("user", f"{IMAGE_TOKEN}\nq"), ("assistant", "Yes.")]
    rendered = Renderer(proc, "chat", 512, system_prompt="You are a radiology assistant.").render(_record(turns))
    assert "radiology assistant" in proc.tokenizer.decode(rendered.input_ids.tolist())
    _, mistral_like = load_model(base_models[("clip", "llama")])
    with pytest.raises(ValueError, match="system turn"):
        Renderer(mistral_like, "chat", 512, system_prompt="x")


def test_both_record_layouts_normalise_alike(tmp_path: Path) -> None:
    llava = {"id": "a", "image": "img.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A CT."}]}
    messages = {"id": "a", "images": ["img.png"], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A CT."}]}
    path = write_jsonl(tmp_path / "d.jsonl", [llava, messages])
    a, b = (normalize(r) for r in iter_raw(path))
    assert a.turns == b.turns and a.images == b.images
    assert (a.line, b.line) == (1, 2)
    json_path = tmp_path / "d.json"
    json_path.write_text(json.dumps([llava]), encoding="utf-8")
    (c,) = (normalize(r) for r in iter_raw(json_path))
    assert c.turns == a.turns


# ----------------------------------------------------------------------------------------------------------------
# Validation (the full hostile-input matrix, one case per error kind, is in test_hostile.py)

GOOD = {"image": "ok.png", "conversations": [{"from": "human", "value": "<image>\nIs there a lesion?"},
                                             {"from": "gpt", "value": "No."}]}


@pytest.fixture()
def image_dir(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (40, 40), (50, 50, 50)).save(root / "ok.png")
    return root


def test_absolute_paths_only_when_allowed(tmp_path: Path, image_dir: Path, processor) -> None:
    rec = {**GOOD, "id": "abs", "image": str(image_dir / "ok.png")}
    path = write_jsonl(tmp_path / "t.jsonl", [rec])
    renderer = Renderer(processor, "chat", 128)
    with pytest.raises(DataValidationError, match="image_outside_root"):
        prepare_samples([str(path)], renderer, image_folder=image_dir, progress=False)
    samples, _ = prepare_samples([str(path)], renderer, image_folder=image_dir, allow_absolute_paths=True, progress=False)
    assert len(samples) == 1


def test_record_error_kind_must_be_known() -> None:
    with pytest.raises(ValueError):
        RecordError("made_up", "x")


# ----------------------------------------------------------------------------------------------------------------
# Batching


def test_splice_expands_each_placeholder_with_its_own_ids(processor) -> None:
    images = ImageExpander(processor)
    p = images.placeholder_id
    ids = np.array([1, p, 5, p, 6])
    labels = np.array([-100, -100, 5, -100, 6])
    out_ids, out_labels = images.splice(ids, labels, [[p, p, p], [7, p, 8]])
    assert out_ids.tolist() == [1, p, p, p, 5, 7, p, 8, 6]
    assert out_labels.tolist() == [-100, -100, -100, -100, 5, -100, -100, -100, 6]
    with pytest.raises(ValueError, match="2 image placeholder"):
        images.splice(ids, labels, [[p]])


def test_dataset_and_collator_shapes(phantom: Path, processor) -> None:
    renderer = Renderer(processor, "chat", 512)
    samples, _ = prepare_samples([str(phantom / "instruct.jsonl")], renderer, image_folder=phantom / "images", progress=False)
    ds = SFTDataset(samples, renderer.images)
    batch = SFTCollator(processor.tokenizer.pad_token_id)([ds[0], ds[1], ds[2]])
    n_img = int((batch["input_ids"] == renderer.image_token_id).sum())
    assert n_img == 3 * num_image_tokens(processor)
    assert batch["pixel_values"].shape[0] == 3
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["sample_ids"] == [samples[0].id, samples[1].id, samples[2].id]
    pad = batch["attention_mask"] == 0
    assert (batch["labels"][pad] == IGNORE_INDEX).all()
    assert torch.equal(batch["attention_mask"].sum(1), torch.tensor([s.length for s in samples[:3]]))


def test_cache_key_covers_the_chat_template_the_renderer_uses(tmp_path: Path, phantom: Path, base_models: dict) -> None:
    """Issue 25: `model.chat_template` changes the processor's template while the key hashed the tokenizer's, so a
    corrected template trained on the stale renderings. The same output folder (one cache) with two templates
    renders twice."""
    from medllava.config import config_from_dict
    from medllava.train.sft import prepare_sft
    from tests.conftest import stage_dict

    templates = {
        "plain": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}",
        "verbose": "{% for m in messages %}### The {{ m['role'] }} says: {{ m['content'] }}\n{% endfor %}"
                   "{% if add_generation_prompt %}### The assistant says: {% endif %}",
    }
    lengths = {}
    for name, template in templates.items():
        cfg = stage_dict(tmp_path, phantom, init_from=base_models[("clip", "llama")],
                         model={"chat_template": template}, data={"max_samples": 4})
        run = prepare_sft(config_from_dict(cfg))
        lengths[name] = [s.length for s in run.trainer.train_dataset.samples]
    assert all(v > p for p, v in zip(lengths["plain"], lengths["verbose"])), lengths


def test_cache_key_of_an_hf_source_follows_the_dataset_version(tmp_path: Path) -> None:
    """Issue 25: `hf:` sources were keyed by their name alone; a new revision of the data reused the old cache."""
    import datasets

    from medllava.data.cache import cache_key

    folder = tmp_path / "ds"
    folder.mkdir()
    datasets.Dataset.from_dict({"question": ["Is it normal?"], "answer": ["yes"]}).to_parquet(folder / "train.parquet")
    spec = f"hf:{folder}"
    first = cache_key([spec])
    assert cache_key([spec]) == first
    datasets.Dataset.from_dict({"question": ["Is it normal?", "Which side?"], "answer": ["no", "left"]}).to_parquet(
        folder / "train.parquet")
    assert cache_key([spec]) != first
