"""The CPU rehearsal of the real recipe families: `scripts/rehearse.sh` runs `./train.sh stages/<family>` on 2
processes with tiny models of the family's architectures and fixtures in the corpora's published layouts.

Both families run through every variant (align, instruct, instruct_lora, instruct_qlora, pass-rate filter, grpo,
grpo_lora, eval after each stage, export): LLaVA-Med v1.5 under torchrun, SigLIP + Qwen2.5 under the DeepSpeed
launcher; accelerate runs a shorter chain. Running a finished family again retrains nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from .conftest import REPO
from .test_ranks import free_port

ALL_STAGES = ["align", "instruct", "instruct_lora", "instruct_qlora", "grpo", "grpo_lora"]


@pytest.fixture(scope="session")
def published_fixtures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fixture data in the published layouts, converted once by the data_recipes/ scripts."""
    work = tmp_path_factory.mktemp("rehearsal_fixtures")
    subprocess.run([str(REPO / ".venv/bin/python"), str(REPO / "scripts/rehearsal_data.py"), str(work)], check=True,
                   capture_output=True, timeout=600)
    return work


def rehearse(family: str, work: Path, launcher: str, stages: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "LAUNCHER": launcher, "STAGES": " ".join(stages), "MASTER_PORT": str(free_port()),
           "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([str(REPO / "scripts/rehearse.sh"), family, str(work)], capture_output=True, text=True,
                          env=env, timeout=1800)


def check_family(work: Path, family: str, stages: list[str], log: str) -> None:
    runs = work / "runs" / family
    summary = json.loads((runs / "summary.json").read_text())
    assert list(summary) == stages
    for stage in stages:
        out = runs / stage
        resolved = yaml.safe_load((out / "medllava_stage.yaml").read_text())
        assert resolved["name"] == yaml.safe_load((REPO / "stages" / family / f"{stage}.yaml").read_text())["name"]
        metrics = json.loads((out / "eval" / "metrics.json").read_text())
        if resolved["kind"] == "grpo":  # evaluated as it trained: think prompt, its completion length
            assert metrics["prompt"] == {"mode": "think", "max_new_tokens": 32, "decoding": "greedy"}
            assert resolved["grpo"]["num_generations"] == 8 and resolved["optim"]["global_batch_size"] == 256
        else:
            assert metrics["prompt"]["mode"] == "plain" and resolved["optim"]["global_batch_size"] == 128
        assert (out / "adapter_config.json").is_file() == ("lora" in stage)
    assert "global batch: 128 samples per optimizer step = 16 per device x 2 rank(s) x 4 accumulation" in log
    if "grpo" in stages:
        assert "global batch: 256 completions per optimizer step = 8 per device x 2 rank(s) x 16 accumulation" in log
        filtered = work / "data" / "vqa" / "rl_train_filtered.jsonl"
        report = json.loads(filtered.with_suffix(".report.json").read_text())
        assert report["prompt"] == "think" and report["n"] == 8 and report["kept"] > 0
    export = runs / "export"
    assert (export / "config.json").is_file() and (export / "README.md").is_file()
    assert "verified with plain transformers" in log


def fresh_work(tmp_path: Path, fixtures: Path) -> Path:
    work = tmp_path / "work"
    shutil.copytree(fixtures / "data", work / "data")
    return work


@pytest.mark.slow
@pytest.mark.parametrize(("family", "launcher"), [("llava_med_v15", "torchrun"), ("siglip_qwen25", "deepspeed")])
def test_rehearsal_of_a_recipe_family(family: str, launcher: str, tmp_path: Path, published_fixtures: Path) -> None:
    if launcher == "deepspeed":
        pytest.importorskip("deepspeed")
    work = fresh_work(tmp_path, published_fixtures)
    result = rehearse(family, work, launcher, ALL_STAGES)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    check_family(work, family, ALL_STAGES, log)

    again = rehearse(family, work, launcher, ALL_STAGES)  # a finished family: nothing retrains
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert again.stdout.count("; skipped)") == len(ALL_STAGES)
    assert "== export: " in again.stdout and "is up to date" in again.stdout
    assert "medllava.train" not in again.stderr


@pytest.mark.slow
def test_rehearsal_under_accelerate(tmp_path: Path, published_fixtures: Path) -> None:
    work = fresh_work(tmp_path, published_fixtures)
    stages = ["align", "instruct_lora"]
    result = rehearse("siglip_qwen25", work, "accelerate", stages)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    assert log.count("rank 1 of 2 joined the process group (gloo)") == 2
    check_family(work, "siglip_qwen25", stages, log)
