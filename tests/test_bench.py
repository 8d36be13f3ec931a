"""The throughput benchmark runs end to end on the tiny preset (CPU) and reports every mode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medllava.bench import PRESETS, BenchSettings, count_flops, markdown, run_benchmark


@pytest.mark.slow
def test_tiny_benchmark_all_modes(tmp_path: Path) -> None:
    pytest.importorskip("trl")
    report = run_benchmark(BenchSettings(preset="tiny", samples=48, steps=3, warmup=1, batch_size=4, max_length=512,
                                         median_answer_tokens=40, profile_steps=1))
    modes = {r["mode"]: r for r in report["results"]}
    assert set(modes) == {"packed", "padded", "trl"}
    for r in modes.values():
        assert r["tokens_per_s"] > 0 and r["samples"] > 0 and r["flops"] > 0 and r["peak_memory_gb"] > 0
        assert r["activation_mb"] > 0
    assert modes["packed"]["padding_fraction"] == 0 < modes["padded"]["padding_fraction"]
    # exactly the measured steps are counted (not warm-up, not the memory or profiled steps after them), and every
    # mode trains on the same samples per step
    assert modes["packed"]["samples"] == modes["padded"]["samples"] == modes["trl"]["samples"] == 3 * 4
    # the same samples without padding keep less for backward, and the head runs on supervised positions only
    assert modes["packed"]["activation_mb"] < modes["padded"]["activation_mb"]
    assert 0 < modes["packed"]["logits_mb"] < modes["padded"]["logits_mb"]  # TRL's fused head materialises none
    assert all("aten::" in r["extra"]["profile"] for r in modes.values())
    table = markdown(report)
    assert "| packed |" in table and "vs TRL" in table
    json.dumps(report)


def test_flop_count_scales_with_tokens() -> None:
    import torch

    from medllava.bench import build_bench_model

    model, _ = build_bench_model("tiny", torch.float32, torch.device("cpu"))
    one = count_flops(model, [100], 1, "full")
    two = count_flops(model, [100, 100], 2, "full")
    assert two == pytest.approx(2 * one)
    assert count_flops(model, [100], 1, "lora") < one
    assert {"clip-qwen2.5-1.5b", "clip-qwen2.5-7b", "clip-mistral-7b", "tiny"} <= set(PRESETS)


def test_liger_mode_must_come_last() -> None:
    from medllava.config import ConfigError

    with pytest.raises(ConfigError, match="liger mode must come last"):
        run_benchmark(BenchSettings(preset="tiny", modes=("liger", "packed")))


def test_liger_mode_where_it_cannot_run_is_an_error() -> None:
    from medllava.config import ConfigError
    from medllava.train.common import liger_problem

    if liger_problem() is None:
        pytest.skip("Liger can run here")
    with pytest.raises(ConfigError, match="mode liger"):
        run_benchmark(BenchSettings(preset="tiny", modes=("packed", "liger")))


@pytest.mark.slow
def test_grpo_real_size_script_smoke_on_cpu(tmp_path: Path) -> None:
    """The GPU script's logic, on the tiny preset: a report with the generation / training split per step."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "grpo_real_size.json"
    result = subprocess.run([sys.executable, str(repo / "benchmarks/grpo_real_size.py"), "--cpu", "--preset", "tiny",
                             "--steps", "2", "--generations", "2", "--completion-length", "8", "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["steps"] == 2 and report["generation_s_per_step"] > 0 and report["train_s_per_step"] > 0
    summary = subprocess.run([sys.executable, str(repo / "benchmarks/summarize.py"), str(tmp_path)],
                             capture_output=True, text=True, timeout=120)
    assert summary.returncode == 0 and "generation s/step" in summary.stdout, summary.stderr[-2000:]


@pytest.mark.slow
def test_bench_command_runs_each_mode_in_its_own_process_on_cpu(tmp_path: Path) -> None:
    """`medllava bench` on CPU: one fresh process per mode (so each peak-memory figure is its own), one report."""
    from medllava.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "--preset", "tiny", "--modes", "packed,padded", "--samples", "24", "--steps", "2",
                 "--warmup", "1", "--batch-size", "4", "--max-length", "512", "--median-answer-tokens", "40",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["mode"] for r in report["results"]] == ["packed", "padded"]
    assert report["settings"]["modes"] == ["packed", "padded"]
    assert all(r["tokens_per_s"] > 0 and r["peak_memory_gb"] > 0 for r in report["results"])
    assert "| padded |" in out.with_suffix(".md").read_text()


def test_peer_benchmark_writes_the_bench_samples_in_llamafactory_form(tmp_path: Path) -> None:
    """benchmarks/peer_llamafactory.py gives LLaMA-Factory the bench's own model and samples (sharegpt form, images
    that exist) and reports its modes against medllava's packed path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("peer", Path(__file__).parents[1] / "benchmarks/peer_llamafactory.py")
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)
    meta = peer.prepare(tmp_path, samples=6, max_length=1024, median_answer_tokens=20, seed=0)
    assert meta["samples"] == 6 and (tmp_path / "model" / "config.json").is_file()
    info = json.loads((tmp_path / "data" / "dataset_info.json").read_text())["bench"]
    rows = json.loads((tmp_path / "data" / info["file_name"]).read_text())
    assert info["columns"] == {"messages": "conversations", "images": "images"} and len(rows) == 6
    for row in rows:
        assert row["conversations"][0]["value"].startswith("<image>") and Path(row["images"][0]).is_file()

    def result(mode: str, tps: list[float]) -> dict:
        return {"mode": mode, "tokens_per_s": sorted(tps)[1], "samples_per_s": 1.0, "padding_fraction": 0.0,
                "tokens": 3000, "samples": 10, "rounds": tps}

    report = {"machine": "CPU", "llamafactory": "0.9.5", "packed_over_neat_rounds": [2.0, 1.0, 1.5],
              "settings": {"samples": 6, "steps": 1, "warmup": 0, "rounds": 3, "batch_size": 8, "lf_rows": 3,
                           "max_length": 1024},
              "results": [result("packed", [300.0, 100.0, 150.0]), result("lf_neat_packing", [150.0, 100.0, 100.0]),
                          result("lf_packing", [200.0, 200.0, 200.0])]}
    table = peer.markdown(report)
    assert "| medllava packed | 150 |" in table and "| 1.50x |" in table
    assert "| LLaMA-Factory packing | 200 | 1.0 | 300 | 0% | **no** | 2.00x |" in table


@pytest.mark.slow
def test_qwen25vl_preset_runs_every_mode_on_the_same_samples(tmp_path: Path) -> None:
    """The tiny Qwen2.5-VL preset: packed (M-RoPE rows), padded and TRL's SFTTrainer (which refuses packing for
    vision data) train the same samples per step; FLOPs are not counted for this family (reported as '-')."""
    pytest.importorskip("trl")
    report = run_benchmark(BenchSettings(preset="tiny-qwen2.5-vl", samples=24, steps=2, warmup=1, batch_size=4,
                                         max_length=512, median_answer_tokens=30))
    modes = {r["mode"]: r for r in report["results"]}
    assert set(modes) == {"packed", "padded", "trl"}
    assert modes["packed"]["samples"] == modes["padded"]["samples"] == modes["trl"]["samples"] == 2 * 4
    assert all(r["tokens_per_s"] > 0 and r["flops"] is None for r in modes.values())
    assert modes["packed"]["padding_fraction"] == 0 < modes["padded"]["padding_fraction"]
    assert "| packed |" in markdown(report)
