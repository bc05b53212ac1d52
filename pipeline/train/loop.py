"""The training loop: load, step, log, checkpoint, stop when done or asked to."""

from __future__ import annotations

import json
import logging
import random
import signal
import time

import numpy as np
import torch

from pipeline.config import RunConfig
from pipeline.data import StreamingLoader
from pipeline.model import build_mae
from pipeline.train import checkpoint, distributed
from pipeline.train.engine import build_engine
from pipeline.train.metrics import MetricsSink
from pipeline.train.optim import lr_at, peak_lr, set_lr, warmup_steps
from pipeline.train.step import train_step

log = logging.getLogger("maepipe.train")

EXIT_OK = 0
EXIT_REQUEUE = 75  # EX_TEMPFAIL: preempted after a checkpoint; slurm/*.sbatch requeues on it
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class StopFlag:
    """Set by SIGUSR1/SIGTERM (preemption notice) or the time limit; acted on at a step boundary."""

    def __init__(self, time_limit_s: float):
        self.signal: int | None = None
        self.deadline = time.monotonic() + time_limit_s if time_limit_s > 0 else None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        self.signal = signum

    @property
    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def restore(engine, loader: StreamingLoader, ckpt: str, cfg: RunConfig, world: int) -> int:
    """Load engine + data state from a complete checkpoint; refuse ones this config cannot continue."""
    state = checkpoint.read_client_state(ckpt)
    if state["config_hash"] != cfg.hash(("model",)):
        raise ValueError(f"checkpoint {ckpt} was made with another model section ({state['config']['model']}); "
                         f"this run has {cfg.to_dict()['model']}: resume it with the same model settings")
    if state["world"] != world:
        raise ValueError(f"checkpoint {ckpt} was written by {state['world']} ranks and this job has {world}")
    local = checkpoint.local_copy(ckpt)
    engine.load_checkpoint(str(local.parent), tag=local.name, load_lr_scheduler_states=False)
    loader.load_state_dict(state["data"])
    log.info("resumed from %s at step %d (epoch %d)", ckpt, state["step"], state["epoch"])
    return state["step"]


def train(cfg: RunConfig) -> int:
    dist = distributed.init(cfg.train.dist_timeout_s)
    run_dir = cfg.run_dir
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.json")
    seed_everything(cfg.train.seed)  # same initial weights on every rank
    engine = build_engine(build_mae(cfg.model), cfg, dist.world)
    loader = StreamingLoader(cfg.data, cfg.model.img_size, cfg.model.in_chans, dist.rank, dist.world, cfg.train.seed)

    step = 0
    resume_from = checkpoint.resolve_resume(cfg.checkpoint.resume, run_dir, cfg.checkpoint.upload_url)
    if resume_from:
        step = restore(engine, loader, resume_from, cfg, dist.world)

    t = cfg.train
    effective_batch = cfg.data.batch_size * t.grad_accum * dist.world
    peak, warmup = peak_lr(cfg.optim, effective_batch), warmup_steps(cfg.optim, t.steps)
    dtype = DTYPES[t.precision]
    stop = StopFlag(t.time_limit_minutes * 60)
    sink = MetricsSink(run_dir, t.steps, step) if dist.is_main else None
    if dist.is_main:
        log.info("training %s: %d ranks (%s), effective batch %d, peak lr %.3g, %d steps (%d per epoch)",
                 cfg.name, dist.world, dist.launcher, effective_batch, peak, t.steps, loader.batches_per_epoch())

    batches = iter(loader)
    interval_start, interval_losses, last_save = time.perf_counter(), [], time.monotonic()
    exit_code = EXIT_OK
    while step < t.steps:
        lr = lr_at(step, t.steps, peak, warmup, cfg.optim.min_lr)
        set_lr(engine.optimizer, lr)
        loss, grad_norm = train_step(engine, batches, step, t.grad_accum, t.seed, dist, dtype)
        step += 1
        interval_losses.append(loss)
        if sink:
            sink.advance(step, loss)

        # sync point: one all-reduce tells every rank whether to stop or save now
        minutes_due = cfg.checkpoint.every_minutes and time.monotonic() - last_save > cfg.checkpoint.every_minutes * 60
        stop_now, save_now = distributed.mean_across(
            [float(stop.signal is not None or stop.out_of_time), float(bool(minutes_due))], dist.device)
        stop_now, save_now = stop_now > 0, save_now > 0 or (cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0)

        if step % t.log_every == 0 or step == t.steps or stop_now:
            elapsed = time.perf_counter() - interval_start
            data = loader.take_metrics()
            mean_loss, wait = distributed.mean_across([sum(interval_losses) / len(interval_losses), data["wait_s"]], dist.device)
            if sink:
                sink.log(step, {"loss": mean_loss, "lr": lr, "grad_norm": grad_norm, "epoch": loader.epoch,
                                "images_per_s": len(interval_losses) * effective_batch / elapsed,
                                "data_wait_frac": min(1.0, wait / elapsed), "data_mb_per_s": data["bytes"] / elapsed / 1e6,
                                "data_retries": data["retries"], "data_skipped": data["skipped"]})
            interval_start, interval_losses = time.perf_counter(), []

        if save_now or stop_now or step == t.steps:
            client = {"step": step, "epoch": loader.epoch, "data": loader.state_dict(), "world": dist.world,
                      "config": cfg.to_dict(), "config_hash": cfg.hash(("model",)), "time": time.time()}
            checkpoint.save(engine, run_dir, step, client, dist.is_main)
            if dist.is_main:
                checkpoint.apply_retention(run_dir / "checkpoints", cfg.checkpoint.keep_last, cfg.checkpoint.keep_every)
            last_save = time.monotonic()
        if stop_now:
            preempted = stop.signal is not None
            log.info("stopping at step %d: %s", step, "preemption signal" if preempted else "time limit")
            exit_code = EXIT_REQUEUE if preempted else EXIT_OK
            break
    if sink:
        sink.close()
        (run_dir / "train_summary.json").write_text(json.dumps({"steps": step, "exit_code": exit_code}) + "\n")
    return exit_code
