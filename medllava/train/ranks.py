"""The one place that knows about ranks: who writes, waiting for the writer, and flags agreed by every rank.

torchrun, `accelerate launch` and the DeepSpeed launcher all start one process per device and describe it in
the environment (RANK, WORLD_SIZE, LOCAL_RANK). Stage runners call these helpers; nothing else reads RANK.

- `writer()` is global rank 0: it writes base models, merges, data caches, reports, staging clean-ups and the
  final folder (the run's output folder is expected on a file system every rank sees).
- `on_writer(fn)` runs `fn` on the writer while the other ranks wait; if it fails, every rank fails with the
  writer's message instead of waiting forever at a barrier.
- `on_node_writer(fn)` runs `fn` on the first process of every node (LOCAL_RANK 0) while the others wait: for
  what each node needs on its own disk (the data cache, when `data.cache_dir` is node-local scratch). On a disk
  the nodes share, `fn` finds the work done by the first node (the cache's lock makes the others wait for it).
- `all_ranks_true(flag)` is the AND of a flag over the ranks, so a decision (stop, skip) is the same everywhere.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

T = TypeVar("T")


class OtherRankFailed(RuntimeError):
    """Raised on the ranks that waited for the writer when the writer failed (the writer reports the cause)."""


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_writer() -> bool:
    return rank() == 0


def ensure_process_group(deepspeed: bool = False) -> None:
    """Join the job's process group (gloo on CPU, nccl on GPUs) if launched with several ranks and not yet joined.

    transformers, accelerate and DeepSpeed all reuse a process group that already exists, so joining early lets
    the stage coordinate its ranks before the Trainer exists (data preparation, base model saves). With `deepspeed`,
    DeepSpeed's own communication layer joins it too: a ZeRO-3 model created before the Trainer prepares DeepSpeed
    (TRL's GRPO reference model, under `zero.Init`) otherwise sizes its batch for one rank and fails.
    """
    if world_size() <= 1 or not dist.is_available():
        return
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank())
            backend = "nccl"
        else:
            backend = "gloo"
        dist.init_process_group(backend=backend,
                                timeout=timedelta(minutes=int(os.environ.get("MEDLLAVA_DIST_TIMEOUT_MIN", "60"))))
        logger.info("rank %d of %d joined the process group (%s)", rank(), world_size(), backend)
    if deepspeed:
        import deepspeed as ds

        ds.init_distributed(dist_backend=dist.get_backend())


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if _distributed():
        dist.barrier()


def on_writer(fn: Callable[[], T], what: str = "") -> T | None:
    """Run `fn` on the writer only; the others wait. Returns fn's result on the writer, None elsewhere.

    A failure on the writer is re-raised there and turns into OtherRankFailed on the other ranks.
    """
    if not _distributed():
        return fn()
    error: BaseException | None = None
    result: T | None = None
    if is_writer():
        try:
            result = fn()
        except BaseException as err:  # noqa: BLE001 - re-raised below, after telling the other ranks
            error = err
    status = [None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(status, src=0)
    if error is not None:
        raise error
    if status[0] is not None:
        raise OtherRankFailed(f"rank 0 failed{f' while {what}' if what else ''}; see its message ({status[0].splitlines()[0]})")
    return result


def on_node_writer(fn: Callable[[], T], what: str = "") -> T | None:
    """Run `fn` on each node's first process (LOCAL_RANK 0); the others wait. Returns fn's result where it ran,
    None elsewhere. A failure is re-raised where it happened and turns into OtherRankFailed, naming that rank, on
    every other rank."""
    if not _distributed():
        return fn()
    error: BaseException | None = None
    result: T | None = None
    if local_rank() == 0:
        try:
            result = fn()
        except BaseException as err:  # noqa: BLE001 - re-raised below, after telling the other ranks
            error = err
    statuses: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(statuses, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(i, s) for i, s in enumerate(statuses) if s is not None]
    if failed:
        who, message = failed[0]
        raise OtherRankFailed(f"rank {who} failed{f' while {what}' if what else ''}; see its message "
                              f"({message.splitlines()[0]})")
    return result


def all_ranks_true(flag: bool) -> bool:
    """True when `flag` is True on every rank (a no-op with one rank)."""
    if not _distributed():
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())
