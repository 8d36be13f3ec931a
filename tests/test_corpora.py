"""Public-corpus recipes on small fixtures in each published layout (written here), run as the scripts are."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from medllava.data.vqa import read_vqa

from .conftest import REPO


def _recipe(name: str, *args: str) -> dict:
    result = subprocess.run([sys.executable, "-m", f"data_recipes.{name}", *args], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("name", ["vqa_rad", "slake", "pathvqa", "pmc_vqa", "omnimedvqa", "llava_med", "llava_to_vqa",
                                  "self_instruct", "pass_rate_filter", "phantom", "medframeqa"])
def test_every_recipe_has_help(name: str, tmp_path: Path) -> None:
    """Issue 25: each recipe is a `python -m data_recipes.NAME` entry point that runs from any folder and no longer
    patches sys.path to find medllava."""
    result = subprocess.run([sys.executable, "-m", f"data_recipes.{name}", "--help"], capture_output=True,
                            text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0 and "usage:" in result.stdout
    assert "sys.path" not in (REPO / "data_recipes" / f"{name}.py").read_text()


def test_recipe_tools_are_out_of_the_training_data_path() -> None:
    """Issue 25: the converters and the self-instruct generator (39% of medllava/data/) are recipe tools: they live in
    medllava/recipes/ and nothing training imports pulls them in."""
    assert not (REPO / "medllava/data/corpora.py").exists() and not (REPO / "medllava/data/self_instruct.py").exists()
    code = ("import sys, medllava.data.cache, medllava.data.collate, medllava.data.vqa, medllava.data.rl, "
            "medllava.train.sft, medllava.train.grpo, medllava.evaluate; "
            "print(sorted(m for m in sys.modules if m.startswith('medllava.recipes')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_vqa_rad_public_json(tmp_path: Path) -> None:
    images = tmp_path / "VQA_RAD Image Folder"
    images.mkdir()
    for name in ("synpic1.jpg", "synpic2.jpg"):
        Image.new("RGB", (16, 16)).save(images / name)
    rows = [
        {"qid": 1, "image_name": "synpic1.jpg", "image_organ": "CHEST", "question": "Is there a pneumothorax?",
         "answer": "No", "answer_type": "CLOSED", "question_type": "PRES", "phrase_type": "test_freeform"},
        {"qid": 2, "image_name": "synpic1.jpg", "image_organ": "CHEST", "question": "Where is the mass?",
         "answer": "right upper lobe", "answer_type": "OPEN", "question_type": "POS", "phrase_type": "test_para"},
        {"qid": 3, "image_name": "synpic2.jpg", "image_organ": "HEAD", "question": "Is this an MRI?",
         "answer": "yes", "answer_type": "CLOSED", "phrase_type": "freeform"},
        {"qid": 4, "image_name": "missing.jpg", "image_organ": "HEAD", "question": "Is it normal?", "answer": "yes",
         "answer_type": "CLOSED", "phrase_type": "test_freeform"},
        {"qid": 5, "image_name": "synpic2.jpg", "question": "", "answer": "yes", "phrase_type": "test_freeform"},
    ]
    src = tmp_path / "VQA_RAD Dataset Public.json"
    src.write_text(json.dumps(rows))
    out = tmp_path / "out/test.jsonl"
    counts = _recipe("vqa_rad", "--in", str(src), "--split", "test", "--image-folder", str(images), "--out", str(out),
                     "--instruct-out", str(tmp_path / "out/test_instruct.jsonl"))
    assert counts["read"] == 5 and counts["written"] == 2
    assert counts["skipped"] == {"other_split": 1, "missing_image": 1, "missing_field": 1}
    recs = [r for r in read_vqa(out)]
    assert [(r.id, r.qtype, r.meta["organ"], r.meta["answer_type"]) for r in recs] == [
        ("vqarad_1", "yes_no", "CHEST", "CLOSED"), ("vqarad_2", "open", "CHEST", "OPEN")]
    conv = _jsonl(tmp_path / "out/test_instruct.jsonl")[0]["conversations"]
    assert conv[0]["value"] == "<image>\nIs there a pneumothorax?" and conv[1]["value"] == "No"
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["skip_examples"]["missing_image"].endswith("missing.jpg")


def test_vqa_rad_public_json_never_mixes_splits_by_default(tmp_path: Path) -> None:
    """Issue 25: `--split` defaulted to all, so following the recipes' hint put the test questions into the
    training file. The public JSON needs an explicit split; the recipes' hints name it."""
    src = tmp_path / "VQA_RAD Dataset Public.json"
    src.write_text(json.dumps([{"qid": 1, "image_name": "a.jpg", "question": "Is it normal?", "answer": "yes",
                                "phrase_type": "test_freeform"}]))
    result = subprocess.run([sys.executable, "-m", "data_recipes.vqa_rad", "--in", str(src), "--out",
                             str(tmp_path / "train.jsonl")], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "--split" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "train.jsonl").exists()
    for stage in REPO.glob("stages/*/grpo*.yaml"):
        hint = next((line for line in stage.read_text().splitlines() if "made_by" in line and "vqa_rad" in line), "")
        assert not hint or "--split train" in hint, stage


def test_vqa_rad_and_pathvqa_from_datasets_with_embedded_images(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({
        "image": [Image.new("RGB", (12, 12), (i * 40, 0, 0)) for i in range(3)],
        "question": ["is this tissue malignant?", "what stain is used?", ""],
        "answer": ["yes", "hematoxylin and eosin", "no"],
        "answer_type": ["closed", "open", "closed"],
        "organ": ["liver", "skin", "lung"],
    }).cast_column("image", datasets.Image())
    parquet = tmp_path / "test-00000-of-00001.parquet"
    ds.to_parquet(str(parquet))
    out = tmp_path / "pathvqa/test.jsonl"
    counts = _recipe("pathvqa", "--in", str(parquet), "--out", str(out))
    assert counts["written"] == 2 and counts["skipped"] == {"missing_field": 1}
    recs = list(read_vqa(out))
    assert [r.qtype for r in recs] == ["yes_no", "open"]
    assert all((out.parent / "images" / r.images[0]).is_file() for r in recs)
    # dataset-side fields are kept for the eval breakdowns (LLaVA-Med's answer type in its CLOSED/OPEN form)
    assert [(r.meta["answer_type"], r.meta["organ"]) for r in recs] == [("CLOSED", "liver"), ("OPEN", "skin")]
    counts = _recipe("vqa_rad", "--in", str(parquet), "--out", str(tmp_path / "vqarad/test.jsonl"))
    assert counts["written"] == 2


def test_medframeqa_frames_in_order_from_both_published_layouts(tmp_path: Path) -> None:
    """MedFrameQA's parquet (image_1..image_5 with unused ones empty, options as texts, correct_answer a letter) and
    the re-published layout (image: a list, answer) become records whose images are the frames in order."""
    datasets = pytest.importorskip("datasets")
    frame = lambda shade: Image.new("RGB", (10, 10), (shade, 0, 0))  # noqa: E731
    ds = datasets.Dataset.from_dict({
        "question_id": ["liver_cirrhosis_CT_abc_1", "heart_x_2", "lung_y_3"],
        "system": ["digestive", "cardiovascular", "respiratory"], "organ": ["liver", "heart", "lung"],
        "keyword": ["cirrhosis", "x", "y"], "modality": ["CT", "Ultrasound", "CT"], "video_id": ["abc", "d", "e"],
        "question": ["Comparing the first image with the second and third, which finding progresses?",
                     "What does the second image add to the first?", "Which?"],
        "options": [["Nodularity", "Ascites", "Normal liver", "Fatty liver"], ["A", "B", "C", "D", "E"], ["x", "y"]],
        "correct_answer": ["b", "E", "C"],  # the third names no option: skipped as bad_answer
        "image_url": ["https://example.org/v1", "https://example.org/v2", "https://example.org/v3"],
        "image_1": [frame(10), frame(20), frame(30)], "image_2": [frame(11), frame(21), frame(31)],
        "image_3": [frame(12), None, None], "image_4": [None, None, None], "image_5": [None, None, None],
    })
    for k in range(1, 6):
        ds = ds.cast_column(f"image_{k}", datasets.Image())
    parquet = tmp_path / "test-00000-of-00001.parquet"
    ds.to_parquet(str(parquet))
    out = tmp_path / "medframeqa/test.jsonl"
    counts = _recipe("medframeqa", "--in", str(parquet), "--out", str(out))
    assert counts["written"] == 2 and counts["skipped"] == {"bad_answer": 1}
    recs = list(read_vqa(out))
    assert [len(r.images) for r in recs] == [3, 2] and [r.answer for r in recs] == ["B", "E"]
    shades = [[Image.open(out.parent / "images" / ref).getpixel((0, 0))[0] for ref in r.images] for r in recs]
    assert shades == [[10, 11, 12], [20, 21]]
    assert recs[0].id == "medframeqa_liver_cirrhosis_CT_abc_1" and recs[0].meta["modality"] == "CT"
    assert recs[0].meta["video_id"] == "abc" and "image_url" not in recs[0].meta
    again = datasets.Dataset.from_dict({"question_id": ["q1"], "question": ["Which frame?"],
                                        "options": [["first", "second"]], "answer": ["A"],
                                        "image": [[frame(40), frame(41)]]})
    again = again.cast_column("image", datasets.List(datasets.Image()))
    again.to_parquet(str(tmp_path / "octo.parquet"))
    counts = _recipe("medframeqa", "--in", str(tmp_path / "octo.parquet"), "--out", str(tmp_path / "o/test.jsonl"))
    assert counts["written"] == 1 and len(next(iter(read_vqa(tmp_path / "o/test.jsonl"))).images) == 2


def test_slake_english_only(tmp_path: Path) -> None:
    rows = [
        {"img_id": 1, "img_name": "xmlab1/source.jpg", "question": "Which organ is abnormal?", "answer": "Lung",
         "q_lang": "en", "location": "Lung", "modality": "CT", "answer_type": "OPEN", "qid": 11},
        {"img_id": 1, "img_name": "xmlab1/source.jpg", "question": "这是CT吗?", "answer": "是", "q_lang": "zh",
         "modality": "CT", "answer_type": "CLOSED", "qid": 12},
        {"img_id": 2, "img_name": "xmlab2/source.jpg", "question": "Is this a T1 weighted image?", "answer": "No",
         "q_lang": "en", "location": "Brain", "modality": "MRI", "answer_type": "CLOSED", "qid": 13},
    ]
    src = tmp_path / "test.json"
    src.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "slake.jsonl"
    counts = _recipe("slake", "--in", str(src), "--out", str(out))
    assert counts["written"] == 2 and counts["skipped"] == {"not_english": 1}
    recs = list(read_vqa(out))
    assert [(r.qtype, r.meta["modality"], r.meta["organ"]) for r in recs] == [("open", "CT", "Lung"), ("yes_no", "MRI", "Brain")]


def test_pmc_vqa_csv(tmp_path: Path) -> None:
    src = tmp_path / "test.csv"
    fields = ["Figure_path", "Question", "Answer", "Choice A", "Choice B", "Choice C", "Choice D", "Answer_label"]
    rows = [
        ["PMC1_F1.jpg", "What imaging modality was used?", "CT", " A:MRI ", " B:CT", " C:X-ray", " D:PET", "B"],
        ["PMC2_F3.jpg", "Which organ is shown?", "Liver", "A:Liver", "B:Kidney", "C:Spleen", "D:Heart", ""],
        ["PMC3_F2.jpg", "What is seen?", "Something else", "A:x", "B:y", "C:z", "D:w", ""],
        ["PMC4_F1.jpg", "What is the view?", "Axial", "A:Axial", "B:", "C:Sagittal", "D:Coronal", "A"],
    ]
    with src.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(fields)
        writer.writerows(rows)
    out = tmp_path / "pmc.jsonl"
    counts = _recipe("pmc_vqa", "--in", str(src), "--out", str(out))
    assert counts["written"] == 2 and counts["skipped"] == {"bad_answer": 1, "missing_field": 1}
    first, second = list(read_vqa(out))
    assert first.options == ["MRI", "CT", "X-ray", "PET"] and first.answer_letter == "B"
    assert second.answer_letter == "A" and second.id == "pmcvqa_3"


def test_omnimedvqa_per_modality(tmp_path: Path) -> None:
    rows = [
        {"dataset": "ACRIMA", "question_id": "q1", "question_type": "Disease Diagnosis", "question": "What is seen?",
         "gt_answer": "Glaucoma", "image_path": "Images/ACRIMA/1.png", "option_A": "Normal", "option_B": "Glaucoma",
         "modality_type": "Fundus Photography"},
        {"dataset": "BUSI", "question_id": "q2", "question": "Which finding?", "gt_answer": "Benign tumor",
         "image_path": "Images/BUSI/2.png", "option_A": "Malignant tumor", "option_B": "Benign tumor",
         "option_C": "Normal", "option_D": "Cyst", "modality_type": "Ultrasound"},
        {"dataset": "BUSI", "question_id": "q3", "question": "Which finding?", "gt_answer": "Not an option",
         "image_path": "Images/BUSI/3.png", "option_A": "A", "option_B": "B", "modality_type": "Ultrasound"},
    ]
    src = tmp_path / "ACRIMA.json"
    src.write_text(json.dumps(rows))
    out = tmp_path / "omni.jsonl"
    counts = _recipe("omnimedvqa", "--in", str(src), "--out", str(out))
    assert counts["written"] == 2 and counts["skipped"] == {"bad_answer": 1}
    a, b = list(read_vqa(out))
    assert (a.answer_letter, a.meta["modality"], len(a.options)) == ("B", "Fundus Photography", 2)
    assert (b.answer_letter, b.meta["modality"], b.meta["source_dataset"]) == ("B", "Ultrasound", "BUSI")


def test_llava_med_alignment_and_instruct(tmp_path: Path) -> None:
    align = [
        {"id": "a1", "image": "PMC1_F1.jpg", "conversations": [
            {"from": "human", "value": "Describe the image concisely.\n<image>"},
            {"from": "gpt", "value": "Axial CT showing a liver lesion."}]},
        {"id": "a2", "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]},
        {"id": "a3", "image": "PMC3.jpg", "conversations": [{"from": "human", "value": "<image>\nDescribe."},
                                                            {"from": "gpt", "value": " "}]},
    ]
    src = tmp_path / "llava_med_alignment_500k.json"
    src.write_text(json.dumps(align))
    out = tmp_path / "align.jsonl"
    counts = _recipe("llava_med", "--kind", "align", "--in", str(src), "--out", str(out))
    assert counts["written"] == 1 and counts["skipped"] == {"no_image": 1, "empty_answer": 1}
    row = _jsonl(out)[0]
    assert row["conversations"][0]["value"] == "<image>\nDescribe the image concisely."

    instruct = [{"id": "i1", "image": "PMC9_F2.jpg", "conversations": [
        {"from": "human", "value": "What is shown?\n<image>"}, {"from": "gpt", "value": "A chest X-ray."},
        {"from": "human", "value": "Any effusion?"}, {"from": "gpt", "value": "A small left effusion."}]},
        {"id": "i2", "image": "PMC9_F3.jpg", "conversations": [
            {"from": "gpt", "value": "Hello"}, {"from": "human", "value": "<image>"}]}]
    src = tmp_path / "llava_med_instruct_60k_inline_mention.json"
    src.write_text(json.dumps(instruct))
    out = tmp_path / "instruct.jsonl"
    counts = _recipe("llava_med", "--kind", "instruct", "--in", str(src), "--out", str(out))
    assert counts["written"] == 1 and counts["skipped"] == {"bad_roles": 1}
    conv = _jsonl(out)[0]["conversations"]
    assert len(conv) == 4 and conv[0]["value"] == "<image>\nWhat is shown?"


def test_llava_vqa_form_to_vqa_records(tmp_path: Path) -> None:
    rows = [{"id": "v1", "image": "a.jpg", "answer_type": "CLOSED", "conversations": [
        {"from": "human", "value": "<image>\nIs the heart enlarged?"}, {"from": "gpt", "value": "yes"}]},
        {"id": "v2", "image": "b.jpg", "conversations": [{"from": "gpt", "value": "orphan"}]}]
    src = tmp_path / "test.json"
    src.write_text(json.dumps(rows))
    out = tmp_path / "vqa.jsonl"
    counts = _recipe("llava_to_vqa", "--in", str(src), "--out", str(out))
    assert counts == {"read": 2, "written": 1, "skipped": {"no_question_answer_pair": 1}}
    (rec,) = list(read_vqa(out))
    assert rec.qtype == "yes_no" and rec.question == "Is the heart enlarged?"


@pytest.mark.parametrize("recipe", ["pathvqa", "vqa_rad"])
def test_train_and_test_splits_into_one_folder_keep_their_own_images(recipe: str, tmp_path: Path) -> None:
    """Embedded images of two splits converted next to each other: no file is overwritten, every record still
    points at its own image, and ids stay unique across the splits."""
    datasets = pytest.importorskip("datasets")
    for split, shade in (("train", 10), ("test", 200)):
        ds = datasets.Dataset.from_dict({
            "image": [Image.new("RGB", (12, 12), (shade + i, 0, 0)) for i in range(3)],
            "question": [f"{split} question {i}?" for i in range(3)], "answer": ["yes", "no", "yes"],
        }).cast_column("image", datasets.Image())
        ds.to_parquet(str(tmp_path / f"{split}.parquet"))
        _recipe(recipe, "--in", str(tmp_path / f"{split}.parquet"), "--out", str(tmp_path / "out" / f"{split}.jsonl"))
    ids = []
    for split, shade in (("train", 10), ("test", 200)):
        for i, rec in enumerate(read_vqa(tmp_path / "out" / f"{split}.jsonl")):
            pixel = Image.open(tmp_path / "out" / "images" / rec.images[0]).convert("RGB").getpixel((0, 0))
            assert pixel == (shade + i, 0, 0), (split, i, rec.images)
            ids.append(rec.id)
    assert len(ids) == len(set(ids)) == 6
