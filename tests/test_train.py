"""SFT stages on the tiny model: full, LoRA, QLoRA (bitsandbytes on CPU), DeepSpeed ZeRO-2, resume, outputs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import TrainerCallback

from medllava.config import config_from_dict, load_config
from medllava.model import component_of, load_model
from medllava.train.common import save_stage_output
from medllava.train.sft import prepare_sft
from medllava.train.stage import run_stage

from .conftest import REPO, stage_dict


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight as saved (state_dict undoes bitsandbytes' CPU repacking of 4-bit weights)."""
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def demo_stage(name: str, tmp: Path, phantom: Path, *overrides: str, **model: Path) -> dict:
    """A shipped demo recipe (stages/demo/NAME.yaml) pointed at the test data, for 3 steps."""
    base = [f"--data.train_files=[{phantom / Path(load_config(REPO / f'stages/demo/{name}.yaml').data.train_files[0]).name}]",
            f"--data.image_folder={phantom / 'images'}", f"--run.output_dir={tmp / 'out'}", "--optim.max_steps=3",
            "--optim.per_device_batch_size=4", "--run.use_cpu=true", "--run.logging_steps=1"]
    if load_config(REPO / f"stages/demo/{name}.yaml").data.format == "chat":
        base.append("--data.max_length=512")  # the test tokenizer's vocabulary is smaller than the demo's
    base += [f"--model.{k}={v}" for k, v in model.items()]
    return load_config(REPO / f"stages/demo/{name}.yaml", base + list(overrides)).to_dict()


def _train(cfg_dict: dict) -> tuple:
    """Prepare, snapshot, train, save; returns (run, before, after, losses)."""
    cfg = config_from_dict(cfg_dict)
    run = prepare_sft(cfg)
    before = _snapshot(run.trainer.model)
    run.trainer.train()
    after = _snapshot(run.trainer.model)
    save_stage_output(cfg, run.trainer, run.processor, run.base_ref)
    losses = [h["loss"] for h in run.trainer.state.log_history if "loss" in h]
    return run, before, after, losses


def _changed(before: dict, after: dict, name: str) -> bool:
    """Bitwise comparison: packed 4-bit weights stored as floats can hold NaN bit patterns."""
    return not torch.equal(before[name].contiguous().view(torch.uint8), after[name].contiguous().view(torch.uint8))


def test_full_align_from_parts(tmp_path: Path, phantom: Path, tiny_pair_dirs: dict) -> None:
    vision, llm = tiny_pair_dirs[("clip", "llama")]
    cfg = demo_stage("align", tmp_path, phantom, "--optim.projector_lr=5e-3", vision_tower=vision, llm=llm)
    run, before, after, losses = _train(cfg)
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    for name, param in run.trainer.model.named_parameters():
        if param.requires_grad:
            assert component_of(name) in ("projector", "llm")
        else:
            assert component_of(name) == "vision"
            assert not _changed(before, after, name), f"frozen {name} changed"
    assert any(_changed(before, after, n) for n in before if component_of(n) == "projector")
    assert any(_changed(before, after, n) for n in before if component_of(n) == "llm")
    # The projector has its own learning rate.
    groups = {g.get("initial_lr", g["lr"]) for g in run.trainer.optimizer.param_groups}
    assert len(groups) == 2

    out = Path(cfg["run"]["output_dir"])
    expected = {"config.json", "generation_config.json", "model.safetensors", "processor_config.json",
                "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "medllava_stage.yaml",
                "data_report.json", "train_log.json", "training_curves.png"}
    assert expected <= {p.name for p in out.iterdir()}
    resolved = yaml.safe_load((out / "medllava_stage.yaml").read_text())
    assert resolved["optim"]["projector_lr"] == pytest.approx(5e-3) and resolved["data"]["format"] == "plain"
    assert resolved["name"] == "demo-align"
    assert json.loads((out / "data_report.json").read_text())["invalid"] == 0
    reloaded, _ = load_model(out)
    saved = load_file(str(out / "model.safetensors"))
    assert any("multi_modal_projector" in k for k in saved)
    assert reloaded.config.text_config.architectures == ["LlamaForCausalLM"]


def test_lora_instruct(tmp_path: Path, phantom: Path, base_models: dict) -> None:
    base = base_models[("siglip", "qwen2")]
    cfg = demo_stage("instruct_lora", tmp_path, phantom, "--optim.lr=5e-2", init_from=base)
    run, before, after, losses = _train(cfg)
    assert all(math.isfinite(x) for x in losses)
    lora = [n for n in before if "lora_B" in n]
    assert lora and all(_changed(before, after, n) for n in lora)
    for name, param in run.trainer.model.named_parameters():
        if not param.requires_grad:
            assert not _changed(before, after, name), f"frozen {name} changed"
    assert any(_changed(before, after, n) for n in before if "modules_to_save" in n and "projector" in n)

    out = Path(cfg["run"]["output_dir"])
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    assert not os.path.isabs(adapter_cfg["base_model_name_or_path"])
    assert (out / adapter_cfg["base_model_name_or_path"]).resolve() == base.resolve()
    merged, _ = load_model(out)  # base + adapter, merged
    assert type(merged).__name__ == "LlavaForConditionalGeneration"


def test_qlora_instruct_with_bitsandbytes_on_cpu(tmp_path: Path, phantom: Path, base_models: dict) -> None:
    pytest.importorskip("bitsandbytes")
    base = base_models[("clip", "llama")]
    cfg = demo_stage("instruct_qlora", tmp_path, phantom, "--optim.lr=5e-2", init_from=base)
    assert cfg["quantization"]["bits"] == 4
    run, before, after, losses = _train(cfg)
    assert all(math.isfinite(x) for x in losses)
    quantized = [n for n, p in run.trainer.model.named_parameters() if type(p).__name__ == "Params4bit"]
    assert quantized, "the LLM's linear layers should be 4-bit"
    assert all(component_of(n.replace("base_model.model.", "")) == "llm" for n in quantized), "only the LLM is quantized"
    assert all(not _changed(before, after, n) for n in quantized)
    assert all(_changed(before, after, n) for n in before if "lora_B" in n)
    assert (Path(cfg["run"]["output_dir"]) / "adapter_config.json").is_file()


def test_qlora_trains_after_an_eval_forward_on_any_cpu(tmp_path: Path, phantom: Path, base_models: dict) -> None:
    """The packing probe runs the 4-bit model in eval mode without gradients before training. On a CPU with
    AVX512-BF16 bitsandbytes then rewrote each 4-bit weight into an inference-only layout for good, and the first
    training step failed; the layers now keep their training layout (on any CPU the switch is checked)."""
    pytest.importorskip("bitsandbytes")
    from medllava.data.packing import SamplePackingCollator

    cfg = demo_stage("instruct_qlora", tmp_path, phantom, "--data.packing=true", "--optim.max_steps=2",
                     init_from=base_models[("siglip", "qwen2")])
    run = prepare_sft(config_from_dict(cfg))  # the probe has run: eval mode, no gradients
    assert isinstance(run.trainer.data_collator, SamplePackingCollator)
    from bitsandbytes.nn import Linear4bit

    layers = [m for m in run.trainer.model.modules() if isinstance(m, Linear4bit)]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    run.trainer.train()
    assert all(math.isfinite(h["loss"]) for h in run.trainer.state.log_history if "loss" in h)


class StopAt(TrainerCallback):
    """Stops training after a given step, as a crash would (the schedule stays that of the full run)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003, ANN201
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


def test_resume_continues_from_the_last_checkpoint(tmp_path: Path, phantom: Path, base_models: dict) -> None:
    base = base_models[("clip", "llama")]
    steps = ("--optim.max_steps=4", "--run.save_steps=2", "--run.save_total_limit=3")
    straight = demo_stage("instruct", tmp_path / "a", phantom, *steps, init_from=base)
    run_stage(config_from_dict(straight))
    # The same stage, stopped after step 2 (checkpoint-2), then run again with the full budget.
    first = demo_stage("instruct", tmp_path / "b", phantom, *steps, init_from=base)
    cfg = config_from_dict(first)
    run = prepare_sft(cfg)
    run.trainer.add_callback(StopAt(2))
    run.trainer.train()
    out_b = Path(first["run"]["output_dir"])
    assert (out_b / "checkpoint-2").is_dir()
    resumed = prepare_sft(config_from_dict(first))
    assert resumed.checkpoint and resumed.checkpoint.endswith("checkpoint-2")
    resumed.trainer.train(resume_from_checkpoint=resumed.checkpoint)
    save_stage_output(cfg, resumed.trainer, resumed.processor, resumed.base_ref)
    assert resumed.trainer.state.global_step == 4
    a = load_file(str(Path(straight["run"]["output_dir"]) / "model.safetensors"))
    b = load_file(str(out_b / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)


@pytest.mark.slow
def test_deepspeed_zero2_step_on_cpu(tmp_path: Path, phantom: Path, base_models: dict) -> None:
    pytest.importorskip("deepspeed")
    cfg = stage_dict(tmp_path, phantom, init_from=base_models[("clip", "llama")], optim={"max_steps": 2},
                     run={"deepspeed": str(REPO / "deepspeed_configs/zero2.json")})
    path = tmp_path / "stage.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29500 + os.getpid() % 1000),
           "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-m", "medllava.cli", "train", str(path)], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    out = Path(cfg["run"]["output_dir"])
    history = json.loads((out / "train_log.json").read_text())
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    before = load_file(str(base_models[("clip", "llama")] / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    vision = [k for k in before if "vision_tower" in k]
    assert all(torch.equal(before[k], after[k]) for k in vision)
    assert any(not torch.equal(before[k], after[k]) for k in before if "multi_modal_projector" in k)


def test_loader_workers_are_forked_once_per_run(tmp_path: Path, phantom: Path, base_models: dict) -> None:
    """With data.num_workers, the DataLoader's workers persist across epochs: forked again at each epoch, a fork
    that met the last epoch's exiting loader threads locked a worker in CPython 3.11's after-fork cleanup (a 2-rank
    ZeRO-3 rehearsal hung at an epoch boundary). Two epochs train with the same workers."""
    from medllava.train.common import trainer_kwargs

    cfg = config_from_dict(stage_dict(tmp_path, phantom, init_from=base_models[("clip", "llama")],
                                      data={"num_workers": 2, "max_samples": 8},
                                      optim={"max_steps": -1, "epochs": 2, "per_device_batch_size": 4}))
    assert trainer_kwargs(cfg, "fp32")["dataloader_persistent_workers"] is True
    run = prepare_sft(cfg)
    loader = run.trainer.get_train_dataloader()
    assert loader.persistent_workers and loader.num_workers == 2
    run.trainer.train()
    assert run.trainer.state.epoch == 2 and run.trainer.state.global_step == 4
    cfg.data.num_workers = 0
    assert trainer_kwargs(cfg, "fp32")["dataloader_persistent_workers"] is False
