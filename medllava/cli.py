"""The `medllava` command: train | eval | chat | serve | web | export | bench | summary | tiny.

User errors (bad config, bad data, missing model or image) print one clear line and exit 2, no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from medllava.config import ConfigError
from medllava.families import FAMILIES

USER_ERROR_EXIT = 2


def _setup_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    # TRL reads a property transformers renamed; the FutureWarning would print once per training step.
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
    logging.basicConfig(level=level, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock", "PIL", "matplotlib", "DeepSpeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_train(args: argparse.Namespace) -> int:
    from medllava.config import load_config

    cfg = load_config(args.config, args.overrides)
    from medllava.train.stage import run_stage

    out = run_stage(cfg)
    print(f"stage {cfg.name} done: {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from medllava.config import require_model_folder, slices_option, window_option

    # the user's mistakes first, before torch is imported
    require_model_folder(args.model)
    slices_option(args.slices)
    if not Path(args.data).exists() and not str(args.data).startswith("hf:"):
        raise ConfigError(f"{args.data}: no such data file or dataset folder")
    window = window_option(args.window)
    from medllava.prior import build_prior

    prior = build_prior(args.prior_from) if args.prior_from else None  # read first: a bad path fails fast
    from medllava.evaluate import evaluate, markdown_table, stage_prompt_settings, update_summary

    prompt = stage_prompt_settings(args.model)  # the prompt mode and completion length the stage trained with
    slices = slices_option(args.slices, prompt.slices)  # series: --slices, else the stage's data.slices
    overlap = None
    if args.prior_from and args.overlap:  # the same training files: what the evaluation set shares with them
        from medllava.data.overlap import MIN_SIMILARITY, check_overlap, index_training

        train_images = args.train_image_folder or args.image_folder
        overlap = check_overlap(index_training(args.prior_from, train_images, slices=slices), args.data,
                                args.image_folder, slices=slices,
                                min_similarity=MIN_SIMILARITY if args.min_similarity is None else args.min_similarity)
    from medllava.model import load_for_inference

    model, processor = load_for_inference(args.model, allow_pickle=args.allow_pickle)  # bf16 on a GPU that has it
    out_dir = args.out or str(Path(args.model) / "eval")
    title = args.stage or Path(args.model).name
    if args.prompt is not None:
        prompt.mode = args.prompt
    max_new_tokens = args.max_new_tokens if args.max_new_tokens is not None else prompt.max_new_tokens
    if window is None:  # no --window: the stage's own
        window = window_option(prompt.window)
    metrics = evaluate(
        model, processor, args.data, image_folder=args.image_folder, out_dir=out_dir, batch_size=args.batch_size,
        max_new_tokens=max_new_tokens, blind=args.blind, limit=args.limit, title=title,
        system_prompt=prompt.system_prompt, mode=prompt.mode, instruction=prompt.instruction, window=window,
        prior=prior, model_path=args.model, window_name=args.window if args.window is not None else prompt.window,
        overlap=overlap, slices=slices,
    )
    print(markdown_table(metrics, title))
    if args.summary:
        update_summary(args.summary, args.stage or title, metrics)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import importlib.util

    if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
        raise ConfigError("medllava serve needs FastAPI and uvicorn: pip install 'medllava[serve]'")
    from medllava.serve import run_server

    return run_server(args)


def cmd_web(args: argparse.Namespace) -> int:
    from medllava.web import run_web

    return run_web(args)


def cmd_chat(args: argparse.Namespace) -> int:
    from medllava.chat import run_chat

    return run_chat(args)


def cmd_export(args: argparse.Namespace) -> int:
    from medllava.export import export, push

    if args.push_to_hub is None and (args.private or args.dry_run):
        raise ConfigError("--private and --dry-run go with --push-to-hub REPO_ID")
    report = export(args.run_dir, args.out, license_id=args.license, repo_id=args.push_to_hub, dtype=args.dtype,
                    max_shard_size=args.max_shard_size, tolerance=args.tolerance, allow_pickle=args.allow_pickle)
    v = report["verification"]
    print(f"exported {args.run_dir} -> {args.out}" + (" (LoRA merged)" if report["merged_adapter"] else ""))
    print(f"verified with plain transformers ({v['dtype']}): max |logit diff| {v['max_abs_logit_diff']:.2e} <= "
          f"{v['tolerance']:.2e}; rounding drift from the trained weights {v['rounding_drift_max_abs_logit_diff']:.2e}")
    if args.push_to_hub:
        plan = push(args.out, args.push_to_hub, private=args.private, dry_run=args.dry_run)
        verb = "would upload" if args.dry_run else "uploaded"
        print(f"{verb} {len(plan['files'])} files ({plan['total_bytes'] / 1e6:.1f} MB) to "
              f"{'private' if plan['private'] else 'public'} repo {plan['repo_id']}; token: {plan['token']}")
        for f in plan["files"]:
            print(f"  {f['path']}  {f['bytes']:,} bytes")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import dataclasses
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import torch

    from medllava.bench import PRESETS, BenchSettings, ModeResult, markdown, median_result, run_benchmark, write_report

    if args.preset not in PRESETS:
        raise ConfigError(f"--preset {args.preset!r}: one of {sorted(PRESETS)}")
    settings = BenchSettings(
        preset=args.preset, modes=tuple(m.strip() for m in args.modes.split(",")), samples=args.samples,
        steps=args.steps, warmup=args.warmup, batch_size=args.batch_size, max_length=args.max_length,
        median_answer_tokens=args.median_answer_tokens, trainable=args.trainable,
        gradient_checkpointing=args.gradient_checkpointing, precision=args.precision,
        attn_implementation=args.attn_implementation, seed=args.seed, profile_steps=args.profile_steps,
        supervised_head=not args.full_head, rounds=args.rounds,
    )
    settings.check()
    if not torch.cuda.is_available() and len(settings.modes) * settings.rounds > 1:
        # On CPU the peak-memory figure is the process's high-water mark: one fresh process per mode and round keeps
        # it honest; the modes alternate within each round, and each figure is the median over the rounds.
        runs: dict[str, list[ModeResult]] = {mode: [] for mode in settings.modes}
        for _ in range(settings.rounds):
            for mode in settings.modes:
                with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                    one = pool.submit(run_benchmark, dataclasses.replace(settings, modes=(mode,), rounds=1)).result()
                runs[mode].append(ModeResult(**one["results"][0]))
        report = {**one, "results": [dataclasses.asdict(median_result(rs)) for rs in runs.values()]}
        report["settings"] = dataclasses.asdict(settings)
    else:
        report = run_benchmark(settings)
    table = markdown(report)
    print(table)
    if args.out:
        out = write_report(report, table, args.out)
        for r in report["results"]:
            if r["extra"].get("profile"):
                out.with_name(f"{out.stem}.{r['mode']}.profile.txt").write_text(r["extra"]["profile"], encoding="utf-8")
    return 0


def cmd_data_overlap(args: argparse.Namespace) -> int:
    from medllava.data.overlap import MIN_SIMILARITY, check_overlap, index_training, overlap_line

    for path in [*args.train, args.eval]:
        if not Path(path).exists() and not str(path).startswith("hf:"):
            raise ConfigError(f"{path}: no such data file")
    index = index_training(args.train, args.train_image_folder or args.image_folder)
    report = check_overlap(index, args.eval, args.image_folder,
                           min_similarity=MIN_SIMILARITY if args.min_similarity is None else args.min_similarity)
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    print(text)
    print(overlap_line(report), file=sys.stderr)
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from medllava.evaluate import summary_table

    summary = json.loads(Path(args.file).read_text(encoding="utf-8"))
    seconds = json.loads(Path(args.timing).read_text(encoding="utf-8"))["seconds"] if args.timing else None
    print(summary_table(summary, seconds))
    return 0


def cmd_tiny(args: argparse.Namespace) -> int:
    from medllava.presets import make_tiny_pair, tiny_corpus

    extra = Path(args.corpus).read_text(encoding="utf-8").splitlines() if args.corpus else []
    if args.family:
        from medllava.families import by_name

        folder = by_name(args.family).build_tiny(args.out, seed=args.seed, corpus=tiny_corpus(extra))
        print(json.dumps({"family": args.family, "model": str(folder)}))
        return 0
    vision_dir, llm_dir = make_tiny_pair(
        args.out, args.vision, args.llm, corpus=tiny_corpus(extra), image_size=args.image_size,
        patch_size=args.patch_size, vision_hidden=args.vision_hidden, vision_layers=args.vision_layers,
        llm_hidden=args.llm_hidden, llm_layers=args.llm_layers, vocab_size=args.vocab_size, seed=args.seed,
    )
    print(json.dumps({"vision_tower": str(vision_dir), "llm": str(llm_dir)}))
    return 0


def add_loading_args(p: argparse.ArgumentParser) -> None:
    """MODEL, --device, --load-in-4bit/8bit and --allow-pickle: how chat, serve and web load a model."""
    p.add_argument("model", help="stage output or exported folder (full model, or LoRA adapter with its base)")
    p.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cuda, mps or cpu")
    bits = p.add_mutually_exclusive_group()
    bits.add_argument("--load-in-4bit", action="store_true", help="4-bit NF4 weights (bitsandbytes)")
    bits.add_argument("--load-in-8bit", action="store_true", help="8-bit weights (bitsandbytes)")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading non-safetensors weights")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medllava", description="Train LLaVA-style medical VLMs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="run one stage from a YAML recipe",
                       description="Run one stage. Any field can be overridden: --optim.lr=1e-4 --run.output_dir=runs/x")
    p.add_argument("config", help="stage YAML (see stages/)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a model on a VQA set")
    p.add_argument("model", help="stage output or exported folder")
    p.add_argument("--data", required=True, help="VQA file (JSON/JSONL): id, image, question, answer, qtype, options?")
    p.add_argument("--image-folder", default=".", help="images in the data file are relative to this folder")
    p.add_argument("--out", default=None, help="output folder (default: MODEL/eval)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: the stage's grpo.max_completion_length for a GRPO stage output, else 64")
    p.add_argument("--prompt", choices=["plain", "answer", "think"], default=None,
                   help="question form (default: what the stage trained with, from its medllava_stage.yaml)")
    p.add_argument("--window", default=None,
                   help="DICOM window: preset (lung, mediastinum, bone, brain, abdomen, ...) or CENTER,WIDTH "
                        "(default: the stage's data.window, else the file's own)")
    p.add_argument("--blind", action="store_true",
                   help="also answer with blank images and report the gap; questions with several images are also "
                        "asked with their images in reverse order and with one image blanked at a time")
    p.add_argument("--slices", default=None,
                   help="series/volume images: COUNT or COUNT,SPACING (uniform or mm); default: the stage's data.slices")
    p.add_argument("--prior-from", nargs="+", default=None, metavar="TRAIN_DATA",
                   help="training file(s) (VQA records or conversations, any source the trainer reads): also "
                        "answer each question with the most common training answer to the same question (no "
                        "image, no model) and report that text-prior accuracy; also check what the evaluation set "
                        "shares with them (exact and near-duplicate images, repeated image-question pairs) and score "
                        "the clean subset beside the full set")
    p.add_argument("--no-overlap", dest="overlap", action="store_false",
                   help="with --prior-from: the text prior only, without the overlap check (which reads every "
                        "training image once)")
    p.add_argument("--train-image-folder", default=None,
                   help="images of the --prior-from files are relative to this folder (default: --image-folder)")
    p.add_argument("--min-similarity", type=float, default=None,
                   help="near-duplicate threshold (cosine similarity of 16x16 grey fingerprints; default 0.99)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N records")
    p.add_argument("--summary", default=None, help="merge headline figures into this JSON file")
    p.add_argument("--stage", default=None, help="name of this entry in the summary")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading non-safetensors weights")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("chat", help="chat about medical images with a trained model")
    add_loading_args(p)
    p.add_argument("--image", action="append", help="image for the first question (repeatable): PNG/JPEG/TIFF/DICOM, "
                   "a DICOM series folder or a NIfTI volume (its slices)")
    p.add_argument("--prompt", default=None, help="one-shot: ask this, print the answer, exit")
    p.add_argument("--system", default=None, help="system prompt (if the chat template accepts one)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--window", default=None,
                   help="DICOM window: preset (lung, mediastinum, bone, brain, abdomen, ...) or CENTER,WIDTH "
                        "(default: the file's own)")
    p.add_argument("--frame", type=int, default=None, help="frame of a multi-frame DICOM (default: the middle one)")
    p.add_argument("--slices", default=None, help="an --image that is a DICOM series folder or a NIfTI volume gives "
                   "COUNT slices (COUNT or COUNT,SPACING: uniform or mm; default: the model's stage's data.slices, else 8,uniform)")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions)")
    add_loading_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-id", default=None, help="the id clients send as `model` (default: the folder's name)")
    p.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY` (default: $MEDLLAVA_API_KEY if set; never logged)")
    p.add_argument("--image-root", default=None, help="allow local image paths under this folder (default: none)")
    p.add_argument("--allow-remote-images", action="store_true", help="allow http(s) image URLs (fetched, 10 s)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="answer length when a request sets none")
    p.add_argument("--max-tokens-limit", type=int, default=1024, help="the most a request may ask for")
    p.add_argument("--max-queue", type=int, default=16, help="requests that may wait; more get 429")
    p.add_argument("--max-body-mb", type=float, default=20.0, help="largest request body (MiB)")
    p.add_argument("--max-pixels", type=int, default=None, help="largest image, width x height (default: the "
                   "decoders' decompression-bomb limit, as in training)")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="longest prompt, images expanded (default: the model's context minus the answer's max_tokens)")
    p.add_argument("--max-images", type=int, default=8, help="images one request may hold")
    p.add_argument("--max-total-mpixels", type=float, default=64.0,
                   help="megapixels a request's images may hold together (read from their headers before decoding)")
    p.add_argument("--max-connections", type=int, default=32,
                   help="requests held at once (sending, waiting or generating); more get 429 before their body is read")
    p.add_argument("--read-timeout", type=float, default=30.0,
                   help="seconds a client has to send its whole request body; later: 408")
    p.add_argument("--max-generation-seconds", type=float, default=600.0,
                   help="longest one answer may take; then it ends with finish_reason length")
    p.add_argument("--system", default=None, help="system prompt when a request has none")
    p.add_argument("--window", default=None, help="DICOM window: preset or CENTER,WIDTH (default: the file's own)")
    p.add_argument("--slices", default=None, help="a local image path that is a DICOM series folder or a NIfTI "
                   "volume gives COUNT slices (COUNT or COUNT,SPACING; default: the model's stage's data.slices, else "
                   "8,uniform); each counts in --max-images")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("web", help="a browser chat for a model (Gradio; image and DICOM upload, streamed answers)")
    add_loading_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--user", default="medllava", help="sign-in name when a password is set")
    p.add_argument("--password", default=None,
                   help="require a sign-in with this password (or set MEDLLAVA_WEB_PASSWORD, which keeps it out of "
                        "the process list)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest upload (MiB)")
    p.add_argument("--max-images", type=int, default=8, help="images one conversation may hold")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="largest image, width x height (default: the decoders' decompression-bomb limit)")
    p.add_argument("--slices", default=None, help="an uploaded NIfTI volume gives COUNT slices (COUNT or "
                   "COUNT,SPACING; default: the model's stage's data.slices, else 8,uniform)")
    p.set_defaults(func=cmd_web)

    p = sub.add_parser("export", help="merge, verify and save a stage output as a standalone model (and push it)")
    p.add_argument("run_dir", help="stage output folder")
    p.add_argument("--out", required=True, help="folder for the exported model")
    p.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="upload to this Hub repository")
    p.add_argument("--private", action="store_true", help="create the Hub repository as private")
    p.add_argument("--dry-run", action="store_true", help="list what would be uploaded, upload nothing")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16",
                   help="dtype of the exported weights (bf16: half the size of fp32; the rounding drift is reported)")
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--license", default="apache-2.0", help="licence id for the model card")
    p.add_argument("--tolerance", type=float, default=None,
                   help="max |logit diff| between the reloaded export and the model as saved (default: a bound per "
                        "probe dtype times the logits' scale, see medllava.export.RELOAD_RELATIVE)")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading non-safetensors weights")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("bench", help="training throughput: medllava packed vs padded vs TRL SFTTrainer")
    p.add_argument("--preset", default="tiny", help="tiny | tiny-qwen2.5-vl | clip-qwen2.5-0.5b | clip-qwen2.5-1.5b | "
                   "clip-qwen2.5-7b | clip-mistral-7b")
    p.add_argument("--modes", default="packed,padded,trl", help="comma-separated: packed, padded, trl, liger (packed + Liger kernels, GPU; last)")
    p.add_argument("--samples", type=int, default=256, help="synthetic samples (one image each)")
    p.add_argument("--steps", type=int, default=10, help="measured optimizer steps per mode")
    p.add_argument("--warmup", type=int, default=2, help="steps before measuring")
    p.add_argument("--batch-size", type=int, default=8, help="samples per step, in every mode")
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--median-answer-tokens", type=int, default=150, help="median of the log-normal answer length")
    p.add_argument("--trainable", choices=["full", "lora", "qlora"], default="full")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--attn-implementation", default=None, help="sdpa (default), flash_attention_2, eager")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile-steps", type=int, default=0,
                   help="profile this many steps after the measured ones (top operators per mode beside --out)")
    p.add_argument("--rounds", type=int, default=1, help="run the modes this many times, alternating; report medians")
    p.add_argument("--full-head", action="store_true",
                   help="medllava modes: LM head and loss over every position (default: supervised positions only)")
    p.add_argument("--out", default=None, help="write the report here (JSON) and a .md table beside it")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("data", help="data tools")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    d = data_sub.add_parser("overlap", help="what an evaluation set shares with training files: exact and near-"
                                            "duplicate images, repeated (image, question) pairs")
    d.add_argument("train", nargs="+", help="training file(s): VQA records or conversations")
    d.add_argument("--eval", required=True, help="the evaluation VQA file")
    d.add_argument("--image-folder", default=".", help="images of the evaluation file are relative to this folder")
    d.add_argument("--train-image-folder", default=None, help="images of the training files (default: --image-folder)")
    d.add_argument("--min-similarity", type=float, default=None, help="near-duplicate threshold (default 0.99)")
    d.add_argument("--out", default=None, help="write the report (JSON) here")
    d.set_defaults(func=cmd_data_overlap)

    p = sub.add_parser("summary", help="print a curriculum summary (accuracy per stage, chance, blind gap)")
    p.add_argument("file", help="summary JSON written by `eval --summary`")
    p.add_argument("--timing", default=None, help="JSON with {\"seconds\": N} to print the total time")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("tiny", help="write a tiny random-init vision tower + LLM pair, or a tiny model of a family "
                                    "(tests, CPU demo, rehearsals)")
    p.add_argument("out", help="output folder (gets vision/ and llm/; with --family: the model folder itself)")
    p.add_argument("--family", choices=[f.name for f in FAMILIES], default=None,
                   help="write a tiny stock model + processor of this family (its published chat template, a "
                        "tokenizer trained in-process) instead of a tower + LLM pair")
    p.add_argument("--vision", choices=["clip", "siglip"], default="clip")
    p.add_argument("--llm", choices=["llama", "mistral", "qwen2"], default="llama")
    p.add_argument("--corpus", default=None, help="text file whose lines join the tokenizer's training corpus")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--vision-hidden", type=int, default=32)
    p.add_argument("--vision-layers", type=int, default=2)
    p.add_argument("--llm-hidden", type=int, default=64)
    p.add_argument("--llm-layers", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tiny)
    return parser


USER_ERRORS = (("medllava.data.validate", "DataValidationError"), ("medllava.imaging", "ImageError"),
               ("medllava.model", "ModelLoadError"), ("medllava.export", "ExportError"),
               ("medllava.train.safety", "DivergenceError"), ("medllava.dist", "OtherRankFailed"),
               ("medllava.dist", "SharedOutputError"))


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the user asked for something impossible: one line, no traceback.

    Only the classes of modules already loaded: an exception whose module was never imported cannot have been
    raised, and importing them here would load torch and transformers (ten seconds) to report a missing file."""
    loaded = [getattr(sys.modules[module], name) for module, name in USER_ERRORS if module in sys.modules]
    return (ConfigError, FileNotFoundError, *loaded)


def take_launcher_arguments(argv: list[str]) -> list[str]:
    """Drop `--local_rank=N` / `--local-rank N` (the DeepSpeed launcher and torch.distributed.launch add it); the
    rank is also in the environment, where medllava.dist reads it."""
    out: list[str] = []
    skip_next = False
    for i, arg in enumerate(argv):
        if skip_next:
            skip_next = False
            continue
        name, eq, value = arg.partition("=")
        if name in ("--local_rank", "--local-rank"):
            if not eq:
                value = argv[i + 1] if i + 1 < len(argv) else ""
                skip_next = True
            os.environ.setdefault("LOCAL_RANK", value)
            continue
        out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = take_launcher_arguments(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    # `train CONFIG --section.key=value ...`: dotted options are config overrides, not argparse options.
    overrides = [a for a in argv if a.startswith("--") and "." in a.split("=", 1)[0]]
    args = parser.parse_args([a for a in argv if a not in overrides])
    args.overrides = overrides
    if overrides and args.command != "train":
        parser.error(f"config overrides are only for `train`: {overrides}")
    _setup_logging(args.verbose)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.func(args)
    except user_error_types() as err:
        print(f"medllava {args.command}: error: {err}", file=sys.stderr)
        return USER_ERROR_EXIT


if __name__ == "__main__":
    raise SystemExit(main())
