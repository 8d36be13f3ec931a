"""GRPO stage: one step with full, LoRA and QLoRA on the tiny model; RL data; reward configuration."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from medllava.config import ConfigError, config_from_dict, load_config
from medllava.data.rl import build_rl_rows, from_llava_conversation, prompt_text
from medllava.data.validate import DataValidationError
from medllava.data.vqa import parse_vqa
from medllava.model import load_model
from medllava.train.grpo import COMPLETIONS_LOG, prepare_grpo
from medllava.train.stage import run_stage

from .conftest import REPO, write_jsonl


def grpo_stage(tmp: Path, phantom: Path, base: Path, *overrides: str) -> dict:
    """The shipped demo GRPO recipe on the test data: one step of 2 questions x 4 generations."""
    args = [f"--model.init_from={base}", f"--data.train_files=[{phantom / 'rl.jsonl'}]",
            f"--data.image_folder={phantom / 'images'}", f"--run.output_dir={tmp / 'out'}", "--optim.max_steps=1",
            "--optim.per_device_batch_size=8", "--grpo.num_generations=4", "--grpo.max_completion_length=4",
            "--run.use_cpu=true", "--run.logging_steps=1", "--grpo.log_completions_every=1", "--data.max_samples=16"]
    return load_config(REPO / "stages/demo/grpo.yaml", args + list(overrides)).to_dict()


@pytest.mark.parametrize(
    "mode",
    ["full", "lora", "qlora"],
)
def test_one_grpo_step(mode: str, tmp_path: Path, phantom: Path, base_models: dict) -> None:
    overrides = {
        "full": [],
        "lora": ["--trainable.llm=lora", "--lora.r=4", "--lora.alpha=8"],
        "qlora": ["--trainable.llm=lora", "--lora.r=4", "--lora.alpha=8", "--quantization.bits=4"],
    }[mode]
    if mode == "qlora":
        pytest.importorskip("bitsandbytes")
    cfg = config_from_dict(grpo_stage(tmp_path, phantom, base_models[("clip", "llama")], *overrides))
    out = run_stage(cfg)
    history = json.loads((out / "train_log.json").read_text())
    logged = [h for h in history if "loss" in h]
    assert logged and all(math.isfinite(h["loss"]) for h in logged)
    step = logged[0]
    for key in ("rewards/accuracy_reward/mean", "completions/mean_length", "frac_reward_zero_std"):
        assert key in step, key
    # the step time split: generation is a real, positive part of the step, not a placeholder
    assert step["timing/generation_s"] > 0 and step["timing/train_s"] > 0
    samples = [json.loads(line) for line in (out / COMPLETIONS_LOG).read_text().splitlines()]
    assert samples and {"step", "question", "answer", "completion", "correct"} <= set(samples[0])
    assert (out / ("adapter_config.json" if mode != "full" else "model.safetensors")).is_file()
    model, _ = load_model(out)
    assert type(model).__name__ == "LlavaForConditionalGeneration"


def test_grpo_on_siglip_qwen_with_think_prompt_and_gating(tmp_path: Path, phantom: Path, base_models: dict) -> None:
    cfg = config_from_dict(grpo_stage(
        tmp_path, phantom, base_models[("siglip", "qwen2")], "--grpo.prompt=think",
        "--grpo.rewards={accuracy: 1.0, think_format: 0.5}", "--grpo.gate_accuracy_on_format=true"))
    run = prepare_grpo(cfg)
    names = [getattr(f, "__name__", "") for f in run.trainer.reward_funcs]
    assert names == ["accuracy_if_think_format", "think_format_reward"]
    assert run.trainer.reward_weights.tolist() == [1.0, 0.5]
    run.trainer.train()
    losses = [h["loss"] for h in run.trainer.state.log_history if "loss" in h]
    assert losses and all(math.isfinite(x) for x in losses)


def test_reward_config_errors(tmp_path: Path, phantom: Path, base_models: dict) -> None:
    base = base_models[("clip", "llama")]
    with pytest.raises(ConfigError, match="unknown reward"):  # the config fails, before any model loads
        config_from_dict(grpo_stage(tmp_path, phantom, base, "--grpo.rewards={accuracy: 1.0, fluency: 1.0}"))
    with pytest.raises(ConfigError, match="needs prompt"):
        config_from_dict(grpo_stage(tmp_path, phantom, base, "--grpo.gate_accuracy_on_format=true"))
    with pytest.raises(ConfigError, match="multiple of num_generations"):
        config_from_dict(grpo_stage(tmp_path, phantom, base, "--optim.per_device_batch_size=6"))


def test_long_prompts_are_filtered_and_counted(tmp_path: Path, phantom: Path, base_models: dict) -> None:
    _, processor = load_model(base_models[("clip", "llama")])
    rows = [{"id": "short", "image": "train/train_00000.png", "question": "Is there a lesion?", "answer": "yes"},
            {"id": "long", "image": "train/train_00000.png", "question": "Is there " + "a lesion " * 200 + "?", "answer": "no"}]
    path = write_jsonl(tmp_path / "rl.jsonl", rows)
    out, report = build_rl_rows([str(path)], processor, image_folder=phantom / "images", max_prompt_length=128,
                                report_dir=tmp_path, progress=False)
    assert [r["id"] for r in out] == ["short"]
    assert report.counts() == {"too_long": 1} and report.total == 2
    assert json.loads((tmp_path / "data_report.json").read_text())["counts"] == {"too_long": 1}


def test_bad_rl_records_stop_the_run_unless_skipped(tmp_path: Path, phantom: Path, base_models: dict) -> None:
    _, processor = load_model(base_models[("clip", "llama")])
    rows = [{"id": "ok", "image": "train/train_00000.png", "question": "Is there a lesion?", "answer": "yes"},
            {"id": "mc", "image": "train/train_00000.png", "question": "Side?", "options": ["left", "right"], "answer": "C"},
            {"id": "img", "image": "missing.png", "question": "Is there a lesion?", "answer": "no"},
            {"id": "yn", "image": "train/train_00000.png", "question": "Lesion?", "qtype": "yes_no", "answer": "maybe"}]
    path = write_jsonl(tmp_path / "rl.jsonl", rows)
    with pytest.raises(DataValidationError) as info:
        build_rl_rows([str(path)], processor, image_folder=phantom / "images", progress=False)
    assert sorted(e.kind for e in info.value.report.errors) == ["bad_answer", "bad_answer", "missing_image"]
    out, report = build_rl_rows([str(path)], processor, image_folder=phantom / "images", skip_invalid=True, progress=False)
    assert [r["id"] for r in out] == ["ok"] and len(report.errors) == 3


def test_prompt_templates() -> None:
    rec = parse_vqa({"id": "1", "image": "x.png", "question": "Which side?", "options": ["left", "right"], "answer": "A"})
    plain = prompt_text(rec, "plain")
    assert plain.startswith("Which side?\nA. left\nB. right\nAnswer with the option's letter")
    think = prompt_text(rec, "think")
    assert "<think>" in think and "<answer>" in think and "directly" not in think
    assert "<answer>" in prompt_text(rec, "answer") and "<think>" not in prompt_text(rec, "answer")
    assert prompt_text(rec, "think", instruction="Reason, then answer.").endswith("Reason, then answer.")


def test_converter_from_llava_vqa_form() -> None:
    record = {"id": "vqa1", "image": "img.jpg", "answer_type": "CLOSED", "conversations": [
        {"from": "human", "value": "<image>\nIs there a pneumothorax?"}, {"from": "gpt", "value": "No"}]}
    (row,) = from_llava_conversation(record)
    assert row == {"id": "vqa1", "image": "img.jpg", "question": "Is there a pneumothorax?", "answer": "No",
                   "qtype": "yes_no"}
    assert parse_vqa(row).qtype == "yes_no"
    multi = {"id": "m", "image": "i.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat organ?"}, {"from": "gpt", "value": "Liver"},
        {"from": "human", "value": "How many lesions?"}, {"from": "gpt", "value": "2"}]}
    rows = from_llava_conversation(multi)
    assert [r["id"] for r in rows] == ["m_0", "m_1"]
    assert [parse_vqa(r).qtype for r in rows] == ["open", "number"]
