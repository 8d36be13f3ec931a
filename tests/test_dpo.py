"""The DPO stage (issue 26): pairs in the published layouts train through `medllava train`, each side's own images
reach the model (a rejected side with an image of its own never sees the chosen one), TRL's DPO loss equals the
loss written out by hand on a tiny fp32 model, LoRA keeps no second model, and per-pair weights weigh the loss."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from medllava.config import config_from_dict
from medllava.data.collate import PAIR_BATCHES, PAIR_WEIGHTS

from .conftest import REPO, stage_dict, write_jsonl

BETA = 0.5


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory, phantom: Path) -> dict[str, Path]:
    return write_pairs(tmp_path_factory.mktemp("pairs"), phantom)


def write_pairs(folder: Path, phantom: Path) -> dict[str, Path]:
    """The phantom's yes/no questions as pairs: chosen = (image, gold answer), rejected = (a blank image of its own,
    the same answer) for half of them and (the image, the wrong answer) for the others; in the three layouts. The
    images go to FOLDER/images (a copy: the session's phantom folder is read by every test and stays as made)."""
    images = folder / "images"
    shutil.copytree(phantom / "images", images)
    (images / "blank").mkdir(exist_ok=True)
    rows = [json.loads(line) for line in (phantom / "rl.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["qtype"] == "yes_no"][:8]
    trl, swift, factory = [], [], []
    for i, r in enumerate(rows):
        blank = f"blank/{Path(r['image']).stem}.png"
        Image.new("RGB", (32, 32), (0, 0, 0)).save(images / blank)
        answer = r["answer"].capitalize() + "."
        wrong = ("No." if r["answer"] == "yes" else "Yes.")
        own_image = i % 2 == 0
        rejected = answer if own_image else wrong
        extra = {"rejected_images": [blank]} if own_image else {}
        question = f"<image>\n{r['question']}"
        trl.append({"id": r["id"], "prompt": question, "chosen": answer, "rejected": rejected,
                    "images": [r["image"]], "weight": 1.0 + i % 3, **extra})
        swift.append({"id": r["id"], "messages": [{"role": "user", "content": question},
                                                  {"role": "assistant", "content": answer}],
                      "rejected_response": rejected, "images": [r["image"]], **extra})
        factory.append({"id": r["id"], "conversations": [{"from": "human", "value": question}],
                        "chosen": {"from": "gpt", "value": answer}, "rejected": {"from": "gpt", "value": wrong},
                        "images": [r["image"]]})
    (folder / "trl.report.json").write_text(json.dumps({  # as data_recipes/preference_pairs.py writes it
        "model": "runs/x/instruct", "n": 4, "temperature": 1.0, "made": {"image:blank": 4, "text": 4}, "skipped": 0,
        "skipped_ids": []}))
    return {"trl": write_jsonl(folder / "trl.jsonl", trl), "ms-swift": write_jsonl(folder / "swift.jsonl", swift),
            "llama-factory": write_jsonl(folder / "factory.jsonl", factory)}


def dpo_stage(tmp: Path, phantom: Path, base: Path, data: Path, llm: str = "full", **dpo: Any) -> dict[str, Any]:
    """A two-step DPO stage on the pairs in DATA, images in the folder beside it (see write_pairs)."""
    images = data.parent / "images"
    return stage_dict(tmp, phantom, init_from=base, data={"train_files": [str(data)], "max_length": 256,
                                                          "image_folder": str(images)},
                      trainable={"vision": "frozen", "projector": "full", "llm": llm},
                      optim={"lr": 1e-3, "max_steps": 2, "per_device_batch_size": 2}, dpo={"beta": BETA, **dpo}) \
        | {"kind": "dpo", "name": "dpo"}


def sequence_logps(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Sum of each row's completion-token log-probabilities, from the model's full logits (no fused head)."""
    inputs = {k: v for k, v in batch.items() if k not in ("completion_mask", "sample_ids", PAIR_WEIGHTS, PAIR_BATCHES)}
    logits = model(**inputs, use_cache=False).logits[:, :-1].float()
    targets = batch["input_ids"][:, 1:]
    token = torch.gather(F.log_softmax(logits, dim=-1), 2, targets[..., None])[..., 0]
    return (token * batch["completion_mask"][:, 1:]).sum(dim=1)


def hand_dpo_loss(policy: torch.nn.Module, reference: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """-log sigmoid(beta ((pi_c - ref_c) - (pi_r - ref_r))), per pair, weighted, averaged over the pairs (the joint
    rows, or each pair's own sub-batch)."""
    if PAIR_BATCHES in batch:
        return torch.stack([hand_dpo_loss(policy, reference, {**sub, PAIR_WEIGHTS: w[None]})
                            for sub, w in zip(batch[PAIR_BATCHES], batch[PAIR_WEIGHTS], strict=True)]).mean()
    pi = sequence_logps(policy, batch)
    with torch.no_grad():
        ref = sequence_logps(reference, batch)
    pi_c, pi_r = pi.chunk(2)
    ref_c, ref_r = ref.chunk(2)
    per_pair = -F.logsigmoid(BETA * ((pi_c - ref_c) - (pi_r - ref_r)))
    return (per_pair * batch[PAIR_WEIGHTS]).mean()


def test_rejected_images_reach_the_model_not_the_chosen_ones(tmp_path: Path, phantom: Path, base_models: dict,
                                                              pairs: dict[str, Path]) -> None:
    from medllava.train.dpo import prepare_dpo

    cfg = dpo_stage(tmp_path, phantom, base_models[("clip", "llama")], pairs["trl"], pair_weights=False)
    run = prepare_dpo(config_from_dict(cfg))
    collator = run.trainer.data_collator
    batch = collator([{"pair": 0}, {"pair": 1}])  # pair 0: a blank image of its own; pair 1: the same image
    pixels = batch["pixel_values"]
    assert pixels.shape[0] == 4  # rows chosen 0, chosen 1, rejected 0, rejected 1, one image each
    chosen0 = collator.sides[0]["image_inputs"]["pixel_values"][0]
    blank0 = collator.sides[1]["image_inputs"]["pixel_values"][0]
    assert not torch.equal(chosen0, blank0)
    torch.testing.assert_close(pixels[0], chosen0)
    torch.testing.assert_close(pixels[2], blank0)  # the rejected side's own (blank) image, not the chosen one
    torch.testing.assert_close(pixels[3], pixels[1])  # a text reject sees the chosen image
    assert torch.equal(batch["input_ids"][0][batch["completion_mask"][0].bool()],
                       batch["input_ids"][2][batch["completion_mask"][2].bool()])  # same answer, other image
    seen: list[torch.Tensor] = []
    tower = run.trainer.model.model.vision_tower
    handle = tower.register_forward_pre_hook(lambda _m, args, kwargs: seen.append(
        (kwargs.get("pixel_values") if kwargs.get("pixel_values") is not None else args[0]).detach().clone()),
        with_kwargs=True)
    try:
        run.trainer.compute_loss(run.trainer.model, dict(batch))
    finally:
        handle.remove()
    assert [s.shape[0] for s in seen] == [4]  # the policy's forward (the reference is a copy with its own tower)
    assert torch.equal(seen[0][2], blank0) and torch.equal(seen[0][0], chosen0)
    # weighted pairs: each pair's own sub-batch, its rejected rows with their own pixels too
    weighted = prepare_dpo(config_from_dict({**cfg, "dpo": {"beta": BETA}})).trainer.data_collator
    subs = weighted([{"pair": 0}, {"pair": 1}])[PAIR_BATCHES]
    torch.testing.assert_close(subs[0]["pixel_values"][1], blank0)
    torch.testing.assert_close(subs[1]["pixel_values"][1], pixels[1])


@pytest.mark.parametrize("llm", ["full", "lora"])
def test_dpo_loss_and_gradients_equal_the_hand_computed_loss(llm: str, tmp_path: Path, phantom: Path,
                                                            base_models: dict, pairs: dict[str, Path]) -> None:
    """On a tiny fp32 model whose policy has moved away from its reference: TRL's loss through our trainer equals
    the DPO loss computed from full logits, weights included, and so do the gradients; LoRA keeps no second model."""
    from medllava.model import load_model
    from medllava.train.dpo import prepare_dpo

    base = base_models[("clip", "llama")]
    run = prepare_dpo(config_from_dict(dpo_stage(tmp_path, phantom, base, pairs["trl"], llm=llm)))
    trainer = run.trainer
    model = trainer.model
    if llm == "lora":  # the reference is the adapter switched off (or TRL's copy of it): no second model
        assert trainer.ref_model is None
    else:
        assert trainer.ref_model is not None and not any(p.requires_grad for p in trainer.ref_model.parameters())
    reference, _ = load_model(base)  # the starting model, loaded on its own
    torch.manual_seed(1)
    with torch.no_grad():  # move the policy away from the reference
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    model.train()
    batch = trainer.data_collator([{"pair": 2}, {"pair": 3}])  # weights 3 and 1: a weighted micro-batch
    assert batch[PAIR_WEIGHTS].tolist() == [3.0, 1.0] and PAIR_BATCHES in batch
    params = [p for p in model.parameters() if p.requires_grad]
    ours = trainer.compute_loss(model, dict(batch))
    ours_grads = torch.autograd.grad(ours, params)
    hand = hand_dpo_loss(model, reference, batch)
    hand_grads = torch.autograd.grad(hand, params)
    assert math.isfinite(float(ours)) and abs(float(ours) - math.log(2) * 2) > 1e-3  # it moved
    torch.testing.assert_close(ours, hand, atol=1e-5, rtol=1e-5)
    for a, b in zip(ours_grads, hand_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("layout", ["trl", "ms-swift", "llama-factory"])
def test_medllava_train_runs_dpo_on_each_layout(layout: str, tmp_path: Path, phantom: Path, base_models: dict,
                                               pairs: dict[str, Path]) -> None:
    """The shipped stages/demo/dpo.yaml through `medllava train`, on LoRA, with the pairs' own data."""
    from medllava.cli import main

    out = tmp_path / "out"
    assert main(["train", str(REPO / "stages/demo/dpo.yaml"), f"--model.init_from={base_models[('siglip', 'qwen2')]}",
                 f"--data.train_files=[{pairs[layout]}]", f"--data.image_folder={pairs[layout].parent / 'images'}",
                 f"--run.output_dir={out}", "--optim.max_steps=2", "--optim.per_device_batch_size=2",
                 "--run.logging_steps=1", "--run.use_cpu=true", "--trainable.llm=lora", "--lora.r=4", "--lora.alpha=8",
                 f"--dpo.beta={BETA}"]) == 0
    log = json.loads((out / "train_log.json").read_text())
    steps = [h for h in log if "loss" in h]
    assert len(steps) == 2 and all(math.isfinite(h["loss"]) for h in steps)
    assert all("rewards/margins" in h for h in steps)
    assert (out / "adapter_config.json").is_file() and not (out / "ref").exists()
    report = json.loads((out / "data_report.json").read_text())
    assert report["valid"] == 8 and report["invalid"] == 0
    if layout == "trl":  # the model card says how the pairs were made (the recipe's report beside the pairs file)
        from medllava.export import _reproduction, stage_lineage

        card = "\n".join(_reproduction(stage_lineage(out).stages[-1]))
        assert f"- DPO: beta {BETA}, loss sigmoid, SFT term (RPO) weight 1.0, per-pair weights on" in card
        assert "made by data_recipes/preference_pairs.py from `runs/x/instruct`" in card and "image:blank 4" in card


def test_a_rejected_image_that_fails_in_the_loader_skips_its_pair_and_is_reported(
        tmp_path: Path, phantom: Path, base_models: dict, pairs: dict[str, Path]) -> None:
    """The rejected side's images obey SFT's loader rule: an image whose header reads but whose pixels do not (it
    passes data.image_check: header) leaves its whole pair unsupervised in the batch (never one side alone) and is
    named in data_report.json."""
    from medllava.train.dpo import prepare_dpo
    from medllava.train.stage import run_stage
    from tests.test_data_scale import truncated_jpeg

    rows = [json.loads(line) for line in pairs["trl"].read_text().splitlines()]
    shutil.copytree(pairs["trl"].parent / "images", tmp_path / "images")
    truncated_jpeg(tmp_path / "images" / "blank" / "cut.png")
    rows[0]["rejected_images"] = ["blank/cut.png"]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = dpo_stage(tmp_path, phantom, base_models[("clip", "llama")], data)
    run = prepare_dpo(config_from_dict(cfg))
    batch = run.trainer.data_collator([{"pair": 0}, {"pair": 2}])
    # pair 0 is replaced by the next pair that decodes (pair 1, weight 2): never one side alone, the same batch size
    assert [b["input_ids"].shape[0] for b in batch[PAIR_BATCHES]] == [2, 2]
    assert batch["sample_ids"] == [rows[1]["id"], rows[2]["id"]] and batch[PAIR_WEIGHTS].tolist() == [2.0, 3.0]
    assert all(b["completion_mask"].sum(dim=1).min() > 0 for b in batch[PAIR_BATCHES])
    assert [e["id"] for e in batch["image_errors"]] == [rows[0]["id"]]
    out = run_stage(config_from_dict({**cfg, "run": {**cfg["run"], "resume": "never"}}))
    report = json.loads((out / "data_report.json").read_text())
    assert report["loader_skipped"] == 1 and report["loader_errors"][0]["id"] == rows[0]["id"]


def test_dpo_section_speaks_trls_names_and_loss_types() -> None:
    """The dpo section's TRL knobs are DPOConfig fields of the same name, and the loss types it accepts are the
    ones TRL's trainer knows (an unknown one is named by TRL's own error)."""
    import dataclasses
    import inspect

    from trl import DPOConfig
    from trl.trainer.dpo_trainer import DPOTrainer

    from medllava.config import DPO_LOSS_TYPES, DPOSection

    ours = {f.name for f in dataclasses.fields(DPOSection)} - {"sft_weight", "pair_weights", "pairs"}
    assert ours <= {f.name for f in dataclasses.fields(DPOConfig)}
    import re

    source = inspect.getsource(DPOTrainer._compute_loss)
    known = source[source.index("Should be one of"):].split("]")[0]
    assert sorted(DPO_LOSS_TYPES) == sorted(re.findall(r"'(\w+)'", known))


def test_text_only_pairs_are_refused_on_several_ranks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A side without an image would leave the tower and projector out of a rank's step (DDP: a missing gradient;
    ZeRO-3: ranks' gathers part ways); on several ranks such pairs are named and refused, on one they train."""
    import numpy as np

    from medllava.config import ConfigError
    from medllava.data.cache import CachedSamples, save_samples
    from medllava.data.render import Rendered
    from medllava.train.dpo import check_images_on_every_side

    ids = np.arange(4, dtype=np.int64)
    sides = [Rendered("a", ids, ids, ["x.png"], 4, "pairs.jsonl", 1), Rendered("a", ids, ids, ["y.png"], 4, "pairs.jsonl", 1),
             Rendered("b", ids, ids, [], 4, "pairs.jsonl", 2), Rendered("b", ids, ids, [], 4, "pairs.jsonl", 2)]
    cached = CachedSamples(save_samples(sides, tmp_path / "cache"))
    check_images_on_every_side(cached)  # one rank
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"2 pair side\(s\) without an image \(pairs.jsonl:2 \(b\)"):
        check_images_on_every_side(cached)
