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
    assert m["by_qtype"]["multiple_choice"] == {"n": 4, "accuracy": 0.75, "unparsed": 1, "own_option_rate": 0.75}
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
    image = Image.open(phantom / "images" / rec.images[0]).convert("RGB")
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


def test_text_prior_answers_with_the_most_common_training_answer(tmp_path: Path) -> None:
    """VQA records and conversations both count; MC answers count as option text; unseen questions get none;
    a bad training line is counted, not fatal."""
    import json

    from medllava.prior import build_prior, question_key

    vqa = tmp_path / "rl.jsonl"
    rows = [{"image": "a.png", "question": "Is the heart enlarged?", "answer": "no"}] * 3 + \
           [{"image": "a.png", "question": "is the heart enlarged", "answer": "Yes."}] + \
           [{"image": "a.png", "question": "Which modality?", "options": ["CT", "MRI"], "answer": "B"}]
    vqa.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    conv = tmp_path / "instruct.jsonl"
    conv.write_text(json.dumps({"image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhich modality?\nA. MRI\nB. CT\nAnswer with the option's letter from the "
                                   "given choices directly."},
        {"from": "gpt", "value": "A. MRI"},
        {"from": "human", "value": "How many lesions?"}, {"from": "gpt", "value": "2"}]}) + "\n")
    prior = build_prior([vqa, conv])
    assert prior.skipped == 1 and prior.pairs == 7
    assert prior.answer("Is the heart enlarged?") == "no"  # 3 against 1, punctuation and case ignored
    assert prior.answer("Which modality?") == "MRI"  # letters read as option text across option orders
    assert prior.answer("How many lesions?") == "2"
    assert prior.answer("Is there a fracture?") is None
    assert question_key("<image>\nWhich modality?\nA. MRI\nB. CT") == question_key("which modality")


def test_prior_and_llava_med_closed_are_scored_beside_accuracy(tmp_path: Path, phantom: Path, base_models: dict,
                                                                capsys) -> None:
    """`medllava eval --prior-from` reports the text prior per question type in metrics.json, the table and the
    summary; LLaVA-Med's CLOSED metric is reported under its own name when the data has answer_type."""
    import json

    from medllava.cli import main

    test = tmp_path / "test.jsonl"
    rows = [json.loads(line) for line in (phantom / "test.jsonl").read_text().splitlines()]
    for r in rows:
        r["answer_type"] = "CLOSED" if r["qtype"] != "open" else "OPEN"
    test.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = tmp_path / "summary.json"
    assert main(["eval", str(base_models[("siglip", "qwen2")]), "--data", str(test), "--image-folder",
                 str(phantom / "images"), "--out", str(tmp_path / "eval"), "--max-new-tokens", "4",
                 "--prior-from", str(phantom / "instruct.jsonl"), str(phantom / "rl.jsonl"),
                 "--summary", str(summary), "--stage", "base"]) == 0
    metrics = json.loads((tmp_path / "eval/metrics.json").read_text())
    prior = metrics["prior"]
    assert set(prior["by_qtype"]) == set(metrics["by_qtype"]) and prior["matched"] > 0
    # the prior's accuracy is what its own answers grade to
    preds = [json.loads(line) for line in (tmp_path / "eval/predictions.jsonl").read_text().splitlines()]
    from medllava.prior import build_prior

    built = build_prior([phantom / "instruct.jsonl", phantom / "rl.jsonl"])
    assert [p["prior_prediction"] for p in preds] == [built.answer(p["question"]) or "" for p in preds]
    lm = metrics["llava_med_closed"]
    assert lm["n"] == sum(1 for r in rows if r["answer_type"] == "CLOSED") and "LLaVA-Med" in lm["definition"]
    table = (tmp_path / "eval/metrics.md").read_text()
    assert "text prior" in table and "llava_med_closed" in table
    assert json.loads(summary.read_text())["base"]["prior_accuracy"] == prior["accuracy"]
    assert "prior" in summary_table(json.loads(summary.read_text())).splitlines()[0]


def test_llava_med_closed_counts_as_llava_med_does() -> None:
    """Substring scoring gated on yes/no (run_eval.py): 'left' never scores, 'no' inside 'abnormal' does."""
    from medllava.evaluate import llava_med_closed

    rows = [_row("yes_no", "no", "No.", answer_type="CLOSED"),
            _row("yes_no", "no", "The scan is abnormal", answer_type="CLOSED"),
            _row("open", "left", "left", answer_type="CLOSED"),
            _row("open", "effusion", "effusion", answer_type="OPEN")]
    assert llava_med_closed(rows) == {"n": 3, "accuracy": pytest.approx(2 / 3, abs=1e-4),
                                      "definition": llava_med_closed(rows)["definition"]}
    assert llava_med_closed([_row("yes_no", "no", "no")]) is None


def test_skipped_records_count_as_wrong_and_metrics_state_how_they_were_obtained(tmp_path: Path, phantom: Path,
                                                                                 base_models: dict) -> None:
    """Issue 25: with half the images broken, eval scored the other half and said nothing. Now a record that
    cannot be asked counts as wrong in the headline accuracy, and metrics.json, the table and the summary say how
    many were skipped and why; metrics.json states the model, its weights' hash, the data file's sha256 and the
    decoding settings."""
    import hashlib
    import json
    import shutil

    from medllava.cli import main

    images = tmp_path / "images"
    shutil.copytree(phantom / "images", images)
    rows = [json.loads(line) for line in (phantom / "test.jsonl").read_text().splitlines()]
    broken_files = sorted({r["image"] for r in rows})[::2]
    for name in broken_files:
        (images / name).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    skipped_rows = [r for r in rows if r["image"] in broken_files]
    assert 0 < len(skipped_rows) < len(rows)
    summary = tmp_path / "summary.json"
    model = base_models[("clip", "llama")]
    assert main(["eval", str(model), "--data", str(phantom / "test.jsonl"), "--image-folder", str(images),
                 "--out", str(tmp_path / "eval"), "--max-new-tokens", "3", "--batch-size", "4",
                 "--summary", str(summary), "--stage", "base"]) == 0
    metrics = json.loads((tmp_path / "eval/metrics.json").read_text())
    preds = [json.loads(line) for line in (tmp_path / "eval/predictions.jsonl").read_text().splitlines()]
    closed = [p for p in preds if p["qtype"] != "open"]
    skipped_closed = [r for r in skipped_rows if r["qtype"] != "open"]
    assert metrics["n_skipped"] == len(skipped_rows) and metrics["skipped"] == {"unsupported_format": len(skipped_rows)}
    assert metrics["n_closed"] == len(closed) + len(skipped_closed)
    assert metrics["accuracy"] == round(sum(p["correct"] for p in closed) / (len(closed) + len(skipped_closed)), 4)
    assert metrics["accuracy_of_asked"] == round(sum(p["correct"] for p in closed) / len(closed), 4)
    how = metrics["provenance"]
    assert how["model"] == str(model) and len(how["weights_sha256"]) == 64
    assert how["data"] == str(phantom / "test.jsonl")
    assert how["data_sha256"] == hashlib.sha256((phantom / "test.jsonl").read_bytes()).hexdigest()
    assert (how["prompt_mode"], how["max_new_tokens"], how["decoding"], how["batch_size"], how["window"]) == \
        ("plain", 3, "greedy", 4, None)
    assert f"skipped records: {len(skipped_rows)}" in (tmp_path / "eval/metrics.md").read_text()
    entry = json.loads(summary.read_text())["base"]
    assert entry["skipped"] == len(skipped_rows)
    assert "skipped" in summary_table(json.loads(summary.read_text())).splitlines()[0]


def test_own_option_rate_counts_answers_naming_an_option_of_their_own_question() -> None:
    """Issue 25: the demo's GRPO answered side questions with a modality option ("A. MRI"); the rate of multiple
    choice answers that name one of their own question's options is reported per stage."""
    from medllava.evaluate import score, summary_table, update_summary

    sides, modality = ["left", "right"], ["X-ray", "CT", "MRI"]
    rows = [{"qtype": "multiple_choice", "options": sides, "answer": "A", "prediction": p}
            for p in ("A. left", "B. right", "A. MRI", "C. CT")]
    rows.append({"qtype": "multiple_choice", "options": modality, "answer": "C", "prediction": "C. MRI"})
    entry = score(rows)["by_qtype"]["multiple_choice"]
    assert entry["own_option_rate"] == 0.6 and entry["accuracy"] == 0.4
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        summary = update_summary(Path(tmp) / "s.json", "grpo", score(rows))
    assert summary["grpo"]["own_option_rate"] == 0.6
    assert "MC own" in summary_table(summary)


@pytest.mark.parametrize("form", ["folder", "hf"])
def test_provenance_of_a_dataset_folder_or_hf_source(tmp_path: Path, phantom: Path, base_models: dict,
                                                     form: str) -> None:
    """Reviewer finding (issue 25): the data hash read the source as a file, so `eval --data hf:...` or a saved
    dataset folder crashed after generating every answer. The hash follows the data's content instead."""
    import json

    import datasets

    from medllava.cli import main

    rows = [json.loads(line) for line in (phantom / "test.jsonl").read_text().splitlines()]
    rows = [{k: r[k] for k in ("id", "image", "question", "answer", "qtype")} for r in rows if r["qtype"] == "yes_no"]
    folder = tmp_path / "ds"
    if form == "folder":
        datasets.Dataset.from_list(rows[:4]).save_to_disk(str(folder))
        spec = str(folder)
    else:
        folder.mkdir()
        datasets.Dataset.from_list(rows[:4]).to_parquet(folder / "train.parquet")
        spec = f"hf:{folder}"
    args = ["eval", str(base_models[("clip", "llama")]), "--data", spec, "--image-folder", str(phantom / "images"),
            "--out", str(tmp_path / "eval"), "--max-new-tokens", "2"]
    assert main(args) == 0
    first = json.loads((tmp_path / "eval/metrics.json").read_text())["provenance"]
    assert first["data"] == spec and len(first["data_sha256"]) == 64
    assert main(args) == 0
    assert json.loads((tmp_path / "eval/metrics.json").read_text())["provenance"]["data_sha256"] == first["data_sha256"]
    if form == "folder":
        import shutil

        shutil.rmtree(folder)
        datasets.Dataset.from_list(rows[1:5]).save_to_disk(str(folder))
    else:
        datasets.Dataset.from_list(rows[1:5]).to_parquet(folder / "train.parquet")
    assert main(args) == 0
    assert json.loads((tmp_path / "eval/metrics.json").read_text())["provenance"]["data_sha256"] != first["data_sha256"]


def test_weights_hash_of_a_lora_stage_covers_its_base(tmp_path: Path) -> None:
    """Reviewer finding (issue 25): a LoRA stage whose adapter names an outside base was hashed by the adapter
    alone; two stages on different bases got one hash."""
    import json

    from medllava.evaluate import weights_sha256

    base_a, base_b, run = tmp_path / "a", tmp_path / "b", tmp_path / "run"
    for folder, payload in ((base_a, b"A" * 32), (base_b, b"B" * 32), (run, b"adapter")):
        folder.mkdir()
        (folder / "model.safetensors" if folder != run else folder / "adapter_model.safetensors").write_bytes(payload)
    (run / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base_a)}))
    on_a = weights_sha256(run)
    (run / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base_b)}))
    assert weights_sha256(run) != on_a


def test_skipped_open_records_count_as_zero_in_every_open_figure() -> None:
    """Reviewer finding (issue 25): a skipped open record counted as wrong in exact match but was left out of F1
    and recall, so the three figures of one row had different denominators."""
    rows = [_row("open", "left lung", "left lung"), _row("open", "liver", "the liver")]
    entry = score(rows, skipped=["open", "open"])["by_qtype"]["open"]
    assert entry["n"] == 4 and entry["skipped"] == 2
    assert entry["exact_match"] == entry["f1"] == entry["recall"] == 0.5
