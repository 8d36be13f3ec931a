"""Several images per question, on Llava and Qwen2.5-VL, with 2 and 3 images: VQA records and their prompts, the
length check, GRPO, the evaluation's order and per-image checks, the pass-rate filter's sampling, preference pairs
(image:order) and DPO, serve (several image_url parts) and the web page (several uploads)."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
from pathlib import Path

import pytest
from PIL import Image

from medllava.data.records import RecordError
from medllava.data.vqa import format_question, parse_vqa
from medllava.families import by_name
from medllava.model import load_model

from .conftest import REPO, write_jsonl

FAMILIES = ["llava", "qwen2_5_vl"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, base_models: dict) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("qwen2_5_vl")
    by_name("qwen2_5_vl").build_tiny(folder)
    return {"llava": base_models[("clip", "llama")], "qwen2_5_vl": folder}


def phantom_images(phantom: Path) -> list[str]:
    return sorted(str(p.relative_to(phantom / "images")) for p in (phantom / "images").rglob("*.png")
                  if "progression" not in p.parts)


@pytest.fixture(scope="module")
def multi(tmp_path_factory: pytest.TempPathFactory, phantom: Path) -> Path:
    """VQA records with 2 and 3 images (one placing its own placeholders), on the phantom's images."""
    images = phantom_images(phantom)
    rows = []
    for i in range(6):
        n = 2 + i % 2
        rows.append({"id": f"m{i}", "images": images[i:i + n], "question": "Is there a lesion in the current study?",
                     "answer": "yes" if i % 3 else "no", "qtype": "yes_no", "answer_if_swapped": "no"})
    rows.append({"id": "inline", "images": images[7:9], "question": "Prior: <image> Current: <image> Which side?",
                 "options": ["left", "right"], "answer": "A", "qtype": "multiple_choice"})
    return write_jsonl(tmp_path_factory.mktemp("multi") / "multi.jsonl", rows)


def test_vqa_records_take_image_lists_and_place_one_placeholder_each() -> None:
    rec = parse_vqa({"images": ["a.png", "b.png", "c.png"], "question": "Grown?", "answer": "yes"})
    assert rec.images == ["a.png", "b.png", "c.png"] and rec.qtype == "yes_no"
    assert format_question(rec.question, n_images=3) == "<image>\n<image>\n<image>\nGrown?"
    assert parse_vqa(rec.to_dict()).images == rec.images
    assert parse_vqa({"image": "a.png", "question": "Q?", "answer": "no"}).to_dict()["image"] == "a.png"
    inline = parse_vqa({"images": ["a", "b"], "question": "Prior <image> now <image> grown?", "answer": "no"})
    assert format_question(inline.question, n_images=2) == "Prior <image> now <image> grown?"
    assert format_question(inline.question, with_image=False) == "Prior now grown?"
    with pytest.raises(RecordError, match="places 1 <image> placeholder"):
        parse_vqa({"images": ["a", "b"], "question": "<image> grown?", "answer": "no"}, "f.jsonl", 3)
    with pytest.raises(RecordError, match="empty"):
        parse_vqa({"images": ["a", ""], "question": "Q?", "answer": "no"})


@pytest.mark.parametrize("family", FAMILIES)
def test_rl_rows_hold_every_image_and_count_its_tokens(family: str, models: dict, multi: Path, phantom: Path) -> None:
    """The prompt length the GRPO filter checks equals the length the processor makes with the images."""
    from medllava.data.render import user_content
    from medllava.data.rl import build_rl_rows

    _, processor = load_model(models[family])
    rows, report = build_rl_rows([str(multi)], processor, image_folder=phantom / "images", progress=False)
    assert report.valid == 7 and [len(r["images"]) for r in rows] == [2, 3, 2, 3, 2, 3, 2]
    assert rows[-1]["prompt"][-1]["content"].startswith("Prior: Current: Which side?")
    from medllava.data.rl import prompt_length

    for row in rows[:2]:
        images = [Image.open(p).convert("RGB") for p in row["images"]]
        messages = [dict(m) for m in row["prompt"]]
        messages[-1]["content"] = user_content(processor, "<image>\n" * len(images) + messages[-1]["content"])
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        real = processor(text=[text], images=[images], return_tensors="pt")["input_ids"].shape[1]
        assert prompt_length(processor, row["prompt"], row["images"]) == real
    short, report = build_rl_rows([str(multi)], processor, image_folder=phantom / "images", progress=False,
                                  max_prompt_length=prompt_length(processor, rows[0]["prompt"], rows[0]["images"]))
    # the 3-image questions and the 2-image one with options are longer than the first: filtered and counted
    assert report.counts().get("too_long") == 4 and [len(r["images"]) for r in short] == [2, 2, 2]


@pytest.mark.parametrize("family", FAMILIES)
def test_grpo_trains_on_questions_with_2_and_3_images(family: str, models: dict, multi: Path, phantom: Path,
                                                      tmp_path: Path) -> None:
    from medllava.config import load_config
    from medllava.train.grpo import COMPLETIONS_LOG
    from medllava.train.stage import run_stage

    args = [f"--model.init_from={models[family]}", f"--data.train_files=[{multi}]",
            f"--data.image_folder={phantom / 'images'}", f"--run.output_dir={tmp_path / 'out'}", "--optim.max_steps=1",
            "--optim.per_device_batch_size=8", "--grpo.num_generations=4", "--grpo.max_completion_length=4",
            "--run.use_cpu=true", "--run.logging_steps=1", "--grpo.log_completions_every=1", "--trainable.llm=lora",
            "--lora.r=4", "--lora.alpha=8", "--data.max_length=4096"]
    out = run_stage(load_config(REPO / "stages/demo/grpo.yaml", args))
    history = json.loads((out / "train_log.json").read_text())
    assert [h for h in history if "loss" in h and math.isfinite(h["loss"])]
    logged = [json.loads(line) for line in (out / COMPLETIONS_LOG).read_text().splitlines()]
    assert logged and all("<image>" not in row["question"] for row in logged)


def test_reliance_variants_reverse_and_blank_one_image_at_a_time() -> None:
    from medllava.evaluate import reliance_variants

    images = [Image.new("RGB", (8, 8), (c, c, c)) for c in (10, 20, 30)]
    v = reliance_variants(images)
    assert list(v) == ["blind", "order", "without_image_1", "without_image_2", "without_image_3"]
    shade = lambda ims: [im.getpixel((0, 0))[0] for im in ims]  # noqa: E731
    assert shade(v["order"]) == [30, 20, 10] and shade(v["blind"]) == [0, 0, 0]
    assert shade(v["without_image_2"]) == [10, 0, 30]
    assert list(reliance_variants(images[:1])) == ["blind"]  # one image: nothing to reorder
    assert "without_image_1" not in reliance_variants(images * 2)  # 6 images: not ablated one by one
    # a prior and a current series of 2 and 1 slices: reversed and blanked study by study, slices kept in order
    studies = reliance_variants(images, [2, 1])
    assert shade(studies["order"]) == [30, 10, 20] and shade(studies["without_image_1"]) == [0, 0, 30]
    assert list(reliance_variants(images, [3])) == ["blind"]  # one series: no order to check


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_reports_order_and_single_image_checks(family: str, models: dict, multi: Path, phantom: Path,
                                                    tmp_path: Path) -> None:
    from medllava.evaluate import decoded, evaluate, generate_batch, load_items, reliance_variants

    model, processor = load_model(models[family])
    metrics = evaluate(model, processor, multi, image_folder=phantom / "images", out_dir=tmp_path, blind=True,
                       max_new_tokens=3, progress=False, batch_size=4)
    assert metrics["order"]["n"] == 7 and metrics["order"]["n_swapped_gold"] == 6
    assert set(metrics["ablation"]) == {"without_image_1", "without_image_2", "without_image_3"}
    assert metrics["ablation"]["without_image_3"]["n"] == 3
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert all({"order_prediction", "without_image_1_prediction", "blind_prediction"} <= set(r) for r in rows)
    assert [r["n_images"] for r in rows] == [2, 3, 2, 3, 2, 3, 2]
    assert "images in reverse order" in (tmp_path / "metrics.md").read_text()
    # batched answers to image lists equal one question at a time, and the order check asks the reversed images
    items, _ = load_items(multi, processor, phantom / "images")
    kept, images = decoded(items[:3], None, [])
    batched = generate_batch(model, processor, [it.prompt for it in kept], images, 3)
    alone = [generate_batch(model, processor, [it.prompt], [ims], 3)[0] for it, ims in zip(kept, images)]
    assert batched == alone
    swapped = [generate_batch(model, processor, [it.prompt], [reliance_variants(ims)["order"]], 3)[0]
               for it, ims in zip(kept, images)]
    assert swapped == [r["order_prediction"] for r in rows[:3]]


def test_summary_shows_the_multi_image_checks(tmp_path: Path) -> None:
    from medllava.evaluate import multi_image_checks, summary_table, update_summary

    rows = [{"answer": "yes", "qtype": "yes_no", "answer_if_swapped": "no", "prediction": "yes",
             "order_prediction": "no", "without_image_1_prediction": "yes", "without_image_2_prediction": "no",
             "blind_prediction": "no"},
            {"answer": "no", "qtype": "yes_no", "answer_if_swapped": "yes", "prediction": "no",
             "order_prediction": "no", "without_image_1_prediction": "no", "without_image_2_prediction": "yes",
             "blind_prediction": "no"},
            {"answer": "no", "qtype": "yes_no", "prediction": "no", "blind_prediction": "no"}]  # one image: not counted
    checks = multi_image_checks(rows)
    assert checks["multi_image"]["accuracy"] == 1.0
    assert checks["order"] == {"n": 2, "accuracy": 0.5, "changed": 0.5, "gap": 0.5, "swapped_accuracy": 0.5,
                               "n_swapped_gold": 2}
    assert checks["ablation"]["without_image_1"] == {"n": 2, "accuracy": 1.0, "gap": 0.0}
    assert checks["ablation"]["without_image_2"] == {"n": 2, "accuracy": 0.0, "gap": 1.0}
    metrics = {"accuracy": 1.0, "n_closed": 3, "chance": 0.5, "blind": {"accuracy": 0.67}, "blind_gap": 0.33, **checks}
    summary = update_summary(tmp_path / "s.json", "instruct", metrics)
    table = summary_table(summary)
    assert "several images" in table and "no image_2 0.00" in table


@pytest.mark.parametrize("family", FAMILIES)
def test_filter_sampling_and_order_pairs_on_image_lists(family: str, models: dict, multi: Path, phantom: Path,
                                                        tmp_path: Path) -> None:
    from data_recipes.pass_rate_filter import sample_answers
    from data_recipes.preference_pairs import PairMaker
    from medllava.data.rl import build_rl_rows

    model, processor = load_model(models[family])
    rows, _ = build_rl_rows([str(multi)], processor, image_folder=phantom / "images", progress=False, with_location=True)
    samples = sample_answers(model, processor, rows[:3], n=2, temperature=1.0, max_new_tokens=3, batch_size=2,
                             progress=False)
    assert [len(s) for s in samples] == [2, 2, 2]
    images = tmp_path / "images"
    images.mkdir()
    local = []
    for row in rows[:2]:  # copies: corrupted images are written beside them, never into the shared phantom folder
        refs = []
        for ref in row["images"]:
            (images / Path(ref).name).write_bytes(Path(ref).read_bytes())
            refs.append(str(images / Path(ref).name))
        local.append({**row, "images": refs})
    args = argparse.Namespace(image_folder=str(images), rejects_subfolder="rejects", window=None, weight="none",
                              rejects=["image:order", "image:blank"], seed=0, noise_strength=1.0)
    originals = {(row["source"], row["line"]): json.loads(Path(row["source"]).read_text().splitlines()[row["line"] - 1])
                 for row in local}
    maker = PairMaker(args, originals, local)
    for row in local:
        pairs, skips = maker.make(row, ["yes", "no"])
        blank = next(p for p in pairs if p["reject"] == "image:blank")
        assert len(blank["rejected_images"]) == len(row["images"])
        assert blank["prompt"][-1]["content"].count("<image>") == len(row["images"])
        if row["answer"] == "yes":  # answer_if_swapped "no": reversing the images makes the answer wrong
            order = next(p for p in pairs if p["reject"] == "image:order")
            assert order["rejected_images"] == list(reversed(order["images"])) and not skips
            assert len(order["images"]) == len(row["images"])
        else:  # the same answer when reversed: no order pair, counted
            assert [s["kind"] for s in skips] == ["image:order"] and "answer_if_swapped" in skips[0]["reason"]


@pytest.mark.parametrize("family", FAMILIES)
def test_dpo_on_pairs_with_2_and_3_images(family: str, models: dict, phantom: Path, tmp_path: Path) -> None:
    from medllava.config import config_from_dict
    from medllava.train.dpo import prepare_dpo
    from tests.test_dpo import dpo_stage

    images = phantom_images(phantom)
    pairs = []
    for i in range(4):
        n = 2 + i % 2
        pairs.append({"id": f"p{i}", "prompt": [{"role": "user", "content": "<image>\n" * n + "Has it grown?"}],
                      "chosen": "Yes.", "rejected": "Yes.", "images": images[i:i + n],
                      "rejected_images": list(reversed(images[i:i + n]))})
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    (tmp_path / "images").symlink_to(phantom / "images")  # read only
    run = prepare_dpo(config_from_dict(dpo_stage(tmp_path, phantom, models[family], path, llm="lora")))
    batch = run.trainer.data_collator([{"pair": 0}, {"pair": 1}])
    assert batch["input_ids"].shape[0] == 4  # chosen, chosen, rejected, rejected
    per_image = "image_grid_thw" if family == "qwen2_5_vl" else "pixel_values"
    assert batch[per_image].shape[0] == 2 * (2 + 3)  # each side carries its own 2 and 3 images
    run.trainer.train()
    assert all(math.isfinite(h["loss"]) for h in run.trainer.state.log_history if "loss" in h)


def _data_uri(path: Path) -> str:
    return f"data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}"


@pytest.mark.parametrize("family", FAMILIES)
def test_serve_answers_with_2_and_3_image_parts_as_chat_does(family: str, models: dict, phantom: Path) -> None:
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx2")
    from medllava.chat import ChatSession
    from medllava.imaging import load_image
    from medllava.serve import ServeSettings, create_app

    model, processor = load_model(models[family])
    model.eval()
    paths = [phantom / "images" / p for p in phantom_images(phantom)[:3]]
    app = create_app(model, processor, ServeSettings(model_id="tiny", default_max_tokens=4, max_images=3))

    async def ask(body: dict) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tiny") as client:
            return await client.post("/v1/chat/completions", json=body, timeout=300)

    usage = {}
    for n in (2, 3):
        content = [{"type": "image_url", "image_url": {"url": _data_uri(p)}} for p in paths[:n]]
        body = {"model": "tiny", "max_tokens": 4,
                "messages": [{"role": "user", "content": [*content, {"type": "text", "text": "Compare them."}]}]}
        reply = asyncio.run(ask(body))
        assert reply.status_code == 200, reply.text
        session = ChatSession(model, processor, max_new_tokens=4)
        for p in paths[:n]:
            session.add_image(load_image(p))
        assert reply.json()["choices"][0]["message"]["content"] == session.ask("Compare them.")
        usage[n] = reply.json()["usage"]["prompt_tokens"]
    assert usage[3] > usage[2]  # every image's tokens are in the prompt
    four = [{"type": "image_url", "image_url": {"url": _data_uri(p)}} for p in paths[:3] + paths[:1]]
    reply = asyncio.run(ask({"model": "tiny", "messages": [{"role": "user", "content": [*four, {"type": "text",
                                                                                                 "text": "Q"}]}]}))
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "too_many_images"


@pytest.mark.parametrize("family", FAMILIES)
def test_web_takes_several_uploads_for_one_question(family: str, models: dict, phantom: Path) -> None:
    from medllava.chat import ChatSession
    from medllava.imaging import ImageError
    from medllava.web import answer_stream, read_uploads

    model, processor = load_model(models[family])
    paths = [str(phantom / "images" / p) for p in phantom_images(phantom)[:3]]
    for n in (2, 3):
        images = read_uploads(paths[:n], "")
        assert len(images) == n
        state = {"messages": [], "images": [], "pending": images}
        answer = list(answer_stream(model, processor, state, "Compare them.", 4))[-1]
        session = ChatSession(model, processor, max_new_tokens=4)
        for image in images:
            session.add_image(image)
        assert answer == session.ask("Compare them.") and len(state["images"]) == n
    with pytest.raises(ImageError, match="at most 2"):
        read_uploads(paths, "", max_images=2)



def test_text_prior_reads_image_list_records(multi: Path) -> None:
    """The text prior (no image, no model) learns from records with several images, whatever the placeholders."""
    from medllava.prior import build_prior, question_key

    prior = build_prior([multi])
    assert prior.pairs == 7 and prior.answer("Is there a lesion in the current study?") == "yes"  # 4 yes, 2 no
    assert prior.answer("Prior: <image> Current: <image> Which side?") == "left"
    assert question_key("Prior: <image> Current: <image> Which side?") == question_key("Prior: Current: Which side?")


def test_a_null_images_column_falls_back_to_image() -> None:
    """Mixed single- and multi-image rows written to parquet get both columns, nulls where unused."""
    from medllava.data.records import RawRecord, normalize

    rec = parse_vqa({"image": "a.png", "images": None, "question": "Q?", "answer": "no"})
    assert rec.images == ["a.png"]
    conv = normalize(RawRecord("f", 1, {"image": "a.png", "images": None, "conversations": [
        {"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "No."}]}))
    assert conv.images == ["a.png"]


def test_slices_and_stacked_window_options(tmp_path: Path) -> None:
    import yaml

    from medllava.config import ConfigError, slices_option, stage_slices
    from medllava.imaging import Window
    from medllava.volumes import SliceSpec

    assert slices_option("16,UNIFORM") == SliceSpec(16) and slices_option("4,2.5") == SliceSpec(4, 2.5)
    assert slices_option(None, {"count": 12, "spacing": 3.0}) == SliceSpec(12, 3.0)
    for bad in ("0", "8,inf", "8,-1", "eight"):
        with pytest.raises(ConfigError, match="--slices"):
            slices_option(bad)
    with pytest.raises(ValueError, match="three"):
        Window.parse("medgemma_ct+lung+bone")  # a stack inside a stack
    (tmp_path / "medllava_stage.yaml").write_text(yaml.safe_dump({"data": {"slices": {"count": 16}}}))
    assert slices_option(None, stage_slices(tmp_path)) == SliceSpec(16)  # chat/serve/web: the stage's
    assert stage_slices(tmp_path / "nothing") is None


@pytest.mark.parametrize("family", FAMILIES)
def test_each_image_is_checked_and_a_loader_failure_is_counted(family: str, models: dict, phantom: Path,
                                                               tmp_path: Path) -> None:
    """Containment, existence and header checks hold for every image of a question (the record is named with the
    failing image); an image whose pixels fail only in the data loader blanks its sample, which is counted."""
    from medllava.data.collate import SFTDataset
    from medllava.data.render import IGNORE_INDEX, Renderer
    from medllava.data.rl import build_rl_rows
    from medllava.data.validate import prepare_samples

    _, processor = load_model(models[family])
    images = tmp_path / "images"
    images.mkdir()
    good = [phantom / "images" / p for p in phantom_images(phantom)[:3]]
    for p in good:
        (images / p.name).write_bytes(p.read_bytes())
    names = [p.name for p in good]
    rows = [{"id": "ok", "images": names, "question": "Q?", "answer": "yes"},
            {"id": "missing", "images": [names[0], "nope.png"], "question": "Q?", "answer": "yes"},
            {"id": "escape", "images": [names[0], names[1], "../secret.png"], "question": "Q?", "answer": "yes"}]
    vqa = write_jsonl(tmp_path / "vqa.jsonl", rows)
    kept, report = build_rl_rows([str(vqa)], processor, image_folder=images, progress=False, skip_invalid=True)
    assert [r["id"] for r in kept] == ["ok"]
    assert {(e.record_id, e.kind) for e in report.errors} == {("missing", "missing_image"),
                                                             ("escape", "image_outside_root")}
    assert any("nope.png" in e.reason for e in report.errors)
    # the second of three images has a readable header and corrupt pixels: found in the data loader
    corrupt = images / "corrupt.png"
    corrupt.write_bytes(good[1].read_bytes()[:60])
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"id": "three", "images": [names[0], "corrupt.png", names[2]],
                                                "conversations": [{"from": "human", "value": "<image>\n" * 3 + "Q?"},
                                                                  {"from": "gpt", "value": "Yes."}]}])
    renderer = Renderer(processor, "chat", 2048)
    samples, _ = prepare_samples([str(sft)], renderer, image_folder=images, progress=False)
    item = SFTDataset(samples, renderer.images)[0]
    assert item["image_error"]["path"].endswith("corrupt.png") and item["image_error"]["id"] == "three"
    assert (item["labels"] == IGNORE_INDEX).all()
