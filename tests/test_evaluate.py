"""The VQA scorer on hand-written predictions: word boundaries, open-question metrics, breakdowns."""

from __future__ import annotations

from pathlib import Path

import pytest

from medllava.data.vqa import format_question, parse_vqa, read_vqa
from medllava.evaluate import chance_level, markdown_table, score, summary_table


def _row(qtype: str, answer: str, prediction: str, **extra) -> dict:
    return {"qtype": qtype, "answer": answer, "prediction": prediction, **extra}


def test_closed_questions_use_word_boundaries_not_substrings() -> None:
    rows = [
        _row("yes_no", "no", "The lung fields are abnormal."),  # LLaVA-Med's substring scorer counted this right
        _row("yes_no", "no", "No."),
        _row("yes_no", "yes", "Yes, there is a nodule."),
        _row("yes_no", "yes", "not yes"),
        _row("yes_no", "no", "I do not know"),  # "not" and "no" are different words
    ]
    m = score(rows)
    assert m["n_closed"] == 5 and m["accuracy"] == pytest.approx(2 / 5)
    assert m["by_qtype"]["yes_no"]["unparsed"] == 3


def test_multiple_choice_and_numbers() -> None:
    opts = ["CT", "MRI", "X-ray"]
    rows = [
        _row("multiple_choice", "B", "B", options=opts),
        _row("multiple_choice", "B", "MRI", options=opts),
        _row("multiple_choice", "B", "A or B", options=opts),
        _row("multiple_choice", "MRI", "(B) MRI", options=opts),
        _row("number", "3", "There are three lesions."),
        _row("number", "3", "2"),
    ]
    m = score(rows)
    assert m["by_qtype"]["multiple_choice"] == {"n": 4, "accuracy": 0.75, "unparsed": 1}
    assert m["by_qtype"]["number"]["accuracy"] == 0.5
    assert m["accuracy"] == pytest.approx(4 / 6, abs=1e-4)  # metrics are rounded to 4 places


def test_open_questions_recall_exact_and_f1() -> None:
    rows = [
        _row("open", "pleural effusion", "pleural effusion"),
        _row("open", "pleural effusion", "There is a large left pleural effusion."),
        _row("open", "right upper lobe", "upper lobe"),
        _row("open", "pneumothorax", "no acute findings"),
    ]
    m = score(rows)
    entry = m["by_qtype"]["open"]
    assert entry["exact_match"] == 0.25
    assert entry["recall"] == pytest.approx((1 + 1 + 2 / 3 + 0) / 4, abs=1e-4)
    f1_second = 2 * (2 / 6) * 1 / (2 / 6 + 1)  # "there is large left pleural effusion" vs "pleural effusion"
    assert entry["f1"] == pytest.approx((1 + f1_second + 0.8 + 0) / 4, abs=1e-4)
    assert m["n_closed"] == 0 and m["accuracy"] == 0.0


def test_breakdowns_by_modality_topic_and_organ() -> None:
    rows = [
        _row("yes_no", "yes", "yes", modality="CT", organ="Lung"),
        _row("yes_no", "no", "yes", modality="CT", organ="Liver"),
        _row("yes_no", "no", "no", modality="MRI", organ="Brain", topic="presence"),
    ]
    m = score(rows)
    assert m["by_modality"] == {"CT": {"n": 2, "accuracy": 0.5}, "MRI": {"n": 1, "accuracy": 1.0}}
    assert set(m["by_organ"]) == {"Lung", "Liver", "Brain"} and m["by_topic"]["presence"]["n"] == 1
    m["chance"] = 0.5
    table = markdown_table(m, "demo")
    assert "| modality: CT | 2 | 0.500 |" in table and "chance level (closed): 0.500" in table


def test_chance_level() -> None:
    assert chance_level(parse_vqa({"image": "x", "question": "q", "answer": "yes"})) == 0.5
    assert chance_level(parse_vqa({"image": "x", "question": "q", "options": ["a", "b", "c", "d"], "answer": "A"})) == 0.25
    assert chance_level(parse_vqa({"image": "x", "question": "q", "answer": "effusion"})) == 0.0


def test_summary_table() -> None:
    text = summary_table({"instruct": {"accuracy": 0.7, "chance": 0.4, "blind_accuracy": 0.35, "blind_gap": 0.35,
                                       "by_topic": {"side": 0.5}}}, seconds=90)
    assert "instruct" in text and "+0.350" in text and "side 0.50" in text and "1.5 min" in text


def test_greedy_is_plainly_greedy_whatever_the_llm_ships(base_models: dict, phantom: Path, tmp_path: Path) -> None:
    """Qwen2.5 ships repetition_penalty 1.05, top_k 20 ... in its generation config: eval, chat and the filter must
    still decode plainly greedy, and a newly assembled model must not carry those extras into its exports."""
    import torch
    from PIL import Image
    from transformers import GenerationConfig

    from medllava.chat import ChatSession
    from medllava.evaluate import build_prompt, generate_batch
    from medllava.model import build_model, load_model
    from medllava.presets import make_tiny_pair

    model, processor = load_model(base_models[("clip", "llama")])
    model.eval()
    rec = next(iter(read_vqa(phantom / "test.jsonl")))
    image = Image.open(phantom / "images" / rec.image).convert("RGB")
    prompt = build_prompt(processor, rec)
    clean = generate_batch(model, processor, [prompt], [image], 12)
    inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    with torch.no_grad():  # greedy by hand: argmax, token after token
        ids = inputs["input_ids"]
        for _ in range(12):
            logits = model(input_ids=ids, pixel_values=inputs["pixel_values"], attention_mask=torch.ones_like(ids)).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            if ids[0, -1].item() in ([model.generation_config.eos_token_id] if isinstance(model.generation_config.eos_token_id, int) else model.generation_config.eos_token_id):
                break
    by_hand = processor.tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert clean == [by_hand]
    model.generation_config.repetition_penalty = 3.0  # what a shipped config can carry
    model.generation_config.no_repeat_ngram_size = 2
    model.generation_config.top_k = 20
    assert generate_batch(model, processor, [prompt], [image], 12) == clean
    question = format_question(rec.question, rec.options, with_image=False)

    def chat_answer() -> str:
        session = ChatSession(model, processor, max_new_tokens=12)
        session.add_image(image)
        return session.ask(question)

    polluted_chat = chat_answer()
    model.generation_config = GenerationConfig(eos_token_id=model.generation_config.eos_token_id,
                                               pad_token_id=model.generation_config.pad_token_id)
    assert chat_answer() == polluted_chat

    vision, llm = make_tiny_pair(tmp_path / "pair", "clip", "llama")
    GenerationConfig(repetition_penalty=1.05, top_k=20, top_p=0.8, temperature=0.7, do_sample=True).save_pretrained(llm)
    built, _ = build_model(str(vision), str(llm))
    g = built.generation_config
    assert g.repetition_penalty in (None, 1.0) and not g.do_sample and (g.top_k, g.top_p, g.temperature) == (None,) * 3


def test_predictions_do_not_depend_on_batch_size_or_run(base_models: dict, phantom: Path, tmp_path: Path) -> None:
    """Greedy predictions are identical for batch size 1 and 16 (left padding changes nothing) and across runs."""
    import json

    from medllava.evaluate import evaluate
    from medllava.model import build_model, load_model, save_model
    from medllava.presets import make_tiny_pair

    varied = []
    for pair in (("clip", "llama"), ("siglip", "qwen2")):
        # a pair whose random LLM writes text (the shared fixtures' stop at once: that would prove nothing)
        built, built_processor = build_model(*map(str, make_tiny_pair(tmp_path / "_".join(pair), *pair)))
        save_model(built, built_processor, tmp_path / f"{pair[0]}_model")
        model, processor = load_model(tmp_path / f"{pair[0]}_model")
        runs = []
        for name, batch_size in (("a", 1), ("b", 16), ("c", 16)):
            out = tmp_path / f"{pair[0]}_{name}"
            evaluate(model, processor, phantom / "test.jsonl", image_folder=phantom / "images", batch_size=batch_size,
                     max_new_tokens=12, blind=True, out_dir=out, progress=False)
            runs.append([(r["prediction"], r["blind_prediction"])
                         for r in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())])
        assert runs[0] == runs[1] == runs[2], pair
        varied.append(len({p for p, _ in runs[0]}) > 1)
    assert any(varied)  # at least one pair writes varied text (a constant answer would hide a difference)
