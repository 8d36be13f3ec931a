#!/usr/bin/env python3
"""Fixture data for the recipe rehearsal, in the layouts the public corpora are published in, converted by the
same data_recipes/ commands a user runs, into the paths the real recipes (stages/<family>/*.yaml) name.

    python scripts/rehearsal_data.py WORKDIR

Writes WORKDIR/published/ (what one downloads):
  llava_med_alignment_500k.json, llava_med_instruct_60k_inline_mention.json  (LLaVA-Med, images in llava_med_images/)
  VQA_RAD Dataset Public.json + "VQA_RAD Image Folder/"                       (VQA-RAD)
  Slake1.0/train.json, Slake1.0/imgs/xmlabN/source.jpg                        (SLAKE, English and Chinese rows)
  pmc_vqa/train.csv + figures                                                  (PMC-VQA)
  pathvqa/train.parquet, pathvqa/test.parquet (embedded images)               (PathVQA as on the Hub)
and then WORKDIR/data/ through the converters:
  data/llava_med/{align,instruct_60k}.jsonl, data/llava_med/images/
  data/vqa/{vqa_rad,slake,pmc_vqa,pathvqa}_train.jsonl, data/vqa/vqa_rad_test.jsonl, data/vqa/images/
  data/corpus.txt (every text, to train the tiny tokenizers on)
Deterministic for a given --seed.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
FINDINGS = ["a small nodule", "a pleural effusion", "a rounded mass", "no acute abnormality", "a fracture",
            "an enlarged heart", "a cystic lesion", "consolidation"]
ORGANS = ["chest", "abdomen", "brain", "liver", "lung", "kidney"]
MODALITIES = ["CT", "MRI", "X-Ray"]
SIDES = ["left", "right"]


def image(rng: random.Random, size: int = 48) -> Image.Image:
    """A grey 'scan' with a bright blob: enough for a tiny tower, and decodable like any JPEG/PNG."""
    arr = np.full((size, size), rng.randint(20, 60), dtype=np.uint8)
    img = Image.fromarray(arr).convert("RGB")
    draw = ImageDraw.Draw(img)
    x, y, r = rng.randint(8, size - 8), rng.randint(8, size - 8), rng.randint(3, 7)
    draw.ellipse([x - r, y - r, x + r, y + r], fill=(230, 230, 230))
    return img


def save(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, quality=90)


def caption(rng: random.Random) -> str:
    return (f"{rng.choice(MODALITIES)} of the {rng.choice(ORGANS)} showing {rng.choice(FINDINGS)} "
            f"on the {rng.choice(SIDES)} side.")


def llava_med(pub: Path, rng: random.Random, n_align: int, n_instruct: int) -> None:
    images = pub / "llava_med_images"
    align, instruct = [], []
    for i in range(n_align):
        name = f"PMC{100000 + i}_fig{i % 3 + 1}.jpg"
        save(image(rng), images / name)
        align.append({"id": f"PMC{100000 + i}", "image": name, "conversations": [
            {"from": "human", "value": "<image>\nDescribe the figure concisely."},
            {"from": "gpt", "value": caption(rng)}]})
    for i in range(n_instruct):
        name = f"PMC{100000 + i % n_align}_fig{i % n_align % 3 + 1}.jpg"
        turns = [{"from": "human", "value": "What is the imaging modality?\n<image>"},
                 {"from": "gpt", "value": f"This is a {rng.choice(MODALITIES)} image of the {rng.choice(ORGANS)}."}]
        if i % 2:
            turns += [{"from": "human", "value": "Is there an abnormality?"},
                      {"from": "gpt", "value": f"Yes, there is {rng.choice(FINDINGS[:3])} on the {rng.choice(SIDES)}."}]
        instruct.append({"id": f"inst{i}", "image": name, "conversations": turns, "domain": {"chest_xray": True}})
    (pub / "llava_med_alignment_500k.json").write_text(json.dumps(align), encoding="utf-8")
    (pub / "llava_med_instruct_60k_inline_mention.json").write_text(json.dumps(instruct), encoding="utf-8")


def yes_no_question(rng: random.Random) -> tuple[str, str]:
    return f"Is there {rng.choice(FINDINGS[:3])} in the {rng.choice(ORGANS)}?", rng.choice(["yes", "no"])


def vqa_rad(pub: Path, rng: random.Random, n: int) -> None:
    folder = pub / "VQA_RAD Image Folder"
    rows = []
    for i in range(n):
        name = f"synpic{5000 + i % (n // 2)}.jpg"
        if not (folder / name).exists():
            save(image(rng), folder / name)
        closed = i % 3 != 2
        q, a = yes_no_question(rng) if closed else ("Which organ is shown?", rng.choice(ORGANS))
        rows.append({"qid": 1000 + i, "image_name": name, "question": q, "answer": a,
                     "answer_type": "CLOSED" if closed else "OPEN", "image_organ": rng.choice(["CHEST", "HEAD", "ABD"]),
                     "question_type": "PRES" if closed else "ORGAN",
                     "phrase_type": "test_freeform" if i % 4 == 0 else "freeform"})
    (pub / "VQA_RAD Dataset Public.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")


def slake(pub: Path, rng: random.Random, n: int) -> None:
    root = pub / "Slake1.0"
    rows = []
    for i in range(n):
        rel = f"xmlab{i // 2}/source.jpg"
        if not (root / "imgs" / rel).exists():
            save(image(rng), root / "imgs" / rel)
            region = Image.new("L", (64, 64), 0)  # SLAKE's segmentation beside each image (organs, lesions)
            region.paste(255, (16, 16, 40, 48))
            region.save(root / "imgs" / Path(rel).parent / "mask.png")
        q, a = yes_no_question(rng)
        rows.append({"img_id": i // 2, "img_name": rel, "question": q, "answer": a, "q_lang": "en",
                     "location": rng.choice(["Lung", "Abdomen", "Brain"]), "modality": rng.choice(MODALITIES),
                     "answer_type": "CLOSED", "content_type": "Abnormality", "qid": 2000 + i})
        if i % 5 == 0:  # SLAKE ships Chinese questions beside the English ones; the converter skips them
            rows.append({**rows[-1], "question": "图中有病变吗?", "answer": "有", "q_lang": "zh", "qid": 9000 + i})
    (root / "train.json").write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")


def pmc_vqa(pub: Path, rng: random.Random, n: int) -> None:
    root = pub / "pmc_vqa"
    root.mkdir(parents=True, exist_ok=True)
    with (root / "train.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["Figure_path", "Question", "Answer", "Choice A", "Choice B", "Choice C",
                                                "Choice D", "Answer_label"])
        writer.writeheader()
        for i in range(n):
            name = f"PMC{700000 + i}_F{i % 4 + 1}.jpg"
            save(image(rng), root / "figures" / name)
            options = rng.sample(MODALITIES + ["Ultrasound"], 4)
            label = rng.choice("ABCD")
            writer.writerow({"Figure_path": name, "Question": "What imaging modality was used?",
                             "Answer": options["ABCD".index(label)],
                             **{f"Choice {c}": f" {c}:{o}" for c, o in zip("ABCD", options)}, "Answer_label": label})


def pathvqa(pub: Path, rng: random.Random, n: int) -> None:
    import datasets

    root = pub / "pathvqa"
    root.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", n), ("test", max(2, n // 4))):
        rows = {"image": [], "question": [], "answer": []}
        for _ in range(count):
            buf = io.BytesIO()
            image(rng).save(buf, format="JPEG")
            rows["image"].append({"bytes": buf.getvalue(), "path": None})
            q, a = yes_no_question(rng)
            rows["question"].append(q.replace("in the", "in this tissue from the"))
            rows["answer"].append(a)
        features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                      "answer": datasets.Value("string")})
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(root / f"{split}.parquet"))


def recipe(*args: str, cwd: Path) -> None:
    """Run one data_recipes/ command as a user would; its counts line is printed."""
    subprocess.run([sys.executable, "-m", f"data_recipes.{Path(args[0]).stem}", *args[1:]], check=True, cwd=cwd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--align", type=int, default=256, help="alignment pairs (2 steps of the recipes' batch 128)")
    parser.add_argument("--instruct", type=int, default=128, help="instruction conversations")
    parser.add_argument("--vqa", type=int, default=12,
                        help="questions per VQA corpus (about 45 in all: one GRPO step of 32 questions x 8)")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    work = args.workdir.resolve()
    pub = work / "published"
    if pub.exists():
        shutil.rmtree(pub)
    pub.mkdir(parents=True)
    llava_med(pub, rng, args.align, args.instruct)
    vqa_rad(pub, rng, args.vqa)
    slake(pub, rng, args.vqa)
    pmc_vqa(pub, rng, args.vqa)
    pathvqa(pub, rng, args.vqa)

    data = work / "data"
    shutil.copytree(pub / "llava_med_images", data / "llava_med" / "images", dirs_exist_ok=True)
    vqa_images = data / "vqa" / "images"
    shutil.copytree(pub / "VQA_RAD Image Folder", vqa_images, dirs_exist_ok=True)
    shutil.copytree(pub / "Slake1.0" / "imgs", vqa_images, dirs_exist_ok=True)
    shutil.copytree(pub / "pmc_vqa" / "figures", vqa_images, dirs_exist_ok=True)
    recipe("llava_med.py", "--kind", "align", "--in", str(pub / "llava_med_alignment_500k.json"),
           "--out", "data/llava_med/align.jsonl", cwd=work)
    recipe("llava_med.py", "--kind", "instruct", "--in", str(pub / "llava_med_instruct_60k_inline_mention.json"),
           "--image-folder", "data/llava_med/images", "--out", "data/llava_med/instruct_60k.jsonl", cwd=work)
    public_json = str(pub / "VQA_RAD Dataset Public.json")
    recipe("vqa_rad.py", "--in", public_json, "--split", "train", "--image-folder", str(vqa_images),
           "--out", "data/vqa/vqa_rad_train.jsonl", cwd=work)
    recipe("vqa_rad.py", "--in", public_json, "--split", "test", "--image-folder", str(vqa_images),
           "--out", "data/vqa/vqa_rad_test.jsonl", cwd=work)
    recipe("slake.py", "--in", str(pub / "Slake1.0" / "train.json"), "--image-folder", str(vqa_images),
           "--out", "data/vqa/slake_train.jsonl", cwd=work)
    recipe("pmc_vqa.py", "--in", str(pub / "pmc_vqa" / "train.csv"), "--image-folder", str(vqa_images),
           "--out", "data/vqa/pmc_vqa_train.jsonl", cwd=work)
    recipe("pathvqa.py", "--in", str(pub / "pathvqa" / "train.parquet"), "--out", "data/vqa/pathvqa_train.jsonl", cwd=work)

    texts = []
    for path in sorted(data.rglob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            texts += [t["value"] for t in row.get("conversations", [])]
            texts += [str(row.get(k, "")) for k in ("question", "answer")] + list(row.get("options") or [])
    texts += ["<think> The image shows the finding. </think> <answer> yes </answer>", "First think step by step."]
    (data / "corpus.txt").write_text("\n".join(t.replace("\n", " ") for t in texts if t) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
