"""Export a stage output as a standalone Hugging Face model folder, verify it, and optionally push it.

    medllava export RUN_DIR --out DIR [--push-to-hub REPO_ID] [--private] [--dry-run]

1. load RUN_DIR; a LoRA adapter is merged into its base reloaded in 16/32 bits (never into a 4-bit base);
2. save safetensors shards, processor, chat template and generation config;
3. write a model card (encoder, LLM, stages run with data and hyper-parameters, evaluation figures found in
   the stage folders, licence, intended use, medical disclaimer);
4. verify: a separate Python process that never imports medllava reloads the folder with plain transformers
   in its saved dtype (bf16 by default) and its logits on a probe image + prompt are compared with the saved
   model's; a LoRA merge is checked against the unmerged adapter; one model is in memory at a time;
5. push with huggingface_hub (token from HF_TOKEN or the saved login; never printed), or list what would
   be uploaded with --dry-run.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image

from medllava.evaluate import describe_settings, write_eval_settings
from medllava.model import ModelLoadError, adapter_base_path, is_adapter_dir, load_model, save_model, widest_dtype
from medllava.train.common import RUN_FACTS, STAGE_CONFIG_NAME

logger = logging.getLogger(__name__)

PROBE_PROMPT = "Describe the findings in this image."
VERIFY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor
    folder, image_path, prompt, out_path, dtype, device = sys.argv[1:7]
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=getattr(torch, dtype)).to(device).eval()
    processor = AutoProcessor.from_pretrained(folder)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[Image.open(image_path).convert("RGB")], text=[text], return_tensors="pt").to(device)
    with torch.no_grad():
        logits = model(**inputs).logits[0].float().numpy()
        generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    np.save(out_path, logits)
    leaked = sorted(m for m in sys.modules if m == "medllava" or m.startswith("medllava."))
    print(json.dumps({"class": type(model).__name__, "generated_tokens": int(generated.shape[1] - inputs["input_ids"].shape[1]),
                      "medllava_imported": leaked}))
    """
)


class ExportError(RuntimeError):
    """The export could not be completed or did not verify."""


@dataclass
class StageInfo:
    """One stage of the chain that produced a model, as recorded in its medllava_stage.yaml."""

    folder: str
    config: dict[str, Any]
    metrics: dict[str, Any] | None = None
    facts: dict[str, Any] | None = None
    """medllava_run.json: ranks, the batch they made, packing, data files with record counts and hashes."""


@dataclass
class Lineage:
    stages: list[StageInfo] = field(default_factory=list)
    vision_tower: str | None = None
    llm: str | None = None
    starting_model: str | None = None
    """The checkpoint the first stage started from (a Qwen2.5-VL, a MedGemma ...), when it was not assembled."""


def stage_lineage(run_dir: str | Path, limit: int = 16) -> Lineage:
    """Follow init_from (and adapter bases) back to the first stage; oldest stage first."""
    lineage = Lineage()
    folder: Path | None = Path(run_dir)
    seen = set()
    while folder is not None and folder.resolve() not in seen and len(seen) < limit:
        seen.add(folder.resolve())
        cfg_path = folder / STAGE_CONFIG_NAME
        if not cfg_path.is_file():
            if is_adapter_dir(folder):
                folder = Path(adapter_base_path(folder))
                continue
            break
        cfg = yaml.safe_load(cfg_path.read_text(encoding="utf-8"))
        metrics_path = folder / "eval" / "metrics.json"
        metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else None
        facts_path = folder / RUN_FACTS
        facts = json.loads(facts_path.read_text(encoding="utf-8")) if facts_path.is_file() else None
        lineage.stages.insert(0, StageInfo(str(folder), cfg, metrics, facts))
        model = cfg.get("model", {})
        if model.get("vision_tower"):
            lineage.vision_tower, lineage.llm = model["vision_tower"], model["llm"]
        init = model.get("init_from")
        folder = Path(init) if init else None
        if init and not (folder / STAGE_CONFIG_NAME).is_file() and not is_adapter_dir(folder):
            lineage.starting_model = init
    return lineage


def _stage_row(stage: StageInfo) -> str:
    c = stage.config
    t, o, q = c.get("trainable", {}), c.get("optim", {}), c.get("quantization", {})
    mode = ", ".join(f"{k} {v}" for k, v in t.items())
    if q.get("bits"):
        mode += f" ({q['bits']}-bit base)"
    lr = f"{o.get('lr')}" + (f" (projector {o['projector_lr']})" if o.get("projector_lr") else "")
    length = f"{o.get('max_steps')} steps" if (o.get("max_steps") or -1) > 0 else f"{o.get('epochs')} epochs"
    data = ", ".join(Path(f).name for f in c.get("data", {}).get("train_files", []))
    return f"| {c.get('name')} | {c.get('kind')} | {data} | {mode} | {lr} | {length} | {c.get('run', {}).get('precision')} |"


def _reproduction(stage: StageInfo) -> list[str]:
    """Every setting that reproduces one stage, as a short list (from its resolved config and run facts)."""
    c, f = stage.config, stage.facts or {}
    o, r, d, t = c.get("optim", {}), c.get("run", {}), c.get("data", {}), c.get("trainable", {})
    lines = [f"### {c.get('name')} ({c.get('kind')})", ""]
    unit = f.get("batch_unit", "samples")
    if f:
        batch = (f"{f['global_batch']} {unit} per optimizer step = {o.get('per_device_batch_size')} per device x "
                 f"{f['world_size']} rank(s) x {f['accumulation']} accumulation")
    else:
        batch = f"{o.get('per_device_batch_size')} per device x {o.get('grad_accum')} accumulation per rank"
    lines.append(f"- global batch: {batch}" + (f" (stated: {o['global_batch_size']})" if o.get("global_batch_size") else ""))
    if f.get("packing") is not None or (not f and c.get("kind") == "sft"):
        packing = f.get("packing")
        lines.append(f"- packing: {'on (one row per micro-batch, samples isolated)' if packing else 'off' if packing is False else d.get('packing')}"
                     f"; max_length {d.get('max_length')}, rendering {d.get('format')}")
    length = f"{o.get('max_steps')} steps" if (o.get("max_steps") or -1) > 0 else f"{o.get('epochs')} epochs"
    lr = f"{o.get('lr')}" + (f", projector {o['projector_lr']}" if o.get("projector_lr") else "")
    lines.append(f"- optimizer: {o.get('optimizer')}, learning rate {lr}, weight decay {o.get('weight_decay')}, "
                 f"schedule {o.get('scheduler')}, warm-up {o.get('warmup_ratio')} of the steps, {length}, "
                 f"gradient clipping {o.get('max_grad_norm')}")
    lines.append("- trainable: " + ", ".join(f"{k} {v}" for k, v in t.items()))
    if "lora" in t.values():
        lo = c.get("lora", {})
        targets = lo.get("target_modules")
        lines.append(f"- LoRA: r {lo.get('r')}, alpha {lo.get('alpha')}, dropout {lo.get('dropout')}, targets "
                     f"{', '.join(targets) if isinstance(targets, list) else targets}")
    q = c.get("quantization", {})
    lines.append(f"- quantization: {q['bits']}-bit {q.get('quant_type')}" + (" with double quantization" if q.get("double_quant") else "")
                 if q.get("bits") else "- quantization: none")
    if c.get("kind") == "grpo":
        g = c.get("grpo", {})
        rewards = ", ".join(f"{k} {v}" for k, v in (g.get("rewards") or {}).items())
        lines.append(f"- GRPO: {g.get('num_generations')} generations per question, completion length "
                     f"{g.get('max_completion_length')}, temperature {g.get('temperature')}, top-p {g.get('top_p')}, "
                     f"beta (KL) {g.get('beta')}, epsilon {g.get('epsilon')}, prompt {g.get('prompt')}, rewards "
                     f"{rewards}" + (" (accuracy gated on format)" if g.get("gate_accuracy_on_format") else ""))
    if c.get("kind") == "dpo":
        dpo = c.get("dpo", {})
        losses = dpo.get("loss_type")
        lines.append(f"- DPO: beta {dpo.get('beta')}, loss {', '.join(losses) if isinstance(losses, list) else losses}"
                     + (f" (weights {dpo['loss_weights']})" if dpo.get("loss_weights") else "")
                     + (f", SFT term (RPO) weight {dpo['sft_weight']}" if dpo.get("sft_weight") else "")
                     + f", per-pair weights {'on' if dpo.get('pair_weights', True) else 'off'}"
                     + ("" if dpo.get("f_divergence_type", "reverse_kl") == "reverse_kl" else
                        f", f-divergence {dpo['f_divergence_type']}"))
        for file, recipe in (f.get("pair_recipes") or {}).items():
            made = ", ".join(f"{k} {v}" for k, v in (recipe.get("made") or {}).items())
            lines.append(f"- pairs `{Path(file).name}`: made by data_recipes/preference_pairs.py from "
                         f"`{recipe.get('model')}` ({recipe.get('n')} samples per question, temperature "
                         f"{recipe.get('temperature')}): {made}; {recipe.get('skipped', 0)} skipped")
    lines.append(f"- precision {r.get('precision')}, seed {r.get('seed')}, DeepSpeed {r.get('deepspeed') or 'none'}, "
                 f"gradient checkpointing {r.get('gradient_checkpointing')}"
                 + (f", DICOM window {d['window']}" if d.get("window") else ""))
    files = f.get("data_files") or [{"file": x} for x in d.get("train_files", [])]
    for entry in files:
        detail = [f"{entry['records']} records" if entry.get("records") is not None else None,
                  f"sha256 {entry['sha256']}" if entry.get("sha256") else None]
        lines.append(f"- data: `{entry['file']}`" + (f" ({', '.join(x for x in detail if x)})" if any(detail) else ""))
    if f.get("valid_records") is not None:
        lines.append(f"- records used: {f['valid_records']} (see the stage's data_report.json for any skipped)")
    return lines + [""]


def _overlap_cell(metrics: dict[str, Any]) -> str:
    """'3 of 100 records (0.812 on the rest)', or 'not checked' (eval without --prior-from)."""
    overlap = metrics.get("overlap")
    if not overlap:
        return "not checked"
    clean = (metrics.get("clean") or {}).get("accuracy")
    flagged = len(set(overlap["contaminated"]["ids"]) | set(overlap["repeated_pair"]["ids"]))
    return f"{flagged} of {overlap['eval_records']} records" + ("" if clean is None else f" ({clean:.3f} on the rest)")


def model_card(lineage: Lineage, *, license_id: str, repo_id: str | None, verification: dict[str, Any],
               eval_settings: str | None = None) -> str:
    """README.md with Hub metadata, the training lineage, evaluation figures and the medical disclaimer."""
    base_models = [m for m in (lineage.vision_tower, lineage.llm, lineage.starting_model) if m and not Path(m).exists()]
    architecture = verification.get("class") or "transformers model"
    meta: dict[str, Any] = {
        "license": license_id,
        "library_name": "transformers",
        "pipeline_tag": "image-text-to-text",
        "tags": ["medical", "llava", "medllava", "vision-language"],
    }
    if base_models:
        meta["base_model"] = base_models
    name = repo_id or "medllava model"
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "", f"# {name}", "",
             "A medical vision-language assistant trained with medllava. It is a stock "
             f"`{architecture}`: it loads with plain `transformers` (no custom code, no "
             "`trust_remote_code`).", "",
             "## Model", ""]
    if lineage.starting_model:
        lines.append(f"- Started from: `{lineage.starting_model}`")
    if lineage.vision_tower or architecture == "LlavaForConditionalGeneration":  # assembled from a tower + LLM
        lines += [f"- Vision encoder: `{lineage.vision_tower or 'unknown'}`",
                  f"- Language model: `{lineage.llm or 'unknown'}`",
                  "- Projector: LLaVA-1.5 two-layer GELU MLP"]
    lines.append("")
    if lineage.stages:
        lines += ["## Training", "", "| stage | kind | data | trainable | learning rate | length | precision |",
                  "|---|---|---|---|---|---|---|"]
        lines += [_stage_row(s) for s in lineage.stages]
        lines.append("")
        lines += ["## Reproducing the run", "", "Each stage's settings, from its `medllava_stage.yaml` (the resolved "
                  "config) and `medllava_run.json` (ranks, batch, packing and data as the run had them).", ""]
        for s in lineage.stages:
            lines += _reproduction(s)
    evaluated = [s for s in lineage.stages if s.metrics]
    if evaluated:
        lines += ["## Evaluation", "", "Held-out closed questions (medllava eval); decoding as listed, greedy unless "
                  "stated.", "",
                  "| after stage | n | accuracy | chance | blank-image accuracy | skipped (counted wrong) | "
                  "overlap with training (clean accuracy) | decoding |",
                  "|---|---:|---:|---:|---:|---:|---|---|"]
        for s in evaluated:
            m = s.metrics or {}
            blind = (m.get("blind") or {}).get("accuracy")
            p = m.get("prompt") or {}
            decoding = (f"{p.get('decoding', 'greedy')}, {p.get('mode', 'plain')} prompt, at most "
                        f"{p.get('max_new_tokens', 64)} new tokens") if p else "greedy"
            lines.append(f"| {s.config.get('name')} | {m.get('n_closed')} | {m.get('accuracy', 0):.3f} | "
                         f"{m.get('chance', 0):.3f} | {'-' if blind is None else f'{blind:.3f}'} | "
                         f"{m.get('n_skipped', 0)} | {_overlap_cell(m)} | {decoding} |")
        lines.append("")
    if eval_settings:
        lines += [f"Evaluate it as it was trained: {eval_settings} (kept in `medllava_eval.json`, which "
                  "`medllava eval` reads).", ""]
    lines += [
        "## Usage", "", "```python",
        "from transformers import AutoModelForImageTextToText, AutoProcessor",
        f'model = AutoModelForImageTextToText.from_pretrained("{repo_id or "PATH"}")',
        f'processor = AutoProcessor.from_pretrained("{repo_id or "PATH"}")',
        'messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]',
        "prompt = processor.apply_chat_template(messages, add_generation_prompt=True)",
        'inputs = processor(images=[image], text=[prompt], return_tensors="pt")',
        "print(processor.decode(model.generate(**inputs, max_new_tokens=128)[0], skip_special_tokens=True))",
        "```", "",
        "## Intended use", "",
        "Research on medical vision-language modelling: visual question answering and description of medical "
        "images in experimental settings, and as a starting point for further fine-tuning.", "",
        "## Medical disclaimer", "",
        "This model is **not a medical device** and is not intended for diagnosis, treatment, or any clinical "
        "decision. Its outputs can be wrong, incomplete or biased by its training data, and they have not been "
        "validated on patients. Do not use it to make or support decisions about patient care; a qualified "
        "professional must review any output used outside research.", "",
        "## Licence", "",
        f"Released under `{license_id}`. The licences of the base vision encoder and language model, and the "
        "terms of the training data, also apply.", "",
        "## Export verification", "",
        f"Saved in {verification.get('dtype', '?')} and reloaded with plain transformers in a separate process: max "
        f"|logit difference| against the model as saved = {verification.get('max_abs_logit_diff', float('nan')):.2e} "
        f"(tolerance {verification.get('tolerance', float('nan')):.2e}). Rounding from the trained weights "
        f"({verification.get('loaded_dtype', '?')}) moved the probe logits by at most "
        f"{verification.get('rounding_drift_max_abs_logit_diff', float('nan')):.2e}, with "
        f"{100 * verification.get('rounding_drift_top1_agreement', float('nan')):.1f}% of the top-1 tokens unchanged."
        + (f" The LoRA merge reproduces the adapter within "
           f"{verification['merge_max_abs_logit_diff']:.2e}." if "merge_max_abs_logit_diff" in verification else ""),
        "",
    ]
    return "\n".join(lines)


def probe_image(size: int = 64) -> Image.Image:
    """A deterministic probe image (gradient with a bright disc)."""
    y, x = np.mgrid[0:size, 0:size]
    arr = ((x + y) * (255 / (2 * size))).astype(np.uint8)
    arr[(x - size * 0.3) ** 2 + (y - size * 0.5) ** 2 < (size * 0.1) ** 2] = 255
    return Image.fromarray(np.stack([arr] * 3, axis=-1))


@torch.no_grad()
def probe_logits(model: Any, processor: Any, image: Image.Image, prompt: str = PROBE_PROMPT) -> np.ndarray:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[image], text=[text], return_tensors="pt").to(next(model.parameters()).device)
    return model(**inputs).logits[0].float().cpu().numpy()


def verify_export(folder: Path, reference: np.ndarray, image_path: Path, tolerance: float, *,
                  dtype: torch.dtype = torch.float32, device: str = "cpu") -> dict[str, Any]:
    """Reload `folder` in a fresh interpreter without medllava, in `dtype` on `device` (see `probe_setup`), and
    compare its probe logits with `reference` (the saved model's own logits, computed before it was written)."""
    with tempfile.TemporaryDirectory() as tmp:
        script, out = Path(tmp) / "verify.py", Path(tmp) / "logits.npy"
        script.write_text(VERIFY_SCRIPT, encoding="utf-8")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        result = subprocess.run([sys.executable, str(script), str(folder.resolve()), str(image_path), PROBE_PROMPT, str(out),
                                 str(dtype).removeprefix("torch."), device],
                                capture_output=True, text=True, cwd=tmp, env=env, timeout=3600)
        if result.returncode != 0:
            raise ExportError(f"the exported folder does not load with plain transformers:\n{result.stderr[-2000:]}")
        report = json.loads(result.stdout.strip().splitlines()[-1])
        logits = np.load(out)
    if report["medllava_imported"]:
        raise ExportError(f"verification imported medllava ({report['medllava_imported']})")
    if logits.shape != reference.shape:
        raise ExportError(f"logit shapes differ: exported {logits.shape} vs reference {reference.shape}")
    diff = float(np.max(np.abs(logits - reference)))
    report.update(max_abs_logit_diff=diff, tolerance=tolerance, passed=diff <= tolerance)
    if diff > tolerance:
        raise ExportError(f"the reloaded export's logits differ from the saved model's by {diff:.3e} (> {tolerance})")
    return report


EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MERGE_TOLERANCE = 1e-4
# What a faithful reload may differ by, relative to the logits' scale: the same values through the same function,
# up to summation order (kernels, thread counts). fp32: reloads on CPU measured up to 1.6e-5 at logits near 1 on
# the tiny models, bound 1e-4; bf16 and fp16 (GPU probes): about 2.5 units in the last place of the dtype (not yet
# measured on a GPU here).
RELOAD_RELATIVE = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 2.5e-3}


def reload_tolerance(dtype: str, logits: np.ndarray) -> float:
    """RELOAD_RELATIVE[dtype] x max(1, max |logit|): the bound for the probe computed in `dtype`."""
    return RELOAD_RELATIVE[dtype] * max(1.0, float(np.max(np.abs(logits))))


SAFETENSORS_FLOATS = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def stored_dtype(folder: str | Path) -> torch.dtype:
    """The widest floating dtype among a model folder's safetensors tensors (read from the headers only)."""
    from safetensors import safe_open

    found = set()
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            found |= {SAFETENSORS_FLOATS[d] for d in (fh.get_slice(k).get_dtype() for k in fh.keys())
                      if d in SAFETENSORS_FLOATS}
    return widest_dtype(found) if found else torch.float32


def round_saved_tensors(model: torch.nn.Module, dtype: torch.dtype, compute_dtype: torch.dtype) -> None:
    """Round what is saved -- parameters and persistent buffers -- to `dtype`, held in `compute_dtype`. Buffers that
    are not saved (rotary frequencies) keep their dtype, as a fresh load computes them: `model.to(dtype)` would
    round those too, and the probe would then compute another function than the reloaded export."""
    saved = set(model.state_dict(keep_vars=True))
    for module_name, module in model.named_modules():
        tensors = [(name, p) for name, p in module.named_parameters(recurse=False)]
        tensors += [(name, b) for name, b in module.named_buffers(recurse=False)
                    if b is not None and (f"{module_name}.{name}" if module_name else name) in saved]
        for name, tensor in tensors:
            if not tensor.is_floating_point() or tensor.dtype == dtype == compute_dtype:  # saved as it is
                continue
            if tensor.dtype == compute_dtype:  # round in place: one parameter's temporary at a time, no second model
                tensor.data.copy_(tensor.data.to(dtype))
            elif isinstance(tensor, torch.nn.Parameter):
                tensor.data = tensor.data.to(dtype).to(compute_dtype)
            else:
                setattr(module, name, tensor.to(dtype).to(compute_dtype))


def cpu_computes_natively(dtype: torch.dtype) -> bool:
    """Whether this CPU has matrix instructions for `dtype` (bf16: AVX512-BF16 or AMX; fp16: AMX-FP16). Without them
    PyTorch's 16-bit matrix products crawl: 0.24 GFLOPS in bf16 against 100 in fp32 on an AMD EPYC without
    AVX-512, where a Xeon with AVX512-BF16 runs bf16 at 65 GFLOPS beside 111 in fp32 (both measured here)."""
    if dtype == torch.float32:
        return True
    checks = {torch.bfloat16: ("_is_avx512_bf16_supported", "_is_amx_tile_supported"),
              torch.float16: ("_is_amx_fp16_supported",)}.get(dtype, ())
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def probe_setup(dtype: str) -> tuple[torch.dtype, str]:
    """Where and in which dtype the probe logits are computed: in the export dtype on a GPU, and on a CPU with
    instructions for it; elsewhere in fp32 from weights already rounded to the export dtype (exactly the saved
    values), since a 16-bit forward pass of a 7B model there takes hours."""
    if torch.cuda.is_available():
        return EXPORT_DTYPES[dtype], "cuda"
    if cpu_computes_natively(EXPORT_DTYPES[dtype]):
        return EXPORT_DTYPES[dtype], "cpu"
    return torch.float32, "cpu"


def export(run_dir: str | Path, out_dir: str | Path, *, license_id: str = "apache-2.0", repo_id: str | None = None,
           dtype: str = "bfloat16", max_shard_size: str = "5GB", tolerance: float | None = None,
           allow_pickle: bool = False) -> dict[str, Any]:
    """Merge, save, card, verify. Returns a report; raises ExportError when verification fails.

    One model in memory at a time: the run is loaded (exactly as trained: in the widest dtype its weights, or a
    LoRA stage's base and adapter, are stored in; fp32 on a CPU without instructions for it), merged, rounded to
    `dtype` (tensor by tensor: weights loaded in their stored dtype are views of the memory-mapped files and cost no
    anonymous memory, so the peak is about one copy in `dtype`), saved, and released before the verification
    process loads the export. Checks: the merge reproduces the unmerged adapter (1e-4
    when merged in fp32), and the reload reproduces the saved model (`reload_tolerance`); the rounding drift from
    the trained weights to `dtype` is reported, not judged."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not run_dir.is_dir():
        raise ModelLoadError(f"{run_dir}: no such run folder")
    image = probe_image()
    adapter = is_adapter_dir(run_dir)
    probe_dtype, device = probe_setup(dtype)
    load_dtype = stored_dtype(run_dir)
    if adapter:
        load_dtype = widest_dtype([load_dtype, stored_dtype(adapter_base_path(run_dir))])
    if device == "cpu" and not cpu_computes_natively(load_dtype):
        load_dtype = torch.float32
    # The reference is the model as trained: for an adapter, the base with the adapter applied (not merged).
    model, processor = load_model(run_dir, dtype=load_dtype, adapter="frozen" if adapter else "merge",
                                  allow_pickle=allow_pickle)
    model.to(device).eval()
    trained = probe_logits(model, processor, image)
    checks: dict[str, Any] = {"loaded_dtype": str(load_dtype).removeprefix("torch."), "dtype": dtype,
                              "probe": f"{str(probe_dtype).removeprefix('torch.')} on {device}"}
    if adapter:
        model = model.merge_and_unload()
        merge_diff = float(np.max(np.abs(probe_logits(model, processor, image) - trained)))
        checks.update(merge_max_abs_logit_diff=merge_diff, merge_tolerance=MERGE_TOLERANCE)
        if load_dtype == torch.float32 and merge_diff > MERGE_TOLERANCE:
            raise ExportError(f"the merged model's logits differ from the adapter's by {merge_diff:.3e}")
    model.config._name_or_path = ""
    round_saved_tensors(model, EXPORT_DTYPES[dtype], probe_dtype)  # in place: never two copies
    saved_logits = probe_logits(model, processor, image)
    checks.update(rounding_drift_max_abs_logit_diff=float(np.max(np.abs(saved_logits - trained))),
                  rounding_drift_top1_agreement=float(np.mean(saved_logits.argmax(-1) == trained.argmax(-1))))
    model.to(EXPORT_DTYPES[dtype])
    out_dir.mkdir(parents=True, exist_ok=True)
    save_model(model, processor, out_dir, max_shard_size=max_shard_size)
    del model
    gc.collect()  # the verification process loads its own copy: this one must be gone by then
    if device == "cuda":
        torch.cuda.empty_cache()
    with tempfile.TemporaryDirectory() as tmp:
        image_path = Path(tmp) / "probe.png"
        image.save(image_path)
        tol = reload_tolerance(str(probe_dtype).removeprefix("torch."), saved_logits) if tolerance is None else tolerance
        verification = {**verify_export(out_dir, saved_logits, image_path, tol, dtype=probe_dtype, device=device),
                        **checks}
    lineage = stage_lineage(run_dir)
    settings = write_eval_settings(run_dir, out_dir)  # the export is evaluated as its last stage was trained
    card = model_card(lineage, license_id=license_id, repo_id=repo_id, verification=verification,
                      eval_settings=describe_settings(settings))
    (out_dir / "README.md").write_text(card, encoding="utf-8")
    (out_dir / "medllava_export.json").write_text(json.dumps({
        "source": str(run_dir), "merged_adapter": adapter, "verification": verification,
        "stages": [s.config.get("name") for s in lineage.stages]}, indent=2) + "\n", encoding="utf-8")
    return {"out": str(out_dir), "merged_adapter": adapter, "verification": verification}


def hub_token_source() -> str:
    """Where a Hub token would come from (never the token itself)."""
    if os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"):
        return "environment (HF_TOKEN)"
    from huggingface_hub import get_token

    return "saved login" if get_token() else "none found"


def push(folder: str | Path, repo_id: str, *, private: bool = False, dry_run: bool = False) -> dict[str, Any]:
    """Upload an exported folder to the Hub; with dry_run, only list what would be uploaded."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    listing = [{"path": str(p.relative_to(folder)), "bytes": p.stat().st_size} for p in files]
    plan = {"repo_id": repo_id, "private": private, "files": listing,
            "total_bytes": sum(f["bytes"] for f in listing), "token": hub_token_source()}
    if dry_run:
        return {**plan, "uploaded": False}
    from huggingface_hub import HfApi

    api = HfApi()  # token from HF_TOKEN or the saved login; never passed through our logs
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                               commit_message="Upload model exported with medllava")
    return {**plan, "uploaded": True, "commit": getattr(commit, "commit_url", str(commit))}
