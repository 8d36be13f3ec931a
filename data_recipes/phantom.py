#!/usr/bin/env python3
"""Generate the synthetic "phantom" imaging set of the CPU demo: learnable by a tiny model, verifiable by a program.

Each image is an X-ray, CT or MRI-looking phantom with zero to three bright lesions, all on one side of the
image. The truth (modality, lesion present, side, count) is known, so every answer can be checked.

Like LLaVA-Med's GPT-written conversations, the instruction data is conversational: it asks about lesion
presence (yes/no), modality, side and count (multiple choice, answered "B. right"), and side and count in open
form too ("On the left side of the image.", "Two lesions."). Every question form the test set asks is taught,
so held-out accuracy per topic measures whether the model reads the image, not whether it guesses the letters of
a form it never saw (an earlier version taught side and count only in open form: its GRPO stage learned to
answer them with another question's option, "A. MRI" to a left/right question). Options come in one order per
topic (X-ray, CT, MRI; left, right; 1, 2, 3), so a letter always names the same finding: with shuffled options the
tiny model named the right modality under the wrong letter ("B. CT" where CT was C), which is incoherent and
scores 0, and the demo would have measured reading the option list rather than the image.

Writes to OUT/:
  images/{train,test}/*.png
  align.jsonl     LLaVA form, one caption per train image (alignment stage)
  instruct.jsonl  LLaVA form, multi-turn conversations about train images (instruction stage)
  rl.jsonl        closed questions with gold answers on train images (GRPO stage); lesions' `bbox` in pixels
  test.jsonl      closed questions with gold answers on held-out images (evaluation)
  corpus.txt      every text, for training the tiny tokenizer
  meta.json       counts and chance level

With --pairs N (and --test-pairs), progression pairs too: a prior and a current study of one phantom "patient"
(same anatomy, position and brightness) where a lesion appears, persists or vanishes. The questions only the pair
answers: "Has a lesion appeared since the prior study?" (yes: none before, one or more now; no: the reverse, so
swapping the studies reverses the answer) and "Is a lesion seen on both the prior and the current study?" (yes
half of the time; no: a lesion on one study only, the prior or the current equally often, so either study alone
answers at most 3 in 4 right: a lesion there leaves 2 to 1 odds, none means no). Every record carries
`answer_if_swapped`, the gold answer with the images in reverse order.
  images/progression/{train,test}/*_{prior,current}.png
  progression_instruct.jsonl  LLaVA form, both images first ("<image>\n<image>\n" + question), one question each
  progression_rl.jsonl        the questions on training pairs (images [prior, current]), for GRPO / DPO pairs
  progression_test.jsonl      the questions on held-out pairs (evaluation: the order and per-image checks)

Deterministic: the same --seed gives byte-identical files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from medllava.data.vqa import LETTERS, format_question

MODALITIES = {"xray": "X-ray", "ct": "CT", "mri": "MRI"}
SIDES = ("left", "right")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
CANVAS = 128

PRESENCE_QUESTIONS = [
    "Is there a lesion in this image?",
    "Is any lesion visible?",
    "Does this image show a lesion?",
]
MODALITY_QUESTIONS = ["What imaging modality is this?", "Which modality was used to acquire this image?"]
SIDE_QUESTIONS = ["On which side of the image is the lesion?", "Which side of the image shows the lesion?"]
COUNT_QUESTIONS = ["How many lesions are visible?", "How many lesions can be seen?"]
DESCRIBE_QUESTIONS = ["Describe the findings.", "What does this image show?", "Describe the image."]


def _ellipse(draw: ImageDraw.ImageDraw, cx: float, cy: float, rx: float, ry: float, fill: int) -> None:
    draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=fill)


def draw_phantom(rng: np.random.Generator, modality: str, side: str | None, count: int, size: int,
                 boxes: list[list[float]] | None = None) -> Image.Image:
    """Draw one phantom on a 128px canvas, blur, add noise, downsample to `size`; `boxes` receives each lesion's
    bounding box [x0, y0, x1, y1] in the output image's pixels (blur margin included)."""
    img = Image.new("L", (CANVAS, CANVAS), 0)
    d = ImageDraw.Draw(img)
    c = CANVAS / 2 + rng.uniform(-4, 4)
    gain = rng.uniform(0.85, 1.15)
    if modality == "xray":
        d.rectangle([0, 0, CANVAS, CANVAS], fill=25)
        _ellipse(d, c, c + 6, 54, 58, int(95 * gain))
        _ellipse(d, c - 24, c, 20, 36, int(55 * gain))
        _ellipse(d, c + 24, c, 20, 36, int(55 * gain))
        for k in range(5):
            y = c - 30 + k * 13
            d.arc([c - 50, y - 8, c + 50, y + 14], 200, 340, fill=int(150 * gain), width=3)
        d.rectangle([c - 4, 8, c + 4, CANVAS - 8], fill=int(210 * gain))
    elif modality == "ct":
        _ellipse(d, c, c, 54, 46, int(185 * gain))
        _ellipse(d, c, c, 49, 41, int(110 * gain))
        _ellipse(d, c, c + 30, 7, 7, int(235 * gain))
    else:  # mri
        d.rectangle([0, 0, CANVAS, CANVAS], fill=10)
        _ellipse(d, c, c, 44, 56, int(205 * gain))
        _ellipse(d, c, c, 39, 51, int(125 * gain))
        _ellipse(d, c - 9, c - 4, 5, 14, int(45 * gain))
        _ellipse(d, c + 9, c - 4, 5, 14, int(45 * gain))
    if side is not None:
        centres: list[tuple[float, float]] = []
        attempts = 0
        while len(centres) < count:
            attempts += 1
            if attempts > 100:  # the first centres left no room for the rest: place them all again
                centres, attempts = [], 0
            x = rng.uniform(0.20, 0.40) if side == "left" else rng.uniform(0.60, 0.80)
            y = rng.uniform(0.28, 0.72)
            if all((x - a) ** 2 + (y - b) ** 2 > 0.16**2 for a, b in centres):
                centres.append((x, y))
        for x, y in centres:
            r = rng.uniform(6.5, 8.5)
            _ellipse(d, x * CANVAS, y * CANVAS, r, r, 255)
            if boxes is not None:
                scale, margin = size / CANVAS, r + 3  # 3 canvas pixels of blur
                boxes.append([round(max(0.0, (x * CANVAS - margin) * scale), 2),
                              round(max(0.0, (y * CANVAS - margin) * scale), 2),
                              round(min(size, (x * CANVAS + margin) * scale), 2),
                              round(min(size, (y * CANVAS + margin) * scale), 2)])
    img = img.filter(ImageFilter.GaussianBlur(1.2))
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 6, (CANVAS, CANVAS))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return img.resize((size, size), Image.BILINEAR).convert("RGB")


def describe(modality: str, side: str | None, count: int, rng: np.random.Generator) -> str:
    name = MODALITIES[modality]
    if side is None:
        options = [f"{name} image with no lesion.", f"A normal {name} image, no lesion is seen."]
    else:
        noun = "lesion" if count == 1 else "lesions"
        article = "An" if name in ("X-ray", "MRI") else "A"
        options = [
            f"{name} image with {COUNT_WORDS[count]} {noun} on the {side} side.",
            f"{article} {name} image showing {COUNT_WORDS[count]} bright {noun} on the {side} side of the image.",
        ]
    return options[int(rng.integers(len(options)))]


def closed_questions(modality: str, side: str | None, count: int, rng: np.random.Generator) -> list[dict]:
    """All closed questions about one image, with gold answers (multiple-choice options in one fixed order per topic)."""
    pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    out = [{"question": pick(PRESENCE_QUESTIONS), "qtype": "yes_no", "answer": "yes" if side else "no", "topic": "presence"}]
    mods = list(MODALITIES.values())  # one order, as side and count have: a letter always means one modality
    out.append({"question": pick(MODALITY_QUESTIONS), "qtype": "multiple_choice", "options": mods,
                "answer": LETTERS[mods.index(MODALITIES[modality])], "topic": "modality"})
    if side is not None:
        sides = ["left", "right"]
        out.append({"question": pick(SIDE_QUESTIONS), "qtype": "multiple_choice", "options": sides,
                    "answer": LETTERS[sides.index(side)], "topic": "side"})
        counts = ["1", "2", "3"]
        out.append({"question": pick(COUNT_QUESTIONS), "qtype": "multiple_choice", "options": counts,
                    "answer": LETTERS[counts.index(str(count))], "topic": "count"})
    return out


def open_questions(side: str | None, count: int, rng: np.random.Generator) -> list[dict]:
    """Side and count asked conversationally (instruction data only)."""
    if side is None:
        return []
    pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    noun = "lesion" if count == 1 else "lesions"
    return [
        {"question": pick(SIDE_QUESTIONS), "text": f"On the {side} side of the image.", "topic": "side"},
        {"question": pick(COUNT_QUESTIONS), "text": f"{COUNT_WORDS[count].capitalize()} {noun}.", "topic": "count"},
    ]


def answer_text(q: dict) -> str:
    """How the assistant answers a question in the instruction data."""
    if "text" in q:
        return q["text"]
    if q["qtype"] == "yes_no":
        return "Yes." if q["answer"] == "yes" else "No."
    letter = q["answer"]
    return f"{letter}. {q['options'][LETTERS.index(letter)]}"


PERSISTENT_QUESTIONS = ["Is a lesion seen on both the prior and the current study?",
                        "Is the lesion persistent, seen on the prior and on the current study?"]
APPEARED_QUESTIONS = ["Has a lesion appeared since the prior study?",
                      "Compared with the prior study, is there a new lesion?"]


def sample_studies(rng: np.random.Generator, topic: str) -> tuple[tuple[str | None, int], tuple[str | None, int]]:
    """(side, count) of the prior and the current study. `appeared`: lesions in one study only, the prior or the
    current equally often. `persistent`: lesions in both (on one side, the count may change) half of the time,
    else in the prior only or the current only, equally often."""
    count = lambda: int(rng.integers(1, 4))  # noqa: E731
    side = SIDES[int(rng.integers(2))]
    if topic == "persistent" and rng.random() < 0.5:
        return (side, count()), (side, count())
    lesion = (side, count())
    return ((None, 0), lesion) if rng.random() < 0.5 else (lesion, (None, 0))


def progression_question(topic: str, prior: tuple[str | None, int], current: tuple[str | None, int],
                         rng: np.random.Generator) -> dict:
    """The question about one pair with its gold answer, and the answer with the studies swapped."""
    pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    if topic == "persistent":
        answer = "yes" if prior[1] and current[1] else "no"
        return {"question": pick(PERSISTENT_QUESTIONS), "qtype": "yes_no", "answer": answer,
                "answer_if_swapped": answer, "topic": "persistent"}
    appeared = prior[1] == 0 and current[1] > 0
    return {"question": pick(APPEARED_QUESTIONS), "qtype": "yes_no", "answer": "yes" if appeared else "no",
            "answer_if_swapped": "no" if appeared else "yes", "topic": "appeared"}


def draw_pair(rng: np.random.Generator, modality: str, prior: tuple[str | None, int],
              current: tuple[str | None, int], size: int) -> tuple[Image.Image, Image.Image]:
    """Two studies of one phantom patient: the same anatomy, position and brightness (one seed for both drawings),
    each with its own lesions."""
    seed = int(rng.integers(2**31))
    return tuple(draw_phantom(np.random.default_rng(seed), modality, side, n, size)  # type: ignore[return-value]
                 for side, n in (prior, current))


def generate_progression(out: Path, *, seed: int, n_train: int, n_test: int, size: int) -> dict:
    """The progression pairs (see the module docstring); their own random stream, so the single-image files are
    the same with or without them."""
    rng = np.random.default_rng([seed, 1])
    files: dict[str, list[dict]] = {"progression_instruct.jsonl": [], "progression_rl.jsonl": [],
                                    "progression_test.jsonl": []}
    corpus: list[str] = []
    for split, n in (("train", n_train), ("test", n_test)):
        folder = out / "images" / "progression" / split
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            modality = list(MODALITIES)[int(rng.integers(3))]
            topic = ("persistent", "appeared")[i % 2]
            prior, current = sample_studies(rng, topic)
            images = []
            for name, img in zip(("prior", "current"), draw_pair(rng, modality, prior, current, size)):
                rel = f"progression/{split}/{split}_{i:05d}_{name}.png"
                img.save(out / "images" / rel)
                images.append(rel)
            q = progression_question(topic, prior, current, rng)
            row = {"id": f"progression_{split}_{i:05d}", "images": images, **q, "modality": MODALITIES[modality],
                   "studies": [{"side": s, "count": n} for s, n in (prior, current)]}
            if split == "test":
                files["progression_test.jsonl"].append(row)
                continue
            files["progression_rl.jsonl"].append(row)
            turns = [{"from": "human", "value": format_question(q["question"], q.get("options"), n_images=2)},
                     {"from": "gpt", "value": answer_text(q)}]
            files["progression_instruct.jsonl"].append({"id": row["id"], "images": images, "conversations": turns})
            corpus.extend(t["value"].replace("<image>\n", "") for t in turns)
    for name, rows in files.items():
        with (out / name).open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return {"progression_train_pairs": n_train, "progression_test_pairs": n_test, "corpus": corpus}


def sample_truth(rng: np.random.Generator) -> tuple[str, str | None, int]:
    modality = list(MODALITIES)[int(rng.integers(3))]
    if rng.random() < 0.5:
        return modality, None, 0
    return modality, SIDES[int(rng.integers(2))], int(rng.integers(1, 4))


def generate(out: Path, *, seed: int, n_train: int, n_test: int, size: int, n_pairs: int = 0,
             n_test_pairs: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    (out / "images" / "train").mkdir(parents=True, exist_ok=True)
    (out / "images" / "test").mkdir(parents=True, exist_ok=True)
    align, instruct, rl, test, corpus = [], [], [], [], []
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            modality, side, count = sample_truth(rng)
            rel = f"{split}/{split}_{i:05d}.png"
            boxes: list[list[float]] = []
            draw_phantom(rng, modality, side, count, size, boxes).save(out / "images" / rel)
            truth = {"modality": MODALITIES[modality], "lesion": side is not None, "side": side, "count": count}
            questions = closed_questions(modality, side, count, rng)
            caption = describe(modality, side, count, rng)
            if split == "test":
                for k, q in enumerate(questions):
                    test.append({"id": f"test_{i:05d}_{k}", "image": rel, **q, "modality": MODALITIES[modality]})
                continue
            align.append({"id": f"align_{i:05d}", "image": rel, "truth": truth, "conversations": [
                {"from": "human", "value": "<image>\n" + DESCRIBE_QUESTIONS[int(rng.integers(3))]},
                {"from": "gpt", "value": caption}]})
            asked = questions + open_questions(side, count, rng)
            order = rng.permutation(len(asked))
            turns: list[dict] = []
            for j, qi in enumerate(order[: int(rng.integers(2, 5))]):
                q = asked[qi]
                turns.append({"from": "human", "value": format_question(q["question"], q.get("options"), with_image=j == 0)})
                turns.append({"from": "gpt", "value": answer_text(q)})
            if rng.random() < 0.3:
                turns += [{"from": "human", "value": DESCRIBE_QUESTIONS[int(rng.integers(3))]}, {"from": "gpt", "value": caption}]
            instruct.append({"id": f"instruct_{i:05d}", "image": rel, "conversations": turns})
            for k, q in enumerate(questions):
                rl.append({"id": f"rl_{i:05d}_{k}", "image": rel, **q, "modality": MODALITIES[modality],
                           **({"bbox": boxes} if boxes else {})})
            corpus.append(caption)
            corpus.extend(t["value"].replace("<image>\n", "") for t in turns)

    def dump(name: str, rows: list[dict]) -> None:
        with (out / name).open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")

    dump("align.jsonl", align)
    dump("instruct.jsonl", instruct)
    dump("rl.jsonl", rl)
    dump("test.jsonl", test)
    progression: dict = {}
    if n_pairs or n_test_pairs:
        progression = generate_progression(out, seed=seed, n_train=n_pairs, n_test=n_test_pairs, size=size)
        corpus.extend(progression.pop("corpus"))
    (out / "corpus.txt").write_text("\n".join(dict.fromkeys(corpus)) + "\n", encoding="utf-8")
    chance = float(np.mean([1 / len(q["options"]) if q.get("options") else 0.5 for q in test])) if test else 0.0
    meta = {"seed": seed, "image_size": size, "train_images": n_train, "test_images": n_test,
            "align": len(align), "instruct": len(instruct), "rl": len(rl), "test_questions": len(test),
            "test_chance_accuracy": round(chance, 4), **progression}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/phantom"), help="output folder (default: data/phantom)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=2000, help="number of training images")
    parser.add_argument("--test", type=int, default=100, help="number of held-out test images")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--pairs", type=int, default=0, help="progression pairs for training (prior + current)")
    parser.add_argument("--test-pairs", type=int, default=0, help="held-out progression pairs")
    args = parser.parse_args(argv)
    meta = generate(args.out, seed=args.seed, n_train=args.train, n_test=args.test, size=args.size,
                    n_pairs=args.pairs, n_test_pairs=args.test_pairs)
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
