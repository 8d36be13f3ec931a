"""Stage configs: every shipped YAML parses; overrides and errors name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from medllava.config import ConfigError, StageConfig, config_from_dict, load_config

REPO = Path(__file__).resolve().parents[1]
STAGE_FILES = sorted((REPO / "stages").rglob("*.yaml"))


def test_stage_files_exist() -> None:
    names = {p.relative_to(REPO / "stages").as_posix() for p in STAGE_FILES}
    for family in ("llava_med_v15", "siglip_qwen25", "demo"):
        for stage in ("align", "instruct", "instruct_lora", "instruct_qlora"):
            assert f"{family}/{stage}.yaml" in names


@pytest.mark.parametrize("path", STAGE_FILES, ids=lambda p: p.relative_to(REPO / "stages").as_posix())
def test_every_stage_yaml_parses(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, StageConfig)
    if cfg.run.deepspeed:
        assert (REPO / cfg.run.deepspeed).is_file()
    for key in ("vision", "llm"):
        assert getattr(cfg.trainable, key) in ("frozen", "full", "lora")


def test_overrides_are_typed() -> None:
    cfg = load_config(REPO / "stages/demo/instruct.yaml", ["--optim.lr=1e-4", "--trainable.llm=lora", "--run.seed=7",
                                                           "--data.train_files=[a.jsonl, b.jsonl]"])
    assert cfg.optim.lr == pytest.approx(1e-4)
    assert cfg.trainable.llm == "lora"
    assert cfg.run.seed == 7
    assert cfg.data.train_files == ["a.jsonl", "b.jsonl"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--optim.lrr=1", "unknown key(s) optim.lrr"),
        ("--trainable.llm=half", "trainable.llm: 'half' is not one of"),
        ("--optim.per_device_batch_size=two", "optim.per_device_batch_size: expected an integer"),
        ("--run.gradient_checkpointing=maybe", "run.gradient_checkpointing: expected true/false"),
        ("--quantization.bits=3", "quantization.bits"),
    ],
)
def test_bad_overrides_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(REPO / "stages/demo/instruct.yaml", [override])


def test_cross_field_checks() -> None:
    base = {"data": {"train_files": ["x.jsonl"]}}
    with pytest.raises(ConfigError, match="init_from"):
        config_from_dict(base)
    with pytest.raises(ConfigError, match="excludes"):
        config_from_dict({**base, "model": {"init_from": "a", "llm": "b"}})
    with pytest.raises(ConfigError, match="cannot be trained in full"):
        config_from_dict({**base, "model": {"init_from": "a"}, "trainable": {"llm": "full"}, "quantization": {"bits": 4}})
    with pytest.raises(ConfigError, match="train_files"):
        config_from_dict({"model": {"init_from": "a"}})


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")


def test_liger_kernel_is_checked_before_training() -> None:
    """Asking for Liger where it cannot run is an error naming the key, never a silent fallback to plain kernels."""
    from medllava.train.common import check_liger, trainer_kwargs

    cfg = load_config(REPO / "stages/demo/instruct.yaml", ["--run.use_cpu=true"])
    assert trainer_kwargs(cfg, "fp32")["use_liger_kernel"] is False
    cfg = load_config(REPO / "stages/demo/instruct.yaml", ["--run.use_cpu=true", "--optim.liger_kernel=true"])
    with pytest.raises(ConfigError, match="optim.liger_kernel"):
        check_liger(cfg)
