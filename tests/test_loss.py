"""The fast training paths compute what the simple ones compute: the LM head and loss on supervised positions only
(loss, gradients, normalisation over gradient accumulation), and a frozen tower run without autograd."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import TrainingArguments

from medllava.attention import VARLEN_SDPA, set_llm_attention
from medllava.config import LoraSection, TrainableSection
from medllava.data.collate import SFTCollator, SFTDataset
from medllava.data.packing import SamplePackingCollator
from medllava.data.render import IGNORE_INDEX, Renderer
from medllava.data.validate import prepare_samples
from medllava.model import apply_trainable, build_model
from medllava.train.loss import head_inputs, supervised_positions
from medllava.train.sft import MedLlavaTrainer


def test_supervised_positions() -> None:
    labels = torch.tensor([[-100, -100, 5, 6, -100, -100, 7],
                           [-100, -100, -100, 8, 9, -100, -100]])
    keep, targets = supervised_positions(labels)
    assert keep.tolist() == [1, 2, 3, 5]  # position p predicts the label at p + 1
    assert targets.tolist() == [[5, 6, -100, 7], [-100, 8, 9, -100]]
    keep, targets = supervised_positions(torch.full((2, 5), IGNORE_INDEX))
    assert keep.tolist() == [0] and targets.tolist() == [[-100], [-100]]  # never empty: the head stays in the graph
    assert set(head_inputs(labels, liger=True)) == {"logits_to_keep", "shift_labels"}


@pytest.fixture(scope="module")
def pieces(tiny_pair_dirs: dict, phantom: Path) -> tuple:
    vision_dir, llm_dir = tiny_pair_dirs[("clip", "llama")]
    model, processor = build_model(str(vision_dir), str(llm_dir), dtype=torch.float32)
    renderer = Renderer(processor, "chat", 512)
    samples, _ = prepare_samples([str(phantom / "instruct.jsonl")], renderer, image_folder=phantom / "images",
                                 progress=False)
    dataset = SFTDataset(samples[:8], renderer.images)
    return model, processor, dataset


def _trainer(model: torch.nn.Module, processor: object, dataset: SFTDataset, tmp: Path, supervised_head: bool,
             collator: object, accumulation: int = 1, optim: str = "adamw_torch") -> MedLlavaTrainer:
    args = TrainingArguments(output_dir=str(tmp), per_device_train_batch_size=4, gradient_accumulation_steps=accumulation,
                             max_steps=1, learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no", optim=optim,
                             remove_unused_columns=False, label_names=["labels"], seed=0, disable_tqdm=True,
                             logging_steps=1, dataloader_num_workers=0)
    return MedLlavaTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                           processing_class=processor, supervised_head=supervised_head)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_supervised_head_equals_the_full_head(pieces: tuple, tmp_path: Path, layout: str) -> None:
    """Same loss and gradients as the stock forward over every position (fp32, tight tolerance), normalised by the
    same number of supervised tokens; the logits computed are those of the supervised positions only."""
    model, processor, dataset = pieces
    model.train()
    packed = layout == "packed"
    set_llm_attention(model, VARLEN_SDPA if packed else "sdpa")
    collator = SamplePackingCollator() if packed else SFTCollator(processor.tokenizer.pad_token_id)
    batch = collator([dataset[i] for i in range(4)])
    items = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    results = {}
    for fast in (False, True):
        trainer = _trainer(model, processor, dataset, tmp_path / str(fast), fast, collator)
        model.zero_grad(set_to_none=True)
        loss, outputs = trainer.compute_loss(model, dict(batch), return_outputs=True,
                                             num_items_in_batch=torch.tensor(items))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[fast] = (loss.detach(), grads, outputs.logits.shape)
    model.zero_grad(set_to_none=True)
    set_llm_attention(model, "sdpa")
    (full_loss, full_grads, full_shape), (loss, grads, shape) = results[False], results[True]
    torch.testing.assert_close(loss, full_loss, atol=1e-6, rtol=1e-6)
    assert grads.keys() == full_grads.keys() and "lm_head.weight" in grads
    for name in grads:
        torch.testing.assert_close(grads[name], full_grads[name], atol=1e-6, rtol=1e-5, msg=name)
    supervised = int((batch["labels"][:, 1:] != IGNORE_INDEX).any(0).sum())
    assert full_shape[1] == batch["input_ids"].shape[1] and shape[1] == supervised < full_shape[1]


def test_supervised_head_trains_like_the_full_head_over_accumulation(pieces: tuple, tmp_path: Path) -> None:
    """A whole optimizer step of 2 x 4 samples (gradient accumulation 2) ends with the same weights either way:
    the loss is normalised over the accumulated batch's supervised tokens exactly as the stock loss is.

    Plain SGD, so the step shows the accumulated gradient itself: Adam divides each gradient by its own magnitude,
    so for a weight whose gradient is near Adam's epsilon a rounding difference of 1e-9 moves it by up to lr x 1e-4
    (2.4e-6 measured on an AMD EPYC with 2 threads), which says nothing about the normalisation."""
    model, processor, dataset = pieces
    start = {k: v.clone() for k, v in model.state_dict().items()}
    ends = []
    for fast in (False, True):
        model.load_state_dict(start)
        for p in model.parameters():
            p.requires_grad_(True)
        collator = SFTCollator(processor.tokenizer.pad_token_id)
        _trainer(model, processor, dataset, tmp_path / str(fast), fast, collator, accumulation=2, optim="sgd").train()
        ends.append({k: v.clone() for k, v in model.state_dict().items()})
    model.load_state_dict(start)
    changed = 0
    for name in ends[0]:
        torch.testing.assert_close(ends[1][name], ends[0][name], atol=1e-6, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
        changed += not torch.equal(ends[0][name], start[name])
    assert changed > 0


def _tower_output_and_grads(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    seen = []
    handle = base.model.vision_tower.register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        out = model(**{k: v for k, v in batch.items() if k != "sample_ids"})
    finally:
        handle.remove()
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return seen[0].last_hidden_state, grads


@pytest.mark.parametrize("llm", ["full", "lora"])
def test_a_frozen_tower_runs_without_autograd(pieces: tuple, tiny_pair_dirs: dict, llm: str) -> None:
    """With gradient checkpointing (which makes every sub-model's input require grad) the frozen tower used to
    record its whole graph and run its backward; now it runs under no-grad, and every trained weight gets exactly
    the gradient it got before."""
    _, processor, dataset = pieces
    vision_dir, llm_dir = tiny_pair_dirs[("clip", "llama")]
    batch = SFTCollator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(2)])
    results = {}
    for fast in (False, True):
        torch.manual_seed(0)
        model, _ = build_model(str(vision_dir), str(llm_dir), dtype=torch.float32)
        model = apply_trainable(model, TrainableSection(vision="frozen", projector="full", llm=llm),
                                LoraSection(r=4, alpha=8, dropout=0.0), gradient_checkpointing=True,
                                frozen_tower_without_grad=fast)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # as the Trainer
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        model.train()
        results[fast] = _tower_output_and_grads(model, batch)
    (slow_tower, slow_grads), (fast_tower, fast_grads) = results[False], results[True]
    assert slow_tower.requires_grad and slow_tower.grad_fn is not None  # the bookkeeping nobody needed
    assert not fast_tower.requires_grad and fast_tower.grad_fn is None
    assert fast_grads.keys() == slow_grads.keys() and any("multi_modal_projector" in n for n in fast_grads)
    for name in fast_grads:
        torch.testing.assert_close(fast_grads[name], slow_grads[name], atol=1e-6, rtol=1e-5, msg=name)
    assert torch.is_grad_enabled()


def test_a_trained_tower_keeps_autograd(pieces: tuple, tiny_pair_dirs: dict) -> None:
    _, processor, dataset = pieces
    vision_dir, llm_dir = tiny_pair_dirs[("clip", "llama")]
    model, _ = build_model(str(vision_dir), str(llm_dir), dtype=torch.float32)
    model = apply_trainable(model, TrainableSection(vision="lora", projector="full", llm="lora"),
                            LoraSection(r=4, alpha=8, dropout=0.0))
    model.train()
    tower, grads = _tower_output_and_grads(model, SFTCollator(processor.tokenizer.pad_token_id)([dataset[0]]))
    assert tower.requires_grad and any("vision_tower" in n and "lora_" in n for n in grads)
