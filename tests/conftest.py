"""Shared fixtures: tiny tower/LLM pairs (tokenizer trained in-process), a small phantom set, stage configs.

Everything is offline and CPU-sized: the pairs have a few hundred thousand parameters.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]

PAIRS = [("clip", "llama"), ("siglip", "qwen2")]


@pytest.fixture(scope="session")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small phantom set (24 train images, 6 test images)."""
    from data_recipes import phantom as phantom_recipe

    out = tmp_path_factory.mktemp("phantom")
    phantom_recipe.generate(out, seed=0, n_train=24, n_test=6, size=32)
    return out


@pytest.fixture(scope="session")
def tiny_pair_dirs(tmp_path_factory: pytest.TempPathFactory, phantom: Path) -> dict[tuple[str, str], tuple[Path, Path]]:
    """Tiny (vision, llm) folders for each preset pair, tokenizer trained on the built-in + phantom texts."""
    from medllava.presets import make_tiny_pair, tiny_corpus

    corpus = tiny_corpus((phantom / "corpus.txt").read_text(encoding="utf-8").splitlines())
    out = {}
    for vision, llm in PAIRS:
        root = tmp_path_factory.mktemp(f"tiny_{vision}_{llm}")
        out[(vision, llm)] = make_tiny_pair(root, vision, llm, corpus=corpus, vocab_size=400)
    return out


@pytest.fixture(scope="session")
def base_models(tmp_path_factory: pytest.TempPathFactory, tiny_pair_dirs: dict) -> dict[tuple[str, str], Path]:
    """Each pair assembled by build_model and saved: what an align stage's output folder holds."""
    from medllava.model import build_model, save_model

    out = {}
    for pair, (vision_dir, llm_dir) in tiny_pair_dirs.items():
        model, processor = build_model(str(vision_dir), str(llm_dir))
        folder = tmp_path_factory.mktemp(f"base_{pair[0]}_{pair[1]}")
        save_model(model, processor, folder)
        out[pair] = folder
    return out


def stage_dict(tmp: Path, phantom: Path, *, init_from: Path | None = None, vision: Path | None = None,
               llm: Path | None = None, fmt: str = "chat", trainable: dict[str, str] | None = None,
               **sections: dict[str, Any]) -> dict[str, Any]:
    """A few-step stage configuration on the phantom set (tests override what they need)."""
    model = {"init_from": str(init_from)} if init_from else {"vision_tower": str(vision), "llm": str(llm)}
    data = {
        "train_files": [str(phantom / ("align.jsonl" if fmt == "plain" else "instruct.jsonl"))],
        "image_folder": str(phantom / "images"),
        "format": fmt,
        "max_length": 512,  # the phantom conversations run to four turns
    }
    cfg: dict[str, Any] = {
        "name": "test",
        "kind": "sft",
        "model": model,
        "data": data,
        "trainable": trainable or {"vision": "frozen", "projector": "full", "llm": "full"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "optim": {"lr": 1e-2, "max_steps": 3, "per_device_batch_size": 4, "warmup_ratio": 0.0},
        "run": {"output_dir": str(tmp / "out"), "precision": "fp32", "logging_steps": 1, "save_steps": 1000,
                "seed": 0, "use_cpu": True},
    }
    for key, value in sections.items():
        cfg.setdefault(key, {}).update(value)
    return cfg


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path
