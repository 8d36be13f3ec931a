"""Export a stage output as a standalone Hugging Face model folder, verify it, and optionally push it.

    medllava export RUN_DIR --out DIR [--push-to-hub REPO_ID] [--private] [--dry-run]

1. load RUN_DIR; a LoRA adapter is merged into its base reloaded in 16/32 bits (never into a 4-bit base);
2. save safetensors shards, processor, chat template and generation config;
3. write a model card (encoder, LLM, stages run with data and hyper-parameters, evaluation figures found in
   the stage folders, licence, intended use, medical disclaimer);
4. verify: a separate Python process that never imports medllava reloads the folder with plain transformers
   and its logits on a probe image + prompt are compared with the unmerged model's;
5. push with huggingface_hub (token from HF_TOKEN or the saved login; never printed), or list what would
   be uploaded with --dry-run.
"""

from __future__ import annotations

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

from medllava.model import ModelLoadError, adapter_base_path, is_adapter_dir, load_model, save_model
from medllava.train.common import RUN_FACTS, STAGE_CONFIG_NAME

logger = logging.getLogger(__name__)

PROBE_PROMPT = "Describe the findings in this image."
VERIFY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor
    folder, image_path, prompt, out_path = sys.argv[1:5]
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[Image.open(image_path).convert("RGB")], text=[text], return_tensors="pt")
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
    if c.get("kind") != "grpo":
        packing = f.get("packing")
        lines.append(f"- packing: {'on' if packing else 'off' if packing is False else d.get('packing')} "
                     f"(at most {d.get('pack_length') or d.get('max_length')} tokens per row); max_length {d.get('max_length')}, "
                     f"rendering {d.get('format')}")
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


def model_card(lineage: Lineage, *, license_id: str, repo_id: str | None, verification: dict[str, Any]) -> str:
    """README.md with Hub metadata, the training lineage, evaluation figures and the medical disclaimer."""
    base_models = [m for m in (lineage.vision_tower, lineage.llm) if m and not Path(m).exists()]
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
             "A LLaVA-style medical vision-language assistant trained with medllava. It is a stock "
             "`LlavaForConditionalGeneration`: it loads with plain `transformers` (no custom code, no "
             "`trust_remote_code`).", "",
             "## Model", "",
             f"- Vision encoder: `{lineage.vision_tower or 'unknown'}`",
             f"- Language model: `{lineage.llm or 'unknown'}`",
             "- Projector: LLaVA-1.5 two-layer GELU MLP", ""]
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
                  "| after stage | n | accuracy | chance | blank-image accuracy | decoding |", "|---|---:|---:|---:|---:|---|"]
        for s in evaluated:
            m = s.metrics or {}
            blind = (m.get("blind") or {}).get("accuracy")
            p = m.get("prompt") or {}
            decoding = (f"{p.get('decoding', 'greedy')}, {p.get('mode', 'plain')} prompt, at most "
                        f"{p.get('max_new_tokens', 64)} new tokens") if p else "greedy"
            lines.append(f"| {s.config.get('name')} | {m.get('n_closed')} | {m.get('accuracy', 0):.3f} | "
                         f"{m.get('chance', 0):.3f} | {'-' if blind is None else f'{blind:.3f}'} | {decoding} |")
        lines.append("")
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
        f"Reloaded with plain transformers in a separate process: max |logit difference| against the unmerged "
        f"model = {verification.get('max_abs_logit_diff', float('nan')):.2e} "
        f"(tolerance {verification.get('tolerance')}).", "",
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
    inputs = processor(images=[image], text=[text], return_tensors="pt")
    return model(**inputs).logits[0].float().numpy()


def verify_export(folder: Path, reference: np.ndarray, image_path: Path, tolerance: float) -> dict[str, Any]:
    """Reload `folder` in a fresh interpreter without medllava and compare its probe logits."""
    with tempfile.TemporaryDirectory() as tmp:
        script, out = Path(tmp) / "verify.py", Path(tmp) / "logits.npy"
        script.write_text(VERIFY_SCRIPT, encoding="utf-8")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        result = subprocess.run([sys.executable, str(script), str(folder.resolve()), str(image_path), PROBE_PROMPT, str(out)],
                                capture_output=True, text=True, cwd=tmp, env=env, timeout=1800)
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
        raise ExportError(f"exported model's logits differ from the unmerged model's by {diff:.3e} (> {tolerance})")
    return report


EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Saving in 16 bits rounds every weight: the probe logits then move by up to a few hundredths.
DEFAULT_TOLERANCE = {"float32": 1e-4, "bfloat16": 0.25, "float16": 0.05}


def export(run_dir: str | Path, out_dir: str | Path, *, license_id: str = "apache-2.0", repo_id: str | None = None,
           dtype: str = "float32", max_shard_size: str = "5GB", tolerance: float | None = None,
           allow_pickle: bool = False) -> dict[str, Any]:
    """Merge, save, card, verify. Returns a report; raises ExportError when verification fails."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not run_dir.is_dir():
        raise ModelLoadError(f"{run_dir}: no such run folder")
    image = probe_image()
    # The reference is the model as trained: for an adapter, the base with the adapter applied (not merged).
    adapter = is_adapter_dir(run_dir)
    reference_model, processor = load_model(run_dir, dtype=torch.float32, adapter="frozen" if adapter else "merge",
                                            allow_pickle=allow_pickle)
    reference_model.eval()
    reference = probe_logits(reference_model, processor, image)
    merged = reference_model.merge_and_unload() if adapter else reference_model
    merged.config._name_or_path = ""
    merged.to(EXPORT_DTYPES[dtype])
    out_dir.mkdir(parents=True, exist_ok=True)
    save_model(merged, processor, out_dir, max_shard_size=max_shard_size)
    with tempfile.TemporaryDirectory() as tmp:
        image_path = Path(tmp) / "probe.png"
        image.save(image_path)
        tol = DEFAULT_TOLERANCE[dtype] if tolerance is None else tolerance
        verification = verify_export(out_dir, reference, image_path, tol)
    lineage = stage_lineage(run_dir)
    (out_dir / "README.md").write_text(model_card(lineage, license_id=license_id, repo_id=repo_id, verification=verification),
                                       encoding="utf-8")
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
