#!/usr/bin/env python3
"""Build DPO preference pairs from VQA records and a model: pairs that teach a model to look at the image.

For every question the model (e.g. the instruction stage's output) samples n answers, each graded by the rules of
`medllava.grading` (those of the GRPO reward and `medllava eval`). The chosen side is the image with an answer that
grades correct (the model's own words when one of its samples is right, else the gold answer as the instruction
data writes it). Each reject kind asked for makes one pair:

- text:        the same image with an answer the model itself gave that grades wrong (a plausible hallucination
               the model makes; none when all its samples are right, counted);
Several images per question: blank and noise corrupt every image; lesion is read for one-image questions only.

- image:blank  the same answer with the image replaced by a flat image of its mean colour;
- image:noise  the same answer with the image replaced by noise of its own mean and spread (--noise-strength < 1
               mixes the noise into the image instead);
- image:lesion the same answer with noise only inside the lesion region: the record's `bbox` ([x0, y0, x1, y1] in
               pixels, or a list of them) or `mask` (an image under the image folder, non-zero inside: SLAKE's
               segmentation); records without a usable one are skipped and counted;
- image:swap   the same answer with another record's image whose gold answer to the same question differs;
- image:order  (comparative questions, two or more images) the same answer with the images in reverse order
               (prior and current exchanged): only a model that compares them in order can prefer it. Made only
               for records whose `answer_if_swapped` differs from their answer (else the reversed images may
               have the same right answer), and not for series (reversed per study, not per slice).

An image reject is the conditional preference of mDPO / MMedPO: the answer is right for the image and not for its
corruption, so only a model that reads the image can prefer it. Corrupted images are written under the image
folder (so the pairs keep the stages' containment rule), named by record and kind. `--weight difficulty` gives each
pair the weight 1 + the share of the model's samples that were wrong (harder questions weigh more).

The output is medllava's pair layout (TRL's keys plus `rejected_images` and `weight`, read by `kind: dpo`), written
whole at the end; questions are processed batch by batch into OUT.partial.jsonl, so an interrupted run resumes
where it stopped. A report (what was made per kind, what was skipped and why, with ids) goes to OUT.report.json.

    python -m data_recipes.preference_pairs --model runs/demo/instruct --data data/phantom/rl.jsonl \\
        --image-folder data/phantom/images --out runs/demo/pairs.jsonl --rejects image:blank text --n 4
    python -m data_recipes.preference_pairs --stage stages/medgemma/dpo_lora.yaml --model runs/medgemma/instruct_lora

With --stage, everything but the model comes from the DPO stage (its dpo.pairs section; what `./train.sh
stages/<family>` runs before the stage).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from data_recipes.pass_rate_filter import original_rows, sample_answers
from medllava.config import REJECT_KINDS, slices_option
from medllava.data.records import record_images, write_records
from medllava.data.rl import build_rl_rows
from medllava.data.vqa import LETTERS
from medllava.grading import grade
from medllava.imaging import ImageError, Window, load_image
from medllava.model import load_for_inference
from medllava.processor import IMAGE_TOKEN


def gold_text(row: dict[str, Any]) -> str:
    """The gold answer as the instruction data writes it: 'Yes.' / 'No.', 'B. CT', or the answer itself."""
    answer = str(row["answer"]).strip()
    if row["qtype"] == "yes_no":
        return "Yes." if answer.lower().startswith("y") else "No."
    options = row.get("options") or []
    if row["qtype"] == "multiple_choice" and options:
        if len(answer) == 1 and answer.upper() in LETTERS[: len(options)]:
            return f"{answer.upper()}. {options[LETTERS.index(answer.upper())]}"
        for i, option in enumerate(options):
            if option.strip().lower() == answer.lower():
                return f"{LETTERS[i]}. {option}"
    return answer


def lesion_mask(record: dict[str, Any], size: tuple[int, int], image_folder: Path) -> np.ndarray | None:
    """A boolean (height, width) mask of the record's lesion region from `bbox` or `mask`; None when it has none."""
    width, height = size
    if record.get("bbox"):
        boxes = record["bbox"] if isinstance(record["bbox"][0], (list, tuple)) else [record["bbox"]]
        mask = np.zeros((height, width), dtype=bool)
        for x0, y0, x1, y1 in boxes:
            mask[max(0, int(y0)):min(height, int(np.ceil(y1))), max(0, int(x0)):min(width, int(np.ceil(x1)))] = True
        return mask if mask.any() else None
    if record.get("mask"):
        try:
            region = Image.open(image_folder / record["mask"]).convert("L").resize((width, height), Image.NEAREST)
        except OSError:  # no such file, or not an image: the record has no usable region
            return None
        mask = np.asarray(region) > 0
        return mask if mask.any() else None
    return None


def corrupt(image: Image.Image, kind: str, rng: np.random.Generator, *, strength: float = 1.0,
            region: np.ndarray | None = None) -> Image.Image:
    """The image blanked to its mean colour, or noised (all of it, or only inside `region`) with noise of its own
    mean and spread per channel; `strength` < 1 mixes the noise in."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    mean, std = pixels.mean(axis=(0, 1)), pixels.std(axis=(0, 1)) + 1.0
    if kind == "blank":
        out = np.broadcast_to(mean, pixels.shape).copy()
    else:
        noise = rng.normal(mean, std, pixels.shape).astype(np.float32)
        mixed = (1 - strength) * pixels + strength * noise
        out = mixed if region is None else np.where(region[..., None], mixed, pixels)
    return Image.fromarray(np.clip(out, 0, 255).round().astype(np.uint8))


def pair_prompt(row: dict[str, Any]) -> list[dict[str, str]]:
    """The question as the model was asked it (the RL row's messages), one image placeholder per image before the
    text."""
    messages = [dict(m) for m in row["prompt"]]
    messages[-1] = {"role": "user", "content": "<image>\n" * len(row["images"]) + messages[-1]["content"]}
    return messages


class PairMaker:
    """Makes the pairs of one question from its samples (and writes the corrupted images)."""

    def __init__(self, args: argparse.Namespace, originals: dict[tuple[str, int], dict], rows: list[dict]) -> None:
        self.args = args
        self.originals = originals
        self.image_folder = Path(os.path.normpath(os.path.abspath(args.image_folder)))
        self.rejects_folder = self.image_folder / args.rejects_subfolder
        self.window = Window.parse(args.window) if args.window else None
        self.placeholder_samples = 0
        # image:swap: for each question text, the images by gold answer
        self.by_question: dict[str, dict[str, list[str]]] = {}
        for row in rows:
            key = row["prompt"][-1]["content"]
            self.by_question.setdefault(key, {}).setdefault(gold_text(row).lower(), []).append(row["images"])

    def relative(self, path: str | Path) -> str:
        """A path under the image folder as written there (links not followed: a snapshot's links into a blob
        store stay the folder's), so the DPO stage resolves it the same way."""
        return Path(os.path.normpath(os.path.abspath(path))).relative_to(self.image_folder).as_posix()

    def make(self, row: dict[str, Any], samples: list[str] | None) -> tuple[list[dict], list[dict]]:
        """(pairs, skips) of one question."""
        skip = lambda kind, reason: {"id": row["id"], "kind": kind, "reason": reason}  # noqa: E731
        if samples is None:
            return [], [skip("all", "image does not decode")]
        # an answer holding the image placeholder cannot be a pair's answer (a side would have more placeholders
        # than images): such samples are left out and counted in the report
        usable = [s for s in samples if IMAGE_TOKEN not in s]
        self.placeholder_samples += len(samples) - len(usable)
        graded = [(s, grade(s, row["answer"], row["qtype"], row["options"]).correct) for s in usable]
        right = [s for s, ok in graded if ok and s.strip()]
        wrong = [s for s, ok in graded if not ok and s.strip()]
        chosen = right[0] if right else gold_text(row)
        base = {"prompt": pair_prompt(row), "chosen": chosen, "images": [self.relative(ref) for ref in row["images"]],
                "chosen_from": "model" if right else "gold"}
        if self.args.weight == "difficulty":
            base["weight"] = round(1.0 + len(wrong) / max(1, len(usable)), 4)
        rng = np.random.default_rng([self.args.seed, zlib.crc32(row["id"].encode("utf-8"))])
        pairs, skips = [], []
        for kind in self.args.rejects:
            pair_id = f"{row['id']}:{kind}"
            if kind == "text":
                others = [w for w in wrong if w.strip().lower() != chosen.strip().lower()]
                if not others:
                    skips.append(skip(kind, "the model's samples were all right"))
                    continue
                pairs.append({"id": pair_id, **base, "rejected": others[0], "reject": kind})
                continue
            corruption = kind.split(":", 1)[1]
            if corruption == "swap":
                answers = self.by_question.get(row["prompt"][-1]["content"], {})
                other = [refs for answer, lists in sorted(answers.items()) if answer != gold_text(row).lower()
                         for refs in lists if len(refs) == len(row["images"])]
                if not other:
                    skips.append(skip(kind, "no other image whose gold answer to this question differs"))
                    continue
                rejected = other[int(rng.integers(len(other)))]
                pairs.append({"id": pair_id, **base, "rejected": chosen,
                              "rejected_images": [self.relative(ref) for ref in rejected], "reject": kind})
                continue
            if corruption == "order":  # a comparative question asked with its images in reverse order
                record = self.originals.get((row["source"], row["line"]), {})
                given = record_images(record)
                swapped = record.get("answer_if_swapped")
                if len(row["images"]) < 2 or len(given) != len(row["images"]):
                    skips.append(skip(kind, "fewer than two images, or a series (reversed per study, not per slice)"))
                    continue
                if swapped is None or str(swapped).strip().lower() == str(row["answer"]).strip().lower():
                    skips.append(skip(kind, "the record gives no answer_if_swapped that differs from its answer: "
                                            "the same answer may hold for the reversed images"))
                    continue
                pairs.append({"id": pair_id, **base, "rejected": chosen,
                              "rejected_images": [self.relative(ref) for ref in reversed(row["images"])],
                              "reject": kind})
                continue
            if corruption == "lesion" and len(row["images"]) > 1:
                skips.append(skip(kind, "lesion regions are read for one-image questions only"))
                continue
            try:
                images = [load_image(ref, window=self.window) for ref in row["images"]]
            except ImageError as err:
                skips.append(skip(kind, f"image does not decode: {err.reason}"))
                continue
            image = images[0]
            region = None
            if corruption == "lesion":
                record = self.originals.get((row["source"], row["line"]), {})
                region = lesion_mask(record, image.size, self.image_folder)
                if region is None:
                    skips.append(skip(kind, "no lesion region (bbox, or a readable non-empty mask) in the record"))
                    continue
            outs = []  # every image of the question corrupted (blank, noise) or its lesion region (one image)
            for k, img in enumerate(images):
                suffix = f"_{k}" if len(images) > 1 else ""
                out = self.rejects_folder / f"{row['id']}_{corruption}{suffix}.png".replace("/", "_")
                out.parent.mkdir(parents=True, exist_ok=True)
                corrupt(img, "blank" if corruption == "blank" else "noise", rng, strength=self.args.noise_strength,
                        region=region).save(out)
                outs.append(self.relative(out))
            pairs.append({"id": pair_id, **base, "rejected": chosen, "rejected_images": outs, "reject": kind})
        return pairs, skips


def stage_settings(args: argparse.Namespace, overrides: list[str], parser: argparse.ArgumentParser) -> argparse.Namespace:
    """With --stage: the data, output, image folder, window and the pair settings come from the DPO stage config
    (its dpo.pairs section), so `./train.sh` makes exactly the file the stage reads."""
    if args.stage is None:
        if overrides:
            parser.error(f"config overrides need --stage: {overrides}")
        missing = [name for name in ("data", "out") if not getattr(args, name)]
        if missing:
            parser.error(f"--{' and --'.join(missing)} required (or --stage DPO_STAGE.yaml)")
        return args
    from medllava.config import load_config

    cfg = load_config(args.stage, overrides)
    if cfg.kind != "dpo":
        parser.error(f"--stage {args.stage}: not a DPO stage (kind: {cfg.kind})")
    pairs = cfg.dpo.pairs
    if not pairs.source:
        parser.error(f"--stage {args.stage}: dpo.pairs.source is empty (which questions to build pairs from?)")
    args.data, args.out = args.data or pairs.source, args.out or Path(cfg.data.train_files[0])
    args.image_folder, args.window, args.seed = cfg.data.image_folder, args.window or cfg.data.window, cfg.run.seed
    args.slices = args.slices or f"{cfg.data.slices.count},{cfg.data.slices.spacing}"
    args.rejects, args.n, args.temperature = pairs.rejects, pairs.n, pairs.temperature
    args.max_new_tokens, args.max_records, args.weight = pairs.max_new_tokens, pairs.max_records, pairs.weight
    args.batch_size = pairs.batch_size
    return args


def row_key(row: dict[str, Any]) -> str:
    """A question's place in its source (ids may repeat: VQA-RAD's name the image and the question)."""
    return f"{row['source']}:{row['line']}"


def settings_stamp(args: argparse.Namespace) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one: the model (and when it was written) and every
    setting that changes the pairs."""
    model = Path(args.model)
    marker = next((model / name for name in ("medllava_stage.yaml", "config.json", "adapter_config.json")
                   if (model / name).is_file()), None)
    return {"model": str(model.resolve()) if model.exists() else args.model,
            "model_written": marker.stat().st_mtime_ns if marker else None, "data": [str(d) for d in args.data],
            "rejects": list(args.rejects), "n": args.n, "temperature": args.temperature,
            "max_new_tokens": args.max_new_tokens, "max_records": args.max_records, "weight": args.weight,
            "seed": args.seed, "noise_strength": args.noise_strength, "window": args.window,
            **({"slices": args.slices} if getattr(args, "slices", None) else {})}  # unset: older partial files match


def read_partial(path: Path, stamp: dict[str, Any]) -> dict[str, dict]:
    """Questions already processed by an interrupted run with the same model and settings: {source:line: {"pairs":
    [...], "skipped": [...]}}. A partial file of another model or other settings is set aside (named)."""
    done: dict[str, dict] = {}
    if not path.is_file():
        return done
    lines = path.read_text(encoding="utf-8").splitlines()
    try:
        header = json.loads(lines[0]) if lines else {}
    except json.JSONDecodeError:
        header = {}
    if header.get("settings") != json.loads(json.dumps(stamp)):
        stale = path.with_name(path.name + ".stale")
        path.replace(stale)
        print(f"preference_pairs: {path} was made by another model or with other settings; set aside as {stale}",
              file=sys.stderr)
        return done
    for line in lines[1:]:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:  # the line being written when the run stopped
            continue
        done[entry["key"]] = entry
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="stage output that answers the questions (e.g. instruct)")
    parser.add_argument("--data", nargs="+", default=None, help="VQA files: id, image, question, answer, qtype, "
                        "options?, bbox? / mask?")
    parser.add_argument("--image-folder", default=".")
    parser.add_argument("--out", type=Path, default=None, help="pairs JSONL to write")
    parser.add_argument("--rejects", nargs="+", choices=REJECT_KINDS, default=["image:blank", "text"])
    parser.add_argument("--n", type=int, default=4, help="samples per question")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32, help="questions per generation batch")
    parser.add_argument("--max-records", type=int, default=None, help="only the first N questions")
    parser.add_argument("--noise-strength", type=float, default=1.0, help="image:noise/lesion: 1 replaces the "
                        "pixels by noise, less mixes it in")
    parser.add_argument("--weight", choices=["none", "difficulty"], default="none")
    parser.add_argument("--rejects-subfolder", default=None,
                        help="where corrupted images go, inside the image folder (default: preference_rejects/OUT)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--window", default=None, help="DICOM window: preset (lung, bone, ...) or CENTER,WIDTH")
    parser.add_argument("--slices", default=None, help="series/volume images: COUNT or COUNT,SPACING (default 8,uniform)")
    parser.add_argument("--stage", default=None,
                        help="DPO stage YAML: take data (dpo.pairs.source), output (data.train_files[0]), image folder, "
                             "window and the dpo.pairs settings from it; --section.key=value overrides apply to it")
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a for a in argv if a.startswith("--") and "." in a.split("=", 1)[0]]
    args = stage_settings(parser.parse_args([a for a in argv if a not in overrides]), overrides, parser)
    if not 0.0 < args.noise_strength <= 1.0:
        raise SystemExit(f"--noise-strength {args.noise_strength}: between 0 (exclusive) and 1")
    args.rejects_subfolder = args.rejects_subfolder or f"preference_rejects/{args.out.stem}"

    torch.manual_seed(args.seed)
    model, processor = load_for_inference(args.model)  # bf16 on a GPU that has it
    rows, report = build_rl_rows(args.data, processor, image_folder=args.image_folder, mode="plain", skip_invalid=True,
                                 max_samples=args.max_records, max_prompt_length=10**9, with_location=True,
                                 slices=slices_option(args.slices))
    repeated = {i for i, count in Counter(row["id"] for row in rows).items() if count > 1}
    for row in rows:  # a repeated id is qualified by its place, so pairs and corrupted images stay apart
        if row["id"] in repeated:
            row["id"] = f"{row['id']}@{Path(row['source']).name}:{row['line']}"
    maker = PairMaker(args, original_rows(args.data), rows)
    partial = args.out.with_name(args.out.name + ".partial.jsonl")
    partial.parent.mkdir(parents=True, exist_ok=True)
    stamp = settings_stamp(args)
    done = read_partial(partial, stamp)
    todo = [row for row in rows if row_key(row) not in done]
    if done:
        print(f"preference_pairs: resuming, {len(done)} question(s) already done in {partial}", file=sys.stderr)
    if not partial.is_file():
        partial.write_text(json.dumps({"settings": stamp}) + "\n", encoding="utf-8")
    with partial.open("a", encoding="utf-8") as fh:
        for start in tqdm(range(0, len(todo), args.batch_size), desc="questions", unit="batch"):
            batch = todo[start:start + args.batch_size]
            samples = sample_answers(model, processor, batch, n=args.n, temperature=args.temperature,
                                     max_new_tokens=args.max_new_tokens, batch_size=len(batch), progress=False,
                                     window=maker.window)
            for row, answers in zip(batch, samples):
                before = maker.placeholder_samples
                pairs, skipped = maker.make(row, answers)
                entry = {"key": row_key(row), "pairs": pairs, "skipped": skipped,
                         "placeholder_samples": maker.placeholder_samples - before}
                done[row_key(row)] = entry
                fh.write(json.dumps(entry, ensure_ascii=False) + "\n")
            fh.flush()
    pairs = [p for row in rows for p in done[row_key(row)]["pairs"]]
    skipped = [s for row in rows for s in done[row_key(row)]["skipped"]]
    made = Counter(p["reject"] for p in pairs)
    summary = {
        "model": args.model, "data": args.data, "rejects": args.rejects, "n": args.n,
        "temperature": args.temperature, "weight": args.weight, "read": report.total,
        "invalid": len(report.errors), "invalid_counts": report.counts(), "questions": len(rows),
        "pairs": len(pairs), "made": dict(made),
        "chosen_from_gold": sum(1 for p in pairs if p["chosen_from"] == "gold"),
        "samples_with_image_placeholder": sum(done[row_key(row)].get("placeholder_samples", 0) for row in rows),
        "skipped": len(skipped), "skipped_counts": dict(Counter(f"{s['kind']}: {s['reason']}" for s in skipped)),
        "skipped_ids": skipped, "invalid_records": [e.to_dict() for e in report.errors],
    }
    report_path = args.out.with_name(args.out.stem + ".report.json")
    report_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("skipped_ids", "invalid_records")}))
    if not pairs:
        print(f"preference_pairs: no pair made; nothing written to {args.out}; see {report_path}", file=sys.stderr)
        return 2
    write_records(pairs, args.out)  # whole or absent: a stage never reads half a file
    partial.unlink()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
