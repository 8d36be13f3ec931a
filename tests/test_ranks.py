"""Many ranks on one CPU machine (gloo): one job, own shards, same weights as one rank, exact resume after a kill,
no ZeRO-3 hang on text-only batches, files written once, and a divergence guard every rank agrees with.

Each multi-process test runs `tests/rank_driver.py` (a stage as `medllava train` runs it) under torchrun or the
DeepSpeed launcher with OMP_NUM_THREADS=1, so two ranks fit on two cores. A hang fails on the timeout.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from medllava.cli import take_launcher_arguments
from medllava.config import ConfigError, config_from_dict

from .conftest import REPO, stage_dict, write_jsonl

DRIVER = Path(__file__).with_name("rank_driver.py")
TIMEOUT = 420  # a hung collective fails the test instead of hanging CI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}


def launch_cmd(n: int, config: Path, *extra: str, launcher: str = "torchrun") -> list[str]:
    if launcher == "deepspeed":  # the `deepspeed` command, from this interpreter (CI does not activate the venv)
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(n), "--master_port",
                str(free_port()), str(DRIVER), str(config), *extra]
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={n}",
            f"--master_port={free_port()}", str(DRIVER), str(config), *extra]


def run_ranks(n: int, config: Path, *extra: str, launcher: str = "torchrun", cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(launch_cmd(n, config, *extra, launcher=launcher), capture_output=True, text=True, env=env(),
                          cwd=cwd, timeout=TIMEOUT)


def write_cfg(tmp: Path, name: str, cfg: dict) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def assert_same_weights(a: Path, b: Path, atol: float) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=atol, rtol=0, msg=key)


# ---------------------------------------------------------------------------------------------------------------
# Fast checks of the pieces


def test_deepspeed_launcher_local_rank_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "unset")  # recorded, so the teardown restores the environment as it was
    monkeypatch.delenv("LOCAL_RANK")
    assert take_launcher_arguments(["--local_rank=1", "train", "x.yaml", "--optim.lr=1"]) == ["train", "x.yaml", "--optim.lr=1"]
    assert os.environ["LOCAL_RANK"] == "1"
    assert take_launcher_arguments(["train", "--local-rank", "0", "x.yaml"]) == ["train", "x.yaml"]


def test_cli_under_the_deepspeed_launcher_arguments(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "medllava.cli", "--local_rank=0", "train", "missing.yaml"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and "no such config file" in result.stderr
    assert "unrecognized arguments" not in result.stderr


def test_global_batch_holds_on_any_number_of_ranks(tmp_path: Path, phantom: Path) -> None:
    cfg = config_from_dict(stage_dict(tmp_path, phantom, vision=tmp_path, llm=tmp_path,
                                      optim={"per_device_batch_size": 4, "global_batch_size": 128}))
    assert [cfg.accumulation(w) for w in (1, 2, 8)] == [32, 16, 4]
    assert {cfg.global_batch(w) for w in (1, 2, 8)} == {128}
    with pytest.raises(ConfigError, match="not a multiple of per_device_batch_size 4 x 3 rank"):
        cfg.accumulation(3)
    with pytest.raises(ConfigError, match="global_batch_size or grad_accum, not both"):
        config_from_dict(stage_dict(tmp_path, phantom, vision=tmp_path, llm=tmp_path,
                                    optim={"global_batch_size": 128, "grad_accum": 4}))


@pytest.mark.parametrize("family", ["llava_med_v15", "siglip_qwen25"])
def test_recipes_state_the_published_global_batch(family: str) -> None:
    from medllava.config import load_config

    for path in sorted((REPO / "stages" / family).glob("*.yaml")):
        cfg = load_config(path)
        expected = {"grpo": 256, "dpo": 64}.get(cfg.kind, 128)  # GRPO: 32 questions x 8 completions; DPO: pairs
        assert cfg.optim.global_batch_size == expected, path.name
        assert {cfg.global_batch(w) for w in (1, 2, 8)} == {expected}, path.name


def test_packing_keeps_the_samples_per_batch(tmp_path: Path, phantom: Path, base_models: dict) -> None:
    """With packing the per-device batch counts samples: every sample of the micro-batch is in the packed rows."""
    from medllava.data.collate import SFTDataset
    from medllava.data.packing import SamplePackingCollator
    from medllava.data.render import Renderer
    from medllava.data.validate import prepare_samples
    from medllava.model import load_model

    _, processor = load_model(base_models[("clip", "llama")])
    renderer = Renderer(processor, "chat", 512)
    samples, _ = prepare_samples([str(phantom / "instruct.jsonl")], renderer, image_folder=phantom / "images",
                                 progress=False)
    dataset = SFTDataset(samples, renderer.images)
    features = [dataset[i] for i in range(6)]
    batch = SamplePackingCollator()(features)
    assert sorted(batch["sample_ids"]) == sorted(f["sample_id"] for f in features)
    assert batch["input_ids"].shape[0] == 1 and len(batch["cu_seq_lens_q"]) == 7  # one row, six samples
    assert int((batch["labels"] != -100).sum()) == sum(int((f["labels"][1:] != -100).sum()) for f in features)


def test_missing_data_fails_before_the_model_loads(tmp_path: Path, phantom: Path) -> None:
    from medllava.train.sft import prepare_sft

    cfg = stage_dict(tmp_path, phantom, vision=tmp_path / "no-tower", llm=tmp_path / "no-llm",
                     data={"train_files": [str(tmp_path / "data/llava_med/align.jsonl")], "made_by": "python -m data_recipes.llava_med ..."})
    with pytest.raises(ConfigError, match=r"align\.jsonl not found \(made by: python -m data_recipes\.llava_med"):
        prepare_sft(config_from_dict(cfg))
    cfg["data"] = {**cfg["data"], "train_files": [str(phantom / "instruct.jsonl")], "image_folder": str(tmp_path / "imgs")}
    with pytest.raises(ConfigError, match="image_folder: .*imgs is not a folder"):
        prepare_sft(config_from_dict(cfg))


def test_missing_filtered_grpo_data_names_the_filter_command(tmp_path: Path, phantom: Path) -> None:
    from medllava.train.grpo import prepare_grpo

    cfg = stage_dict(tmp_path, phantom, init_from=tmp_path / "runs/instruct",
                     grpo={"num_generations": 4, "pass_rate_filter": {"source": [str(phantom / "rl.jsonl")]}})
    cfg["kind"] = "grpo"
    cfg["data"]["train_files"] = [str(tmp_path / "rl_filtered.jsonl")]
    with pytest.raises(ConfigError, match=r"rl_filtered\.jsonl not found \(made by `python -m data_recipes\.pass_rate_filter --stage"):
        prepare_grpo(config_from_dict(cfg))


def test_missing_tracker_fails_before_the_model_loads(tmp_path: Path, phantom: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from medllava.train.sft import prepare_sft

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg = stage_dict(tmp_path, phantom, vision=tmp_path / "no-tower", llm=tmp_path / "no-llm", run={"report_to": "wandb"})
    with pytest.raises(ConfigError, match="run.report_to: wandb is not installed"):
        prepare_sft(config_from_dict(cfg))


# ---------------------------------------------------------------------------------------------------------------
# Two processes


def sft_cfg(tmp: Path, phantom: Path, base: Path, name: str, **sections: dict) -> Path:
    cfg = stage_dict(tmp / name, phantom, init_from=base, **sections)
    cfg["run"].pop("use_cpu")  # a CPU-only machine must be enough: no GPU is visible here
    return write_cfg(tmp, name, cfg)


@pytest.mark.slow
def test_two_ranks_train_as_one_job_each_on_its_own_shard_and_write_once(tmp_path: Path, phantom: Path,
                                                                         tiny_pair_dirs: dict) -> None:
    """LoRA from an encoder + LLM pair: the in-memory base is saved once, the data prepared once, the final folder
    published once; the ranks are one DDP job and share out the samples."""
    vision, llm = tiny_pair_dirs[("clip", "llama")]
    cfg = stage_dict(tmp_path / "lora", phantom, vision=vision, llm=llm,
                     trainable={"vision": "frozen", "projector": "full", "llm": "lora"},
                     optim={"max_steps": -1, "epochs": 1, "per_device_batch_size": 3, "global_batch_size": 6})
    cfg["run"].pop("use_cpu")
    result = run_ranks(2, write_cfg(tmp_path, "lora", cfg), "--record", str(tmp_path / "rec"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    log = result.stderr
    assert "parallel_mode != ParallelMode.DISTRIBUTED" not in log
    ranks = [json.loads((tmp_path / "rec" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and all("DISTRIBUTED" in r["parallel_mode"] for r in ranks)
    assert [r["process_zero"] for r in ranks] == [True, False]
    seen = [{sid for batch in r["batches"] for sid in batch} for r in ranks]
    assert seen[0] and seen[1] and not seen[0] & seen[1], "each rank sees its own shard"
    assert len(seen[0] | seen[1]) == 24  # one epoch of the 24 records, split between the ranks
    assert log.count("saving the in-memory base model") == 1
    assert log.count("data: 24 records ready") == 1, "data checked and rendered once, not once per rank"
    assert log.count("global batch: 6 samples per optimizer step = 3 per device x 2 rank(s) x 1 accumulation") == 2
    out = tmp_path / "lora" / "out"
    assert (out / "adapter_config.json").is_file() and (out / "base" / "config.json").is_file()
    assert json.loads((out / "data_report.json").read_text())["valid"] == 24


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "smolvlm"])
def test_two_ranks_end_with_the_weights_of_one_rank(family: str, tmp_path: Path, phantom: Path,
                                                    base_models: dict) -> None:
    """Llava, a stock Qwen2.5-VL (packed M-RoPE rows, a filler image for micro-batches without one) and a stock
    SmolVLM (each rank's tiles as one block)."""
    if family == "llava":
        base = base_models[("clip", "llama")]
    else:
        from medllava.families import by_name

        base = by_name(family).build_tiny(tmp_path / "base")
    optim = {"max_steps": 3, "per_device_batch_size": 2, "global_batch_size": 8, "lr": 5e-3}
    one = sft_cfg(tmp_path, phantom, base, "one", optim=optim)
    two = sft_cfg(tmp_path, phantom, base, "two", optim=optim)
    for n, cfg in ((1, one), (2, two)):
        result = run_ranks(n, cfg, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-4000:]
    # 1 rank: 4 micro-batches of 2 per step; 2 ranks: 2 each, gradients averaged by DDP. The same 8 samples make
    # each step, so only the order of float32 additions differs (~1e-7 relative per step); after 3 Adam steps at
    # lr 5e-3 that stays far below 1e-5, while one sample more or less per step moves weights by ~1e-3.
    assert_same_weights(tmp_path / "one" / "out", tmp_path / "two" / "out", atol=1e-5)


def kill_when(proc: subprocess.Popen, ready: Path, deadline_s: float = 300) -> None:
    deadline = time.time() + deadline_s
    while time.time() < deadline and not ready.is_dir() and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job: launcher and both ranks
    proc.wait()


def grpo_cfg(tmp: Path, phantom: Path, base: Path, name: str) -> Path:
    cfg = stage_dict(tmp / name, phantom, init_from=base,
                     optim={"max_steps": 6, "per_device_batch_size": 4, "global_batch_size": 8, "lr": 1e-3},
                     run={"save_steps": 2, "save_total_limit": 3})
    cfg["run"].pop("use_cpu")
    cfg["kind"] = "grpo"
    cfg["data"]["train_files"] = [str(phantom / "rl.jsonl")]
    cfg["grpo"] = {"prompt": "plain", "rewards": {"accuracy": 1.0}, "num_generations": 4, "max_completion_length": 6,
                   "log_completions_every": 0}
    return write_cfg(tmp, name, cfg)


def dpo_cfg(tmp: Path, phantom: Path, base: Path, name: str) -> Path:
    """6 full-model DPO steps of 4 pairs (weights 1 to 3, half the rejected sides with images of their own), a
    checkpoint every 2."""
    from tests.test_dpo import dpo_stage, write_pairs

    (tmp / name).mkdir(parents=True, exist_ok=True)
    pairs = write_pairs(tmp / name, phantom)
    cfg = dpo_stage(tmp / name, phantom, base, pairs["trl"])
    cfg["optim"] = {"lr": 1e-3, "max_steps": 6, "per_device_batch_size": 2, "global_batch_size": 4,
                    "warmup_ratio": 0.0}
    cfg["run"].update(save_steps=2, save_total_limit=3)
    cfg["run"].pop("use_cpu")
    return write_cfg(tmp, name, cfg)


def checkpointed_sft_cfg(tmp: Path, phantom: Path, base: Path, name: str) -> Path:
    """8 steps on 2 ranks, a checkpoint every 2: the run the kill and restart tests interrupt."""
    return sft_cfg(tmp, phantom, base, name, optim={"max_steps": 8, "per_device_batch_size": 2, "global_batch_size": 4},
                   run={"save_steps": 2, "save_total_limit": 3})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, phantom: Path, base_models: dict) -> dict[str, Path]:
    """{kind: output folder} of the 2-rank runs nobody interrupted (made once for the tests that interrupt them)."""
    tmp, base, outs = tmp_path_factory.mktemp("uninterrupted"), base_models[("clip", "llama")], {}
    for kind, make in (("sft", checkpointed_sft_cfg), ("grpo", grpo_cfg), ("dpo", dpo_cfg)):
        result = run_ranks(2, make(tmp, phantom, base, f"straight-{kind}"), cwd=tmp)
        assert result.returncode == 0, result.stderr[-4000:]
        outs[kind] = tmp / f"straight-{kind}" / "out"
    return outs


@pytest.mark.slow
def test_two_rank_dpo_ends_with_the_weights_of_one_rank(tmp_path: Path, phantom: Path, base_models: dict,
                                                        uninterrupted: dict) -> None:
    """The same 4 weighted pairs per step on 1 rank (2 micro-batches) and on 2 (one each, gradients averaged)."""
    one = dpo_cfg(tmp_path, phantom, base_models[("clip", "llama")], "one")
    result = run_ranks(1, one, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert_same_weights(tmp_path / "one" / "out", uninterrupted["dpo"], atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sft", "grpo", "dpo"])
def test_sigkill_of_a_two_rank_job_then_rerun_ends_with_the_uninterrupted_weights(kind: str, tmp_path: Path,
                                                                                  phantom: Path, base_models: dict,
                                                                                  uninterrupted: dict) -> None:
    make = {"sft": checkpointed_sft_cfg, "grpo": grpo_cfg, "dpo": dpo_cfg}[kind]
    killed = make(tmp_path, phantom, base_models[("clip", "llama")], "killed")
    proc = subprocess.Popen(launch_cmd(2, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env(),
                            cwd=tmp_path, start_new_session=True)
    out = tmp_path / "killed" / "out"
    kill_when(proc, out / "checkpoint-4")
    assert not (out / "medllava_stage.yaml").exists(), "the kill should land before the stage ends"
    result = run_ranks(2, killed, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "resuming from" in result.stderr
    assert_same_weights(out, uninterrupted[kind], atol=1e-6)


@pytest.mark.slow
def test_zero3_with_a_text_only_rank_does_not_hang(tmp_path: Path, phantom: Path, base_models: dict) -> None:
    """Per-device batch 1 over a text-only, a one-image and a three-image record: in some steps one rank has no
    image, in others the ranks hold 1 and 3 images. Without the idle vision pass the image rank waits forever in
    ZeRO-3's parameter all-gather; different image counts per rank run the vision tower once each all the same."""
    pytest.importorskip("deepspeed")
    rows = [json.loads(line) for line in (phantom / "instruct.jsonl").read_text().splitlines()]
    text_only = {"id": "text-only", "conversations": [{"from": "human", "value": "What does CT stand for?"},
                                                      {"from": "gpt", "value": "Computed tomography."}]}
    three = {"id": "three-images", "images": [rows[1]["image"], rows[2]["image"], rows[3]["image"]],
             "conversations": [{"from": "human", "value": "<image>\n<image>\n<image>\nAny lesion in these?"},
                               {"from": "gpt", "value": "Yes."}]}
    data = write_jsonl(tmp_path / "mixed.jsonl", [rows[0], text_only, three])
    cfg = stage_dict(tmp_path / "z3", phantom, init_from=base_models[("clip", "llama")],
                     optim={"max_steps": 3, "per_device_batch_size": 1, "global_batch_size": 2, "epochs": 3},
                     run={"deepspeed": str(REPO / "deepspeed_configs/zero3.json")})
    cfg["run"].pop("use_cpu")
    cfg["data"]["train_files"] = [str(data)]
    result = run_ranks(2, write_cfg(tmp_path, "z3", cfg), "--record", str(tmp_path / "rec"), launcher="deepspeed",
                       cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    batches = [json.loads((tmp_path / "rec" / f"rank{r}.json").read_text())["batches"] for r in (0, 1)]
    assert any(("text-only" in a) != ("text-only" in b) for a, b in zip(*batches)), "a step with one text-only rank"
    assert any({"three-images", rows[0]["id"]} == {*a, *b} for a, b in zip(*batches)), "a step with 1 and 3 images"
    assert (tmp_path / "z3" / "out" / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_guard_decides_the_same_on_every_rank(mode: str, tmp_path: Path, phantom: Path, base_models: dict) -> None:
    """Rank 1's loss turns NaN at step 2 while rank 0's stays finite: both stop together (no rank left waiting
    in an all-reduce), or both skip that batch and finish."""
    cfg = sft_cfg(tmp_path, phantom, base_models[("clip", "llama")], mode,
                  optim={"max_steps": 4, "per_device_batch_size": 2, "global_batch_size": 4},
                  run={"on_nonfinite": mode})
    result = run_ranks(2, cfg, "--nan-loss-rank", "1", "--nan-step", "2", cwd=tmp_path)
    out = tmp_path / mode / "out"
    if mode == "stop":
        assert result.returncode != 0
        assert "rank 0: DivergenceError: non-finite loss (on another rank) at step 2" in result.stderr
        assert "rank 1: DivergenceError: non-finite loss (loss=nan on rank 1) at step 2" in result.stderr
        assert not (out / "model.safetensors").exists()
    else:
        assert result.returncode == 0, result.stderr[-4000:]
        report = json.loads((out / "nonfinite.json").read_text())
        assert report["skipped"] == 1 and report["events"][0]["step"] == 2


@pytest.mark.slow
def test_guard_sees_nonfinite_gradients_under_deepspeed(tmp_path: Path, phantom: Path, base_models: dict) -> None:
    """Under DeepSpeed param.grad is empty and the optimizer steps inside backward: the guard reads the engine's
    gradient norm and stops at the step whose gradient was NaN, although every loss was finite."""
    pytest.importorskip("deepspeed")
    cfg = sft_cfg(tmp_path, phantom, base_models[("clip", "llama")], "ds",
                  optim={"max_steps": 4, "per_device_batch_size": 2, "global_batch_size": 4},
                  run={"deepspeed": str(REPO / "deepspeed_configs/zero2.json")})
    result = run_ranks(2, cfg, "--nan-grad-step", "2", launcher="deepspeed", cwd=tmp_path)
    assert result.returncode != 0
    assert ("DivergenceError: non-finite gradient (DeepSpeed found non-finite gradients and skipped the update) at "
            "step 2") in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sft", "grpo"])
def test_two_nodes_with_node_local_caches_end_with_the_weights_of_one_node(kind: str, tmp_path: Path, phantom: Path,
                                                                          base_models: dict) -> None:
    """Issue 28: two torchrun agents on loopback acting as two nodes (1 process each), each with its own
    data.cache_dir as on nodes without a shared scratch disk: only global rank 0 built the cache and node 1 died
    with `No such file or directory: .../ids.npy`. Each node's first process now builds (or reuses) its own copy;
    the job ends with the weights of 1 node x 2 processes."""
    base = base_models[("clip", "llama")]
    if kind == "sft":
        make = lambda name: sft_cfg(tmp_path, phantom, base, name,  # noqa: E731
                                    optim={"max_steps": 3, "per_device_batch_size": 2, "global_batch_size": 4})
    else:
        make = lambda name: grpo_cfg(tmp_path, phantom, base, name)  # noqa: E731
    one = make("one")
    result = run_ranks(2, one, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    two = yaml.safe_load(make("two").read_text())
    port, procs = free_port(), []
    for node in (0, 1):
        two["data"]["cache_dir"] = str(tmp_path / f"node{node}-cache")
        config = write_cfg(tmp_path, f"two-node{node}", two)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1",
             "--master_addr=127.0.0.1", f"--master_port={port}", str(DRIVER), str(config)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=tmp_path))
    logs = [p.communicate(timeout=TIMEOUT) for p in procs]
    for p, (_, err) in zip(procs, logs):
        assert p.returncode == 0, err[-4000:]
    for node in (0, 1):  # each node made its own copy of the data
        made = [f for f in (tmp_path / f"node{node}-cache").iterdir() if (f / "COMPLETE").is_file()]
        assert len(made) == 1, list((tmp_path / f"node{node}-cache").iterdir())
    assert_same_weights(tmp_path / "one" / "out", tmp_path / "two" / "out", atol=1e-6 if kind == "grpo" else 1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Issue 28: the ground floor, one device per process, shared output, restarts, hangs


def test_dist_is_the_ground_floor_and_the_one_place_that_reads_ranks() -> None:
    """medllava/dist.py imports no other medllava module (the model code and the trainers both use it), and nothing
    imports the old medllava.train.ranks."""
    import ast

    tree = ast.parse((REPO / "medllava" / "dist.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not [m for m in imported if m.startswith("medllava")], imported
    assert not (REPO / "medllava" / "train" / "ranks.py").exists()
    for path in (REPO / "medllava").rglob("*.py"):
        assert "train.ranks" not in path.read_text(), path


def test_one_process_with_several_gpus_trains_on_one_never_dataparallel(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """Issue 28: a plain `medllava train` that sees several GPUs fell into transformers' DataParallel (the batch
    multiplied by the GPU count). The GPU count is simulated: the trainer keeps one device and says how to launch."""
    from transformers import TrainingArguments

    from medllava.train.sft import MedLlavaTrainer

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to=[], use_cpu=True)
    assert args.device.type == "cpu"
    args._n_gpu = 3  # what _setup_devices finds on a host with three visible GPUs and no launcher
    with caplog.at_level("WARNING"):
        trainer = MedLlavaTrainer(model=torch.nn.Linear(2, 2), args=args)
    assert trainer.args.n_gpu == 1 and trainer._train_batch_size == 4
    assert "3 GPUs are visible to this one process" in caplog.text and "NPROC=3 ./train.sh" in caplog.text


def test_hang_message_names_the_silent_rank_and_the_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """The watchdog reads every rank's heartbeat from the launcher's store: a rank heard long ago (or never) is
    named, with this rank's step."""
    import torch.distributed as tdist

    from medllava import dist as mdist

    port = free_port()
    server = tdist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "3", "RANK": "0",
                       "TORCHELASTIC_RESTART_COUNT": "0"}.items():
        monkeypatch.setenv(key, value)
    watchdog = mdist.HangWatchdog(timeout_s=5, interval_s=0.5)
    watchdog._store = mdist._heartbeat_store()
    watchdog.progress(7)
    watchdog._beat()
    now = time.time()
    tdist.PrefixStore(mdist.heartbeat_prefix(), server).set("1", json.dumps({"step": 7, "time": now - 60, "host": "node-b"}))
    message = watchdog.describe(now)
    assert "rank 0 on" in message and "no progress for 5 s at step 7" in message
    assert "rank(s) 1, 2 stopped answering or fell behind" in message
    assert "rank 1 on node-b: step 7, heard 60 s ago" in message and "rank 2: never heard" in message


def _rank_pids(agent: int) -> dict[int, int]:
    """{global rank: pid} of the worker processes a torchrun agent started (read from /proc)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == agent:
            env_vars = dict(item.split(b"=", 1) for item in environ if b"=" in item)
            if b"RANK" in env_vars:
                found[int(env_vars[b"RANK"])] = int(proc.name)
    return found


def _wait_for(path: Path, proc: subprocess.Popen, deadline_s: float = 300) -> None:
    deadline = time.time() + deadline_s
    while time.time() < deadline and not path.is_dir() and proc.poll() is None:
        time.sleep(0.02)
    assert path.is_dir(), f"{path} never appeared"


@pytest.mark.slow
def test_a_killed_rank_under_max_restarts_resumes_and_ends_with_the_uninterrupted_weights(
        tmp_path: Path, phantom: Path, base_models: dict, uninterrupted: dict) -> None:
    """Issue 28: under `torchrun --max-restarts=1`, rank 1 killed mid-stage makes torchrun restart the job, which
    resumes from the newest checkpoint and ends with the weights of a run nobody killed."""
    killed = checkpointed_sft_cfg(tmp_path, phantom, base_models[("clip", "llama")], "killed")
    # torchrun's restarts need its c10d rendezvous (what --standalone and train.sh's many-node launch use)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--max-restarts=1", "--nnodes=1", "--nproc_per_node=2",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", str(DRIVER), str(killed)]
    log = (tmp_path / "killed.log").open("w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env(), cwd=tmp_path,
                            start_new_session=True)
    try:
        out = tmp_path / "killed" / "out"
        _wait_for(out / "checkpoint-4", proc)
        os.kill(_rank_pids(proc.pid)[1], signal.SIGKILL)
        assert proc.wait(timeout=240) == 0, (tmp_path / "killed.log").read_text()[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = (tmp_path / "killed.log").read_text()
    assert text.count("rank 1 of 2 joined the process group") == 2, "torchrun restarted the job once"
    assert "resuming from" in text
    assert_same_weights(out, uninterrupted["sft"], atol=1e-6)


@pytest.mark.slow
def test_a_hung_rank_ends_the_job_naming_the_rank_and_step_within_the_set_time(tmp_path: Path, phantom: Path,
                                                                            base_models: dict) -> None:
    """Issue 28: rank 1 frozen (SIGSTOP) mid-stage left rank 0 waiting in its next collective for the process
    group's timeout (an hour). With run.hang_timeout_s 8, rank 0 ends within the set time, naming itself, its step
    and rank 1 as the rank that stopped answering; the launcher then ends the job."""
    cfg = sft_cfg(tmp_path, phantom, base_models[("clip", "llama")], "hung",
                  optim={"max_steps": 400, "per_device_batch_size": 2, "global_batch_size": 4},
                  run={"save_steps": 2, "hang_timeout_s": 8})
    log = (tmp_path / "hung.log").open("w+")
    proc = subprocess.Popen(launch_cmd(2, cfg), stdout=log, stderr=subprocess.STDOUT, text=True, env=env(),
                            cwd=tmp_path, start_new_session=True)
    try:
        _wait_for(tmp_path / "hung" / "out" / "checkpoint-2", proc)
        pids = _rank_pids(proc.pid)
        os.kill(pids[1], signal.SIGSTOP)
        frozen = time.time()
        while time.time() - frozen < 120 and Path(f"/proc/{pids[0]}").exists() and \
                "zombie" not in Path(f"/proc/{pids[0]}/status").read_text():
            time.sleep(0.1)
        waited = time.time() - frozen
        os.kill(pids[1], signal.SIGCONT)  # the launcher's SIGTERM reaches a frozen process only once it runs
        assert proc.wait(timeout=120) != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = (tmp_path / "hung.log").read_text()
    assert waited < 30, (waited, text[-3000:])  # hang_timeout_s 8, counted from the last progress
    assert "rank 0 on" in text and "made no progress for 8 s at step" in text, text[-3000:]
    assert "rank(s) 1 stopped answering or fell behind" in text
    assert "rank 1 on" not in text.split("made no progress")[0][-300:], "the frozen rank does not blame the others"
    # woken by SIGCONT, rank 1 said why, or the launcher's SIGTERM ended it first (torchrun writes the exit code as
    # "failed (exitcode: -15)" or, in its summary, "exitcode  : -15")
    assert "rank 1 was frozen for" in text or re.search(r"exitcode\s*:\s*-15\b", text), text[-3000:]
    assert re.search(r"exitcode\s*:\s*75\b", text) or "exit code 75" in text.lower(), text[-3000:]


@pytest.mark.slow
def test_an_output_folder_the_nodes_do_not_share_fails_fast_naming_the_ranks(tmp_path: Path, phantom: Path,
                                                                            base_models: dict) -> None:
    """Issue 28: two loopback nodes whose run.output_dir resolves to different folders (a relative path on node-local
    disks) trained on, with rank 0 alone writing checkpoints a restart of node 1 could never read. The stage now
    stops before the model loads, naming the rank and host that cannot see the output folder."""
    cfg = yaml.safe_load(sft_cfg(tmp_path, phantom, base_models[("clip", "llama")], "local").read_text())
    cfg["run"]["output_dir"] = "runs/local"  # resolved in each node's own working folder
    cfg["run"]["shared_output_wait_s"] = 2
    config = write_cfg(tmp_path, "local", cfg)
    port, procs = free_port(), []
    for node in (0, 1):
        (tmp_path / f"node{node}").mkdir()
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1",
             "--master_addr=127.0.0.1", f"--master_port={port}", str(DRIVER), str(config)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(), cwd=tmp_path / f"node{node}"))
    logs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    assert all(p.returncode != 0 for p in procs)
    text = "\n".join(logs)
    assert "run.output_dir runs/local is not one folder every rank can use: rank 1 on" in text, text[-3000:]
    assert "cannot see (within 2 s) the file rank 0 wrote there" in text
    assert "loading" not in text.lower() or "model" not in text.split("is not shared")[0].lower()
    assert not (tmp_path / "node0" / "runs" / "local" / "checkpoint-1").exists()


# ---------------------------------------------------------------------------------------------------------------
# Issue 28: train.sh on many nodes (medllava/launch.py builds each node's launcher command)


def test_slurm_first_host_of_a_node_list() -> None:
    from medllava.launch import first_host

    assert first_host("gpu[07-09,12],cpu1") == "gpu07"
    assert first_host("node3,node4") == "node3"
    assert first_host("a100-[001-004]-ib") == "a100-001-ib"
    assert first_host("single") == "single"
    assert first_host("r[1-2]-n[01-04],x1") == "r1-n01"


def test_layout_from_slurm_and_from_explicit_variables() -> None:
    from medllava.launch import LaunchError, layout_from_env

    slurm = {"SLURM_JOB_ID": "123456", "SLURM_NNODES": "4", "SLURM_NODEID": "2", "SLURM_GPUS_ON_NODE": "8",
             "SLURM_JOB_NODELIST": "gpu[10-13]"}
    layout = layout_from_env(slurm, gpus=0)
    assert (layout.nnodes, layout.node_rank, layout.nproc, layout.master_addr) == (4, 2, 8, "gpu10")
    assert layout.master_port == 20000 + 123456 % 10000 and layout.job_id == "123456"
    mine = layout_from_env({**slurm, "NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1",
                            "MASTER_PORT": "29600", "NPROC": "4"}, gpus=8)
    assert (mine.nnodes, mine.node_rank, mine.nproc, mine.master_addr, mine.master_port) == (2, 1, 4, "10.0.0.1",
                                                                                              29600)
    one = layout_from_env({}, gpus=3)
    assert (one.nnodes, one.node_rank, one.nproc) == (1, 0, 3) and layout_from_env({}, gpus=0).nproc == 1
    assert not one.addr_given and mine.addr_given and layout.addr_given
    step = layout_from_env({**slurm, "SLURM_STEP_NODELIST": "gpu[12-13]"}, gpus=0)  # srun on part of the job
    assert step.master_addr == "gpu12"
    with pytest.raises(LaunchError, match="set MASTER_ADDR"):
        layout_from_env({"NNODES": "2", "NODE_RANK": "1"}, gpus=1)
    with pytest.raises(LaunchError, match="NODE_RANK=2 is not a node of NNODES=2"):
        layout_from_env({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h"}, gpus=1)
    with pytest.raises(LaunchError, match="NPROC='eight' is not a whole number"):
        layout_from_env({"NPROC": "eight"}, gpus=1)


def test_each_launcher_joins_the_nodes() -> None:
    """The command every node runs for 2 nodes x 8 GPUs, node 1, rendezvous at host0:29600."""
    from medllava.launch import LaunchError, Layout, launch_command

    layout = Layout(nnodes=2, node_rank=1, nproc=8, master_addr="host0", master_port=29600, job_id="77")
    torchrun = launch_command("torchrun", layout, ["train", "s.yaml"], max_restarts=2, python="py")
    assert torchrun == ["py", "-m", "torch.distributed.run", "--nproc_per_node=8", "--max-restarts=2", "--nnodes=2",
                        "--node_rank=1", "--rdzv-backend=c10d", "--rdzv-endpoint=host0:29600", "--rdzv-id=77",
                        "-m", "medllava.cli", "train", "s.yaml"]
    accelerate = launch_command("accelerate", layout, ["train", "s.yaml"], python="py")
    flags = dict(zip(accelerate[4:-6:2], accelerate[5:-6:2]))
    assert accelerate[3] == "--multi_gpu" and flags["--num_processes"] == "16" and flags["--num_machines"] == "2"
    assert flags["--machine_rank"] == "1" and flags["--main_process_ip"] == "host0"
    assert accelerate[-6:-4] == ["--rdzv_backend", "c10d"]  # a restarted node can re-join
    deepspeed = launch_command("deepspeed", layout, ["train", "s.yaml"], hostfile="hosts", python="py")
    assert deepspeed == ["py", "-m", "deepspeed.launcher.runner", "--master_port", "29600", "--master_addr", "host0",
                         "--hostfile", "hosts", "--no_ssh", "--node_rank", "1", "--module", "medllava.cli", "train",
                         "s.yaml"]
    # HOSTFILE alone (run once on node 0, DeepSpeed starts the nodes over ssh): DeepSpeed finds the first host's
    # address itself; a 127.0.0.1 would send the remote ranks to their own loopback
    ssh = launch_command("deepspeed", Layout(nproc=8), ["train"], hostfile="hosts", python="py")
    assert "--master_addr" not in ssh and ssh[ssh.index("--hostfile") + 1] == "hosts" and "--no_ssh" not in ssh
    with pytest.raises(LaunchError, match="does not restart failed ranks"):
        launch_command("deepspeed", layout, ["train"], max_restarts=1)
    made = launch_command("deepspeed", layout, ["train"], python="py")  # no HOSTFILE: one is written
    assert Path(made[made.index("--hostfile") + 1]).read_text() == "node0 slots=8\nnode1 slots=8\n"
    single = launch_command("torchrun", Layout(nproc=4), ["train"], python="py")
    assert "--standalone" in single and not any(a.startswith("--nnodes") for a in single)
    with pytest.raises(LaunchError, match="LAUNCHER='mpirun'"):
        launch_command("mpirun", layout, ["train"])


def test_train_sh_reads_the_layout_and_refuses_an_impossible_one(tmp_path: Path) -> None:
    clean = {k: v for k, v in env().items() if not k.startswith("SLURM_") and k not in
             ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC", "JOB_ID", "LAUNCHER", "MAX_RESTARTS")}
    layout = subprocess.run([sys.executable, "-m", "medllava.launch", "--layout"], capture_output=True, text=True,
                            env={**clean, "SLURM_JOB_ID": "9", "SLURM_NNODES": "2", "SLURM_NODEID": "1",
                                 "SLURM_JOB_NODELIST": "n[1-2]", "NPROC": "1"}, check=True).stdout
    assert layout.split() == ["NNODES=2", "NODE_RANK=1", "NPROC=1", "MASTER_ADDR=n1", "MASTER_PORT=20009",
                              "JOB_ID=9"]
    bad = subprocess.run([sys.executable, "-m", "medllava.launch", "--", "train", "x.yaml"], capture_output=True,
                         text=True, env={**clean, "NNODES": "2", "NODE_RANK": "0"})
    assert bad.returncode == 2 and "set MASTER_ADDR" in bad.stderr
