"""GPU-only checks (run by benchmarks/gpu_check.sh on a lent H100/H200; skipped elsewhere)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from medllava.attention import llm_attention, packed_implementation, set_llm_attention
from medllava.config import config_from_dict
from medllava.data.packing import SamplePackingCollator, packing_isolates
from medllava.model import load_model
from medllava.train.sft import prepare_sft
from medllava.train.stage import run_stage

from .conftest import stage_dict

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _gpu_stage(tmp: Path, phantom: Path, base: Path, **sections) -> dict:
    cfg = stage_dict(tmp, phantom, init_from=base, **sections)
    cfg["run"].update(use_cpu=False, precision="bf16")
    return cfg


def test_bf16_full_step_on_gpu(tmp_path: Path, phantom: Path, base_models: dict) -> None:
    out = run_stage(config_from_dict(_gpu_stage(tmp_path, phantom, base_models[("siglip", "qwen2")])))
    model, _ = load_model(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_qlora_step_on_gpu(tmp_path: Path, phantom: Path, base_models: dict) -> None:
    pytest.importorskip("bitsandbytes")
    cfg = _gpu_stage(tmp_path, phantom, base_models[("clip", "llama")], quantization={"bits": 4},
                     trainable={"vision": "frozen", "projector": "full", "llm": "lora"})
    run = prepare_sft(config_from_dict(cfg))
    assert next(run.trainer.model.parameters()).is_cuda
    run.trainer.train()
    losses = [h["loss"] for h in run.trainer.state.log_history if "loss" in h]
    assert losses and all(math.isfinite(x) for x in losses)


def test_deepspeed_zero2_on_gpu(tmp_path: Path, phantom: Path, base_models: dict) -> None:
    pytest.importorskip("deepspeed")
    repo = Path(__file__).resolve().parents[1]
    cfg = _gpu_stage(tmp_path, phantom, base_models[("clip", "llama")], run={"deepspeed": str(repo / "deepspeed_configs/zero2.json")})
    import os

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29611")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    out = run_stage(config_from_dict(cfg))
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize("attn", ["sdpa", "flash_attention_2"])
def test_packing_isolates_in_bf16_on_gpu(attn: str, base_models: dict) -> None:
    """The training layout (one row per micro-batch with its cu_seq_lens) on the attention training uses: SDPA run
    sample by sample for an sdpa LLM, flash-attention's variable-length kernel for a flash LLM."""
    if attn == "flash_attention_2":
        pytest.importorskip("flash_attn")
    model, processor = load_model(base_models[("siglip", "qwen2")], dtype=torch.bfloat16, attn_implementation=attn)
    model.cuda()
    set_llm_attention(model, packed_implementation(attn))
    assert llm_attention(model) == packed_implementation(attn)
    isolated, diff, leak = packing_isolates(model, len(processor.tokenizer), SamplePackingCollator())
    assert isolated, (diff, leak)


LIGER_CHECK = r'''
import sys, torch
from medllava.model import load_model
from transformers.integrations.liger import apply_liger_kernel
model, processor = load_model(sys.argv[1], dtype=torch.float32)
model.cuda().train()
torch.manual_seed(0)
n_img = model.config.image_seq_length
size = model.config.vision_config.image_size
ids = torch.randint(5, len(processor.tokenizer) - 1, (2, n_img + 40), device="cuda")
ids[:, 1:1 + n_img] = model.config.image_token_id
labels = ids.clone()
labels[:, :1 + n_img] = -100
batch = dict(input_ids=ids, labels=labels, pixel_values=torch.randn(2, 3, size, size, device="cuda"))
from medllava.train.loss import head_inputs, supervised_loss
def loss_and_grads(kind):
    model.zero_grad()
    if kind == "full":  # the stock forward: head and loss over every position
        loss = model(**batch).loss
    else:  # the training path: head and loss on the supervised positions (fused by Liger once patched)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        out = model(**inputs, **head_inputs(batch["labels"], liger=kind == "liger"))
        loss = supervised_loss(out, head_inputs(batch["labels"])["labels"])
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
plain_loss, plain_grads = loss_and_grads("full")
kept_loss, kept_grads = loss_and_grads("supervised")
apply_liger_kernel(model, None)  # patches the Llava forward (fused linear cross-entropy) and the LLM's layers
liger_loss, liger_grads = loss_and_grads("liger")
for name, (loss, grads) in {"supervised": (kept_loss, kept_grads), "liger": (liger_loss, liger_grads)}.items():
    worst = max((grads[n] - g).abs().max().item() / (g.abs().max().item() + 1e-8) for n, g in plain_grads.items())
    print(name, plain_loss, loss, worst)
    assert abs(plain_loss - loss) < 1e-4 * max(1.0, abs(plain_loss)), (name, plain_loss, loss)
    assert worst < 1e-3, (name, worst)
'''


@pytest.mark.parametrize("pair", [("clip", "llama"), ("siglip", "qwen2")])
def test_liger_kernels_compute_the_same_loss_and_gradients(pair: tuple, base_models: dict) -> None:
    """The fast paths equal the plain one in fp32: the head and loss on supervised positions, and Liger's fused
    linear cross-entropy (on the same positions), RMSNorm, RoPE and SwiGLU. Liger patches the model class in place,
    so the check runs in its own process."""
    import subprocess
    import sys

    pytest.importorskip("liger_kernel")
    result = subprocess.run([sys.executable, "-c", LIGER_CHECK, str(base_models[pair])], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_bf16_resume_on_gpu_is_bitwise(tmp_path: Path, phantom: Path, base_models: dict) -> None:
    """The CPU test's twin (tests/test_fault_tolerance.py) on CUDA: a resumed bf16 run ends bitwise equal."""
    import shutil

    from safetensors.torch import load_file

    from medllava.train.common import train_and_save

    base = base_models[("clip", "llama")]
    sections = {"optim": {"max_steps": 4, "per_device_batch_size": 4, "lr": 5e-3},
                "run": {"save_steps": 2, "save_total_limit": 5}}
    straight = run_stage(config_from_dict(_gpu_stage(tmp_path / "a", phantom, base, **sections)))
    (tmp_path / "b" / "out").mkdir(parents=True)
    shutil.copytree(straight / "checkpoint-2", tmp_path / "b" / "out" / "checkpoint-2")
    run = prepare_sft(config_from_dict(_gpu_stage(tmp_path / "b", phantom, base, **sections)))
    out = train_and_save(run)
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_bf16_export_probes_on_the_gpu(tmp_path: Path, base_models: dict) -> None:
    from medllava.export import export

    report = export(base_models[("siglip", "qwen2")], tmp_path / "export")
    v = report["verification"]
    assert v["probe"] == "bfloat16 on cuda" and v["passed"], v
