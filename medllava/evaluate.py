"""Medical VQA evaluation: batched greedy generation over a VQA set, scoring, and the image-reliance check.

Scoring uses `medllava.grading.grade`, the same extraction the GRPO rewards use: closed (yes/no) questions by
word-boundary matching, multiple choice by letter or option text, numbers by value, open questions by
normalised exact match, token F1 and recall of gold tokens (LLaVA-Med's headline open metric). With `blind`,
every question is asked again with blank images; the gap shows how much the answers depend on the image. For
questions with several images (prior and current study, views), `blind` also asks each with its images in reverse
order (a model whose answer does not change is not comparing them; scored against the record's
`answer_if_swapped` where it has one) and with one image blanked at a time (the single-image baselines). With a
text prior (`medllava.prior`, `--prior-from TRAIN_DATA`), every question is also answered with the training set's
most common answer to the same question, no image and no model: accuracy above chance that the prior also reaches
was bought by the question's wording.

Two closed-question figures are kept apart by name: `accuracy` is ours (closed question types -- yes/no,
multiple choice, number -- graded by `medllava.grading`); `llava_med_closed` is LLaVA-Med's (records whose
dataset `answer_type` is CLOSED, whatever the answer; a hit when the normalised prediction contains "yes" or "no"
and contains the normalised gold answer, as LLaVA-Med's run_eval.py scores it). Papers' "closed" figures are the
latter.
Outputs: predictions.jsonl, metrics.json, metrics.md, and a bar chart.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from medllava.data.cache import file_sha256, source_sha256
from medllava.data.records import RecordError
from medllava.data.rl import expand_record
from medllava.data.vqa import VQARecord, format_question, read_vqa
from medllava.grading import grade, normalize_text
from medllava.imaging import ImageError, Window, blank_like, decode_each
from medllava.model import adapter_base_path, decoding_config, is_adapter_dir
from medllava.prior import TextPrior
from medllava.volumes import SliceSpec

logger = logging.getLogger(__name__)

CLOSED_QTYPES = ("yes_no", "multiple_choice", "number")


ABLATION_MAX_IMAGES = 4
"""Per-image ablation (blank one image at a time) for questions with 2 to this many images; a series of slices is
not ablated slice by slice."""


@dataclass
class EvalItem:
    record: VQARecord
    images: list[Any]
    """The image references (resolved paths, or embedded images as read); decoded when their batch runs."""
    prompt: str
    groups: list[int] | None = None
    """How many of `images` each of the record's own images is (a series gives its slices); None: one each."""


@dataclass
class Skipped:
    """A record that could not be asked (unreadable, or its image does not decode): counted as wrong."""

    error: RecordError
    qtype: str | None
    """Its question type when the record was read; None when it could not be (then it counts as closed)."""


EVAL_SETTINGS = "medllava_eval.json"
"""The file an export keeps its last stage's evaluation settings in (PromptSettings), for `medllava eval`."""


@dataclass
class PromptSettings:
    """How questions are put to a model: what its last stage trained with (see `stage_prompt_settings`)."""

    mode: str = "plain"
    """'plain' (instruction-data wording), 'answer' or 'think' (the GRPO prompts, medllava.data.rl)."""
    instruction: str | None = None
    system_prompt: str | None = None
    max_new_tokens: int = 64
    window: str | None = None
    """The stage's DICOM display window (data.window), so a model is evaluated on the images it trained on."""
    slices: dict[str, Any] | None = None
    """The stage's data.slices (how a series or volume becomes slices); None: the defaults."""


def stage_prompt_settings(model_dir: str | Path) -> PromptSettings:
    """The prompt a stage output was trained with, read from its medllava_stage.yaml: a GRPO stage's prompt mode,
    instruction and completion length; an SFT stage's system prompt; the stage's window. An export keeps its last
    stage's settings in medllava_eval.json. Plain settings when there is neither."""
    import yaml

    path = Path(model_dir) / "medllava_stage.yaml"
    if not path.is_file():
        kept = Path(model_dir) / EVAL_SETTINGS
        if kept.is_file():
            return PromptSettings(**json.loads(kept.read_text(encoding="utf-8")))
        return PromptSettings()
    stage = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    data = stage.get("data") or {}
    system_prompt, window, slices = data.get("system_prompt"), data.get("window"), data.get("slices")
    if stage.get("kind") == "grpo":
        g = stage.get("grpo") or {}
        return PromptSettings(mode=g.get("prompt", "plain"), instruction=g.get("instruction"), system_prompt=system_prompt,
                              max_new_tokens=int(g.get("max_completion_length", 64)), window=window, slices=slices)
    return PromptSettings(system_prompt=system_prompt, window=window, slices=slices)


def write_eval_settings(run_dir: str | Path, out_dir: str | Path) -> PromptSettings:
    """Keep a stage output's evaluation settings beside its export (see EVAL_SETTINGS)."""
    settings = stage_prompt_settings(run_dir)
    (Path(out_dir) / EVAL_SETTINGS).write_text(json.dumps(asdict(settings), indent=2) + "\n", encoding="utf-8")
    return settings


def describe_settings(settings: PromptSettings) -> str:
    """'think prompt, up to 512 new tokens, window lung' (the model card's line)."""
    parts = [f"{settings.mode} prompt", f"up to {settings.max_new_tokens} new tokens"]
    if settings.window:
        parts.append(f"window {settings.window}")
    count, spacing = (settings.slices or {}).get("count", 8), (settings.slices or {}).get("spacing", "uniform")
    if (count, spacing) != (8, "uniform"):  # the default is not worth a word
        parts.append(f"series as {count} slices ({spacing if spacing == 'uniform' else f'{spacing} mm apart'})")
    if settings.system_prompt:
        parts.append("the stage's system prompt")
    return ", ".join(parts)


def build_prompt(processor: Any, record: VQARecord, system_prompt: str | None = None, mode: str = "plain",
                 instruction: str | None = None) -> str:
    """The chat-template prompt for one question (the same wording as the instruction data and GRPO)."""
    from medllava.data.render import user_content
    from medllava.data.rl import prompt_text

    messages: list[dict[str, Any]] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    n = len(record.images)  # GRPO's prompts put the images in front of the text, as TRL does in training
    text = format_question(record.question, record.options, n_images=n) if mode == "plain" else \
        "<image>\n" * n + prompt_text(record, mode, instruction)
    messages.append({"role": "user", "content": user_content(processor, text)})
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@torch.no_grad()
def generate_batch(model: Any, processor: Any, prompts: Sequence[str],
                   images: Sequence[Image.Image | Sequence[Image.Image]], max_new_tokens: int = 64, *,
                   num_samples: int = 1, temperature: float = 0.0) -> list[str]:
    """Answers for a batch of prompts (left-padded), each with its image or list of images: greedy by default, or
    `num_samples` sampled answers per prompt at `temperature` (returned prompt by prompt)."""
    tokenizer = processor.tokenizer
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        # one image list per prompt (Gemma 3's processor needs the nesting; the others accept it)
        nested = [[image] if isinstance(image, Image.Image) else list(image) for image in images]
        inputs = processor(text=list(prompts), images=nested, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = side
    device = next(model.parameters()).device
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    inputs = {k: (v.to(device, dtype) if k == "pixel_values" else v.to(device)) for k, v in inputs.items()}
    config = decoding_config(model, max_new_tokens, temperature=temperature, num_return_sequences=num_samples)
    out = model.generate(**inputs, generation_config=config)
    new = out[:, inputs["input_ids"].shape[1]:]
    return [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]


def load_items(data: str | Path, processor: Any, image_folder: str | Path, *, limit: int | None = None,
               system_prompt: str | None = None, mode: str = "plain", instruction: str | None = None,
               slices: SliceSpec | None = None) -> tuple[list[EvalItem], list[Skipped]]:
    """Read the VQA set: records, resolved image references and prompts (no pixels: images are decoded batch by
    batch; a series or volume as its slices, `slices`). Bad records are returned as skipped, never dropped
    silently."""
    items: list[EvalItem] = []
    errors: list[Skipped] = []
    for rec in read_vqa(data):
        if limit is not None and len(items) + len(errors) >= limit:
            break
        if isinstance(rec, RecordError):
            errors.append(Skipped(rec, None))
            continue
        try:
            groups = expand_record(rec, image_folder, slices=slices)
        except RecordError as err:
            errors.append(Skipped(err.located(rec.source, rec.line, rec.id), rec.qtype))
            continue
        items.append(EvalItem(rec, rec.images, build_prompt(processor, rec, system_prompt, mode, instruction),
                              groups))
    return items, errors


def decoded(chunk: Sequence[EvalItem], window: Window | None,
            errors: list[Skipped]) -> tuple[list[EvalItem], list[list[Image.Image]]]:
    """A batch's items whose images all decode, with their images; the others become errors (skipped, counted)."""
    kept, images = [], []
    for it in chunk:
        mine = decode_each(it.images, window)
        bad = next((image for image in mine if isinstance(image, ImageError)), None)
        if bad is not None:
            rec = it.record
            errors.append(Skipped(RecordError(bad.kind, f"{bad.reason} ({bad.path})", source=rec.source, line=rec.line,
                                              record_id=rec.id), rec.qtype))
        else:
            kept.append(it)
            images.append(mine)
    return kept, images


def reliance_variants(images: list[Image.Image], groups: list[int] | None = None) -> dict[str, list[Image.Image]]:
    """The image-reliance checks' inputs for one question: `blind` (every image blank), and when the record gave 2
    or more images `order` (the record's images reversed) and, up to ABLATION_MAX_IMAGES of them,
    `without_image_<k>` (the record's image k blank, the others kept). `groups`: how many of `images` each record
    image is (a series' slices stay together and in their order); None: one each."""
    groups = groups or [1] * len(images)
    bounds = [sum(groups[:k]) for k in range(len(groups) + 1)]
    parts = [images[bounds[k]:bounds[k + 1]] for k in range(len(groups))]
    out = {"blind": [blank_like(im) for im in images]}
    if len(parts) >= 2:
        out["order"] = [im for part in reversed(parts) for im in part]
        if len(parts) <= ABLATION_MAX_IMAGES:
            for k in range(len(parts)):
                out[f"without_image_{k + 1}"] = [blank_like(im) if j == k else im
                                                 for j, part in enumerate(parts) for im in part]
    return out


def chance_level(record: VQARecord) -> float:
    if record.qtype == "multiple_choice" and record.options:
        return 1.0 / len(record.options)
    if record.qtype == "yes_no":
        return 0.5
    return 0.0


def _mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 4) if values else 0.0


def score(rows: list[dict[str, Any]], key: str = "prediction",
          skipped: Sequence[str | None] = (), gold: str = "answer") -> dict[str, Any]:
    """Metrics over prediction rows: overall closed accuracy, per question type, per modality and topic.

    `skipped`: the question types of records that could not be asked (None: unreadable, counted as closed). They
    count as wrong in `accuracy` and in their type's figure; `accuracy_of_asked` leaves them out. The slices by
    modality, topic and organ are over the asked records."""
    graded = []
    for row in rows:
        g = grade(row[key], row[gold], row["qtype"], row.get("options"))
        graded.append((row, g))
    closed = [(r, g) for r, g in graded if r["qtype"] in CLOSED_QTYPES]
    missed = [0.0] * sum(1 for q in skipped if q is None or q in CLOSED_QTYPES)
    metrics: dict[str, Any] = {
        "n": len(rows),
        "accuracy": _mean([g.correct for _, g in closed] + missed),
        "n_closed": len(closed) + len(missed),
        "accuracy_of_asked": _mean([g.correct for _, g in closed]),
    }
    by_type: dict[str, Any] = {}
    for qtype in sorted({r["qtype"] for r in rows} | {q for q in skipped if q is not None}):
        sub = [(r, g) for r, g in graded if r["qtype"] == qtype]
        lost = sum(1 for q in skipped if q == qtype)
        entry = {"n": len(sub) + lost,
                 "accuracy" if qtype != "open" else "exact_match": _mean([g.correct for _, g in sub] + [0.0] * lost)}
        if lost:
            entry["skipped"] = lost
        if qtype == "open":
            entry["f1"] = _mean([g.f1 for _, g in sub] + [0.0] * lost)
            entry["recall"] = _mean([g.recall for _, g in sub] + [0.0] * lost)
        else:
            entry["unparsed"] = sum(1 for _, g in sub if g.parsed is None)
        if qtype == "multiple_choice" and sub:
            # answers that name one option of their own question (an answer naming another question's option,
            # or its letter with another text, names none): below 1, the model answers some form by rote
            entry["own_option_rate"] = _mean([float(g.parsed is not None) for _, g in sub])
        by_type[qtype] = entry
    metrics["by_qtype"] = by_type
    for field in ("modality", "topic", "organ", "answer_type"):
        groups: dict[str, list[float]] = defaultdict(list)
        for r, g in closed:
            if r.get(field) is not None:
                groups[str(r[field])].append(g.correct)
        if groups:
            metrics[f"by_{field}"] = {k: {"n": len(v), "accuracy": _mean(v)} for k, v in sorted(groups.items())}
    return metrics


LLAVA_MED_CLOSED = ("LLaVA-Med run_eval.py: records with answer_type CLOSED; hit when the normalised prediction "
                    "contains 'yes' or 'no' and contains the normalised gold answer")


def llava_med_closed(rows: list[dict[str, Any]], key: str = "prediction") -> dict[str, Any] | None:
    """LLaVA-Med's closed metric over the rows whose dataset answer_type is CLOSED (None when no row says)."""
    closed = [r for r in rows if str(r.get("answer_type", "")).upper() == "CLOSED"]
    if not closed:
        return None
    hits = []
    for r in closed:
        pred, gold = normalize_text(str(r[key] or "")), normalize_text(str(r["answer"]))
        hits.append(float(("yes" in pred or "no" in pred) and gold in pred))
    return {"n": len(closed), "accuracy": _mean(hits), "definition": LLAVA_MED_CLOSED}


def markdown_table(metrics: dict[str, Any], title: str = "") -> str:
    lines = [f"## {title}" if title else "## Evaluation", ""]
    lines.append("| slice | n | accuracy | blind accuracy | text prior |")
    lines.append("|---|---:|---:|---:|---:|")
    baselines = [metrics.get("blind") or {}, metrics.get("prior") or {}]

    def cells(group: str | None, name: str | None) -> str:
        out = []
        for base in baselines:
            entry = base if group is None else ((base.get(group) or {}).get(name) or {})
            value = entry.get("accuracy", entry.get("exact_match")) if entry else None
            out.append("-" if value is None else f"{value:.3f}")
        return " | ".join(out)

    lines.append(f"| closed (all) | {metrics['n_closed']} | {metrics['accuracy']:.3f} | {cells(None, None)} |")
    for group in ("by_qtype", "by_modality", "by_topic", "by_organ", "by_answer_type"):
        for name, entry in (metrics.get(group) or {}).items():
            acc = entry.get("accuracy", entry.get("exact_match", 0.0))
            lines.append(f"| {group[3:]}: {name} | {entry['n']} | {acc:.3f} | {cells(group, name)} |")
    lines.append("")
    lines.append(f"chance level (closed): {metrics.get('chance', 0.0):.3f}")
    if metrics.get("blind"):
        lines.append(f"image-reliance gap (accuracy - blind accuracy): {metrics['blind_gap']:+.3f}")
    if metrics.get("order"):
        o, m = metrics["order"], metrics["multi_image"]
        lines.append(f"questions with several images: {o['n']}, accuracy {m['accuracy']:.3f}; images in reverse order: "
                     f"accuracy {o['accuracy']:.3f} (gap {o['gap']:+.3f}), answers changed {o['changed']:.3f}"
                     + (f", accuracy against the swapped gold {o['swapped_accuracy']:.3f}" if "swapped_accuracy" in o else ""))
        for name, entry in (metrics.get("ablation") or {}).items():
            lines.append(f"  {name.replace('_', ' ')} (blanked): accuracy {entry['accuracy']:.3f} (gap {entry['gap']:+.3f})")
    if metrics.get("prior"):
        p = metrics["prior"]
        lines.append(f"text prior (most common training answer to the same question; {p['matched']}/{metrics['n']} "
                     f"questions seen in training): closed accuracy {p['accuracy']:.3f}; "
                     f"accuracy - prior {metrics['accuracy'] - p['accuracy']:+.3f}")
    if metrics.get("overlap"):
        from medllava.data.overlap import overlap_line

        clean = metrics.get("clean")
        lines.append(overlap_line(metrics["overlap"]) + (
            f"; accuracy on the {clean['n_closed']} clean closed questions: {clean['accuracy']:.3f}" if clean else
            "; no clean question left"))
    if metrics.get("llava_med_closed"):
        lm = metrics["llava_med_closed"]
        lines.append(f"llava_med_closed (LLaVA-Med's definition, not comparable with `accuracy`): {lm['accuracy']:.3f} "
                     f"over {lm['n']} answer_type CLOSED records")
    open_entry = (metrics.get("by_qtype") or {}).get("open")
    if open_entry:
        lines.append(f"open questions: recall {open_entry['recall']:.3f}, exact {open_entry['exact_match']:.3f}, F1 {open_entry['f1']:.3f}")
    if metrics.get("n_skipped"):
        kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(metrics["skipped"].items()))
        lines.append(f"skipped records: {metrics['n_skipped']} ({kinds}; listed in skipped.jsonl), counted as wrong "
                     f"in the accuracies above; accuracy over the asked records only: {metrics['accuracy_of_asked']:.3f}")
    return "\n".join(lines) + "\n"


def plot_metrics(metrics: dict[str, Any], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, accs = ["all closed"], [metrics["accuracy"]]
    kinds = {"blank image": metrics.get("blind") or {}, "text prior": metrics.get("prior") or {}}
    bases: dict[str, list[float | None]] = {k: [v.get("accuracy")] for k, v in kinds.items()}
    for group in ("by_qtype", "by_topic", "by_modality"):
        for name, entry in (metrics.get(group) or {}).items():
            if "accuracy" in entry:
                names.append(name)
                accs.append(entry["accuracy"])
                for label, base in kinds.items():
                    bases[label].append(((base.get(group) or {}).get(name) or {}).get("accuracy"))
    multi = metrics.get("order")
    fig, axes = plt.subplots(1, 2 if multi else 1, figsize=(max(5, len(names) * 0.9) + (4 if multi else 0), 3.5),
                             squeeze=False)
    ax = axes[0][0]
    xs = range(len(names))
    shown = [(label, values) for label, values in bases.items() if any(v is not None for v in values)]
    width = 0.8 / (1 + len(shown))
    ax.bar([x - 0.4 + width / 2 for x in xs], accs, width=width, label="with image")
    for k, (label, values) in enumerate(shown, start=1):
        ax.bar([x - 0.4 + width / 2 + k * width for x in xs], [v or 0 for v in values], width=width, label=label)
    ax.axhline(metrics.get("chance", 0.0), color="grey", linestyle="--", label="chance (closed)")
    ax.set_xticks(list(xs), names, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(fontsize=8)
    if multi:  # questions with several images: as asked, reversed, each image blanked, all blanked
        checks = {"as asked": metrics["multi_image"]["accuracy"], "reversed": multi["accuracy"],
                  **{name.replace("without_", "no "): entry["accuracy"]
                     for name, entry in (metrics.get("ablation") or {}).items()}}
        right = axes[0][1]
        right.bar(range(len(checks)), list(checks.values()), color=["C0", "C3", *["C2"] * (len(checks) - 2)])
        right.set_xticks(range(len(checks)), list(checks), rotation=30, ha="right")
        right.set_ylim(0, 1)
        right.set_title(f"{multi['n']} questions with several images")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def evaluate(
    model: Any,
    processor: Any,
    data: str | Path,
    *,
    image_folder: str | Path = ".",
    out_dir: str | Path | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 64,
    blind: bool = False,
    limit: int | None = None,
    system_prompt: str | None = None,
    mode: str = "plain",
    instruction: str | None = None,
    window: Window | None = None,
    title: str = "",
    progress: bool = True,
    prior: TextPrior | None = None,
    model_path: str | Path | None = None,
    window_name: str | None = None,
    overlap: dict[str, Any] | None = None,
    slices: SliceSpec | None = None,
) -> dict[str, Any]:
    """Evaluate a loaded model on a VQA file; write outputs to out_dir when given; return the metrics.

    `mode`/`instruction`: the prompt form (plain, or a GRPO stage's answer/think prompt) and `max_new_tokens`
    the completion length; `stage_prompt_settings` reads both from a stage output. `prior`: a text prior
    (`medllava.prior.build_prior`) scored beside the model as metrics["prior"]. `model_path` and `window_name`
    (the folder the model came from, the window's name) go into metrics["provenance"] with the data's sha256.
    `overlap`: what the set shares with the training files (medllava.data.overlap.check_overlap), reported as
    metrics["overlap"], with the records that share nothing scored as metrics["clean"]."""
    model.eval()
    items, errors = load_items(data, processor, image_folder, limit=limit, system_prompt=system_prompt, mode=mode,
                               instruction=instruction, slices=slices)
    rows: list[dict[str, Any]] = []
    scored: list[EvalItem] = []
    # Images are decoded batch by batch (memory stays at one batch of pixels whatever the set's size); the blind
    # pass asks the same batch again with blank images of the same sizes, and questions with several images again
    # with their order reversed and with each image blanked in turn (reliance_variants).
    for start in tqdm(range(0, len(items), batch_size), desc="eval", disable=not progress, leave=False):
        chunk, images = decoded(items[start:start + batch_size], window, errors)
        if not chunk:
            continue
        answers = generate_batch(model, processor, [it.prompt for it in chunk], images, max_new_tokens)
        checks: list[dict[str, str]] = [{} for _ in chunk]
        if blind:
            variants = [reliance_variants(mine, it.groups) for it, mine in zip(chunk, images)]
            for name in dict.fromkeys(name for v in variants for name in v):
                which = [i for i, v in enumerate(variants) if name in v]
                got = generate_batch(model, processor, [chunk[i].prompt for i in which],
                                     [variants[i][name] for i in which], max_new_tokens)
                for i, ans in zip(which, got):
                    checks[i][f"{name}_prediction"] = ans
            del variants
        for it, ans, check in zip(chunk, answers, checks):
            rec = it.record
            rows.append({"id": rec.id, "question": rec.question, "qtype": rec.qtype, "answer": rec.answer,
                         **({"options": rec.options} if rec.options else {}), **rec.meta,
                         "n_images": len(it.images), "prediction": ans, **check,
                         **({"prior_prediction": prior.answer(rec.question) or ""} if prior else {})})
            scored.append(it)
        del images
    if errors:
        logger.warning("eval: skipped %d record(s), counted as wrong: %s", len(errors),
                       "; ".join(e.error.describe() for e in errors[:5]))
    if not rows:
        raise ValueError(f"{data}: no usable VQA records")
    items = scored
    skipped = [e.qtype for e in errors]
    metrics = score(rows, skipped=skipped)
    metrics["n_skipped"] = len(errors)
    metrics["prompt"] = {"mode": mode, "max_new_tokens": max_new_tokens, "decoding": "greedy"}
    metrics["provenance"] = {
        "model": None if model_path is None else str(model_path),
        "weights_sha256": None if model_path is None else weights_sha256(model_path),
        "data": str(data), "data_sha256": source_sha256(data), "prompt_mode": mode, "instruction": instruction,
        "system_prompt": system_prompt, "max_new_tokens": max_new_tokens, "decoding": "greedy",
        "window": window_name if window_name is not None else (None if window is None else asdict(window)),
        "batch_size": batch_size, "limit": limit, "blind": blind,
        **({"slices": asdict(slices)} if slices is not None else {})}
    metrics["chance"] = _mean([chance_level(it.record) for it in items if it.record.qtype in CLOSED_QTYPES])
    if blind:
        metrics["blind"] = score(rows, key="blind_prediction", skipped=skipped)
        metrics["blind_gap"] = round(metrics["accuracy"] - metrics["blind"]["accuracy"], 4)
        metrics.update(multi_image_checks(rows))
    if prior is not None:
        metrics["prior"] = {**score(rows, key="prior_prediction", skipped=skipped), "sources": prior.sources,
                            "matched": sum(1 for r in rows if r["prior_prediction"]), "training_pairs": prior.pairs}
    if overlap is not None:
        flagged = (set(overlap["contaminated"]["ids"]) | set(overlap["repeated_pair"]["ids"])
                   | set(overlap.get("unreadable_eval_ids", [])))  # unknown is not clean
        clean_rows = [r for r in rows if r["id"] not in flagged]
        metrics["overlap"] = overlap
        if clean_rows:
            metrics["clean"] = score(clean_rows, skipped=[e.qtype for e in errors if e.error.record_id not in flagged])
    lm_closed = llava_med_closed(rows)
    if lm_closed is not None:
        metrics["llava_med_closed"] = lm_closed
    if errors:
        counts: dict[str, int] = defaultdict(int)
        for e in errors:
            counts[e.error.kind] += 1
        metrics["skipped"] = dict(counts)
    for row in rows:
        g = grade(row["prediction"], row["answer"], row["qtype"], row.get("options"))
        row.update(extracted=g.extracted, parsed=g.parsed, correct=g.correct)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with (out / "predictions.jsonl").open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        if errors:
            with (out / "skipped.jsonl").open("w", encoding="utf-8") as fh:
                for e in errors:
                    fh.write(json.dumps({**e.error.to_dict(), "qtype": e.qtype}, ensure_ascii=False) + "\n")
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
        (out / "metrics.md").write_text(markdown_table(metrics, title), encoding="utf-8")
        plot_metrics(metrics, out / "accuracy.png", title)
    return metrics


def multi_image_checks(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The checks that the images of a question are used together, over the rows asked with 2 or more images:
    `multi_image` (their accuracy as asked), `order` (asked with the images reversed: `changed`, the share of
    answers that differ; `accuracy`, graded against the original gold, the order-swapped baseline a comparing model
    beats; `swapped_accuracy`, graded against `answer_if_swapped` over the rows that have one) and `ablation`
    (`without_image_<k>`: image k blanked; accuracy against the gold, and the gap to the accuracy as asked).
    Empty when no row has several images."""
    multi = [r for r in rows if "order_prediction" in r]
    if not multi:
        return {}
    asked = score(multi)
    out: dict[str, Any] = {"multi_image": asked}
    swapped = score(multi, key="order_prediction")
    changed = [float(normalize_text(r["order_prediction"]) != normalize_text(r["prediction"])) for r in multi]
    order = {"n": len(multi), "accuracy": swapped["accuracy"], "changed": _mean(changed),
             "gap": round(asked["accuracy"] - swapped["accuracy"], 4)}
    with_swapped = [r for r in multi if r.get("answer_if_swapped") not in (None, "")]
    if with_swapped:
        order["swapped_accuracy"] = score(with_swapped, key="order_prediction", gold="answer_if_swapped")["accuracy"]
        order["n_swapped_gold"] = len(with_swapped)
    out["order"] = order
    ablation = {}
    for k in range(1, ABLATION_MAX_IMAGES + 1):
        key = f"without_image_{k}_prediction"
        sub = [r for r in multi if key in r]
        if sub:
            acc = score(sub, key=key)["accuracy"]
            ablation[f"without_image_{k}"] = {"n": len(sub), "accuracy": acc,
                                              "gap": round(score(sub)["accuracy"] - acc, 4)}
    if ablation:
        out["ablation"] = ablation
    return out


def weights_sha256(model_dir: str | Path) -> str | None:
    """One sha256 over a model folder's safetensors files, by name, and for a LoRA stage its base's (the saved
    `base/` folder, or the model its adapter names when that is a local folder; else the base's name)."""
    folder = Path(model_dir)
    files = sorted(folder.glob("*.safetensors")) + sorted((folder / "base").glob("*.safetensors"))
    if not files:
        return None
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.relative_to(folder)}:{file_sha256(f)}\n".encode())
    if is_adapter_dir(folder) and not (folder / "base").is_dir():
        base = adapter_base_path(folder)
        base_files = sorted(Path(base).glob("*.safetensors")) if Path(base).is_dir() else []
        digest.update(f"base={base}\n".encode())
        for f in base_files:
            digest.update(f"base/{f.name}:{file_sha256(f)}\n".encode())
    return digest.hexdigest()


def update_summary(path: str | Path, stage: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """Merge one stage's headline figures into a summary JSON ({stage: {"accuracy": ..., ...}})."""
    path = Path(path)
    summary = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    entry = {"accuracy": metrics["accuracy"], "chance": metrics.get("chance"), "n": metrics["n_closed"],
             "skipped": metrics.get("n_skipped", 0)}
    if "blind" in metrics:
        entry["blind_accuracy"] = metrics["blind"]["accuracy"]
        entry["blind_gap"] = metrics["blind_gap"]
    if "order" in metrics:
        entry["multi_image_accuracy"] = metrics["multi_image"]["accuracy"]
        entry["order_accuracy"] = metrics["order"]["accuracy"]
        entry["order_changed"] = metrics["order"]["changed"]
        entry["ablation"] = {k: v["accuracy"] for k, v in (metrics.get("ablation") or {}).items()}
    if "prior" in metrics:
        entry["prior_accuracy"] = metrics["prior"]["accuracy"]
    if "overlap" in metrics:
        entry["overlap"] = metrics["overlap"]["contaminated"]["count"]
        entry["clean_accuracy"] = (metrics.get("clean") or {}).get("accuracy")
    mc = (metrics.get("by_qtype") or {}).get("multiple_choice") or {}
    if "own_option_rate" in mc:
        entry["own_option_rate"] = mc["own_option_rate"]
    for key in ("by_topic", "by_qtype"):
        if key in metrics:
            entry[key] = {k: v.get("accuracy", v.get("exact_match")) for k, v in metrics[key].items()}
    summary[stage] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def summary_table(summary: dict[str, Any], seconds: float | None = None) -> str:
    """A plain-text table of a curriculum summary: accuracy per stage beside chance, blind accuracy (blank
    image), the blind gap, the text prior (training set's most common answer to the same question), the records
    skipped (counted wrong) and the share of multiple-choice answers that name an option of their own question."""

    def fmt(value: float | None, spec: str = ".3f") -> str:
        return "-" if value is None else format(value, spec)

    lines = [f"{'stage':<12} {'accuracy':>9} {'chance':>7} {'blind':>7} {'gap':>7} {'prior':>7} {'skipped':>7} "
             f"{'MC own':>7}   by topic"]
    for stage, entry in summary.items():
        topics = ", ".join(f"{k} {v:.2f}" for k, v in (entry.get("by_topic") or {}).items())
        lines.append(
            f"{stage:<12} {entry['accuracy']:>9.3f} {entry.get('chance') or 0:>7.3f} "
            f"{fmt(entry.get('blind_accuracy')):>7} {fmt(entry.get('blind_gap'), '+.3f'):>7} "
            f"{fmt(entry.get('prior_accuracy')):>7} {entry.get('skipped', 0):>7} "
            f"{fmt(entry.get('own_option_rate')):>7}   {topics}"
        )
    multi = {stage: entry for stage, entry in summary.items() if "order_accuracy" in entry}
    if multi:  # the checks that several images are used together (questions with 2+ images only)
        lines.append(f"{'several images':<14} {'accuracy':>9} {'order':>7} {'changed':>7}   one image blanked")
        for stage, entry in multi.items():
            blanked = ", ".join(f"{k.replace('without_', 'no ')} {v:.2f}" for k, v in (entry.get("ablation") or {}).items())
            lines.append(f"{stage:<14} {entry['multi_image_accuracy']:>9.3f} {entry['order_accuracy']:>7.3f} "
                         f"{entry['order_changed']:>7.3f}   {blanked}")
    if seconds is not None:
        lines.append(f"total time: {seconds / 60:.1f} min")
    return "\n".join(lines)
