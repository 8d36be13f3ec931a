"""How train.sh starts a stage on many processes and nodes: the node layout from the environment and the launcher's
command line (torchrun, accelerate, the DeepSpeed launcher). It imports nothing heavy: it runs before every stage.

    python -m medllava.launch --layout      print the layout as shell assignments (NNODES=2 NODE_RANK=1 ...)
    python -m medllava.launch -- ARGS...    replace this process with the launcher running `medllava.cli ARGS...`

The layout: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT and NPROC (processes per node, default every visible
GPU, at least 1) from the environment; under SLURM (one `train.sh` per node: `srun --ntasks-per-node=1`) the
missing ones come from SLURM_NNODES, SLURM_NODEID, the first host of the step's (else the job's) node list and
SLURM_GPUS_ON_NODE,
and the port from the job id (two jobs sharing a node do not collide). LAUNCHER picks the launcher; MAX_RESTARTS
(torchrun, accelerate) restarts a failed job from its newest checkpoint; HOSTFILE (DeepSpeed) names the nodes.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass

LAUNCHERS = ("torchrun", "accelerate", "deepspeed")
DEFAULT_PORT = 29500


class LaunchError(ValueError):
    """The environment describes an impossible layout (a node rank past the node count, no master address)."""


@dataclass(frozen=True)
class Layout:
    """Where this node sits in the job."""

    nnodes: int = 1
    node_rank: int = 0
    nproc: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_PORT
    job_id: str = "medllava"
    addr_given: bool = False
    """Whether the address came from the environment (MASTER_ADDR or SLURM), not the one-node default."""

    def shell(self) -> str:
        """The layout as shell assignments, for `eval` in train.sh."""
        values = {"NNODES": self.nnodes, "NODE_RANK": self.node_rank, "NPROC": self.nproc,
                  "MASTER_ADDR": self.master_addr, "MASTER_PORT": self.master_port, "JOB_ID": self.job_id}
        return " ".join(f"{key}={shlex.quote(str(value))}" for key, value in values.items())


def first_host(nodelist: str) -> str:
    """The first host of a SLURM host list: "gpu[07-09,12],cpu1" -> "gpu07", "r[1-2]-n[01-04]" -> "r1-n01"."""
    depth, first = 0, ""
    for char in nodelist.strip():  # the first entry: up to a comma outside brackets
        if char == "," and depth == 0:
            break
        depth += {"[": 1, "]": -1}.get(char, 0)
        first += char
    host = re.sub(r"\[([^\]]+)\]", lambda m: re.split(r"[,-]", m.group(1))[0], first)
    if not host or "[" in host or "]" in host:
        raise LaunchError(f"SLURM node list {nodelist!r}: no host name in it")
    return host


def visible_gpus() -> int:
    """GPUs nvidia-smi lists (0 where there is none or no nvidia-smi)."""
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in listed.splitlines() if line.startswith("GPU "))


def _int(key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"{key}={value!r} is not a whole number") from None


def layout_from_env(env: Mapping[str, str], gpus: int | None = None) -> Layout:
    """The node layout the environment describes (explicit variables first, then SLURM's)."""
    slurm = "SLURM_JOB_ID" in env and "SLURM_NNODES" in env

    def pick(key: str, slurm_key: str | None, default: str) -> str:
        if env.get(key):
            return env[key]
        if slurm and slurm_key and env.get(slurm_key):
            return env[slurm_key]
        return default

    nnodes = _int("NNODES", pick("NNODES", "SLURM_NNODES", "1"))
    node_rank = _int("NODE_RANK", pick("NODE_RANK", "SLURM_NODEID", "0"))
    gpus = visible_gpus() if gpus is None else gpus
    nproc = _int("NPROC", pick("NPROC", "SLURM_GPUS_ON_NODE", str(max(gpus, 1))))
    given = True
    if env.get("MASTER_ADDR"):
        addr = env["MASTER_ADDR"]
    elif slurm and nnodes > 1:  # the step's nodes (an srun on part of the allocation), else the job's
        addr = first_host(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
                          or env.get("SLURM_NODELIST", ""))
    elif nnodes > 1:
        raise LaunchError(f"NNODES={nnodes}: set MASTER_ADDR to the address of node 0 (the same on every node)")
    else:
        addr, given = "127.0.0.1", False
    default_port = str(20000 + int(env["SLURM_JOB_ID"]) % 10000) if slurm and env["SLURM_JOB_ID"].isdigit() \
        else str(DEFAULT_PORT)
    port = _int("MASTER_PORT", env.get("MASTER_PORT") or default_port)
    if nnodes < 1 or nproc < 1:
        raise LaunchError(f"NNODES={nnodes}, NPROC={nproc}: both must be at least 1")
    if not 0 <= node_rank < nnodes:
        raise LaunchError(f"NODE_RANK={node_rank} is not a node of NNODES={nnodes} (0 to {nnodes - 1})")
    job = env.get("JOB_ID") or (env["SLURM_JOB_ID"] if slurm else "medllava")
    return Layout(nnodes, node_rank, nproc, addr, port, job, given)


def launch_command(launcher: str, layout: Layout, args: list[str], *, max_restarts: int = 0,
                   hostfile: str | None = None, python: str = sys.executable) -> list[str]:
    """The command that starts `medllava.cli ARGS` on this node's processes, joined with the other nodes'."""
    many = layout.nnodes > 1
    if launcher == "torchrun":
        cmd = [python, "-m", "torch.distributed.run", f"--nproc_per_node={layout.nproc}"]
        if max_restarts:
            cmd.append(f"--max-restarts={max_restarts}")
        if many:  # the c10d rendezvous: node 0's agent hosts it; restarts re-join it (the static one cannot)
            cmd += [f"--nnodes={layout.nnodes}", f"--node_rank={layout.node_rank}", "--rdzv-backend=c10d",
                    f"--rdzv-endpoint={layout.master_addr}:{layout.master_port}", f"--rdzv-id={layout.job_id}"]
        else:
            cmd.append("--standalone")
        return [*cmd, "-m", "medllava.cli", *args]
    if launcher == "accelerate":
        # accelerate's --multi_gpu is its multi-process launcher (torch's elastic agent); on a machine without GPUs
        # the ranks join over gloo (its --cpu would start a single process). Precision comes from the stage.
        total = layout.nproc * layout.nnodes
        cmd = [python, "-m", "accelerate.commands.launch", *(["--multi_gpu"] if total > 1 else []),
               "--num_processes", str(total), "--num_machines", str(layout.nnodes), "--machine_rank",
               str(layout.node_rank), "--main_process_ip", layout.master_addr, "--main_process_port",
               str(layout.master_port), "--mixed_precision", "no", "--dynamo_backend", "no"]
        if many:  # the c10d rendezvous, as for torchrun: a restarted node can re-join it
            cmd += ["--rdzv_backend", "c10d"]
        if max_restarts:
            cmd += ["--max_restarts", str(max_restarts)]
        return [*cmd, "-m", "medllava.cli", *args]
    if launcher == "deepspeed":
        if max_restarts:
            raise LaunchError("MAX_RESTARTS: the DeepSpeed launcher does not restart failed ranks; use "
                              "LAUNCHER=torchrun (DeepSpeed configs work under it) or rerun train.sh, which resumes")
        cmd = [python, "-m", "deepspeed.launcher.runner", "--master_port", str(layout.master_port)]
        if many or layout.addr_given or not hostfile:
            # with HOSTFILE alone DeepSpeed finds the first listed host's address itself (127.0.0.1 would send the
            # ssh-started ranks to their own loopback)
            cmd += ["--master_addr", layout.master_addr]
        if many:  # every node runs its own launcher (no ssh); the hostfile gives the node order and slots
            cmd += ["--hostfile", hostfile or write_hostfile(layout), "--no_ssh", "--node_rank",
                    str(layout.node_rank)]
        elif hostfile:  # run once, on node 0: DeepSpeed starts the hostfile's nodes over ssh (pdsh)
            cmd += ["--hostfile", hostfile]
        else:
            cmd += ["--num_gpus", str(layout.nproc)]
        return [*cmd, "--module", "medllava.cli", *args]
    raise LaunchError(f"LAUNCHER={launcher!r}: use one of {', '.join(LAUNCHERS)}")


def write_hostfile(layout: Layout) -> str:
    """A DeepSpeed hostfile of `nnodes` nodes with `nproc` slots each (names matter only over ssh)."""
    handle, path = tempfile.mkstemp(prefix="medllava-hostfile-", text=True)
    with os.fdopen(handle, "w") as fh:
        fh.writelines(f"node{i} slots={layout.nproc}\n" for i in range(layout.nnodes))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medllava.launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", action="store_true", help="print the node layout as shell assignments")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="-- then the medllava command to launch")
    ns = parser.parse_args(argv)
    try:
        layout = layout_from_env(os.environ)
        if ns.layout:
            print(layout.shell())
            return 0
        args = ns.args[1:] if ns.args[:1] == ["--"] else ns.args
        if not args:
            parser.error("nothing to launch: python -m medllava.launch -- train STAGE.yaml")
        cmd = launch_command(os.environ.get("LAUNCHER", "torchrun"), layout, args,
                             max_restarts=_int("MAX_RESTARTS", os.environ.get("MAX_RESTARTS", "0")),
                             hostfile=os.environ.get("HOSTFILE") or None)
    except LaunchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sys.stdout.flush()
    os.execv(cmd[0], cmd)
    return 0  # not reached


if __name__ == "__main__":
    raise SystemExit(main())
