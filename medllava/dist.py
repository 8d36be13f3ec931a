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
- `check_shared_output(folder)` fails fast, naming the ranks and hosts, when the output folder is not one folder
  every rank sees (checkpoints, resume and the final folder need that; only the data cache may be node-local).
- `one_device_per_process(args)` keeps a single process that sees several GPUs on one of them (never
  DataParallel), and says how to launch one process per GPU.
- `HangWatchdog` ends a rank whose training made no progress for `run.hang_timeout_s`, with a message naming the
  step and the ranks that fell silent (each rank's heartbeat is kept in the launcher's store).

It is the ground floor: it imports no other medllava module, so the model code and the trainers can both use it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

T = TypeVar("T")


HANG_EXIT_CODE = 75
"""The exit status of a rank that the hang watchdog ended (the launcher then stops the others)."""


class OtherRankFailed(RuntimeError):
    """Raised on the ranks that waited for the writer when the writer failed (the writer reports the cause)."""


class SharedOutputError(RuntimeError):
    """The output folder is not the same folder on every rank (node-local disks)."""


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_writer() -> bool:
    return rank() == 0


def ensure_process_group(deepspeed: bool = False, timeout_s: float = 3600.0) -> None:
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
        timeout = timedelta(seconds=timeout_s)
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and _attempt() != "0":
            # A torchrun restart: the agent's store still holds the dead attempt's gloo/NCCL addresses under the
            # same keys (env:// adds no attempt prefix), and the new ranks would connect to closed ports. Each
            # attempt gets a prefix of its own in the agent's store.
            store = dist.PrefixStore(f"medllava-attempt-{_attempt()}", _launcher_store(timeout))
            dist.init_process_group(backend=backend, store=store, rank=rank(), world_size=world_size(),
                                    timeout=timeout)
        else:
            dist.init_process_group(backend=backend, timeout=timeout)
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


def check_shared_output(folder: Path, wait_s: float = 30.0) -> None:
    """Make the output folder and fail on every rank, naming the ranks and hosts that cannot see it, unless it is
    one folder that every rank sees: rank 0 writes a probe file there and every rank looks for it for up to
    `wait_s` (a network file system may serve a cached listing of the folder for that long; NFS's default acdirmin
    is 30 s). A rank that cannot make the folder or write the probe is reported the same way, by every rank, rather
    than leaving the others at a barrier. With one rank: only the folder is made."""
    if not _distributed():
        folder.mkdir(parents=True, exist_ok=True)
        return
    problem: str | None = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        problem = f"cannot make it ({err})"
    name = [f".medllava-shared-{uuid.uuid4().hex}" if is_writer() else None]
    dist.broadcast_object_list(name, src=0)
    probe = folder / str(name[0])
    if is_writer() and problem is None:
        try:
            probe.write_text(socket.gethostname(), encoding="utf-8")
        except OSError as err:
            problem = f"cannot write there ({err})"
    barrier()
    if problem is None and not _sees(probe, wait_s):
        problem = f"cannot see (within {wait_s:g} s) the file rank 0 wrote there"
    seen: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(seen, (problem, socket.gethostname(), str(folder.resolve())))
    barrier()
    if is_writer():
        probe.unlink(missing_ok=True)
    bad = [f"rank {i} on {host} ({path}) {what}" for i, (what, host, path) in enumerate(seen) if what]
    if bad:
        raise SharedOutputError(
            f"run.output_dir {folder} is not one folder every rank can use: {'; '.join(bad)}. Rank 0 sees "
            f"{seen[0][2]} on {seen[0][1]}. Checkpoints, resume and the final folder need one writable folder every "
            "rank sees: put run.output_dir on a file system every node mounts, as an absolute path (only "
            "data.cache_dir may be node-local)")


def _sees(probe: Path, wait_s: float) -> bool:
    """Whether `probe` shows (by name, or in its folder's listing) within `wait_s`."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if probe.exists() or probe.name in os.listdir(probe.parent):
                return True
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)


def one_device_per_process(args: Any) -> None:
    """One process that sees several GPUs trains on the first of them: transformers would otherwise wrap the model
    in DataParallel (the global batch multiplied by the GPU count, packed rows split across GPUs). `args` is a
    TrainingArguments; its GPU count is set to one, as transformers itself does for model-parallel models."""
    if world_size() > 1 or args.n_gpu <= 1:
        return
    logger.warning("%d GPUs are visible to this one process: training on %s only. To train on all of them start one "
                   "process per GPU: `NPROC=%d ./train.sh stages/<family>` or `torchrun --nproc_per_node=%d -m "
                   "medllava.cli train STAGE.yaml` (or accelerate launch / deepspeed)", args.n_gpu, args.device,
                   args.n_gpu, args.n_gpu)
    args._n_gpu = 1


class HangWatchdog:
    """Ends this rank when its training makes no progress for `timeout_s`, naming the step and the silent ranks.

    A rank that stops answering (stuck in a collective, a dead host, a frozen process) leaves the others waiting in
    their next collective until the process group's timeout, and NCCL's own watchdog ends them without saying who
    was missing. Here each rank reports `progress(step)` from the trainer's callbacks, and a thread writes a
    heartbeat (step, time, host) into the launcher's key-value store (MASTER_ADDR:MASTER_PORT) every `interval_s`.
    When the local step has not moved for `timeout_s`, the thread reads every rank's heartbeat, logs which ranks
    fell silent or behind, and ends the process with HANG_EXIT_CODE; the launcher then stops the job.
    """

    def __init__(self, timeout_s: float, interval_s: float | None = None) -> None:
        self.timeout_s = timeout_s
        self.interval_s = interval_s if interval_s is not None else min(5.0, max(0.2, timeout_s / 10))
        self.step = 0
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._store: Any = None

    def progress(self, step: int) -> None:
        self.step = step
        self._last = time.monotonic()

    def start(self) -> None:
        if self._thread is not None or world_size() <= 1:
            return
        self._stop.clear()
        self._store = _heartbeat_store()
        self._last = time.monotonic()
        self._beat()
        self._thread = threading.Thread(target=self._watch, name="medllava-hang-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s * 2 + 1)
            self._thread = None

    def _beat(self) -> None:
        if self._store is None:
            return
        try:
            self._store.set(str(rank()), json.dumps({"step": self.step, "time": time.time(),
                                                     "host": socket.gethostname()}))
        except (RuntimeError, OSError) as err:  # the store's host may be the one that is gone
            logger.debug("heartbeat not written: %s", err)

    def heartbeats(self) -> dict[int, dict[str, Any] | None]:
        """Every rank's last heartbeat (None: never heard, or the store does not answer)."""
        beats: dict[int, dict[str, Any] | None] = dict.fromkeys(range(world_size()))
        for other in beats:
            if self._store is None:
                break
            try:
                key = str(other)
                beats[other] = json.loads(self._store.get(key)) if self._store.check([key]) else None
            except (RuntimeError, OSError):  # the store's host is gone or frozen: do not wait on it per rank
                break
            except ValueError:
                beats[other] = None
        return beats

    def describe(self, now: float | None = None) -> str:
        """The hang message: this rank, its step, and every rank's last heartbeat, silent or behind ones named."""
        now = time.time() if now is None else now
        beats = self.heartbeats()
        fresh = max(3 * self.interval_s, 2.0)
        parts, suspects = [], []
        for other, beat in beats.items():
            if beat is None:
                parts.append(f"rank {other}: never heard")
                suspects.append(other)
                continue
            age = now - float(beat["time"])
            parts.append(f"rank {other} on {beat['host']}: step {beat['step']}, heard {age:.0f} s ago")
            if other != rank() and (age > fresh or int(beat["step"]) < self.step):
                suspects.append(other)
        who = (f"rank(s) {', '.join(map(str, suspects))} stopped answering or fell behind" if suspects else
               "every rank still answers, so the hang is inside a collective (dump the ranks' stacks, e.g. py-spy)")
        return (f"rank {rank()} on {socket.gethostname()} made no progress for {self.timeout_s:g} s at step "
                f"{self.step} (run.hang_timeout_s): {who}. Last heartbeats: {'; '.join(parts)}. Ending this rank "
                f"(exit {HANG_EXIT_CODE}); the launcher stops the others, and a rerun resumes from the newest "
                "checkpoint")

    def _watch(self) -> None:
        woke = time.monotonic()
        while not self._stop.wait(self.interval_s):
            slept, woke = time.monotonic() - woke, time.monotonic()
            if slept > max(5 * self.interval_s, self.timeout_s / 2):
                # this process itself was frozen (SIGSTOP, a suspended VM): its own silence is not a hang of the
                # others; count from now
                logger.warning("rank %d was frozen for %.0f s (no CPU time); resuming the hang watch", rank(), slept)
                self._last = woke
            self._beat()
            if woke - self._last > self.timeout_s:
                message = self.describe()
                logger.error("%s", message)
                for handler in logging.getLogger().handlers:
                    handler.flush()
                print(message, file=sys.stderr, flush=True)
                os._exit(HANG_EXIT_CODE)  # a hung collective cannot be interrupted from Python


def _heartbeat_store() -> Any:
    """A client of the launcher's key-value store (torchrun's agent, or rank 0's for the DeepSpeed launcher), under a
    prefix of this attempt (torchrun restarts keep the store); None where it cannot be reached."""
    if not os.environ.get("MASTER_ADDR") or not os.environ.get("MASTER_PORT"):
        return None
    try:
        store = _launcher_store(timedelta(seconds=10))
    except (RuntimeError, OSError) as err:
        logger.warning("hang watchdog: no heartbeats (the store at %s:%s does not answer: %s)",
                       os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"], err)
        return None
    return dist.PrefixStore(heartbeat_prefix(), store)


def _launcher_store(timeout: timedelta) -> Any:
    """A client of the key-value store the launcher serves at MASTER_ADDR:MASTER_PORT."""
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout,
                         wait_for_workers=False)


def _attempt() -> str:
    """Which torchrun attempt this is ("0" before any restart)."""
    return os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")


def heartbeat_prefix() -> str:
    """Where this attempt's heartbeats live in the store (torchrun restarts keep the store, not the attempt)."""
    return f"medllava-heartbeat/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{_attempt()}"
