"""Fault tolerance for the stage runners: atomic checkpoints and outputs, complete-checkpoint resume, and the
divergence guard.

- Checkpoints are written under OUTPUT/.staging/ and renamed into place when complete, so a kill at any
  moment leaves either the previous checkpoints or a complete new one; leftovers are ignored with a warning.
- The final model is written to OUTPUT/.staging/final and its files are moved into OUTPUT with config.json
  (or adapter_config.json) and the stage marker last: a folder is loadable only once it is whole.
- A non-finite loss or gradient stops the run with the step and the sample ids, or (on_nonfinite: skip)
  drops that batch's update; skips are counted in the logs and listed in nonfinite.json. With several ranks
  the finite flag is agreed over all of them first, so every rank stops (or skips) together. Under DeepSpeed
  the engine owns the gradients (param.grad is empty) and steps inside backward: the guard reads the engine's
  overflow flag and global gradient norm after the step. Under fp16 (DeepSpeed's loss scaler, or the Trainer's
  GradScaler) an overflow is the scaler's routine: the scaler skips that step itself and the guard only counts
  it, unless more than `max_skips` come in a row (the scale cannot bring the gradients back: stop). Under
  bf16/fp32 it means non-finite gradients whose update DeepSpeed dropped (stop, or counted as a skip); a
  non-finite norm without that flag stops the run (the update is applied already).
- With several ranks, a rank whose training stops making progress (a hung collective, a frozen peer) ends the
  job after run.hang_timeout_s, naming the step and the silent ranks (HangCallback feeds dist.HangWatchdog).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from medllava import dist as ranks

logger = logging.getLogger(__name__)

STAGING = ".staging"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
NONFINITE_REPORT = "nonfinite.json"


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss or gradient; the message names the step and the samples."""


def fsync_tree(folder: Path) -> None:
    """Flush every file under `folder` to disk (so a rename publishes complete data)."""
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as fh:
                os.fsync(fh.fileno())


def is_complete_checkpoint(folder: Path) -> bool:
    """The Trainer writes trainer_state.json last: a checkpoint without it was cut short."""
    return (folder / "trainer_state.json").is_file()


def last_complete_checkpoint(out_dir: Path, *, quarantine: bool = False) -> str | None:
    """The newest complete checkpoint-N in out_dir. Incomplete ones are reported (and, with `quarantine`, renamed
    to incomplete-checkpoint-N so that rotation never keeps them over good ones); staging leftovers are reported."""
    if not out_dir.is_dir():
        return None
    staging = out_dir / STAGING
    if staging.is_dir() and any(staging.iterdir()):
        logger.warning("ignoring half-written output from an interrupted run: %s", sorted(p.name for p in staging.iterdir()))
    best: tuple[int, Path] | None = None
    for path in out_dir.iterdir():
        m = CHECKPOINT_RE.match(path.name)
        if not m or not path.is_dir():
            continue
        if not is_complete_checkpoint(path):
            logger.warning("ignoring incomplete checkpoint %s (no trainer_state.json)", path)
            if quarantine:
                target = path.with_name("incomplete-" + path.name)  # out of the Trainer's checkpoint-* globs
                if target.exists():
                    shutil.rmtree(target)
                path.rename(target)
            continue
        step = int(m.group(1))
        if best is None or step > best[0]:
            best = (step, path)
    return str(best[1]) if best else None


def publish_folder(staging: Path, out_dir: Path, last: tuple[str, ...]) -> None:
    """Move every file of `staging` into `out_dir`; the names in `last` go in last, in order.

    Before anything moves, `last` files and stale weight files are removed from out_dir, so an interrupted
    publish leaves a folder that does not load rather than a mix of old and new weights.
    """
    fsync_tree(staging)
    new = {p.name for p in staging.iterdir() if p.is_file()}
    for name in last:
        (out_dir / name).unlink(missing_ok=True)
    for path in out_dir.iterdir():
        is_weights = path.suffix == ".safetensors" or path.name.endswith(".index.json") or path.suffix == ".bin"
        if path.is_file() and is_weights and path.name not in new:
            path.unlink()
    for path in sorted(staging.iterdir()):
        if path.is_file() and path.name not in last:
            os.replace(path, out_dir / path.name)
        elif path.is_dir():
            target = out_dir / path.name
            if target.exists():
                shutil.rmtree(target)
            os.replace(path, target)
    for name in last:
        if (staging / name).is_file():
            os.replace(staging / name, out_dir / name)
    shutil.rmtree(staging, ignore_errors=True)
    remove_empty_staging(out_dir)


def remove_empty_staging(out_dir: Path) -> None:
    staging = out_dir / STAGING
    if staging.is_dir() and not any(staging.iterdir()):
        staging.rmdir()


class DivergenceGuard(TrainerCallback):
    """Checks each batch's loss (from the trainer) and the gradients before each optimizer step."""

    def __init__(self, mode: str = "stop", max_skips: int = 20) -> None:
        if mode not in ("stop", "skip"):
            raise ValueError(f"on_nonfinite must be 'stop' or 'skip', not {mode!r}")
        self.mode = mode
        self.max_skips = max_skips
        self.events: list[dict[str, Any]] = []
        self.last_ids: list[str] | None = None
        self.output_dir: str | None = None
        self.deepspeed_engine: Any = lambda: None  # set by the trainer: returns its DeepSpeed engine, if any
        self.loss_scaler: Any = lambda: None  # set by the trainer: returns its fp16 GradScaler, if any
        self.scaler_skips = 0
        self.scaler_skips_in_a_row = 0

    def _scaler_skipped(self, step: int) -> None:
        """An fp16 overflow step: the loss scaler skips it and lowers the scale (routine, counted); only a run of
        more than `max_skips` in a row is a divergence."""
        self.scaler_skips += 1
        self.scaler_skips_in_a_row += 1
        logger.info("step %d: the fp16 loss scaler skipped an overflowing step (%d so far)", step, self.scaler_skips)
        if self.scaler_skips_in_a_row > self.max_skips:
            raise DivergenceError(f"the fp16 loss scaler skipped {self.scaler_skips_in_a_row} steps in a row (up to "
                                  f"step {step}): the gradients stay non-finite whatever the scale; the run diverged")

    def _handle(self, kind: str, step: int, detail: str) -> None:
        ids = self.last_ids
        where = f"step {step}" + (f", samples {ids}" if ids else "")
        if self.mode == "stop":
            raise DivergenceError(f"non-finite {kind} ({detail}) at {where}; lower the learning rate, check those "
                                  "samples, or set run.on_nonfinite: skip")
        self.events.append({"step": step, "kind": kind, "detail": detail, "sample_ids": ids})
        logger.warning("skipping a batch: non-finite %s (%s) at %s", kind, detail, where)
        if len(self.events) > self.max_skips:
            raise DivergenceError(f"more than {self.max_skips} non-finite batches (last at {where}); the run diverged")

    def loss_ok(self, loss: torch.Tensor, step: int, sample_ids: list[str] | None) -> bool:
        self.last_ids = list(sample_ids) if sample_ids else None
        local = bool(torch.isfinite(loss.detach()).all())
        if ranks.all_ranks_true(local):
            return True
        if local:
            detail = "on another rank"
        else:
            detail = f"loss={loss.detach().float().mean().item()}" + (f" on rank {ranks.rank()}" if ranks.world_size() > 1 else "")
        self._handle("loss", step, detail)
        return False

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is None or self.deepspeed_engine() is not None:
            return
        bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        if ranks.all_ranks_true(not bad):
            self.scaler_skips_in_a_row = 0
            return
        scaler = self.loss_scaler()
        if scaler is not None and scaler.is_enabled():  # fp16: the scaler sees the inf, skips the step itself
            self._scaler_skipped(state.global_step + 1)
            return
        self._handle("gradient", state.global_step + 1, f"{len(bad)} tensors, e.g. {bad[0]}" if bad else "on another rank")
        for p in model.parameters():  # skip: no gradient, so the optimizer leaves every weight as it is
            p.grad = None

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        engine = self.deepspeed_engine()
        if engine is None:
            return
        step = state.global_step + 1
        if getattr(getattr(engine, "optimizer", None), "overflow", False):
            if engine.fp16_enabled():  # the loss scaler's routine: it skipped the step and lowers the scale
                self._scaler_skipped(step)
                return
            # bf16/fp32 have no loss scale: the gradients really were non-finite (DeepSpeed dropped the update)
            self._handle("gradient", step, "DeepSpeed found non-finite gradients and skipped the update")
            return
        self.scaler_skips_in_a_row = 0
        norm = engine.get_global_grad_norm()
        value = float(norm.item() if torch.is_tensor(norm) else norm) if norm is not None else 0.0
        if not math.isfinite(value):
            self.mode = "stop"  # the update is applied already (inside backward): nothing left to skip
            self._handle("gradient", step, f"global gradient norm {value} under DeepSpeed")

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.events and state.is_world_process_zero:
            path = Path(args.output_dir) / NONFINITE_REPORT
            path.write_text(json.dumps({"skipped": len(self.events), "events": self.events}, indent=2) + "\n",
                            encoding="utf-8")
            logger.warning("%d batch(es) skipped for non-finite values; see %s", len(self.events), path)


class HangCallback(TrainerCallback):
    """Feeds the hang watchdog: every step, micro-step, save, log and evaluation is progress."""

    def __init__(self, watchdog: ranks.HangWatchdog) -> None:
        self.watchdog = watchdog

    def _progress(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.watchdog.progress(state.global_step)

    on_step_begin = on_substep_end = on_step_end = on_save = on_log = on_evaluate = _progress

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._progress(args, state, control)
        self.watchdog.start()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.watchdog.stop()
