"""Every model family beside Llava: tiny stock checkpoints (saved with plain transformers' save_pretrained, as a
download looks), rendered, trained (full and LoRA), packed and reloaded with plain transformers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from medllava.config import config_from_dict
from medllava.data.collate import SFTCollator, SFTDataset
from medllava.data.packing import SamplePackingCollator, with_packed_positions
from medllava.data.render import IGNORE_INDEX, Renderer
from medllava.data.validate import prepare_samples
from medllava.families import FAMILIES, by_name, family_of
from medllava.model import ModelLoadError, apply_trainable, end_of_turn_ids, family_of_source, load_model
from medllava.train.sft import prepare_sft
from medllava.train.stage import run_stage
from tests.conftest import stage_dict, write_jsonl

NEW = [f.name for f in FAMILIES if not f.assembled]
PACKED = [f.name for f in FAMILIES if not f.assembled and f.packing_refusal is None]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each new family's tiny checkpoint folder."""
    out = {}
    for name in NEW:
        folder = tmp_path_factory.mktemp(name)
        by_name(name).build_tiny(folder)
        out[name] = folder
    return out


def _records(tmp: Path, phantom: Path, n: int = 6) -> Path:
    """n phantom conversations; the second holds 2 images and the third 3 (the first turn asks about them all), so
    every family's rendering, packing and training run on several images per sample."""
    rows = [json.loads(line) for line in (phantom / "instruct.jsonl").read_text(encoding="utf-8").splitlines()[:n]]
    others = [r["image"] for r in rows[::-1]]
    for k, row in enumerate(rows[1:3], start=1):
        row["images"] = [row.pop("image"), *others[:k]]
        first = row["conversations"][0]
        first["value"] = "<image>\n" * k + first["value"]
    return write_jsonl(tmp / "records.jsonl", rows)


@pytest.mark.parametrize("name", NEW)
def test_tiny_folder_is_a_stock_checkpoint_of_its_family(tiny: dict[str, Path], name: str) -> None:
    config = AutoConfig.from_pretrained(tiny[name])
    assert family_of(config).name == name and family_of_source(tiny[name]).name == name
    model = AutoModelForImageTextToText.from_pretrained(tiny[name])
    counts = {c: sum(p.numel() for n, p in model.named_parameters() if family_of(model).component_of(n) == c)
              for c in ("vision", "projector", "llm")}
    assert all(counts.values()), counts  # every part found under the family's module names


@pytest.mark.parametrize("name", NEW)
def test_supervised_tokens_are_each_answer_and_its_end_of_turn(tiny: dict[str, Path], name: str, phantom: Path,
                                                               tmp_path: Path) -> None:
    """Under the family's own chat template, the labels are exactly the assistant turns' text + end-of-turn."""
    processor = AutoProcessor.from_pretrained(tiny[name])
    renderer = Renderer(processor, "chat", 512)
    rows = [{"id": "two-turn", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nIs there a lesion?"}, {"from": "gpt", "value": "Yes, one lesion."},
        {"from": "human", "value": "Which side?"}, {"from": "gpt", "value": "The left side."}]}]
    Image.new("RGB", (40, 56), (90, 90, 90)).save(tmp_path / "a.png")
    samples, _ = prepare_samples([str(write_jsonl(tmp_path / "r.jsonl", rows))], renderer, image_folder=tmp_path,
                                 progress=False)
    sample = samples[0]
    tok = processor.tokenizer
    supervised = sample.labels != IGNORE_INDEX
    runs, current = [], []
    for keep, tid in zip(supervised, sample.input_ids):
        if keep:
            current.append(int(tid))
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    texts = [tok.decode(r) for r in runs]
    end = tok.convert_ids_to_tokens(end_of_turn_ids(processor)[-1])  # the token the template closes a turn with
    assert [t.strip() for t in texts] == [f"Yes, one lesion.{end}", f"The left side.{end}"]
    assert int((sample.input_ids == renderer.image_token_id).sum()) == 1


@pytest.mark.parametrize("name", NEW)
def test_loaded_sample_matches_what_the_processor_makes(tiny: dict[str, Path], name: str, tmp_path: Path) -> None:
    """The dataset's expansion of a rendered sample is the processor's own input_ids for the same text and image,
    and its length is the one checked before training (each image counted at its size)."""
    processor = AutoProcessor.from_pretrained(tiny[name])
    item, reference, length = _sample_and_reference(processor, (61, 45), tmp_path)
    assert item["input_ids"].tolist() == reference["input_ids"][0].tolist()
    assert len(item["input_ids"]) == length
    batch = SFTCollator(processor.tokenizer.pad_token_id)([item])  # what the model gets: the processor's layout
    for key in item["image_inputs"]:
        torch.testing.assert_close(batch[key], reference[key])


def _sample_and_reference(processor: object, size: tuple[int, int], tmp_path: Path) -> tuple[dict, dict, int]:
    """A one-image record rendered and loaded as training does (its item and checked length), and what the
    processor itself makes of the same text and image."""
    renderer = Renderer(processor, "chat", 1024)
    Image.new("RGB", size, (30, 60, 90)).save(tmp_path / "a.png")
    rows = [{"id": "r", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "An axial CT."}]}]
    samples, _ = prepare_samples([str(write_jsonl(tmp_path / "r.jsonl", rows))], renderer, image_folder=tmp_path,
                                 progress=False)
    item = SFTDataset(samples, renderer.images)[0]
    text = renderer._apply(renderer.messages(_record(rows[0], tmp_path)), add_generation_prompt=False)
    reference = processor(text=[text], images=[Image.open(tmp_path / "a.png").convert("RGB")], return_tensors="pt")
    return item, reference, samples[0].length


def _record(row: dict, folder: Path):
    from medllava.data.records import RawRecord, normalize

    return normalize(RawRecord(data=row, source="r.jsonl", line=1))


@pytest.mark.parametrize("name", [n for n in NEW if by_name(n).dynamic_resolution])
def test_a_large_image_is_counted_whole_and_never_cut(tiny: dict[str, Path], name: str, tmp_path: Path) -> None:
    """Dynamic resolution: a bigger image has more tokens; over max_length the record is refused (too_long),
    never truncated through its image. (SmolVLM resizes every image to its longest edge, so there the count
    follows the shape: a wide strip is one row of tiles, a square two.)"""
    processor = AutoProcessor.from_pretrained(tiny[name])
    small_size, large_size = ((64, 16), (64, 64)) if name == "smolvlm" else ((16, 16), (48, 48))
    Image.new("RGB", small_size).save(tmp_path / "s.png")
    Image.new("RGB", large_size).save(tmp_path / "l.png")
    counter = Renderer(processor, "chat", 4096)
    n_small, n_large = counter.images.count(small_size), counter.images.count(large_size)
    assert n_large > n_small
    rows = [{"id": i, "image": f, "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                   {"from": "gpt", "value": "A CT."}]} for i, f in (("s", "s.png"), ("l", "l.png"))]
    records = str(write_jsonl(tmp_path / "r.jsonl", rows))
    both, _ = prepare_samples([records], counter, image_folder=tmp_path, progress=False)
    assert both[1].length - both[0].length == n_large - n_small
    assert [len(SFTDataset(both, counter.images)[i]["input_ids"]) for i in (0, 1)] == [b.length for b in both]
    renderer = Renderer(processor, "chat", both[0].length + (n_large - n_small) // 2)
    samples, report = prepare_samples([records], renderer, image_folder=tmp_path, skip_invalid=True, progress=False)
    assert [s.id for s in samples] == ["s"]
    assert [e.kind for e in report.errors] == ["too_long"] and report.errors[0].record_id == "l"


@pytest.mark.parametrize("name", PACKED)
def test_packed_row_gives_each_sample_its_separate_logits(tiny: dict[str, Path], name: str, phantom: Path,
                                                          tmp_path: Path) -> None:
    """Packing is exact: samples with images packed in one row (Qwen-VL: M-RoPE positions per sample from the
    model's own get_rope_index) give the logits each gives alone. Measured on a 2-core AMD EPYC (torch 2.14.1): max
    |diff| 0.0 for all four families; the bound 1e-4 leaves room for other kernels, far below the leak (> 1e-3)."""
    from medllava.attention import VARLEN_SDPA, set_llm_attention

    model, processor = load_model(tiny[name])
    model.eval()
    renderer = Renderer(processor, "chat", 512)
    samples, _ = prepare_samples([str(_records(tmp_path, phantom, 3))], renderer, image_folder=phantom / "images",
                                 progress=False)
    dataset = SFTDataset(samples, renderer.images)
    items = [dataset[i] for i in range(3)]
    pad = processor.tokenizer.pad_token_id
    with torch.no_grad():
        alone = [model(**{k: v for k, v in SFTCollator(pad)([i]).items() if k not in ("labels", "sample_ids")}).logits[0]
                 for i in items]
        set_llm_attention(model, VARLEN_SDPA)
        batch = SamplePackingCollator()(items)
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "sample_ids")}
        packed = model(**with_packed_positions(model, inputs)).logits[0]
        plain = {k: v for k, v in inputs.items() if k not in ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k",
                                                              "max_length_q", "max_length_k")}
        leaking = model(**plain).logits[0]
    start = 0
    for logits in alone:
        n = logits.shape[0]
        torch.testing.assert_close(packed[start:start + n], logits, atol=1e-4, rtol=1e-4)
        start += n
    assert (leaking[-alone[-1].shape[0]:] - alone[-1]).abs().max() > 1e-3  # the check can fail


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("llm", ["full", "lora"])
def test_sft_trains_and_reloads_with_plain_transformers(tiny: dict[str, Path], name: str, llm: str, phantom: Path,
                                                        tmp_path: Path) -> None:
    data = _records(tmp_path, phantom, 8)
    cfg = stage_dict(tmp_path, phantom, init_from=tiny[name], data={"train_files": [str(data)], "max_length": 512},
                     trainable={"vision": "frozen", "projector": "full", "llm": llm},
                     optim={"max_steps": 2, "projector_lr": 1e-3})
    out = run_stage(config_from_dict(cfg))
    facts = json.loads((out / "medllava_run.json").read_text())
    assert facts["packing"] is (by_name(name).packing_refusal is None)
    if llm == "full":
        reloaded = AutoModelForImageTextToText.from_pretrained(out)
        assert family_of(reloaded).name == name
        before = AutoModelForImageTextToText.from_pretrained(tiny[name])
        proj = by_name(name).projector[0]
        changed = [n for n, p in reloaded.named_parameters()
                   if not torch.equal(p, before.get_parameter(n)) and by_name(name).component_of(n) == "projector"]
        assert changed, f"{proj} did not train"
        frozen = [n for n, p in reloaded.named_parameters() if by_name(name).component_of(n) == "vision"]
        assert all(torch.equal(reloaded.get_parameter(n), before.get_parameter(n)) for n in frozen)
    else:
        model, _ = load_model(out)  # adapter + its base, merged
        assert family_of(model).name == name
    AutoProcessor.from_pretrained(out)


@pytest.mark.parametrize("name", NEW)
def test_trainable_spec_maps_onto_the_family_modules(tiny: dict[str, Path], name: str) -> None:
    from medllava.config import LoraSection, TrainableSection

    family = by_name(name)
    model, _ = load_model(tiny[name])
    model = apply_trainable(model, TrainableSection(vision="frozen", projector="full", llm="lora"), LoraSection(r=2, alpha=4))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(family.component_of(n) == "projector" for n in trainable)
    assert not any(family.component_of(n) == "vision" for n in trainable)
    lora = [n for n in trainable if "lora_" in n]
    assert lora and all(family.component_of(n) == "llm" for n in lora)


def test_a_model_of_no_supported_family_is_one_line_naming_them(tmp_path: Path) -> None:
    from transformers import BlipConfig

    BlipConfig().save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=r"not a model family medllava trains; supported: Llava.*Qwen2-VL") as err:
        load_model(tmp_path)
    assert "\n" not in str(err.value)


def test_records_that_are_not_renderable_name_their_line(tiny: dict[str, Path], tmp_path: Path) -> None:
    processor = AutoProcessor.from_pretrained(tiny[NEW[0]])
    renderer = Renderer(processor, "chat", 512)
    rows = [{"id": "x", "image": "missing.png", "conversations": [{"from": "human", "value": "<image>\nQ"},
                                                                   {"from": "gpt", "value": "A"}]}]
    with pytest.raises(Exception, match="r.jsonl"):
        prepare_samples([str(write_jsonl(tmp_path / "r.jsonl", rows))], renderer, image_folder=tmp_path, progress=False)


@pytest.fixture(scope="module")
def lora_runs(tiny: dict[str, Path], phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A one-step LoRA SFT stage output per new family (adapter + a reference to the stock base folder)."""
    out = {}
    for name in NEW:
        tmp = tmp_path_factory.mktemp(f"lora_{name}")
        cfg = stage_dict(tmp, phantom, init_from=tiny[name], data={"train_files": [str(_records(tmp, phantom, 4))],
                                                                   "max_length": 512},
                         trainable={"vision": "frozen", "projector": "full", "llm": "lora"}, optim={"max_steps": 1})
        out[name] = run_stage(config_from_dict(cfg))
    return out


@pytest.mark.parametrize("name", NEW)
def test_eval_chat_and_export_of_each_family(lora_runs: dict[str, Path], name: str, phantom: Path,
                                             tmp_path: Path) -> None:
    """eval (and its blind check), a chat turn with an image, and the LoRA merge exported to a stock folder of the
    same family that plain transformers reloads with the same logits."""
    from medllava.chat import ChatSession
    from medllava.evaluate import evaluate
    from medllava.export import export
    from medllava.imaging import load_image

    model, processor = load_model(lora_runs[name])
    model.eval()
    metrics = evaluate(model, processor, phantom / "test.jsonl", image_folder=phantom / "images",
                       out_dir=tmp_path / "eval", max_new_tokens=4, blind=True, progress=False, batch_size=3)
    assert metrics["n"] == len((phantom / "test.jsonl").read_text().splitlines()) and "blind" in metrics
    session = ChatSession(model, processor, max_new_tokens=4)
    session.add_image(load_image(next((phantom / "images").rglob("*.png"))))
    session.ask("What is shown?")
    assert session.last_usage["prompt_tokens"] > 10 and session.last_usage["completion_tokens"] > 0
    report = export(lora_runs[name], tmp_path / "export", dtype="float32")
    v = report["verification"]
    assert report["merged_adapter"] and v["passed"] and v["medllava_imported"] == []
    assert family_of(AutoConfig.from_pretrained(tmp_path / "export")).name == name
    assert v["class"] == type(model).__name__
    card = (tmp_path / "export" / "README.md").read_text()
    assert f"`{v['class']}`" in card and "Started from:" in card and "Vision encoder" not in card


@pytest.mark.parametrize("name", NEW)
def test_grpo_step_on_each_family(tiny: dict[str, Path], name: str, phantom: Path, tmp_path: Path) -> None:
    """One GRPO step (LoRA; Qwen2.5-VL also QLoRA) through TRL's generation with the family's own processor."""
    import math

    from medllava.config import load_config
    from medllava.train.stage import run_stage
    from tests.conftest import REPO

    quant = ["--quantization.bits=4"] if name == "qwen2_5_vl" else []
    if quant:
        pytest.importorskip("bitsandbytes")
    args = [f"--model.init_from={tiny[name]}", f"--data.train_files=[{phantom / 'rl.jsonl'}]",
            f"--data.image_folder={phantom / 'images'}", f"--run.output_dir={tmp_path / 'out'}", "--optim.max_steps=1",
            "--optim.per_device_batch_size=8", "--grpo.num_generations=4", "--grpo.max_completion_length=4",
            "--run.use_cpu=true", "--run.logging_steps=1", "--data.max_samples=8", "--trainable.llm=lora",
            "--lora.r=4", "--lora.alpha=8", *quant]
    out = run_stage(load_config(REPO / "stages/demo/grpo.yaml", args))
    history = json.loads((out / "train_log.json").read_text())
    assert [h for h in history if "loss" in h and math.isfinite(h["loss"])]
    model, _ = load_model(out)
    assert family_of(model).name == name


@pytest.mark.parametrize("name", NEW)
def test_qlora_sft_keeps_tower_and_projector_in_16_bits(tiny: dict[str, Path], name: str, phantom: Path,
                                                        tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    cfg = stage_dict(tmp_path, phantom, init_from=tiny[name], data={"train_files": [str(_records(tmp_path, phantom, 4))],
                                                                    "max_length": 512},
                     trainable={"vision": "frozen", "projector": "full", "llm": "lora"}, optim={"max_steps": 1},
                     quantization={"bits": 4})
    run = prepare_sft(config_from_dict(cfg))
    quantized = {n.rsplit(".", 1)[0] for n, p in run.trainer.model.named_parameters() if type(p).__name__ == "Params4bit"}
    family = by_name(name)
    assert quantized and all(family.component_of(n) == "llm" for n in quantized)
    run.trainer.train()


def test_pixel_range_is_a_stage_setting_and_part_of_the_cache_key(tiny: dict[str, Path], phantom: Path,
                                                                    tmp_path: Path) -> None:
    from medllava.config import ConfigError

    data = {"train_files": [str(_records(tmp_path, phantom, 4))], "max_length": 512}
    lengths = {}
    for max_pixels in (16 * 16, 48 * 48):
        cfg = stage_dict(tmp_path / str(max_pixels), phantom, init_from=tiny["qwen2_5_vl"], data=data,
                         model={"max_pixels": max_pixels, "min_pixels": 8 * 8},
                         run={"output_dir": str(tmp_path / "out")})  # one output folder, one cache folder
        run = prepare_sft(config_from_dict(cfg))
        assert run.processor.image_processor.size["longest_edge"] == max_pixels
        lengths[max_pixels] = [s.length for s in run.trainer.train_dataset.samples]
    assert all(a < b for a, b in zip(lengths[16 * 16], lengths[48 * 48]))  # re-rendered, not read from the cache
    cfg = stage_dict(tmp_path / "g", phantom, init_from=tiny["gemma3"], data=data, model={"max_pixels": 1024})
    with pytest.raises(ConfigError, match="max_pixels.*Gemma 3"):
        prepare_sft(config_from_dict(cfg))


def test_grpo_image_inputs_line_up_with_prompts_of_unequal_length(tiny: dict[str, Path], phantom: Path,
                                                                  tmp_path: Path) -> None:
    """TRL left-pads prompts; the token types it takes from the processor must be left-padded too, or a prompt
    shorter than the longest gets another sample's M-RoPE layout (found by the Qwen2.5-VL rehearsal)."""
    from medllava.config import load_config
    from medllava.train.grpo import prepare_grpo
    from tests.conftest import REPO

    args = [f"--model.init_from={tiny['qwen2_5_vl']}", f"--data.train_files=[{phantom / 'rl.jsonl'}]",
            f"--data.image_folder={phantom / 'images'}", f"--run.output_dir={tmp_path / 'out'}", "--run.use_cpu=true"]
    run = prepare_grpo(load_config(REPO / "stages/demo/grpo.yaml", args))
    processor = run.trainer.processing_class
    prompts = ["<|vision_start|><|image_pad|><|vision_end|>short", "<|vision_start|><|image_pad|><|vision_end|>a longer question here"]
    images = [[Image.new("RGB", (16, 16))], [Image.new("RGB", (16, 16))]]
    inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    assert (inputs["attention_mask"][:, -1] == 1).all()  # left-padded, as TRL pads the prompt ids
    types = inputs["mm_token_type_ids"]
    assert torch.equal(types.bool(), inputs["input_ids"] == processor.image_token_id)


@pytest.mark.parametrize("name", ["qwen2_5_vl", "gemma3", "smolvlm"])
def test_serve_answers_an_openai_request_with_an_image(tiny: dict[str, Path], name: str, phantom: Path) -> None:
    """`medllava serve`'s app (FastAPI, in process) answers an OpenAI-shaped request with an image and an earlier
    assistant turn on the family's own chat template."""
    import base64

    from fastapi.testclient import TestClient

    from medllava.serve import ServeSettings, create_app

    model, processor = load_model(tiny[name])
    model.eval()
    image = next((phantom / "images").rglob("*.png"))
    uri = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    client = TestClient(create_app(model, processor, ServeSettings(model_id="tiny")))
    body = {"model": "tiny", "max_tokens": 4, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Hello"}]},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                     {"type": "text", "text": "What is shown?"}]}]}
    reply = client.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200, reply.text
    usage = reply.json()["usage"]
    assert usage["prompt_tokens"] > 20 and usage["completion_tokens"] > 0  # the image's tokens counted


@pytest.mark.parametrize("name", PACKED)
def test_packed_row_trains_like_the_padded_batch(tiny: dict[str, Path], name: str, phantom: Path,
                                                 tmp_path: Path) -> None:
    """The same samples packed in one row (per-sample attention, the family's packed positions) and padded in a
    batch give the same loss and the same gradients on every trainable parameter. Measured on a 2-core AMD EPYC
    (torch 2.14.1): loss differs by at most 4.8e-7 (Qwen3-VL), gradients by at most 3.7e-8 (InternVL); the bounds
    (1e-5) leave a 20x and 250x margin for other processors' float kernels."""
    from medllava.attention import VARLEN_SDPA, set_llm_attention

    model, processor = load_model(tiny[name])
    renderer = Renderer(processor, "chat", 512)
    samples, _ = prepare_samples([str(_records(tmp_path, phantom, 3))], renderer, image_folder=phantom / "images",
                                 progress=False)
    dataset = SFTDataset(samples, renderer.images)
    items = [dataset[i] for i in range(3)]
    results = []
    for packed in (False, True):
        set_llm_attention(model, VARLEN_SDPA if packed else "sdpa")
        collate = SamplePackingCollator() if packed else SFTCollator(processor.tokenizer.pad_token_id)
        batch = collate(items)
        inputs = {k: v for k, v in batch.items() if k != "sample_ids"}
        model.zero_grad(set_to_none=True)
        loss = model(**with_packed_positions(model, inputs)).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (padded_loss, padded_grads), (packed_loss, packed_grads) = results
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-5, rtol=1e-5)
    assert packed_grads.keys() == padded_grads.keys() and packed_grads
    for n in packed_grads:
        torch.testing.assert_close(packed_grads[n], padded_grads[n], atol=1e-5, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


IDEFICS3_CHAT_TEMPLATE = (  # HuggingFaceM4/Idefics3-8B-Llama3's
    "<|begin_of_text|>{% for message in messages %}{{message['role'].capitalize()}}{% if message['content'][0]['type'] "
    "== 'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' "
    "%}{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def _tiny_idefics3(out: Path) -> Path:
    """A tiny Idefics3 (the SmolVLM family's other model type) saved with plain transformers."""
    from transformers import GPT2Tokenizer, Idefics3Config, Idefics3ImageProcessor, Idefics3Processor

    from medllava.presets import train_family_tokenizer

    torch.manual_seed(0)
    grid = [f"<row_{r}_col_{c}>" for r in (1, 2) for c in (1, 2)]
    special = ["<|end_of_text|>", "<|begin_of_text|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
               "<global-img>", *grid]
    tok = GPT2Tokenizer(bos_token="<|begin_of_text|>", eos_token="<end_of_utterance>", pad_token="<|end_of_text|>",
                        unk_token="<|end_of_text|>")
    tok = train_family_tokenizer(tok, special, IDEFICS3_CHAT_TEMPLATE, byte_level=True)
    config = Idefics3Config(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        text_config={"model_type": "llama", "vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id},
        scale_factor=2, image_token_id=tok.convert_tokens_to_ids("<image>"), pad_token_id=tok.pad_token_id)
    model = AutoModelForImageTextToText.from_config(config)
    image_processor = Idefics3ImageProcessor(size={"longest_edge": 64}, max_image_size={"longest_edge": 32},
                                             do_image_splitting=True)
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=4,
                                  chat_template=IDEFICS3_CHAT_TEMPLATE)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def test_idefics3_renders_as_its_processor_and_trains(phantom: Path, tmp_path: Path) -> None:
    """Idefics3 (model type `idefics3`, the SmolVLM family): a rendered sample is what its processor makes, and a
    LoRA SFT step trains and reloads."""
    folder = _tiny_idefics3(tmp_path / "idefics3")
    assert family_of_source(folder).name == "smolvlm"
    processor = AutoProcessor.from_pretrained(folder)
    item, reference, _ = _sample_and_reference(processor, (61, 30), tmp_path)
    assert item["input_ids"].tolist() == reference["input_ids"][0].tolist()
    batch = SFTCollator(processor.tokenizer.pad_token_id)([item])
    torch.testing.assert_close(batch["pixel_values"], reference["pixel_values"])
    cfg = stage_dict(tmp_path, phantom, init_from=folder, data={"train_files": [str(_records(tmp_path, phantom, 4))],
                                                                "max_length": 512},
                     trainable={"vision": "frozen", "projector": "full", "llm": "lora"}, optim={"max_steps": 1})
    model, _ = load_model(run_stage(config_from_dict(cfg)))
    assert type(model).__name__ == "Idefics3ForConditionalGeneration"


def test_smolvlm_batch_of_unequal_tile_counts_gives_the_processor_batch_logits(tiny: dict[str, Path],
                                                                               tmp_path: Path) -> None:
    """SmolVLM: a wide image is one row of tiles, a square one two; the processor pads the batch with empty tiles
    to [samples, most tiles, ...], medllava gives the model the batch's tiles as one block. Each row's logits are
    those of the processor's own batch."""
    model, processor = load_model(tiny["smolvlm"])
    model.eval()
    renderer = Renderer(processor, "chat", 1024)
    sizes = {"wide": (64, 20), "square": (60, 60)}
    rows = []
    for name, size in sizes.items():
        Image.new("RGB", size, (7 * len(name), 90, 20)).save(tmp_path / f"{name}.png")
        rows.append({"id": name, "image": f"{name}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhich shape?"}, {"from": "gpt", "value": f"It is {name}."}]})
    samples, _ = prepare_samples([str(write_jsonl(tmp_path / "r.jsonl", rows))], renderer, image_folder=tmp_path,
                                 progress=False)
    dataset = SFTDataset(samples, renderer.images)
    items = [dataset[0], dataset[1]]
    tiles = [len(i["image_inputs"]["pixel_values"]) for i in items]
    assert tiles[0] < tiles[1]
    batch = SFTCollator(processor.tokenizer.pad_token_id)(items)
    assert batch["pixel_values"].shape[:2] == (1, sum(tiles))
    texts = [renderer._apply(renderer.messages(_record(r, tmp_path)), add_generation_prompt=False) for r in rows]
    processor.tokenizer.padding_side = "right"
    reference = processor(text=texts, images=[[Image.open(tmp_path / f"{n}.png").convert("RGB")] for n in sizes],
                          padding=True, return_tensors="pt")
    assert reference["pixel_values"].shape[:2] == (2, tiles[1])  # padded with an empty tile
    with torch.no_grad():
        ours = model(**{k: v for k, v in batch.items() if k not in ("labels", "sample_ids")}).logits
        theirs = model(**reference).logits
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        assert torch.equal(batch["input_ids"][row, :n], reference["input_ids"][row, :n])
        torch.testing.assert_close(ours[row, :n], theirs[row, :n])


@pytest.mark.parametrize("name", NEW)
def test_web_chat_streams_the_chat_answer_on_each_family(tiny: dict[str, Path], name: str, phantom: Path) -> None:
    """`medllava web`'s answer stream (an uploaded image, two turns) ends with what `medllava chat` answers, on the
    family's own processor and chat template."""
    from medllava.chat import ChatSession
    from medllava.web import answer_stream, read_uploads

    model, processor = load_model(tiny[name])
    model.eval()
    image = read_uploads(str(sorted((phantom / "images").rglob("*.png"))[0]), "")[0]
    session = ChatSession(model, processor, max_new_tokens=4)
    session.add_image(image)
    first = session.ask("Is any lesion visible?")
    state = {"messages": [], "images": [], "pending": [image]}
    assert list(answer_stream(model, processor, state, "Is any lesion visible?", 4))[-1] == first
    assert list(answer_stream(model, processor, state, "Why?", 4))[-1] == session.ask("Why?")
    assert len(state["images"]) == 1 and len(state["messages"]) == 4


def test_smolvlm_max_pixels_sets_the_longest_edge_in_whole_tiles(tiny: dict[str, Path]) -> None:
    """SmolVLM's resolution setting is the longest edge (whole tiles): max_pixels picks the largest tile multiple
    whose square fits, so an image's tiles shrink with it; it has no min_pixels."""
    processor = AutoProcessor.from_pretrained(tiny["smolvlm"])
    family = by_name("smolvlm")
    before = Renderer(processor, "chat", 1024).images.count((64, 64))
    family.set_pixel_limits(processor, None, 40 * 40)  # sqrt 40 -> one 32-pixel tile
    assert processor.image_processor.size["longest_edge"] == 32
    assert Renderer(processor, "chat", 1024).images.count((64, 64)) < before
    with pytest.raises(ValueError, match="min_pixels"):
        family.set_pixel_limits(processor, 16 * 16, None)
    with pytest.raises(ValueError, match="below one 32 x 32 tile"):
        family.set_pixel_limits(processor, None, 20 * 20)


@pytest.mark.parametrize("name", [f.name for f in FAMILIES])
def test_prompt_length_is_known_before_asking(tiny: dict[str, Path], name: str, phantom: Path,
                                              tmp_path: Path) -> None:
    """What `medllava serve` checks against the context before generating: the prompt's length with each image
    expanded, equal to the length the processor then makes, on every family (two turns, an image of its own size)."""
    from medllava.chat import ChatSession
    from medllava.imaging import load_image

    folder = tiny[name] if name in tiny else by_name(name).build_tiny(tmp_path / name)
    model, processor = load_model(folder)
    model.eval()
    session = ChatSession(model, processor, max_new_tokens=2)
    session.add_image(load_image(next((phantom / "images").rglob("*.png"))).resize((45, 61)))
    for text in ("What is shown?", "Which side?"):
        expected = session.prompt_tokens(text)
        session.ask(text)
        assert expected == session.last_usage["prompt_tokens"]


@pytest.mark.parametrize("name", NEW)
def test_dpo_on_each_family_equals_the_hand_computed_loss_and_trains(tiny: dict[str, Path], name: str,
                                                                      phantom: Path, tmp_path: Path) -> None:
    """DPO (LoRA, a rejected side with a blank image of its own) on every family: TRL's fused loss through our
    batches (the family's image inputs and token types, M-RoPE positions) equals the DPO loss from the model's
    full logits, and a step trains."""
    from medllava.train.dpo import prepare_dpo
    from tests.test_dpo import dpo_stage, hand_dpo_loss, write_pairs

    pairs = write_pairs(tmp_path, phantom)
    run = prepare_dpo(config_from_dict(dpo_stage(tmp_path, phantom, tiny[name], pairs["trl"], llm="lora")))
    model = run.trainer.model
    reference, _ = load_model(tiny[name])
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    batch = run.trainer.data_collator([{"pair": 0}, {"pair": 2}])  # rejected sides with their own images
    assert batch["pair_weights"].tolist() == [1.0, 3.0]
    ours = run.trainer.compute_loss(model, dict(batch))
    hand = hand_dpo_loss(model, reference, batch)
    torch.testing.assert_close(ours, hand, atol=1e-4, rtol=1e-4)
    run.trainer.train()
    assert all(math.isfinite(h["loss"]) for h in run.trainer.state.log_history if "loss" in h)
