"""Packing computes exactly what unpacked training computes: logits, loss (per token) and gradients."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medllava.data.collate import SFTCollator, SFTDataset
from medllava.data.packing import (
    PackedCollator,
    PackedDataset,
    SamplePackingCollator,
    pack_bins,
    pack_items,
    packing_isolates,
)
from medllava.data.render import IGNORE_INDEX, Renderer
from medllava.data.validate import prepare_samples
from medllava.model import build_model
from medllava.processor import num_image_tokens

COMBOS = [("clip", "llama"), ("clip", "qwen2"), ("siglip", "llama"), ("siglip", "qwen2")]


@pytest.fixture(scope="module", params=COMBOS, ids=lambda c: f"{c[0]}+{c[1]}")
def setup(request: pytest.FixtureRequest, tiny_pair_dirs: dict, phantom: Path) -> tuple:
    vision, llm = request.param
    vision_dir = tiny_pair_dirs[(vision, "llama" if vision == "clip" else "qwen2")][0]
    llm_dir = tiny_pair_dirs[("clip" if llm == "llama" else "siglip", llm)][1]
    model, processor = build_model(str(vision_dir), str(llm_dir), dtype=torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():  # a fresh projector is small; make it matter so differences would show
        for p in model.model.multi_modal_projector.parameters():
            p.mul_(3.0)
    renderer = Renderer(processor, "chat", 512)
    samples, _ = prepare_samples([str(phantom / "instruct.jsonl")], renderer, image_folder=phantom / "images",
                                 progress=False)
    dataset = SFTDataset(samples[:4], processor.image_processor, renderer.image_token_id, num_image_tokens(processor))
    return model, processor, dataset


def _per_sample(model: torch.nn.Module, dataset: SFTDataset) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each sample alone: its logits, and the token-weighted mean loss over all samples (with graph)."""
    logits, total, count = [], 0.0, 0
    for i in range(len(dataset)):
        item = dataset[i]
        out = model(input_ids=item["input_ids"][None], labels=item["labels"][None], pixel_values=item["pixel_values"])
        n = int((item["labels"][1:] != IGNORE_INDEX).sum())
        total = total + out.loss * n
        count += n
        logits.append(out.logits[0])
    return logits, total / count


def _reference(model: torch.nn.Module, dataset: SFTDataset) -> tuple[list[torch.Tensor], torch.Tensor, dict]:
    """Per-sample logits, the token-weighted loss (detached) and its gradients, every weight trainable."""
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    ref_logits, ref_loss = _per_sample(model, dataset)
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return ref_logits, ref_loss.detach(), ref_grads


def _forward(model: torch.nn.Module, batch: dict) -> object:
    return model(**{k: v for k, v in batch.items() if k != "sample_ids"})


def test_packed_logits_loss_and_gradients_equal_per_sample(setup: tuple) -> None:
    model, processor, dataset = setup
    ref_logits, ref_loss, ref_grads = _reference(model, dataset)

    batch = PackedCollator(processor.tokenizer.pad_token_id)([pack_items([dataset[i] for i in range(len(dataset))])])
    assert "attention_mask" not in batch and batch["use_cache"] is False
    out = _forward(model, batch)
    start = 0
    for logits in ref_logits:
        torch.testing.assert_close(out.logits[0, start:start + logits.shape[0]], logits, atol=2e-5, rtol=1e-5)
        start += logits.shape[0]
    torch.testing.assert_close(out.loss, ref_loss.detach(), atol=1e-6, rtol=1e-6)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-6, rtol=1e-4, msg=name)
    model.zero_grad(set_to_none=True)


def test_two_packed_rows_with_padding_equal_per_sample(setup: tuple) -> None:
    model, processor, dataset = setup
    model.eval()
    with torch.no_grad():
        ref_logits, ref_loss = _per_sample(model, dataset)
        rows = [pack_items([dataset[0], dataset[1]]), pack_items([dataset[2]]), pack_items([dataset[3]])]
        batch = PackedCollator(processor.tokenizer.pad_token_id)(rows)
        out = _forward(model, batch)
    lengths = [lg.shape[0] for lg in ref_logits]
    torch.testing.assert_close(out.logits[0, :lengths[0]], ref_logits[0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits[0, lengths[0]:lengths[0] + lengths[1]], ref_logits[1], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits[1, :lengths[2]], ref_logits[2], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits[2, :lengths[3]], ref_logits[3], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, ref_loss, atol=1e-6, rtol=1e-6)


def test_micro_batch_packing_equals_per_sample_with_and_without_the_image_filler(setup: tuple) -> None:
    """The training path: a micro-batch of samples packed into rows of at most `capacity` tokens. Loss and
    gradients equal per-sample training; a text-only micro-batch's blank-image filler adds exactly nothing."""
    model, processor, dataset = setup
    ref_logits, ref_loss, ref_grads = _reference(model, dataset)
    lengths = sorted(lg.shape[0] for lg in ref_logits)
    capacity = max(lengths[-1], lengths[0] + lengths[1])  # the two shortest share a row, the longest fits alone
    collate = SamplePackingCollator(processor.tokenizer.pad_token_id, capacity, filler=dataset.image_filler())
    batch = collate([dataset[i] for i in range(len(dataset))])
    assert 1 < batch["input_ids"].shape[0] < len(dataset) and batch["input_ids"].shape[1] <= capacity
    assert len(batch["sample_ids"]) == len(dataset) and batch["pixel_values"].shape[0] == len(dataset)  # no filler
    out = _forward(model, batch)
    torch.testing.assert_close(out.loss, ref_loss.detach(), atol=1e-6, rtol=1e-6)
    out.loss.backward()
    for name, p in model.named_parameters():
        if name in ref_grads:
            torch.testing.assert_close(p.grad, ref_grads[name], atol=1e-6, rtol=1e-4, msg=name)
    model.zero_grad(set_to_none=True)

    # text only: the same samples without their images (and placeholders) -> the filler brings one blank image
    text = [dict(dataset[i]) for i in range(2)]
    for item in text:
        keep = item["input_ids"] != dataset.image_token_id
        item["input_ids"], item["labels"] = item["input_ids"][keep], item["labels"][keep]
        del item["pixel_values"]
    with torch.no_grad():
        plain = _forward(model, PackedCollator(processor.tokenizer.pad_token_id)([pack_items(text)]))
        filled_batch = collate(text)
        filled = _forward(model, filled_batch)
    assert filled_batch["pixel_values"].shape[0] == 1 and len(filled_batch["sample_ids"]) == 2
    torch.testing.assert_close(filled.loss, plain.loss, atol=1e-6, rtol=1e-6)
    padded = SFTCollator(processor.tokenizer.pad_token_id, filler=dataset.image_filler())(text)
    assert padded["pixel_values"].shape[0] == 1 and padded["input_ids"].shape[0] == 3
    with torch.no_grad():
        torch.testing.assert_close(_forward(model, padded).loss, plain.loss, atol=1e-6, rtol=1e-6)


def test_padded_batches_equal_per_sample(setup: tuple) -> None:
    model, processor, dataset = setup
    model.eval()
    with torch.no_grad():
        _, ref_loss = _per_sample(model, dataset)
        batch = SFTCollator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
        out = _forward(model, batch)
    torch.testing.assert_close(out.loss, ref_loss, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("trap", ["attention_mask", "use_cache"])
def test_a_mask_or_a_cache_would_break_isolation(setup: tuple, trap: str) -> None:
    """The traps: with a 2D attention mask, or with the KV cache on, restarting positions no longer isolate
    samples in transformers 5.x; packed batches carry neither."""
    model, processor, dataset = setup
    model.eval()
    with torch.no_grad():
        ref_logits, _ = _per_sample(model, dataset)
        batch = PackedCollator(processor.tokenizer.pad_token_id)([pack_items([dataset[0], dataset[1]])])
        if trap == "attention_mask":
            batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        else:
            batch["use_cache"] = True
        out = _forward(model, batch)
    n0 = ref_logits[0].shape[0]
    assert (out.logits[0, n0:n0 + ref_logits[1].shape[0]] - ref_logits[1]).abs().max() > 1e-3
    isolated, diff, leak = packing_isolates(model, len(processor.tokenizer))
    assert isolated and diff < 1e-4 < leak


def test_packed_dataset_keeps_every_sample_once(setup: tuple) -> None:
    _, processor, dataset = setup
    packed = PackedDataset(dataset, capacity=max(dataset.lengths) * 2)
    assert sorted(i for b in packed.bins for i in b) == list(range(len(dataset)))
    assert all(length <= packed.capacity for length in packed.lengths)
    row = packed[0]
    ids = row["sample_id"]
    assert len(ids) == len(packed.bins[0]) and row["input_ids"].shape[0] == packed.lengths[0]
    starts = (row["position_ids"] == 0).nonzero().flatten().tolist()
    assert len(starts) == len(ids) and all(row["labels"][s] == IGNORE_INDEX for s in starts)


def test_pack_bins_first_fit_decreasing() -> None:
    assert pack_bins([5, 3, 8, 2, 7], capacity=10) == [[2, 3], [1, 4], [0]]  # decreasing: 8+2, 7+3, 5
    shuffled = pack_bins([5, 3, 8, 2, 7], capacity=10, seed=0)
    assert sorted(i for b in shuffled for i in b) == list(range(5)) and shuffled == pack_bins([5, 3, 8, 2, 7], 10, seed=0)
    assert sorted(i for b in pack_bins([1] * 7, 3) for i in b) == list(range(7))
    with pytest.raises(ValueError, match="more than the packing capacity"):
        pack_bins([4, 11], 10)


def _first_fit_by_scan(lengths: list[int], capacity: int, order: list[int]) -> list[list[int]]:
    """The plain first fit: scan every bin in order for the first with room."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return [sorted(b) for b in bins]


@pytest.mark.parametrize("seed", [None, 0, 1])
def test_pack_bins_tree_equals_first_fit_by_scan(seed: int | None) -> None:
    """The segment-tree search picks exactly the bins a scan would (the fast path computes the same)."""
    rng = torch.Generator().manual_seed(7)
    for low, high, capacity in ((600, 1600, 2048), (20, 700, 4096), (1, 10, 10), (10, 10, 10)):
        lengths = torch.randint(low, high + 1, (3000,), generator=rng).tolist()
        if seed is None:
            order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
        else:
            order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
        assert pack_bins(lengths, capacity, seed) == _first_fit_by_scan(lengths, capacity, order)


def test_runner_packs_by_default_and_respects_the_probe(tmp_path: Path, phantom: Path, base_models: dict,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from medllava.config import ConfigError, config_from_dict
    from medllava.train import sft

    from .conftest import stage_dict

    cfg = stage_dict(tmp_path, phantom, init_from=base_models[("clip", "llama")])
    run = sft.prepare_sft(config_from_dict(cfg))
    assert isinstance(run.trainer.train_dataset, SFTDataset)  # batches count samples; each is packed
    assert isinstance(run.trainer.data_collator, SamplePackingCollator)
    run.trainer.train()  # packed micro-batches train end to end
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in run.trainer.state.log_history if "loss" in h)

    monkeypatch.setattr(sft, "packing_isolates", lambda *a, **k: (False, 0.9, 1.0))  # a model that leaks
    cfg["run"]["resume"] = "never"  # the same folder, other packing settings: these are new runs, not resumes
    run = sft.prepare_sft(config_from_dict(cfg))
    assert isinstance(run.trainer.data_collator, SFTCollator)  # auto: padded instead, with a warning
    cfg["data"]["packing"] = True
    with pytest.raises(ConfigError, match="not isolated"):
        sft.prepare_sft(config_from_dict(cfg))
    cfg["data"]["packing"] = False
    assert isinstance(sft.prepare_sft(config_from_dict(cfg)).trainer.data_collator, SFTCollator)


def test_flash_attention_gets_one_packed_row_and_sdpa_rows(setup: tuple) -> None:
    """transformers takes the variable-length flash path only for a batch of one row; the collator gives flash
    models exactly that, and other implementations rows that the block-diagonal mask isolates."""
    from transformers.modeling_flash_attention_utils import _is_packed_sequence

    from medllava.data.packing import one_row_layout

    model, processor, dataset = setup
    features = [dataset[i] for i in range(len(dataset))]
    capacity = max(f["input_ids"].shape[0] for f in features) + 1  # room for one sample a row: several rows
    rows = SamplePackingCollator(processor.tokenizer.pad_token_id, capacity)(features)
    one = SamplePackingCollator(processor.tokenizer.pad_token_id, capacity, one_row=True)(features)
    assert rows["input_ids"].shape[0] > 1 and one["input_ids"].shape[0] == 1
    assert not _is_packed_sequence(rows["position_ids"], rows["input_ids"].shape[0])  # flash would leak here
    assert _is_packed_sequence(one["position_ids"], 1)  # ... and isolates here
    assert one["input_ids"].shape[1] == sum(f["input_ids"].shape[0] for f in features)  # no padding at all
    assert sorted(one["sample_ids"]) == sorted(rows["sample_ids"])
    for impl, expected in (("sdpa", False), ("eager", False), ("flash_attention_2", True), ("flash_attention_3", True)):
        model.config._attn_implementation = impl  # what one_row_layout reads (no kernel runs here)
        model.config.get_text_config()._attn_implementation = impl
        assert one_row_layout(model) is expected, impl
    model.config._attn_implementation = model.config.get_text_config()._attn_implementation = "sdpa"
    model.eval()
    with torch.no_grad():  # and the one-row layout computes the same as separate samples
        ref_logits, _ = _per_sample(model, dataset)
        out = _forward(model, one)
    start = 0
    for ref in ref_logits:
        torch.testing.assert_close(out.logits[0, start:start + ref.shape[0]], ref, atol=1e-5, rtol=1e-5)
        start += ref.shape[0]


class LeakyCollator(SamplePackingCollator):
    """A packing collator with the classic mistake: a 2D attention mask of ones beside restarting positions."""

    def __call__(self, features: list) -> dict:
        batch = super().__call__(features)
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        return batch


def test_the_probe_checks_the_collators_own_layout(setup: tuple) -> None:
    """No monkeypatching: the probe runs the collator it is given, so a leaking layout returns False."""
    model, processor, dataset = setup
    pad = processor.tokenizer.pad_token_id
    filler = dataset.image_filler()
    for one_row in (False, True):
        isolated, diff, leak = packing_isolates(model, len(processor.tokenizer),
                                                SamplePackingCollator(pad, 512, filler=filler, one_row=one_row))
        assert isolated and diff < 1e-4 < leak, (one_row, diff, leak)
    isolated, diff, leak = packing_isolates(model, len(processor.tokenizer), LeakyCollator(pad, 512, filler=filler))
    assert not isolated and diff > 1e-3, (diff, leak)


def test_the_runner_probes_on_the_placed_model_in_its_precision(tmp_path: Path, phantom: Path,
                                                                base_models: dict) -> None:
    """bf16 on CPU: the probe runs under the trainer's autocast, on the trainer's model, and packing stays on."""
    from medllava.config import config_from_dict
    from medllava.train import sft

    from .conftest import stage_dict

    cfg = stage_dict(tmp_path, phantom, init_from=base_models[("siglip", "qwen2")], run={"precision": "bf16"},
                     data={"packing": True})
    run = sft.prepare_sft(config_from_dict(cfg))
    assert isinstance(run.trainer.data_collator, SamplePackingCollator) and not run.trainer.data_collator.one_row
