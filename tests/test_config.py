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


@pytest.mark.parametrize(("ratio", "steps"), [(0.0, 0), (0.1, 10), (0.5, 50), (1.0, 100)])
def test_warmup_ratio_is_a_share_of_the_steps(ratio: float, steps: int, tmp_path: Path) -> None:
    """Issue 25: warmup_ratio 1.0 reached TrainingArguments as warmup_steps=1.0, which it reads as one step."""
    from transformers import TrainingArguments

    from medllava.config import config_from_dict
    from medllava.train.common import trainer_kwargs
    from tests.conftest import stage_dict

    cfg = config_from_dict(stage_dict(tmp_path, tmp_path, init_from=tmp_path, optim={"warmup_ratio": ratio}))
    kwargs = trainer_kwargs(cfg, "fp32")
    args = TrainingArguments(output_dir=str(tmp_path), warmup_steps=kwargs["warmup_steps"], use_cpu=True)
    assert args.get_warmup_steps(100) == steps


def test_warmup_ratio_outside_zero_to_one_is_refused(tmp_path: Path) -> None:
    from medllava.config import ConfigError, config_from_dict
    from tests.conftest import stage_dict

    with pytest.raises(ConfigError, match="warmup_ratio"):
        config_from_dict(stage_dict(tmp_path, tmp_path, init_from=tmp_path, optim={"warmup_ratio": 5}))


def test_start_up_only_settings_do_not_block_resume(tmp_path: Path) -> None:
    """Issue 25: changing data.preprocess_workers (how the data is prepared at start-up, not what) refused the
    resume; a change that alters training (the learning rate) still does."""
    import json

    from medllava.config import ConfigError, config_from_dict
    from medllava.train.common import RESUME_INFO, check_resume_config, resume_info
    from tests.conftest import stage_dict

    base = stage_dict(tmp_path, tmp_path, init_from=tmp_path, data={"preprocess_workers": 1})
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    (checkpoint / RESUME_INFO).write_text(json.dumps(resume_info(config_from_dict(base).to_dict())))
    check_resume_config(config_from_dict(stage_dict(tmp_path, tmp_path, init_from=tmp_path,
                                                    data={"preprocess_workers": 2})), str(checkpoint))
    with pytest.raises(ConfigError, match="optim.lr"):
        check_resume_config(config_from_dict(stage_dict(tmp_path, tmp_path, init_from=tmp_path,
                                                        data={"preprocess_workers": 1}, optim={"lr": 1.0})),
                            str(checkpoint))


def _minimal(**extra: object) -> dict:
    return {"model": {"init_from": "runs/x"}, "data": {"train_files": ["a.jsonl"]},
            "optim": {"per_device_batch_size": 8}, **extra}


@pytest.mark.parametrize(("section", "message"), [
    ({"kind": "grpo", "grpo": {"rewards": {"accuracy": 1.0, "fluency": 1.0}}}, "unknown reward"),
    ({"kind": "grpo", "grpo": {"prompt": "plain", "gate_accuracy_on_format": True}}, "needs prompt"),
    ({"kind": "dpo", "dpo": {"loss_type": ["sigmoid", "dpop"]}}, r"dpo.loss_type: unknown .*dpop"),
    ({"kind": "dpo", "dpo": {"beta": 0}}, "dpo.beta"),
    ({"kind": "dpo", "dpo": {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}}, "dpo.loss_weights"),
    ({"kind": "dpo", "dpo": {"loss_type": "aot"}}, "pair_weights"),
    ({"kind": "dpo", "dpo": {"sft_weight": -1}}, "dpo.sft_weight"),
    ({"kind": "dpo", "dpo": {"loss_type": ["sigmoid", "bco_pair", "sft"], "f_divergence_type": "js_divergence"}},
     "bco_pair"),
    ({"kind": "dpo", "dpo": {"loss_type": "exo_pair"}}, "label_smoothing > 0"),
    ({"kind": "dpo", "dpo": {"label_smoothing": 0.5}}, "dpo.label_smoothing"),
    ({"kind": "dpo", "dpo": {"ld_alpha": 2.0}}, "dpo.ld_alpha"),
    ({"kind": "dpo", "dpo": {"loss_type": "aot", "use_weighting": True, "pair_weights": False}}, "use_weighting"),
    ({"kind": "dpo", "data": {"train_files": ["a.jsonl"], "packing": True}}, "data.packing"),
    ({"kind": "dpo", "dpo": {"pairs": {"rejects": ["image:blur"]}}}, "dpo.pairs.rejects"),
    ({"kind": "ppo"}, "kind"),
])
def test_every_stage_check_fails_before_a_model_loads(section: dict, message: str) -> None:
    """Each kind's own settings are checked by StageConfig.validate (an unknown reward name used to pass the
    config and fail only after the model had loaded)."""
    with pytest.raises(ConfigError, match=message):
        config_from_dict(_minimal(**section))


def test_every_stage_kind_has_one_table_entry() -> None:
    """A stage kind is one entry of the table: its runner, what its batch counts, and its config section."""
    import importlib
    import typing

    from medllava.train.stage import STAGE_KINDS

    kinds = typing.get_args(typing.get_type_hints(StageConfig)["kind"])
    assert set(kinds) == set(STAGE_KINDS) == {"sft", "grpo", "dpo"}
    for name, kind in STAGE_KINDS.items():
        module, function = kind.runner.split(":")
        assert callable(getattr(importlib.import_module(module), function)), name
        assert kind.batch_unit in ("samples", "completions", "pairs")
    cfg = config_from_dict(_minimal(kind="dpo", dpo={"beta": 0.2, "loss_type": ["sigmoid", "sft"],
                                                     "loss_weights": [1.0, 0.5]}))
    assert (cfg.dpo.beta, cfg.dpo.loss_type, cfg.dpo.loss_weights) == (0.2, ["sigmoid", "sft"], [1.0, 0.5])
