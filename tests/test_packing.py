"""Packing computes exactly what unpacked training computes (logits, loss per token, gradients), isolated by the
batch's own sample boundaries under every attention implementation, at the cost of the samples' own lengths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from medllava.attention import VARLEN_SDPA, llm_attention, packed_implementation, set_llm_attention
from medllava.data.collate import SFTCollator, SFTDataset
from medllava.data.packing import BOUNDARY_KEYS, SamplePackingCollator, packing_isolates
from medllava.data.render import IGNORE_INDEX, Renderer
from medllava.data.validate import prepare_samples
from medllava.model import build_model

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
    dataset = SFTDataset(samples[:4], renderer.images)
    set_llm_attention(model, VARLEN_SDPA)  # what the runner does for an sdpa LLM when it packs
    return model, processor, dataset


def _per_sample(model: torch.nn.Module, dataset: SFTDataset) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each sample alone: its logits, and the token-weighted mean loss over all samples (with graph)."""
    logits, total, count = [], 0.0, 0
    for i in range(len(dataset)):
        item = dataset[i]
        out = model(input_ids=item["input_ids"][None], labels=item["labels"][None], pixel_values=item["image_inputs"]["pixel_values"])
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

    batch = SamplePackingCollator()([dataset[i] for i in range(len(dataset))])
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch and "use_cache" not in batch
    assert batch["cu_seq_lens_q"].tolist() == [0, *torch.tensor([lg.shape[0] for lg in ref_logits]).cumsum(0).tolist()]
    assert batch["max_length_q"] == max(lg.shape[0] for lg in ref_logits)
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


def test_micro_batch_packing_equals_per_sample_with_and_without_the_image_filler(setup: tuple) -> None:
    """A text-only micro-batch's blank-image filler adds exactly nothing, packed or padded."""
    model, processor, dataset = setup
    text = [dict(dataset[i]) for i in range(2)]
    for item in text:
        keep = item["input_ids"] != dataset.image_token_id
        item["input_ids"], item["labels"] = item["input_ids"][keep], item["labels"][keep]
        del item["image_inputs"]
    collate = SamplePackingCollator(filler=dataset.image_filler())
    model.eval()
    with torch.no_grad():
        plain = _forward(model, SamplePackingCollator()(text))
        filled_batch = collate(text)
        filled = _forward(model, filled_batch)
        with_images = collate([dataset[i] for i in range(len(dataset))])
    assert "pixel_values" not in SamplePackingCollator()(text)
    assert filled_batch["pixel_values"].shape[0] == 1 and len(filled_batch["sample_ids"]) == 2
    assert len(filled_batch["cu_seq_lens_q"]) == 4  # two samples and the filler, each its own sequence
    assert with_images["pixel_values"].shape[0] == len(dataset) and len(with_images["cu_seq_lens_q"]) == 5  # no filler
    torch.testing.assert_close(filled.loss, plain.loss, atol=1e-6, rtol=1e-6)
    padded = SFTCollator(processor.tokenizer.pad_token_id, filler=dataset.image_filler())(text)
    assert padded["pixel_values"].shape[0] == 1 and padded["input_ids"].shape[0] == 3
    set_llm_attention(model, "sdpa")  # padded batches (a padding mask) run on plain SDPA
    try:
        with torch.no_grad():
            torch.testing.assert_close(_forward(model, padded).loss, plain.loss, atol=1e-6, rtol=1e-6)
    finally:
        set_llm_attention(model, VARLEN_SDPA)


def test_padded_batches_equal_per_sample(setup: tuple) -> None:
    model, processor, dataset = setup
    set_llm_attention(model, "sdpa")
    model.eval()
    try:
        with torch.no_grad():
            _, ref_loss = _per_sample(model, dataset)
            batch = SFTCollator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
            out = _forward(model, batch)
    finally:
        set_llm_attention(model, VARLEN_SDPA)
    torch.testing.assert_close(out.loss, ref_loss, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("use_cache", [True, False, None])
def test_isolation_is_stated_by_the_batch_alone(setup: tuple, use_cache: bool | None) -> None:
    """The same packed batch is isolated whatever the KV-cache setting (it used to leak with the cache on);
    without its boundaries the row is one long sequence and the samples see each other."""
    model, processor, dataset = setup
    model.eval()
    with torch.no_grad():
        ref_logits, _ = _per_sample(model, dataset)
        batch = SamplePackingCollator()([dataset[0], dataset[1]])
        inputs = {k: v for k, v in batch.items() if k != "sample_ids"}
        if use_cache is not None:
            inputs["use_cache"] = use_cache
        out = model(**inputs)
        bare = model(**{k: v for k, v in inputs.items() if k not in BOUNDARY_KEYS})
    n0, n1 = ref_logits[0].shape[0], ref_logits[1].shape[0]
    torch.testing.assert_close(out.logits[0, n0:n0 + n1], ref_logits[1], atol=2e-5, rtol=1e-5)
    assert (bare.logits[0, n0:n0 + n1] - ref_logits[1]).abs().max() > 1e-3


def test_sdpa_alone_does_not_read_the_boundaries(setup: tuple) -> None:
    """Why the runner switches an sdpa LLM to VARLEN_SDPA: stock SDPA with the cache on runs the packed row as one
    causal sequence, and the start-up probe sees it."""
    model, processor, dataset = setup
    set_llm_attention(model, "sdpa")
    try:
        isolated, diff, leak = packing_isolates(model, len(processor.tokenizer), SamplePackingCollator())
    finally:
        set_llm_attention(model, VARLEN_SDPA)
    assert not isolated and diff > 1e-3
    isolated, diff, leak = packing_isolates(model, len(processor.tokenizer), SamplePackingCollator())
    assert isolated and diff < 1e-4 < leak


class AttentionWork(TorchDispatchMode):
    """Counts query x key positions of every attention kernel call (per batch row and head), whichever SDPA
    kernel runs: the work attention does."""

    def __init__(self) -> None:
        super().__init__()
        self.pairs = 0
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 (torch's signature)
        if "scaled_dot_product" in func.__name__ and "backward" not in func.__name__:
            q, k = args[0], args[1]
            self.pairs += q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2]
            self.calls += 1
        return func(*args, **(kwargs or {}))


def test_attention_costs_the_sum_of_squared_sample_lengths(setup: tuple) -> None:
    """Variable-length attention computes each sample against itself only: query x key pairs equal the sum of the
    samples' squared lengths, where a block-diagonal mask over the row (the layout before) costs the row squared."""
    model, processor, dataset = setup
    batch = SamplePackingCollator()([dataset[i] for i in range(len(dataset))])
    lengths = batch["cu_seq_lens_q"].diff().tolist()
    inputs = {k: v for k, v in batch.items() if k not in ("sample_ids", "labels")}
    text = model.config.get_text_config()
    layers, heads = text.num_hidden_layers, text.num_attention_heads
    model.eval()
    with torch.no_grad(), AttentionWork() as work:
        model.model.language_model(inputs_embeds=model.get_input_embeddings()(inputs["input_ids"]),
                                   **{k: inputs[k] for k in BOUNDARY_KEYS})
    assert work.calls == layers * len(lengths)
    assert work.pairs == layers * heads * sum(n * n for n in lengths)
    set_llm_attention(model, "sdpa")  # the dense route: transformers' block-diagonal mask over the whole row
    try:
        with torch.no_grad(), AttentionWork() as dense:
            model.model.language_model(inputs_embeds=model.get_input_embeddings()(inputs["input_ids"]),
                                       position_ids=inputs["position_ids"], use_cache=False)
    finally:
        set_llm_attention(model, VARLEN_SDPA)
    assert dense.pairs == layers * heads * sum(lengths) ** 2 > 2 * work.pairs


def test_every_attention_implementation_gets_the_boundaries_or_no_packing(setup: tuple) -> None:
    """sdpa and eager LLMs train packed on VARLEN_SDPA; flash-attention keeps its own kernel, which takes the
    batch's cu_seq_lens/max_length keywords (the spy below stands in for the kernel, which needs a GPU: it sees
    exactly those keywords and no mask); flex attention and other kernels are not offered packing."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    from medllava.attention import varlen_sdpa_forward

    assert packed_implementation("sdpa") == packed_implementation("eager") == VARLEN_SDPA
    for flash in ("flash_attention_2", "flash_attention_3"):
        assert packed_implementation(flash) == flash
    assert packed_implementation("flex_attention") is None and packed_implementation("paged|eager") is None

    model, processor, dataset = setup
    seen: list[dict] = []

    def spy(module, query, key, value, attention_mask, **kwargs):  # noqa: ANN001, ANN202
        seen.append({"mask": attention_mask, **{k: kwargs.get(k) for k in BOUNDARY_KEYS}})
        return varlen_sdpa_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("test_boundary_spy", spy)
    AttentionMaskInterface.register("test_boundary_spy", flash_attention_mask)  # what flash_attention_2 uses
    batch = SamplePackingCollator()([dataset[0], dataset[1]])
    set_llm_attention(model, "test_boundary_spy")
    try:
        assert llm_attention(model) == "test_boundary_spy"
        with torch.no_grad():
            _forward(model, batch)
    finally:
        set_llm_attention(model, VARLEN_SDPA)
    assert len(seen) == model.config.get_text_config().num_hidden_layers
    for call in seen:
        assert call["mask"] is None
        assert torch.equal(call["cu_seq_lens_q"], batch["cu_seq_lens_q"])
        assert torch.equal(call["cu_seq_lens_k"], batch["cu_seq_lens_k"])
        assert call["max_length_q"] == call["max_length_k"] == batch["max_length_q"]


def test_varlen_attention_keeps_sliding_windows_and_refuses_padding() -> None:
    """A Mistral-style sliding window shorter than a sample: each sample's attention is banded as the model's
    own mask would band it; a padding mask (not a packed row) is an error, not a silent leak."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=4)
    model = MistralForCausalLM(config).eval()
    model.set_attn_implementation("sdpa")
    seqs = [torch.randint(0, 64, (n,)) for n in (9, 3, 12)]
    with torch.no_grad():
        separate = [model(input_ids=s[None], use_cache=False).logits[0] for s in seqs]
        batch = SamplePackingCollator()([{"input_ids": s, "labels": s.clone(), "sample_id": str(i)}
                                         for i, s in enumerate(seqs)])
        from medllava.attention import register

        register()
        model.set_attn_implementation(VARLEN_SDPA)
        packed = model(**{k: batch[k] for k in ("input_ids", *BOUNDARY_KEYS)}).logits[0]
        with pytest.raises(ValueError, match="packed rows"):
            model(input_ids=seqs[0][None], attention_mask=torch.ones(1, 9, dtype=torch.long).index_fill(1, torch.tensor([0]), 0))
    torch.testing.assert_close(packed, torch.cat(separate), atol=1e-5, rtol=1e-5)


def test_runner_packs_by_default_and_respects_the_probe(tmp_path: Path, phantom: Path, base_models: dict) -> None:
    """The runner packs with the LLM on VARLEN_SDPA; a collator whose rows leak (its own probe shows it, nothing
    is patched) falls back to padded batches on plain SDPA with packing 'auto' and is an error with 'true'; an LLM
    whose attention cannot read the boundaries is not packed."""
    from medllava.config import ConfigError, config_from_dict
    from medllava.train import sft

    from .conftest import stage_dict

    cfg = stage_dict(tmp_path, phantom, init_from=base_models[("clip", "llama")])
    run = sft.prepare_sft(config_from_dict(cfg))
    assert isinstance(run.trainer.train_dataset, SFTDataset)  # batches count samples; each is packed
    assert isinstance(run.trainer.data_collator, SamplePackingCollator)
    assert llm_attention(run.trainer.model) == VARLEN_SDPA
    assert run.trainer.model.config.vision_config._attn_implementation == "sdpa"  # the tower keeps its own
    run.trainer.train()  # packed micro-batches train end to end
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in run.trainer.state.log_history if "loss" in h)

    cfg["run"]["resume"] = "never"  # the same folder, other settings: these are new runs, not resumes
    run = sft.prepare_sft(config_from_dict(cfg))
    run.trainer.data_collator = LeakyCollator(filler=run.trainer.data_collator.filler)
    sft.check_packing(config_from_dict(cfg), run.trainer, run.processor)
    assert isinstance(run.trainer.data_collator, SFTCollator)  # auto: padded instead, with a warning
    assert llm_attention(run.trainer.model) == "sdpa"
    cfg["data"]["packing"] = True
    run = sft.prepare_sft(config_from_dict(cfg))
    run.trainer.data_collator = LeakyCollator(filler=run.trainer.data_collator.filler)
    with pytest.raises(ConfigError, match="not isolated"):
        sft.check_packing(config_from_dict(cfg), run.trainer, run.processor)
    cfg["data"]["packing"] = False
    assert isinstance(sft.prepare_sft(config_from_dict(cfg)).trainer.data_collator, SFTCollator)

    cfg["model"]["attn_implementation"] = "flex_attention"
    cfg["data"]["packing"] = True
    with pytest.raises(ConfigError, match="cannot isolate packed samples"):
        sft.prepare_sft(config_from_dict(cfg))
    cfg["data"]["packing"] = "auto"
    assert isinstance(sft.prepare_sft(config_from_dict(cfg)).trainer.data_collator, SFTCollator)


def test_retired_pack_length_says_what_changed() -> None:
    from medllava.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match="data.pack_length: no longer used"):
        config_from_dict({"model": {"init_from": "x"}, "data": {"train_files": ["a.jsonl"], "pack_length": 512}})


class LeakyCollator(SamplePackingCollator):
    """A packing collator with the classic mistake: the row forgets its boundaries (no cu_seq_lens, positions
    counting through the whole row), so every implementation runs it as one sequence."""

    def __call__(self, features: list) -> dict:
        batch = super().__call__(features)
        del batch["cu_seq_lens_q"], batch["cu_seq_lens_k"], batch["max_length_q"], batch["max_length_k"]
        batch["position_ids"] = torch.arange(batch["input_ids"].shape[1])[None]
        return batch


def test_the_probe_checks_the_collators_own_layout(setup: tuple) -> None:
    """No monkeypatching: the probe runs the collator it is given, so a leaking layout returns False."""
    model, processor, dataset = setup
    filler = dataset.image_filler()
    isolated, diff, leak = packing_isolates(model, len(processor.tokenizer), SamplePackingCollator(filler=filler))
    assert isolated and diff < 1e-4 < leak, (diff, leak)
    isolated, diff, leak = packing_isolates(model, len(processor.tokenizer), LeakyCollator(filler=filler))
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
    assert isinstance(run.trainer.data_collator, SamplePackingCollator)
    assert llm_attention(run.trainer.model) == VARLEN_SDPA
