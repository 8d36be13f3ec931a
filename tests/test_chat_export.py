"""Chat CLI (one-shot, interactive through a pseudo-terminal, user errors) and export (merge, verify, card, push)."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medllava.chat import ChatSession
from medllava.config import config_from_dict
from medllava.export import export, probe_image, probe_logits, push
from medllava.model import load_model
from medllava.train.stage import run_stage

from .conftest import stage_dict

SECRET = "hf_medllavaTestToken0123456789abcdef"


def _cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medllava.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600, env=env)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory, phantom: Path, base_models: dict) -> Path:
    """A few LoRA steps on the tiny model: an adapter folder whose weights really moved."""
    tmp = tmp_path_factory.mktemp("lora_run")
    cfg = stage_dict(tmp, phantom, init_from=base_models[("clip", "llama")],
                     trainable={"vision": "frozen", "projector": "full", "llm": "lora"}, optim={"lr": 5e-2})
    return run_stage(config_from_dict(cfg))


def test_session_answers_and_keeps_history(base_models: dict, phantom: Path) -> None:
    model, processor = load_model(base_models[("siglip", "qwen2")])
    session = ChatSession(model, processor, max_new_tokens=4)
    session.add_image(Image.open(phantom / "images/test/test_00000.png"))
    streamed: list[str] = []
    first = session.ask("Is there a lesion?", on_text=streamed.append)
    assert first == "".join(streamed).strip()
    session.ask("Which side?")
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    assert len(session.images) == 1
    session.reset()
    assert session.messages == [] and session.images == []


def test_one_shot_answers(base_models: dict, phantom: Path, tmp_path: Path) -> None:
    result = _cli("chat", str(base_models[("clip", "llama")]), "--image", str(phantom / "images/test/test_00001.png"),
                  "--prompt", "Is there a lesion?", "--max-new-tokens", "4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("chat", "no/such/model", "--prompt", "hi"), "no such model folder"),
        (("chat", "MODEL", "--image", "missing.png", "--prompt", "hi"), "image file not found"),
        (("chat", "MODEL", "--image", "notes.txt", "--prompt", "hi"), "not a recognised image format"),
        (("chat", "MODEL", "--window", "widest", "--prompt", "hi"), "--window"),
    ],
)
def test_chat_user_errors_are_one_line(args: tuple, message: str, base_models: dict, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not an image", encoding="utf-8")
    args = tuple(str(base_models[("clip", "llama")]) if a == "MODEL" else a for a in args)
    result = _cli(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("medllava")]
    assert len(lines) == 1 and message in lines[0]


def _read_until(fd: int, marker: str, timeout: float = 120.0) -> str:
    buf = ""
    deadline = time.time() + timeout
    while marker not in buf:
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {marker!r}; got {buf[-500:]!r}")
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 4096).decode(errors="replace")
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
    return buf


def test_interactive_session_through_a_pty(base_models: dict, phantom: Path, tmp_path: Path) -> None:
    image = phantom / "images/test/test_00002.png"
    main_fd, child_fd = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "medllava.cli", "chat", str(base_models[("siglip", "qwen2")]),
                             "--max-new-tokens", "4"], stdin=child_fd, stdout=child_fd, stderr=subprocess.PIPE,
                            cwd=tmp_path, close_fds=True)
    os.close(child_fd)
    try:
        _read_until(main_fd, "you> ")
        os.write(main_fd, f"/image {image}\n".encode())
        assert "image attached" in _read_until(main_fd, "you> ")
        os.write(main_fd, b"/image nope.png\n")
        assert "image file not found" in _read_until(main_fd, "you> ")
        os.write(main_fd, b"Is there a lesion?\n")
        first = _read_until(main_fd, "you> ")
        assert "assistant> " in first
        os.write(main_fd, b"Which side is it on?\n")
        second = _read_until(main_fd, "you> ")
        assert "assistant> " in second
        os.write(main_fd, b"/exit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(main_fd)
    assert b"Traceback" not in proc.stderr.read()


def test_merged_export_matches_the_adapter_and_loads_without_medllava(lora_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "export"
    report = export(lora_run, out, repo_id="someone/tiny-medllava")
    v = report["verification"]
    assert report["merged_adapter"] is True
    assert v["passed"] and v["max_abs_logit_diff"] < 1e-4 and v["merge_max_abs_logit_diff"] < 1e-4
    assert v["dtype"] == "bfloat16" and v["loaded_dtype"] == "float32"  # bf16 by default, merged in fp32
    assert v["rounding_drift_max_abs_logit_diff"] > 0 and 0 < v["rounding_drift_top1_agreement"] <= 1
    assert v["class"] == "LlavaForConditionalGeneration" and v["generated_tokens"] > 0 and v["medllava_imported"] == []
    assert not (out / "adapter_config.json").exists()
    assert {"config.json", "model.safetensors", "generation_config.json", "processor_config.json", "tokenizer.json",
            "chat_template.jinja", "README.md"} <= {p.name for p in out.iterdir()}
    # The merge really changed the weights: the export differs from the base it came from.
    adapter_model, processor = load_model(lora_run, adapter="frozen")
    with adapter_model.disable_adapter():
        base_logits = probe_logits(adapter_model.eval(), processor, probe_image())
    exported, exported_processor = load_model(out)
    exported_logits = probe_logits(exported.eval(), exported_processor, probe_image())
    assert np.abs(exported_logits - base_logits).max() > 1e-3
    card = (out / "README.md").read_text()
    for needle in ("license: apache-2.0", "pipeline_tag: image-text-to-text", "## Training", "## Medical disclaimer",
                   "not a medical device", "## Intended use", "Vision encoder:", "Language model:", "test |"):
        assert needle in card, needle


def test_export_carries_the_stage_eval_settings(lora_run: Path, tmp_path: Path) -> None:
    """Issue 25: `medllava eval` of an export used the plain prompt and 64 tokens whatever the stage trained with.
    The export keeps the last stage's prompt mode, instruction, completion length and window, and eval reads them."""
    import shutil

    import yaml

    from medllava.evaluate import stage_prompt_settings

    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    stage = yaml.safe_load((run / "medllava_stage.yaml").read_text())
    stage["kind"] = "grpo"
    stage["grpo"] = {"prompt": "think", "instruction": "Look closely.", "max_completion_length": 512}
    stage["data"]["window"] = "lung"
    (run / "medllava_stage.yaml").write_text(yaml.safe_dump(stage))
    settings = stage_prompt_settings(run)
    assert (settings.mode, settings.max_new_tokens, settings.window) == ("think", 512, "lung")
    export(run, tmp_path / "export")
    assert stage_prompt_settings(tmp_path / "export") == settings
    assert "think prompt, up to 512 new tokens, window lung" in (tmp_path / "export" / "README.md").read_text()


def test_export_of_a_full_model(base_models: dict, tmp_path: Path) -> None:
    report = export(base_models[("siglip", "qwen2")], tmp_path / "full", dtype="bfloat16")
    assert report["merged_adapter"] is False and report["verification"]["passed"]
    cfg = json.loads((tmp_path / "full/config.json").read_text())
    assert cfg["model_type"] == "llava" and cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"


def test_push_dry_run_lists_files_and_never_shows_the_token(lora_run: Path, tmp_path: Path) -> None:
    env = {**os.environ, "HF_TOKEN": SECRET}
    out = tmp_path / "export"
    result = _cli("export", str(lora_run), "--out", str(out), "--push-to-hub", "someone/tiny-medllava", "--private",
                  "--dry-run", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "would upload" in result.stdout and "private repo someone/tiny-medllava" in result.stdout
    assert "model.safetensors" in result.stdout and "README.md" in result.stdout
    assert "token: environment (HF_TOKEN)" in result.stdout
    assert SECRET not in result.stdout + result.stderr
    for path in out.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    plan = push(out, "someone/tiny-medllava", dry_run=True)
    assert plan["uploaded"] is False and plan["total_bytes"] == sum(f["bytes"] for f in plan["files"])


def test_export_keeps_one_model_in_memory_and_verifies_in_the_saved_dtype(base_models: dict, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """At 7B a second full copy is tens of GB: the exporter's model is released before the verification process
    loads the export, and that process loads it in the dtype it was saved in (not fp32)."""
    import gc
    import weakref

    from safetensors import safe_open

    import medllava.export as ex

    loaded: list = []
    real_load, real_verify = ex.load_model, ex.verify_export

    def tracking_load(*args, **kwargs):
        model, processor = real_load(*args, **kwargs)
        loaded.append(weakref.ref(model))
        return model, processor

    def checking_verify(*args, **kwargs):
        gc.collect()
        assert all(ref() is None for ref in loaded), "the exporter still holds its model during verification"
        return real_verify(*args, **kwargs)

    monkeypatch.setattr(ex, "load_model", tracking_load)
    monkeypatch.setattr(ex, "verify_export", checking_verify)
    out = tmp_path / "export"
    report = ex.export(base_models[("clip", "llama")], out)
    assert loaded and report["verification"]["passed"]
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        assert {fh.get_slice(k).get_dtype() for k in fh.keys()} == {"BF16"}
    v = report["verification"]
    probe = "bfloat16" if ex.cpu_computes_natively(torch.bfloat16) else "float32"  # what this CPU computes natively
    assert v["probe"] == f"{probe} on cpu" and v["max_abs_logit_diff"] <= v["tolerance"] < 0.1
    assert v["max_abs_logit_diff"] < 1e-6  # the same values through the same function (rotary buffers not rounded)
    assert ex.stored_dtype(out) == torch.bfloat16 and ex.stored_dtype(base_models[("clip", "llama")]) == torch.float32
    assert ex.reload_tolerance("float32", np.array([10.0])) == pytest.approx(1e-3)
    assert ex.reload_tolerance("bfloat16", np.array([0.5])) == pytest.approx(2e-2)


@pytest.mark.parametrize("native_bf16", [False, True])
def test_cpu_export_probes_in_what_the_cpu_computes(base_models: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    native_bf16: bool) -> None:
    """A CPU with bf16 instructions probes the bf16 export in bf16 (one copy of the weights in memory: fp32 weights
    stay views of their files); one without them probes in fp32 on the rounded values. Either way the reload gives
    the saved model's logits, and the bf16 files hold the same values."""
    from safetensors.torch import load_file

    import medllava.export as ex

    monkeypatch.setattr(ex, "cpu_computes_natively", lambda dtype: dtype == torch.float32 or native_bf16)
    report = ex.export(base_models[("clip", "llama")], tmp_path / "export")
    v = report["verification"]
    assert v["probe"] == ("bfloat16 on cpu" if native_bf16 else "float32 on cpu")
    assert v["passed"] and v["max_abs_logit_diff"] < 1e-6 and v["rounding_drift_max_abs_logit_diff"] > 0
    other = tmp_path / f"other-{native_bf16}"
    monkeypatch.setattr(ex, "cpu_computes_natively", lambda dtype: dtype == torch.float32 or not native_bf16)
    ex.export(base_models[("clip", "llama")], other)
    a, b = load_file(str(tmp_path / "export" / "model.safetensors")), load_file(str(other / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
