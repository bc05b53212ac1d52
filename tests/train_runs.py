"""Launching real training jobs for tests: torchrun / plain processes, signals, logs of losses and sample ids."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.conftest import subprocess_env
from tests.servers import free_ports

TOML = """
name = "{name}"
out_dir = "{out}"
[model]
preset = "tiny"
img_size = 16
patch_size = 4
in_chans = 1
[data]
manifest = "{manifest}"
batch_size = 8
num_workers = 0
shuffle_window = 64
mean = [0.286]
std = [0.353]
[optim]
lr = 1e-3
warmup_steps = 2
[train]
steps = {steps}
log_every = 1
zero_stage = {stage}
dist_timeout_s = 60
[checkpoint]
keep_last = 10
"""


def write_config(path: Path, manifest: str, out: Path, name: str, steps: int = 10, stage: int = 2) -> Path:
    path.write_text(TOML.format(name=name, out=out, manifest=manifest, steps=steps, stage=stage))
    return path


def torchrun(nproc: int, config: Path, *args: str, extra: tuple[str, ...] = ()) -> list[str]:
    (port,) = free_ports(1)
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
            f"--master_port={port}", *extra, "-m", "pipeline.cli", "train", "--config", str(config), *args]


def single(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "train", "--config", str(config), *args]


def start(cmd: list[str], log: Path, **env: str) -> subprocess.Popen:
    """A job in its own session (so the whole job can be killed at once), output in `log`."""
    return subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True,
                            env=subprocess_env(MAEPIPE_SAMPLE_LOG="1", **env))


def run(cmd: list[str], log: Path, timeout: float = 300, **env: str) -> int:
    proc = start(cmd, log, **env)
    try:
        return proc.wait(timeout)
    finally:
        kill_job(proc)


def kill_job(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        proc.wait(60)


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss; a step run twice (after a kill) keeps its last value."""
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


def wait_for_step(run_dir: Path, proc: subprocess.Popen, step: int, timeout: float = 300) -> int:
    """Poll the metrics log until it shows `step` (or later); -> the step seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = max(losses(run_dir), default=0)
        if seen >= step:
            return seen
        if proc.poll() is not None:
            raise AssertionError(f"job ended with {proc.returncode} before step {step}")
        time.sleep(0.02)
    raise AssertionError(f"no step {step} within {timeout}s")


def rank_processes(proc: subprocess.Popen) -> dict[int, psutil.Process]:
    """Training processes below a launcher, by RANK."""
    out = {}
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            env = child.environ()
        except psutil.Error:
            continue
        if "RANK" in env and "pipeline.cli" in " ".join(child.cmdline()):
            out[int(env["RANK"])] = child
    return out


def consumed(run_dir: Path) -> dict[tuple[int, int], tuple[int, list[int]]]:
    """(rank, step) -> (epoch, sample ids) from the sample logs; a step run twice keeps its last record."""
    out = {}
    for path in sorted((run_dir / "samples").glob("rank-*.jsonl")):
        rank = int(path.stem.split("-")[1])
        for line in path.read_text().splitlines():
            r = json.loads(line)
            out[(rank, r["step"])] = (r["epoch"], [i for micro in r["ids"] for i in micro])
    return out
