"""The `medllava` command: user errors are one line and exit 2; eval writes its outputs; tiny writes a pair."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from medllava.cli import main


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medllava.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("train", "missing.yaml"), "no such config file"),
        (("train", "REPO/stages/demo/instruct.yaml", "--optim.lrr=1"), "unknown key(s) optim.lrr"),
        (("eval", "no/such/model", "--data", "x.jsonl"), "no such model folder"),
    ],
)
def test_user_errors_are_one_line(args: tuple, message: str, tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[1]
    result = _run(*(a.replace("REPO", str(repo)) for a in args), cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("medllava")]
    assert len(lines) == 1 and message in lines[0]


@pytest.mark.parametrize(("argv", "message"), [
    (["train", "missing.yaml"], "no such config file"),
    (["chat", "no/such/model", "--prompt", "hi"], "no/such/model: no such model folder"),
    (["chat", "MODEL", "--image", "missing.png", "--prompt", "hi"], "image file not found"),
    (["chat", "MODEL", "--image", "notes.txt", "--prompt", "hi"], "not a recognised image format"),
    (["chat", "MODEL", "--window", "widest", "--prompt", "hi"], "--window"),
    (["eval", "no/such/model", "--data", "test.jsonl"], "no/such/model: no such model folder"),
    (["eval", "MODEL", "--data", "missing.jsonl"], "missing.jsonl: no such data file"),
    (["eval", "MODEL", "--data", "test.jsonl", "--window", "widest"], "--window"),
])
def test_a_user_error_is_reported_without_loading_torch(argv: list[str], message: str, tmp_path: Path) -> None:
    """Reporting a user error imports nothing heavy: a missing config, model folder, image or data file or a bad
    window is one line at once (it used to import torch and transformers first, six to ten seconds)."""
    (tmp_path / "MODEL").mkdir()
    (tmp_path / "notes.txt").write_text("not an image", encoding="utf-8")
    (tmp_path / "test.jsonl").write_text("", encoding="utf-8")
    code = (f"import sys; from medllava.cli import main; rc = main({argv!r}); "
            "print(rc, 'torch' in sys.modules, 'transformers' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.stdout.split() == ["2", "False", "False"], result.stderr[-2000:]
    assert message in result.stderr


def test_train_reports_bad_records_before_training(tmp_path: Path, phantom: Path, base_models: dict) -> None:
    import yaml

    from .conftest import stage_dict

    data = tmp_path / "bad.jsonl"
    data.write_text('{"id": "a", "image": "nope.png", "conversations": []}\n', encoding="utf-8")
    cfg = stage_dict(tmp_path, phantom, init_from=base_models[("clip", "llama")])
    cfg["data"]["train_files"] = [str(data)]
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    result = _run("train", str(tmp_path / "s.yaml"), cwd=tmp_path)
    assert result.returncode == 2
    assert f"{data}:1 (id a): empty_conversation" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "out").glob("checkpoint-*"))


def test_eval_writes_predictions_metrics_and_table(tmp_path: Path, phantom: Path, base_models: dict, capsys) -> None:
    summary = tmp_path / "summary.json"
    code = main(["eval", str(base_models[("siglip", "qwen2")]), "--data", str(phantom / "test.jsonl"),
                 "--image-folder", str(phantom / "images"), "--out", str(tmp_path / "eval"), "--blind",
                 "--max-new-tokens", "4", "--summary", str(summary), "--stage", "base"])
    assert code == 0
    out = tmp_path / "eval"
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    n_test = len((phantom / "test.jsonl").read_text().splitlines())
    assert len(rows) == n_test and {"prediction", "blind_prediction", "correct", "extracted"} <= set(rows[0])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == n_test and 0.0 <= metrics["accuracy"] <= 1.0 and "blind_gap" in metrics
    assert 0.3 < metrics["chance"] < 0.6
    assert (out / "metrics.md").read_text().startswith("## base")
    assert (out / "accuracy.png").stat().st_size > 1000
    assert set(json.loads(summary.read_text())) == {"base"}
    assert "closed (all)" in capsys.readouterr().out


def test_tiny_writes_loadable_pair(tmp_path: Path) -> None:
    from medllava.model import build_model

    assert main(["tiny", str(tmp_path / "pair"), "--vision", "siglip", "--llm", "qwen2"]) == 0
    model, processor = build_model(str(tmp_path / "pair/vision"), str(tmp_path / "pair/llm"))
    assert model.config.vision_feature_select_strategy == "full"
