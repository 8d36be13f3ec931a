"""The CPU rehearsal of the real recipe families: `scripts/rehearse.sh` runs `./train.sh stages/<family>` on 2
processes with tiny models of the family's architectures and fixtures in the corpora's published layouts.

Both families run through every variant (align, instruct, instruct_lora, instruct_qlora, pass-rate filter, grpo,
grpo_lora, eval after each stage, export): LLaVA-Med v1.5 under torchrun, SigLIP + Qwen2.5 under the DeepSpeed
launcher; accelerate runs a shorter chain; all three at once. Running a finished family again retrains nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from .conftest import REPO
from .test_ranks import free_port

ALL_STAGES = ["align", "instruct", "instruct_lora", "instruct_qlora", "dpo_lora", "grpo", "grpo_lora"]


@pytest.fixture(scope="session")
def published_fixtures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fixture data in the published layouts, converted once by the data_recipes/ scripts."""
    work = tmp_path_factory.mktemp("rehearsal_fixtures")
    subprocess.run([str(REPO / ".venv/bin/python"), str(REPO / "scripts/rehearsal_data.py"), str(work)], check=True,
                   capture_output=True, timeout=600)
    return work


LOOPBACK_NODES = {"medgemma": 2}  # jobs run as 2 loopback nodes x 1 process instead of 1 node x 2 (issue 28)


def _env(launcher: str, stages: list[str] | None, nodes: int = 1) -> dict[str, str]:
    """The rehearsal's environment; stages None: the recipe folder's own chain (train.sh's default)."""
    env = {**os.environ, "LAUNCHER": launcher, "MASTER_PORT": str(free_port()), "CUDA_VISIBLE_DEVICES": ""}
    for key in ("STAGES", "NNODES", "NODE_RANK", "MASTER_ADDR", "NPROC"):
        env.pop(key, None)
    if nodes > 1:
        env.update(NNODES=str(nodes), NPROC=str(2 // nodes))
    return {**env, "STAGES": " ".join(stages)} if stages is not None else env


def rehearse_together(jobs: dict[str, tuple[str, Path, str, list[str] | None]]) -> dict[str, subprocess.CompletedProcess]:
    """Several runs of scripts/rehearse.sh at once ({name: (family, work, launcher, stages)}). On 2 cores
    one family's single-process phases (interpreter start-up, evaluation, filter, export) overlap the other's
    training, so together they take much less than one after the other."""
    procs = {}
    with contextlib.ExitStack() as files:
        for name, (family, work, launcher, stages) in jobs.items():
            work.mkdir(parents=True, exist_ok=True)
            out, err = (files.enter_context((work / f"rehearsal.{kind}").open("w")) for kind in ("out", "err"))
            procs[name] = subprocess.Popen([str(REPO / "scripts/rehearse.sh"), family, str(work)], text=True,
                                           stdout=out, stderr=err,
                                           env=_env(launcher, stages, LOOPBACK_NODES.get(name, 1)))
        for proc in procs.values():
            proc.wait(timeout=1800)
    return {name: subprocess.CompletedProcess(proc.args, proc.returncode, (jobs[name][1] / "rehearsal.out").read_text(),
                                              (jobs[name][1] / "rehearsal.err").read_text())
            for name, proc in procs.items()}


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
            assert metrics["prompt"]["mode"] == "plain"
            assert resolved["optim"]["global_batch_size"] == (64 if resolved["kind"] == "dpo" else 128)
        assert (out / "adapter_config.json").is_file() == ("lora" in stage)
    assert "global batch: 128 samples per optimizer step = 16 per device x 2 rank(s) x 4 accumulation" in log
    if "dpo_lora" in stages:  # pairs made from the QLoRA stage's model, then LoRA DPO on its merged weights
        assert "global batch: 64 pairs per optimizer step = 8 per device x 2 rank(s) x 4 accumulation" in log
        pairs = json.loads((work / "data" / "vqa" / f"dpo_pairs_{family}.report.json").read_text())
        assert pairs["made"].get("image:blank", 0) > 0 and pairs["made"].get("image:lesion", 0) > 0
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


FAMILIES = {"llava_med_v15": "torchrun", "siglip_qwen25": "deepspeed"}


@pytest.mark.slow
def test_rehearsal_of_the_recipe_families(tmp_path: Path, published_fixtures: Path) -> None:
    """Both families through every variant (LLaVA-Med v1.5 under torchrun, SigLIP + Qwen2.5 under the DeepSpeed
    launcher) and the accelerate launcher on a shorter chain, run at the same time; then each family again:
    nothing retrains."""
    import importlib.util

    jobs = {f"{family}-{launcher}": (family, fresh_work(tmp_path / family, published_fixtures), launcher, ALL_STAGES)
            for family, launcher in FAMILIES.items() if launcher != "deepspeed" or importlib.util.find_spec("deepspeed")}
    accelerate_stages = ["align"]  # the launcher itself; LoRA and the rest run under torchrun and DeepSpeed
    jobs["accelerate"] = ("siglip_qwen25", fresh_work(tmp_path / "accelerate", published_fixtures), "accelerate",
                          accelerate_stages)
    results = rehearse_together(jobs)
    for name, result in results.items():
        log = result.stdout + result.stderr
        assert result.returncode == 0, f"{name}: {log[-6000:]}"
        family, work, _, stages = jobs[name]
        check_family(work, family, stages, log)
    log = results["accelerate"].stdout + results["accelerate"].stderr
    assert log.count("rank 1 of 2 joined the process group (gloo)") == 1

    del jobs["accelerate"]
    again = rehearse_together(jobs)  # a finished family: nothing retrains
    for name, result in again.items():
        assert result.returncode == 0, f"{name}: {(result.stdout + result.stderr)[-4000:]}"
        assert result.stdout.count("; skipped)") == len(ALL_STAGES)
        assert "== export: " in result.stdout and "is up to date" in result.stdout
        assert "medllava.train" not in result.stderr


MODEL_FAMILIES = {"qwen25vl_medvlthinker": ("deepspeed", ["instruct", "dpo", "grpo"]),
                  "medgemma": ("torchrun", ["instruct_lora", "dpo_lora", "grpo_lora"])}


@pytest.mark.slow
def test_rehearsal_of_the_model_family_recipes(tmp_path: Path, published_fixtures: Path) -> None:
    """The recipes that start from a released VLM, from a tiny stock model of its family (`medllava tiny
    --family`): Qwen2.5-VL (SFT warm start with packed M-RoPE rows, then GRPO with a KL reference) under the
    DeepSpeed launcher with ZeRO-3, MedGemma (LoRA SFT on padded batches, then LoRA GRPO) under torchrun on two
    loopback nodes of one process each (train.sh per node, node-local data caches, node 0 filtering, evaluating
    and exporting while node 1 waits); both at once, each evaluated after every stage and exported."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    jobs = {family: (family, fresh_work(tmp_path / family, published_fixtures), launcher, None)
            for family, (launcher, _) in MODEL_FAMILIES.items()}
    results = rehearse_together(jobs)
    for family, result in results.items():
        log = result.stdout + result.stderr
        assert result.returncode == 0, f"{family}: {log[-6000:]}"
        stages = MODEL_FAMILIES[family][1]
        runs = jobs[family][1] / "runs" / family
        assert list(json.loads((runs / "summary.json").read_text())) == stages
        for stage in stages:
            resolved = yaml.safe_load((runs / stage / "medllava_stage.yaml").read_text())
            assert resolved["name"] == yaml.safe_load((REPO / "stages" / family / f"{stage}.yaml").read_text())["name"]
            metrics = json.loads((runs / stage / "eval" / "metrics.json").read_text())
            assert metrics["prompt"]["mode"] == ("think" if resolved["kind"] == "grpo" else "plain")
        assert "global batch: 128 samples per optimizer step = 16 per device x 2 rank(s) x 4 accumulation" in log
        assert "global batch: 256 completions per optimizer step = 8 per device x 2 rank(s) x 16 accumulation" in log
        assert "global batch: 64 pairs per optimizer step = 8 per device x 2 rank(s) x 4 accumulation" in log
        dpo_stage = [s for s in stages if s.startswith("dpo")][0]
        pairs = json.loads((jobs[family][1] / "data" / "vqa" / f"dpo_pairs_{family}.report.json").read_text())
        assert pairs["made"].get("image:blank", 0) > 0 and pairs["made"].get("image:lesion", 0) > 0  # SLAKE's masks
        facts = json.loads((runs / dpo_stage / "medllava_run.json").read_text())
        assert facts["batch_unit"] == "pairs" and facts["pair_recipes"]
        exported = json.loads((runs / "export" / "config.json").read_text())
        assert exported["model_type"] == {"qwen25vl_medvlthinker": "qwen2_5_vl", "medgemma": "gemma3"}[family]
        assert "verified with plain transformers" in log
    logs = {family: result.stdout + result.stderr for family, result in results.items()}
    assert "packing on" in logs["qwen25vl_medvlthinker"]  # M-RoPE rows, isolation probed on the model
    assert "packing off: Gemma 3 attends bidirectionally" in logs["medgemma"]
    work = jobs["medgemma"][1]  # two nodes: each made its own data cache, node 0 alone filtered
    assert "== node 0 of 2 (1 processes each)" in logs["medgemma"]
    node1 = (work / "node1.log").read_text()
    assert "grpo_lora.yaml -> runs/medgemma/grpo_lora" in node1 and "== export" not in node1
    assert "== pass_rate_filter: from" not in node1  # node 0 filtered; node 1 waited for it (or found it)
    assert "== preference_pairs: from" not in node1 and "== preference_pairs: from" in logs["medgemma"]
    assert "16 per device x 2 rank(s) x 4 accumulation" in node1
    for node in (0, 1):
        assert sorted(p.name.split("-")[0] for p in (work / f"node{node}-cache").iterdir() if p.is_dir()) == \
            ["dpo", "rl", "sft"]
