"""Rank and world from whatever launched us: torchrun / deepspeed launcher, srun, Ray Train, or nothing.

The model never sees any of this; the loop asks `init()` once and gets a DistInfo back.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    launcher: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def first_slurm_host(nodelist: str) -> str:
    """'gpu[003-005,009],cpu1' -> 'gpu003' (what `scontrol show hostnames | head -1` prints)."""
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not m:
        return nodelist
    prefix, _, ranges = m.groups()
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def detect_env() -> str:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* from the launcher's variables; return its name."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, deepspeed launcher, Ray Train's torch backend
        launcher = "torchrun"
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        launcher = "srun"
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
        env.setdefault("MASTER_ADDR", first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")))
        # every task must agree on the port without talking: derive it from the job id
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
    else:
        launcher = "single"
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))
    env.setdefault("LOCAL_RANK", "0")
    return launcher


def attempt_store(timeout: datetime.timedelta) -> torch.distributed.Store:
    """The torchrun agent's TCPStore, seen through a namespace of this attempt.

    torchrun (static and c10d rendezvous alike) keeps one store for the whole job and hands it to
    every attempt under --max-restarts, with no per-attempt prefix. A restarted attempt would then
    read the killed attempt's process-group keys (gloo's peer addresses), dial a dead rank and fail
    with "connectFullMesh ... Connection refused". TORCHELASTIC_RESTART_COUNT tells attempts apart:
    every agent counts each failed attempt of its own workers, and a job with a dead rank fails on
    every node (gloo error or train.dist_timeout_s). Elastic membership changes under c10d restart
    without counting: there, TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 gives each round a fresh store.
    """
    env = os.environ
    agent = torch.distributed.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), int(env["WORLD_SIZE"]),
                                       is_master=False, timeout=timeout)
    return torch.distributed.PrefixStore(f"maepipe/attempt-{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", agent)


def init(timeout_s: float = 300.0) -> DistInfo:
    """Join the process group (gloo on CPU, NCCL on GPU). Every rank blocks here until all arrive."""
    import deepspeed

    launcher = detect_env()
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    # the shared-memory comm op JIT-compiles for ~75 s on first use and brings nothing on CPU tests
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    timeout = datetime.timedelta(seconds=timeout_s)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend, store=attempt_store(timeout), timeout=timeout,
                                             rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    # a group made above or by the launcher (Ray Train) is adopted as is; else this creates it with our timeout
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout)
    return DistInfo(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, device, launcher)


def all_true(flag: bool, device: torch.device) -> bool:
    """True when every rank says True (sync point: all ranks must call it at the same step)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item())


def any_true(flag: bool, device: torch.device) -> bool:
    """True when some rank says True (sync point)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def mean_across(values: list[float], device: torch.device) -> list[float]:
    """Average a few scalars over ranks (sync point)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return (t / torch.distributed.get_world_size()).tolist()
