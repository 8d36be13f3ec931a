"""Preference pairs (issue 26, first part): the TRL, ms-swift and LLaMA-Factory layouts read into one form, the
rejected side's own images (ms-swift `rejected_images`) kept apart from the chosen side's, and every SFT image
rule applied to both sides, each problem named by file, line and side."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from medllava.data.preference import PreferencePair, check_pair_images, read_pairs
from medllava.data.records import RecordError

from .conftest import write_jsonl

QUESTION = "<image>\nIs there a pneumothorax?"


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for name, shade in (("ct.png", 200), ("ct_noised.png", 90)):
        Image.new("L", (16, 16), shade).save(folder / name)
    return folder


def read(path: Path, images: Path) -> list[PreferencePair | RecordError]:
    return list(read_pairs(path, images))


def test_the_three_published_layouts_read_into_the_same_pair(tmp_path: Path, images: Path) -> None:
    rows = [
        {"id": "trl", "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                                  "text": "Is there a pneumothorax?"}]}],
         "chosen": [{"role": "assistant", "content": "Yes, on the right."}],
         "rejected": [{"role": "assistant", "content": "No."}], "images": ["ct.png"]},
        {"id": "swift", "messages": [{"role": "user", "content": QUESTION},
                                     {"role": "assistant", "content": "Yes, on the right."}],
         "rejected_response": "No.", "images": ["ct.png"]},
        {"id": "factory", "conversations": [{"from": "human", "value": QUESTION}],
         "chosen": {"from": "gpt", "value": "Yes, on the right."}, "rejected": {"from": "gpt", "value": "No."},
         "images": ["ct.png"]},
        {"id": "trl-text", "prompt": QUESTION, "chosen": "Yes, on the right.", "rejected": "No.", "image": "ct.png"},
    ]
    pairs = read(write_jsonl(tmp_path / "pairs.jsonl", rows), images)
    assert all(isinstance(p, PreferencePair) for p in pairs), pairs
    assert [p.layout for p in pairs] == ["trl", "ms-swift", "llama-factory", "trl"]
    for pair in pairs:
        assert [(t.role, t.text.replace("\n", " ").strip()) for t in pair.prompt] == \
            [("user", "<image> Is there a pneumothorax?")], pair.id
        assert (pair.chosen, pair.rejected, pair.weight) == ("Yes, on the right.", "No.", 1.0)
        assert pair.images == [images / "ct.png"] and pair.rejected_images is None and not pair.own_rejected_images
        assert pair.side("rejected")[2] == [images / "ct.png"]  # TRL's case: the rejected side sees the same image


def test_ms_swift_rejected_images_and_messages_belong_to_the_rejected_side(tmp_path: Path, images: Path) -> None:
    rows = [
        {"id": "own-image", "messages": [{"role": "user", "content": QUESTION},
                                         {"role": "assistant", "content": "Yes, on the right."}],
         "rejected_response": "Yes, on the right.", "images": ["ct.png"], "rejected_images": ["ct_noised.png"],
         "weight": 0.7},
        {"id": "own-conversation", "messages": [{"role": "user", "content": QUESTION},
                                                {"role": "assistant", "content": "Yes."}],
         "rejected_messages": [{"role": "user", "content": "<image>\nIs the lung collapsed?"},
                               {"role": "assistant", "content": "No."}],
         "images": ["ct.png"], "rejected_images": ["ct_noised.png"]},
        {"id": "own-conversation-no-images", "messages": [{"role": "user", "content": QUESTION},
                                                          {"role": "assistant", "content": "Yes."}],
         "rejected_messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "No."}],
         "images": ["ct.png"]},
        {"id": "factory-system", "system": "You are a radiologist.", "conversations": [{"from": "human",
                                                                                        "value": QUESTION}],
         "chosen": {"from": "gpt", "value": "Yes."}, "rejected": {"from": "gpt", "value": "No."},
         "images": ["ct.png"], "weight": None},
    ]
    own, conversation, no_images, system = read(write_jsonl(tmp_path / "swift.jsonl", rows), images)
    assert own.own_rejected_images and own.weight == 0.7
    assert own.side("chosen") == (own.prompt, "Yes, on the right.", [images / "ct.png"])
    assert own.side("rejected") == (own.prompt, "Yes, on the right.", [images / "ct_noised.png"])
    prompt, answer, side_images = conversation.side("rejected")
    assert prompt[0].text.endswith("Is the lung collapsed?") and answer == "No."
    assert side_images == [images / "ct_noised.png"]
    # ms-swift: rejected_messages bring their own images; without them the placeholder has no image
    assert isinstance(no_images, RecordError) and no_images.kind == "image_count_mismatch"
    assert "rejected side: 1 <image> placeholder(s) for 0 image(s)" in str(no_images)
    assert [t.role for t in system.prompt] == ["system", "user"] and system.weight == 1.0


def test_bad_pairs_are_named_by_file_line_and_side(tmp_path: Path, images: Path) -> None:
    base = {"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "Yes."}],
            "rejected_response": "No.", "images": ["ct.png"]}
    rows = [
        {"id": "no-layout", "question": "Is there a pneumothorax?", "answer": "yes"},
        {**base, "id": "two-rejected-images", "rejected_images": ["ct.png", "ct_noised.png"]},
        {**base, "id": "escape", "rejected_images": ["../secret.png"]},
        {**base, "id": "negative-weight", "weight": -1},
        {**base, "id": "same", "rejected_response": "Yes."},
        {"id": "empty", "prompt": QUESTION, "chosen": "Yes.", "rejected": " ", "images": ["ct.png"]},
        "{not json",
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    errors = read(path, images)
    assert all(isinstance(e, RecordError) for e in errors), errors
    found = [(e.line, e.record_id, e.kind) for e in errors]
    assert found == [(1, "no-layout", "missing_field"), (2, "two-rejected-images", "image_count_mismatch"),
                     (3, "escape", "image_outside_root"), (4, "negative-weight", "bad_weight"),
                     (5, "same", "same_pair"), (6, "empty", "empty_answer"), (7, None, "invalid_json")]
    assert all(e.source == str(path) for e in errors)
    assert "rejected side: 1 <image> placeholder(s) for 2 image(s)" in str(errors[1])
    assert "rejected side" in str(errors[2]) and "weight" in str(errors[3]) and "same answer" in str(errors[4])


def test_rejected_images_are_checked_like_every_training_image(tmp_path: Path, images: Path) -> None:
    (images / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 10)
    rows = [{"id": str(i), "prompt": QUESTION, "chosen": "Yes.", "rejected": "Yes.", "images": ["ct.png"],
             "rejected_images": [name]} for i, name in enumerate(["ct_noised.png", "gone.png", "truncated.png"])]
    rows.append({"id": "chosen-gone", "prompt": QUESTION, "chosen": "Yes.", "rejected": "No.", "images": ["nope.png"]})
    pairs = read(write_jsonl(tmp_path / "pairs.jsonl", rows), images)
    kept, errors = check_pair_images(pairs)
    assert [p.id for p in kept] == ["0"]
    assert [(e.record_id, e.kind) for e in errors] == [("1", "missing_image"), ("2", "unsupported_format"),
                                                       ("chosen-gone", "missing_image")]
    assert str(errors[0]).startswith(f"{tmp_path / 'pairs.jsonl'}:2 (id 1): missing_image: rejected side:")
    assert "chosen side" in str(errors[2])


def test_a_json_array_file_and_a_datasets_folder_are_read_too(tmp_path: Path, images: Path) -> None:
    row = {"id": "a", "prompt": QUESTION, "chosen": "Yes.", "rejected": "No.", "images": ["ct.png"]}
    (tmp_path / "pairs.json").write_text(json.dumps([row, {**row, "id": "b"}]))
    assert [p.id for p in read(tmp_path / "pairs.json", images)] == ["a", "b"]


# -- data_recipes/preference_pairs.py: pairs built from VQA records and a model --------------------------------


def test_corruptions_blank_noise_and_lesion_only_noise(phantom: Path) -> None:
    import numpy as np

    from data_recipes.preference_pairs import corrupt, lesion_mask

    row = next(r for r in map(json.loads, (phantom / "rl.jsonl").read_text().splitlines()) if r.get("bbox"))
    image = Image.open(phantom / "images" / row["image"]).convert("RGB")
    pixels = np.asarray(image, dtype=np.int16)
    region = lesion_mask(row, image.size, phantom / "images")
    assert region is not None and 0 < region.mean() < 0.5
    # the phantom's boxes hold its lesions: the brightest pixels lie inside them
    brightest = pixels.mean(axis=2) >= np.percentile(pixels.mean(axis=2), 99.5)
    assert region[brightest].all()
    rng = np.random.default_rng(0)
    blank = np.asarray(corrupt(image, "blank", rng))
    assert (blank == blank[0, 0]).all()
    lesion = np.asarray(corrupt(image, "noise", rng, region=region), dtype=np.int16)
    assert (lesion[~region] == pixels[~region]).all() and (lesion[region] != pixels[region]).any()
    noised = np.asarray(corrupt(image, "noise", rng), dtype=np.int16)
    assert (noised != pixels).mean() > 0.9
    assert lesion_mask({"id": "x"}, image.size, phantom / "images") is None


def test_preference_pairs_recipe_makes_every_kind_and_resumes(tmp_path: Path, phantom: Path,
                                                              base_models: dict) -> None:
    import argparse
    import shutil

    from data_recipes import preference_pairs

    data = tmp_path / "rl.jsonl"
    rows = [json.loads(line) for line in (phantom / "rl.jsonl").read_text().splitlines()][:12]
    images = shutil.copytree(phantom / "images", tmp_path / "images")  # corrupted images are written in there
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "pairs.jsonl"
    args = ["--model", str(base_models[("clip", "llama")]), "--data", str(data), "--image-folder",
            str(images), "--out", str(out), "--n", "3", "--max-new-tokens", "4", "--batch-size", "5",
            "--rejects", "text", "image:blank", "image:lesion", "image:swap", "--weight", "difficulty"]
    assert preference_pairs.main(args) == 0
    report = json.loads(out.with_name("pairs.report.json").read_text())
    pairs = list(read_pairs(out, images))
    assert all(isinstance(p, PreferencePair) for p in pairs), [p for p in pairs if not isinstance(p, PreferencePair)]
    assert report["pairs"] == len(pairs) and report["questions"] == 12
    kinds = report["made"]
    with_lesion = sum(1 for r in rows if r.get("bbox"))
    assert kinds["image:blank"] == 12 and kinds["image:lesion"] == with_lesion
    assert sum(v for k, v in report["skipped_counts"].items() if k.startswith("image:lesion: no lesion region")) == \
        12 - with_lesion
    assert kinds.get("text", 0) + report["skipped_counts"].get("text: the model's samples were all right", 0) == 12
    assert kinds.get("image:swap", 0) + sum(v for k, v in report["skipped_counts"].items() if k.startswith("image:swap")) == 12
    by_id = {p.id: p for p in pairs}
    blank = by_id[f"{rows[0]['id']}:image:blank"]
    assert blank.own_rejected_images and blank.chosen == blank.rejected  # same answer, another image
    assert blank.rejected_images[0].is_file() and images in blank.rejected_images[0].parents
    assert all(1.0 <= p.weight <= 2.0 for p in pairs)
    for p in pairs:
        if p.id.endswith(":text"):
            assert p.rejected != p.chosen and not p.own_rejected_images
    # interrupted after the first questions: the rerun keeps what the partial file holds and makes the rest
    first = [json.loads(x) for x in out.read_text().splitlines()]
    kept = [{**p, "chosen": "kept from the interrupted run"} for p in first if p["id"].startswith(rows[0]["id"] + ":")]
    stamp = preference_pairs.settings_stamp(argparse.Namespace(
        model=args[1], data=[str(data)], rejects=args[args.index("--rejects") + 1:args.index("--weight")], n=3,
        temperature=1.0, max_new_tokens=4, max_records=None, weight="difficulty", seed=0, noise_strength=1.0,
        window=None))
    partial = out.with_name("pairs.jsonl.partial.jsonl")
    partial.write_text(json.dumps({"settings": stamp}) + "\n" +
                       json.dumps({"key": f"{data}:1", "pairs": kept, "skipped": []}) + "\n")
    out.unlink()
    assert preference_pairs.main(args) == 0
    again = [json.loads(x) for x in out.read_text().splitlines()]
    assert [p["id"] for p in again] == [p["id"] for p in first]
    assert [p["chosen"] for p in again[:len(kept)]] == ["kept from the interrupted run"] * len(kept)
    assert not partial.exists()
    # a partial file of other settings is set aside, never mixed in
    partial.write_text(json.dumps({"settings": {**stamp, "n": 9}}) + "\n" +
                       json.dumps({"key": f"{data}:1", "pairs": kept, "skipped": []}) + "\n")
    assert preference_pairs.main(args) == 0
    assert [json.loads(x)["chosen"] for x in out.read_text().splitlines()][0] != "kept from the interrupted run"
    assert partial.with_name(partial.name + ".stale").is_file()


def test_implicit_prompt_alpaca_and_rlaif_v_layouts(tmp_path: Path, images: Path) -> None:
    """TRL's implicit prompt (two whole conversations), LLaMA-Factory's alpaca rows and RLAIF-V's question rows
    read into the same pair; a question without a placeholder gets one per image."""
    rows = [
        {"id": "implicit", "images": ["ct.png"],
         "chosen": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "Yes, on the right."}],
         "rejected": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "No."}]},
        {"id": "alpaca", "instruction": "Is there a pneumothorax?", "input": "", "chosen": "Yes, on the right.",
         "rejected": "No.", "images": ["ct.png"]},
        {"id": "rlaif", "question": "Is there a pneumothorax?", "chosen": "Yes, on the right.", "rejected": "No.",
         "image": "ct.png"},
        {"id": "implicit-other-prompt", "images": ["ct.png"],
         "chosen": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "Yes, on the right."}],
         "rejected": [{"role": "user", "content": QUESTION + " Be brief."}, {"role": "assistant", "content": "No."}]},
    ]
    pairs = read(write_jsonl(tmp_path / "pairs.jsonl", rows), images)
    assert all(isinstance(p, PreferencePair) for p in pairs), pairs
    assert [p.layout for p in pairs] == ["trl-implicit", "alpaca", "rlaif-v", "trl-implicit"]
    for pair in pairs:
        assert [(t.role, t.text.replace("\n", " ").strip()) for t in pair.prompt] == \
            [("user", "<image> Is there a pneumothorax?")], pair.id
        assert (pair.chosen, pair.rejected, pair.images) == ("Yes, on the right.", "No.", [images / "ct.png"])
    assert pairs[0].rejected_prompt is None
    assert pairs[3].side("rejected")[0][0].text.endswith("Be brief.")
    # a rejected conversation with image parts of its own sees those images, not the chosen ones
    own = {"id": "implicit-own-image",
           "chosen": [{"role": "user", "content": [{"type": "image", "image": "ct.png"}, {"type": "text", "text": "Q?"}]},
                      {"role": "assistant", "content": "Yes."}],
           "rejected": [{"role": "user", "content": [{"type": "image", "image": "ct_noised.png"},
                                                     {"type": "text", "text": "Q?"}]},
                        {"role": "assistant", "content": "Yes."}]}
    (pair,) = read(write_jsonl(tmp_path / "own.jsonl", [own]), images)
    assert isinstance(pair, PreferencePair), pair
    assert pair.images == [images / "ct.png"] and pair.side("rejected")[2] == [images / "ct_noised.png"]


def test_rlaif_v_style_dataset_source_with_embedded_images(tmp_path: Path, images: Path) -> None:
    """An `hf:` / saved-dataset source in RLAIF-V's columns, images embedded: both sides see the embedded image."""
    import datasets

    ds = datasets.Dataset.from_list([{"idx": i, "question": "Is there a pneumothorax?", "chosen": "Yes.",
                                      "rejected": "No.",
                                      "image": {"bytes": (images / "ct.png").read_bytes(), "path": "ct.png"}}
                                     for i in range(3)]).cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "rlaif"))
    pairs = read(tmp_path / "rlaif", images)
    assert len(pairs) == 3 and all(isinstance(p, PreferencePair) and p.layout == "rlaif-v" for p in pairs), pairs
    kept, errors = check_pair_images(pairs)
    assert len(kept) == 3 and not errors


def test_sampled_answers_holding_the_image_placeholder_are_left_out_and_counted(tmp_path: Path, images: Path) -> None:
    """A sampled answer with `<image>` in it would give its side more placeholders than images (an invalid pair
    the DPO stage would refuse): the recipe leaves such samples out and counts them."""
    import argparse

    from data_recipes.preference_pairs import PairMaker

    args = argparse.Namespace(image_folder=str(images), rejects_subfolder="rejects", window=None, weight="none",
                              rejects=["text"], seed=0, noise_strength=1.0)
    row = {"id": "q1", "prompt": [{"role": "user", "content": "Is there a pneumothorax?"}],
           "images": [str(images / "ct.png")], "answer": "yes", "qtype": "yes_no", "options": None,
           "source": "rl.jsonl", "line": 1}
    maker = PairMaker(args, {}, [row])
    pairs, skipped = maker.make(row, ["<image> yes", "No.", "<image>"])
    assert maker.placeholder_samples == 2 and not skipped
    assert [(p["chosen"], p["rejected"], p["chosen_from"]) for p in pairs] == [("Yes.", "No.", "gold")]
