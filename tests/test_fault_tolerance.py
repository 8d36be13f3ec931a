"""Fault tolerance: SIGKILL and resume, interrupted checkpoint writes, divergence guard, pickle refusal, secrets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from medllava.config import ConfigError, config_from_dict
from medllava.model import ModelLoadError, load_model
from medllava.train.common import save_stage_output
from medllava.train.safety import STAGING, DivergenceError
from medllava.train.sft import prepare_sft
from medllava.train.stage import run_stage

from .conftest import stage_dict

LONG = {"max_steps": 160, "per_device_batch_size": 2, "lr": 5e-3}


def _write_cfg(tmp: Path, phantom: Path, base: Path, name: str, **sections) -> tuple[Path, Path]:
    cfg = stage_dict(tmp / name, phantom, init_from=base, optim=dict(LONG),
                     run={"save_steps": 10, "save_total_limit": 2, "logging_steps": 10}, **sections)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path, Path(cfg["run"]["output_dir"])


def _train_cmd(cfg: Path) -> list[str]:
    return [sys.executable, "-m", "medllava.cli", "train", str(cfg)]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-6, rtol=0, msg=key)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory, phantom: Path, base_models: dict) -> Path:
    """The uninterrupted run every resumed run must end equal to."""
    tmp = tmp_path_factory.mktemp("reference")
    cfg, out = _write_cfg(tmp, phantom, base_models[("clip", "llama")], "straight")
    result = subprocess.run(_train_cmd(cfg), capture_output=True, text=True, cwd=tmp, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_ends_with_the_same_weights(tmp_path: Path, phantom: Path, base_models: dict,
                                                                reference_run: Path) -> None:
    cfg, out = _write_cfg(tmp_path, phantom, base_models[("clip", "llama")], "killed")
    proc = subprocess.Popen(_train_cmd(cfg), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "checkpoint-20").is_dir():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "medllava_stage.yaml").exists(), "the kill should land before the run ends"
    following = config_from_dict(stage_dict(tmp_path / "next", phantom, init_from=out))
    with pytest.raises(ConfigError, match="unfinished stage"):  # a later stage refuses the half-done folder
        prepare_sft(following)
    result = subprocess.run(_train_cmd(cfg), capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stderr
    _assert_same_weights(out, reference_run)


CRASH_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from medllava.config import load_config
    from medllava.train.sft import prepare_sft
    run = prepare_sft(load_config(sys.argv[1]))
    save = run.trainer._save_optimizer_and_scheduler
    def crash_in_the_middle(output_dir):
        # the weights of checkpoint-30 are on disk, the optimizer state is not: die like a kill -9 would
        if run.trainer.state.global_step == 30:
            os.kill(os.getpid(), signal.SIGKILL)
        return save(output_dir)
    run.trainer._save_optimizer_and_scheduler = crash_in_the_middle
    run.trainer.train(resume_from_checkpoint=run.checkpoint)
    """
)


@pytest.mark.slow
def test_interrupted_checkpoint_write_resumes_from_the_previous_good_one(tmp_path: Path, phantom: Path,
                                                                        base_models: dict, reference_run: Path) -> None:
    cfg, out = _write_cfg(tmp_path, phantom, base_models[("clip", "llama")], "crashed")
    script = tmp_path / "crash.py"
    script.write_text(CRASH_SCRIPT, encoding="utf-8")
    result = subprocess.run([sys.executable, str(script), str(cfg)], capture_output=True, text=True, cwd=tmp_path,
                            timeout=600)
    assert result.returncode == -signal.SIGKILL
    assert (out / STAGING / "checkpoint-30" / "model.safetensors").is_file()  # the half-written one
    assert not (out / "checkpoint-30").exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-20"]
    # A non-atomic writer's leftover, newer than every good checkpoint: must be set aside, not resumed from.
    (out / "checkpoint-25").mkdir()
    (out / "checkpoint-25" / "model.safetensors").write_bytes(b"partial")

    result = subprocess.run(_train_cmd(cfg), capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ignoring half-written output" in result.stderr
    assert "ignoring incomplete checkpoint" in result.stderr and (out / "incomplete-checkpoint-25").is_dir()
    assert "resuming from" in result.stderr and "checkpoint-20" in result.stderr
    _assert_same_weights(out, reference_run)
    assert not (out / STAGING).exists()


class Poisoned(torch.utils.data.Dataset):
    """Wraps a dataset; the sample at `index` gets NaN pixels (a corrupt input that yields a NaN loss)."""

    def __init__(self, inner: torch.utils.data.Dataset, index: int) -> None:
        self.inner, self.index = inner, index

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int) -> dict:
        item = self.inner[i]
        if i == self.index:
            pixels = item["image_inputs"]["pixel_values"]
            item = {**item, "image_inputs": {**item["image_inputs"], "pixel_values": torch.full_like(pixels, float("nan"))}}
        return item


def _poisoned_run(tmp: Path, phantom: Path, base: Path, mode: str):
    cfg = config_from_dict(stage_dict(tmp, phantom, init_from=base, optim={"max_steps": 6, "per_device_batch_size": 4},
                                      run={"on_nonfinite": mode}, data={"num_workers": 0}))
    run = prepare_sft(cfg)
    dataset = run.trainer.train_dataset  # packed rows (packing is on by default) or single samples
    run.trainer.train_dataset = Poisoned(dataset, index=0)
    ids = dataset[0]["sample_id"]
    return cfg, run, ids[0] if isinstance(ids, list) else ids


def test_nonfinite_loss_stops_with_step_and_sample_ids(tmp_path: Path, phantom: Path, base_models: dict) -> None:
    _, run, poisoned_id = _poisoned_run(tmp_path, phantom, base_models[("clip", "llama")], "stop")
    with pytest.raises(DivergenceError) as info:
        run.trainer.train()
    message = str(info.value)
    assert "non-finite loss" in message and poisoned_id in message
    step = int(message.split("at step ")[1].split(",")[0])
    assert 1 <= step <= 6


def test_nonfinite_batches_can_be_skipped_and_are_counted(tmp_path: Path, phantom: Path, base_models: dict) -> None:
    cfg, run, poisoned_id = _poisoned_run(tmp_path, phantom, base_models[("clip", "llama")], "skip")
    run.trainer.train()
    save_stage_output(cfg, run.trainer, run.processor, run.base_ref)
    out = Path(cfg.run.output_dir)
    report = json.loads((out / "nonfinite.json").read_text())
    assert report["skipped"] >= 1 and all(e["kind"] == "loss" for e in report["events"])
    assert any(poisoned_id in e["sample_ids"] for e in report["events"])
    history = json.loads((out / "train_log.json").read_text())
    assert any(h.get("nonfinite_skipped") for h in history)
    weights = _weights(out)
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_exploding_updates_stop_the_run(tmp_path: Path, phantom: Path, base_models: dict) -> None:
    cfg = config_from_dict(stage_dict(tmp_path, phantom, init_from=base_models[("clip", "llama")],
                                      optim={"lr": 1e30, "max_grad_norm": 0.0, "max_steps": 5}))
    with pytest.raises(DivergenceError, match=r"non-finite (loss|gradient) .* at step [2-5], samples \["):
        run_stage(cfg)


def test_pickle_weights_are_refused_unless_allowed(tmp_path: Path, base_models: dict) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    src = base_models[("clip", "llama")]
    for path in src.iterdir():
        if path.suffix != ".safetensors":
            (folder / path.name).write_bytes(path.read_bytes())
    model, _ = load_model(src)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pickle files .*pytorch_model.bin.*--allow-pickle"):
        load_model(folder)
    from medllava.cli import main

    assert main(["eval", str(folder), "--data", "x.jsonl"]) == 2


def test_tokens_never_reach_logs_configs_or_cards(tmp_path: Path, phantom: Path, base_models: dict) -> None:
    secret_hf, secret_wandb = "hf_SuperSecretTokenValue1234567890", "wandb_SecretKey0987654321abcdef"
    env = {**os.environ, "HF_TOKEN": secret_hf, "WANDB_API_KEY": secret_wandb}
    cfg = stage_dict(tmp_path, phantom, init_from=base_models[("siglip", "qwen2")],
                     trainable={"vision": "frozen", "projector": "full", "llm": "lora"}, optim={"max_steps": 2})
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    outputs = []
    for args in (["train", str(path)],
                 ["export", cfg["run"]["output_dir"], "--out", str(tmp_path / "export"), "--push-to-hub", "me/x",
                  "--dry-run"]):
        result = subprocess.run([sys.executable, "-m", "medllava.cli", *args], capture_output=True, text=True,
                                env=env, cwd=tmp_path, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs.append(result.stdout + result.stderr)
    assert "token: environment (HF_TOKEN)" in outputs[1]
    for text in outputs:
        assert secret_hf not in text and secret_wandb not in text
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "README.md" for p in files) and any(p.name == "medllava_stage.yaml" for p in files)
    for p in files:
        data = p.read_bytes()
        assert secret_hf.encode() not in data and secret_wandb.encode() not in data, p


def test_mixed_precision_resume_restores_every_tensor_in_its_own_dtype(tmp_path: Path, phantom: Path,
                                                                     base_models: dict) -> None:
    """bf16 on CPU: the frozen tower is bf16 and the trainable weights fp32. A run resumed from its step-2
    checkpoint ends bitwise equal to the uninterrupted run (no fp32 weight comes back rounded to bf16)."""
    import shutil

    base = base_models[("clip", "llama")]
    sections = {"optim": {"max_steps": 4, "per_device_batch_size": 4, "lr": 5e-3},
                "run": {"precision": "bf16", "save_steps": 2, "save_total_limit": 5}}
    straight = run_stage(config_from_dict(stage_dict(tmp_path / "a", phantom, init_from=base, **sections)))
    resumed_dir = tmp_path / "b" / "out"
    resumed_dir.mkdir(parents=True)
    shutil.copytree(straight / "checkpoint-2", resumed_dir / "checkpoint-2")
    run = prepare_sft(config_from_dict(stage_dict(tmp_path / "b", phantom, init_from=base, **sections)))
    assert run.checkpoint and run.checkpoint.endswith("checkpoint-2")
    dtypes = {p.dtype for p in run.trainer.model.parameters()}
    assert dtypes == {torch.bfloat16, torch.float32}, dtypes  # the mixed layout this test is about
    run.trainer._load_from_checkpoint(run.checkpoint)
    step2 = load_file(str(straight / "checkpoint-2" / "model.safetensors"))
    restored = {k: v for k, v in run.trainer.model.state_dict().items()}
    fp32 = [k for k, v in restored.items() if v.dtype == torch.float32]
    assert fp32
    saved_fp32 = {k: v for k, v in step2.items() if v.dtype == torch.float32}
    assert sorted(t.float().sum().item() for t in saved_fp32.values()) == \
        sorted(restored[k].sum().item() for k in fp32)  # the same fp32 values, not bf16-rounded ones
    from medllava.train.common import train_and_save

    out = train_and_save(run)
    a, b = _weights(straight), _weights(out)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


class _Scaler:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def is_enabled(self) -> bool:
        return self.enabled


class _Engine:
    """The DeepSpeed engine state the guard reads: the optimizer's overflow flag, fp16, the global grad norm."""

    def __init__(self, overflow: bool, fp16: bool, norm: float) -> None:
        self.optimizer = type("Opt", (), {"overflow": overflow})()
        self._fp16, self._norm = fp16, norm

    def fp16_enabled(self) -> bool:
        return self._fp16

    def get_global_grad_norm(self) -> float:
        return self._norm


def _inf_grad_model() -> torch.nn.Module:
    model = torch.nn.Linear(2, 2)
    model.weight.grad = torch.full_like(model.weight, float("inf"))
    return model


def test_fp16_overflow_is_the_scalers_routine_not_a_divergence() -> None:
    """fp16 with the Trainer's GradScaler: an overflow step leaves inf gradients that the scaler skips itself;
    the guard counts it and stops only when the overflows never end. Without a scaler, inf gradients stop."""
    from medllava.train.safety import DivergenceGuard

    state = type("State", (), {"global_step": 7})()
    guard = DivergenceGuard("stop", max_skips=3)
    guard.loss_scaler = lambda: _Scaler(True)
    for _ in range(3):
        guard.on_pre_optimizer_step(None, state, None, model=_inf_grad_model())
    assert guard.scaler_skips == 3 and not guard.events
    healthy = torch.nn.Linear(2, 2)
    healthy.weight.grad = torch.zeros_like(healthy.weight)
    guard.on_pre_optimizer_step(None, state, None, model=healthy)  # a good step resets the run of overflows
    for _ in range(3):
        guard.on_pre_optimizer_step(None, state, None, model=_inf_grad_model())
    with pytest.raises(DivergenceError, match="4 steps in a row"):
        guard.on_pre_optimizer_step(None, state, None, model=_inf_grad_model())
    plain = DivergenceGuard("stop")  # bf16/fp32: no scaler, so inf gradients are a real divergence
    plain.last_ids = ["rec-3"]
    with pytest.raises(DivergenceError, match="step 8, samples \\['rec-3'\\]"):
        plain.on_pre_optimizer_step(None, state, None, model=_inf_grad_model())


def test_deepspeed_overflow_under_fp16_is_counted_and_under_bf16_stops() -> None:
    from medllava.train.safety import DivergenceGuard

    state = type("State", (), {"global_step": 11})()
    guard = DivergenceGuard("stop", max_skips=2)
    guard.deepspeed_engine = lambda: _Engine(overflow=True, fp16=True, norm=float("inf"))
    guard.on_optimizer_step(None, state, None)
    guard.on_optimizer_step(None, state, None)
    assert guard.scaler_skips == 2
    with pytest.raises(DivergenceError, match="in a row"):
        guard.on_optimizer_step(None, state, None)
    bf16 = DivergenceGuard("stop")
    bf16.deepspeed_engine = lambda: _Engine(overflow=True, fp16=False, norm=float("nan"))
    with pytest.raises(DivergenceError, match="step 12"):
        bf16.on_optimizer_step(None, state, None)
    nan_norm = DivergenceGuard("skip")
    nan_norm.deepspeed_engine = lambda: _Engine(overflow=False, fp16=False, norm=float("nan"))
    with pytest.raises(DivergenceError, match="gradient norm nan"):  # applied already: nothing to skip, so stop
        nan_norm.on_optimizer_step(None, state, None)
