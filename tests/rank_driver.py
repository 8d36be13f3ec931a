"""Runs one stage the way `medllava train` does, under any launcher, with test-only probes and faults.

    python -m torch.distributed.run --nproc_per_node 2 tests/rank_driver.py STAGE.yaml [--record DIR]
        [--nan-loss-rank R --nan-step S] [--nan-grad-step S]

--record DIR       each rank writes DIR/rank{R}.json: world size, parallel mode, and the sample ids of every batch
--nan-loss-rank/--nan-step   that rank's loss becomes NaN at that optimizer step (the other ranks stay finite)
--nan-grad-step S  the projector's gradient becomes NaN at step S on every rank (loss stays finite)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from medllava.cli import _setup_logging, user_error_types
from medllava.config import load_config


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--record", type=Path, default=None)
    parser.add_argument("--nan-loss-rank", type=int, default=None)
    parser.add_argument("--nan-step", type=int, default=None)
    parser.add_argument("--nan-grad-step", type=int, default=None)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None)  # the DeepSpeed launcher's
    args = parser.parse_args()
    _setup_logging()
    cfg = load_config(args.config)
    rank = int(os.environ.get("RANK", "0"))
    try:
        from medllava.train.common import train_and_save
        from medllava.train.stage import STAGE_KINDS

        run = STAGE_KINDS[cfg.kind].prepare(cfg)
        trainer = run.trainer
        seen: list[list[str]] = []
        if args.record is not None:
            collate = trainer.data_collator

            def recording(features: list) -> dict:
                batch = collate(features)
                seen.append(list(batch.get("sample_ids", [])))
                return batch

            trainer.data_collator = recording
        if args.nan_loss_rank is not None and rank == args.nan_loss_rank:
            forward = trainer.model.forward

            def nan_forward(*a, **k):  # noqa: ANN002, ANN003, ANN202
                out = forward(*a, **k)
                if trainer.state.global_step + 1 == args.nan_step:  # the loss comes from these logits (train/loss.py)
                    out.logits = out.logits * float("nan")
                    if out.loss is not None:
                        out.loss = out.loss * float("nan")
                return out

            trainer.model.forward = nan_forward
        if args.nan_grad_step is not None:
            for name, param in trainer.model.named_parameters():
                if "multi_modal_projector" in name and param.requires_grad:
                    param.register_hook(lambda g: g * float("nan") if trainer.state.global_step + 1 == args.nan_grad_step
                                        else g)
                    break
        train_and_save(run)
        if args.record is not None:
            args.record.mkdir(parents=True, exist_ok=True)
            (args.record / f"rank{rank}.json").write_text(json.dumps({
                "world_size": trainer.args.world_size, "parallel_mode": str(trainer.args.parallel_mode),
                "process_zero": trainer.is_world_process_zero(), "batches": seen}), encoding="utf-8")
    except user_error_types() as err:
        print(f"rank {rank}: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
