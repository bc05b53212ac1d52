"""The training loop: load, step, log, checkpoint, stop when done or asked to."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import resource
import signal
import threading
import time

import numpy as np
import torch

from pipeline.config import ConfigError, RunConfig, config_from_dict
from pipeline.data import StreamingLoader
from pipeline.model import build_mae
from pipeline.train import checkpoint, distributed
from pipeline.train.engine import build_engine
from pipeline.train.flops import mae_flops_per_image, mfu, peak_tflops
from pipeline.train.metrics import MetricsSink
from pipeline.train.optim import lr_at, peak_lr, warmup_steps
from pipeline.train.step import train_step

log = logging.getLogger("maepipe.train")

EXIT_OK = 0
EXIT_REQUEUE = 75  # EX_TEMPFAIL: preempted after a checkpoint; slurm/*.sbatch requeues on it
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# opt-in debug log of the global sample ids each rank consumed, one JSON line per step, in
# RUN/samples/rank-R.jsonl: the no-repeat/no-skip tests of elastic resume read it
SAMPLE_LOG_ENV = "MAEPIPE_SAMPLE_LOG"
# config sections that may change between a checkpoint and its resume (logged); model may not
RESUME_FIXED = ("model",)


class StopFlag:
    """Set by SIGUSR1/SIGTERM (preemption notice), notify() or the time limit; acted on at a step boundary.

    CPython runs the handler only when the main thread is back in Python: a rank blocked in a
    collective sees the signal once that returns, which a dead peer bounds (gloo error at once, or
    train.dist_timeout_s); exiting from the handler would come no sooner. torchrun follows its
    SIGTERM with SIGKILL after 30 s.
    """

    def __init__(self, time_limit_s: float):
        self.signal: int | None = None
        self.deadline = time.monotonic() + time_limit_s if time_limit_s > 0 else None
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGUSR1, signal.SIGTERM):
                signal.signal(sig, self._handle)
        else:  # Ray Train runs the loop in a worker thread: Python lets only the main thread take signals
            log.info("not the main thread: notices come through notify() (jobs/stop_notice.py under Ray Train)")

    def _handle(self, signum, _frame):
        self.notify(signum)

    def notify(self, signum: int) -> None:
        """A preemption notice from elsewhere (another thread, the host process): stop like on `signum`."""
        self.signal = signum

    def ignore_from_now(self) -> None:
        """The run is over and saved: later notices are ignored, so this rank exits with its own code.

        After the first rank exits non-zero (75), torchrun and srun SIGTERM the others. A Python handler
        would catch that, but interpreter shutdown puts SIGTERM back to its default (fatal) action while
        the rank is still tearing down, so it would end as -15. SIG_IGN survives that shutdown.
        """
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGUSR1, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN)

    @property
    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'section.key: old -> new' for every leaf that differs (checkpoint.resume is not a change)."""
    out = []
    for key in sorted(set(old) | set(new)):
        where = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, where + ".")
        elif a != b and where != "checkpoint.resume":
            out.append(f"{where}: {a!r} -> {b!r}")
    return out


def check_resumable(state: dict, cfg: RunConfig, ckpt: str) -> None:
    """Refuse a checkpoint whose model differs (shape, patch, mask ratio...); log deliberate changes.

    The saved config is rebuilt through today's dataclasses rather than trusting its stored hash:
    a field added since the checkpoint was written takes its default, which keeps the old behaviour."""
    saved = config_from_dict(state["config"])
    if saved.hash(RESUME_FIXED) != cfg.hash(RESUME_FIXED):
        changed = config_changes({"model": saved.to_dict()["model"]}, {"model": cfg.to_dict()["model"]})
        raise ConfigError(f"checkpoint {ckpt} cannot be resumed with this config: {'; '.join(changed)}. "
                          "The model section must match the checkpoint's: set these fields back (or start a new "
                          "run with another name / without --resume)")
    for change in config_changes(saved.to_dict(), cfg.to_dict()):
        log.info("config changed since the checkpoint (allowed): %s", change)


def needs_universal(state: dict, cfg: RunConfig, world: int) -> bool:
    """DeepSpeed loads its own ZeRO files only on the same world size and stage; else convert."""
    return state["world"] != world or state["config"]["train"]["zero_stage"] != cfg.train.zero_stage


def restore(engine, loader: StreamingLoader, ckpt: str, state: dict, universal: bool,
            dist: distributed.DistInfo, seed: int) -> int:
    """Load engine, data and RNG state from a complete checkpoint (collective)."""
    if dist.local_rank == 0:  # one download / conversion per node; the others wait and reuse it
        local = checkpoint.local_copy(ckpt)
        if universal:
            checkpoint.universal_copy(local)
    torch.distributed.barrier()  # sync: the node's copy (and universal form) is ready
    local = checkpoint.local_copy(ckpt)
    if universal:
        local = checkpoint.universal_copy(local)
        log.info("checkpoint from %d ranks (ZeRO %d) loads on %d ranks (ZeRO %d) through its universal form",
                 state["world"], state["config"]["train"]["zero_stage"], dist.world, engine.zero_optimization_stage())
    path, _ = engine.load_checkpoint(str(local.parent), tag=local.name, load_lr_scheduler_states=False)
    if path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint files in {local}")
    loader.load_state_dict(state["data"])
    if state["world"] == dist.world:
        checkpoint.set_rng_state(state["rng"][dist.rank])
    else:  # another layout has no "same rank" to continue: a fresh stream per (seed, step, rank)
        digest = hashlib.blake2b(f"{seed}/{state['step']}/{dist.rank}".encode(), digest_size=4).digest()
        seed_everything(int.from_bytes(digest, "little"))
    log.info("resumed from %s at step %d (epoch %d)", ckpt, state["step"], state["epoch"])
    return state["step"]


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory of this process, or its peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def train(cfg: RunConfig, stop: StopFlag | None = None) -> int:
    """Run (or resume) the training of `cfg` on this rank. -> EXIT_OK, or EXIT_REQUEUE after a preemption save.

    `stop`: a flag made by the caller, who feeds it notices (Ray Train workers); default: one taking
    this process's SIGUSR1/SIGTERM."""
    stop = stop or StopFlag(cfg.train.time_limit_minutes * 60)  # first: a notice during startup must not kill us
    dist = distributed.init(cfg.train.dist_timeout_s)
    run_dir = cfg.run_dir
    resume_from = checkpoint.resolve_resume(cfg.checkpoint.resume, run_dir, cfg.checkpoint.upload_url)
    state = checkpoint.read_client_state(resume_from) if resume_from else None
    if state:
        check_resumable(state, cfg, resume_from)
    universal = bool(state) and needs_universal(state, cfg, dist.world)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.json")
    seed_everything(cfg.train.seed)  # same initial weights on every rank
    extra = {"checkpoint": {"load_universal": True}} if universal else None
    engine = build_engine(build_mae(cfg.model), cfg, dist.world, extra)
    loader = StreamingLoader(cfg.data, cfg.model.img_size, cfg.model.in_chans, dist.rank, dist.world, cfg.train.seed)

    step, skips, restore_s = 0, 0, None
    if state:
        started = time.perf_counter()
        step = restore(engine, loader, resume_from, state, universal, dist, cfg.train.seed)
        skips = state.get("nonfinite_skipped", 0)
        restore_s = time.perf_counter() - started

    t = cfg.train
    effective_batch = cfg.data.batch_size * t.grad_accum * dist.world
    peak, warmup = peak_lr(cfg.optim, effective_batch), warmup_steps(cfg.optim, t.steps)
    dtype = DTYPES[t.precision]
    flops_img, peak_tf = mae_flops_per_image(cfg.model), peak_tflops(t.peak_tflops, t.precision)
    sink = MetricsSink(run_dir, t.steps, step) if dist.is_main else None
    uploader = (checkpoint.Uploader(run_dir / "checkpoints", cfg.checkpoint.upload_url, cfg.checkpoint.keep_last,
                                    cfg.checkpoint.keep_every) if dist.is_main and cfg.checkpoint.upload_url else None)
    samples_log = _open_sample_log(run_dir, dist.rank)
    if sink:
        log.info("training %s: %d ranks (%s), ZeRO %d, %s, effective batch %d, peak lr %.3g, %d steps (%d per epoch), "
                 "%.3g GFLOP per image", cfg.name, dist.world, dist.launcher, t.zero_stage, t.precision, effective_batch,
                 peak, t.steps, loader.batches_per_epoch(), flops_img / 1e9)
        if restore_s is not None:
            sink.log(step, {"event": "restore", "restore_s": restore_s, "from": resume_from, "universal": universal})

    batches = iter(loader)
    interval_start, interval_steps, interval_losses, last_save = time.perf_counter(), 0, [], time.monotonic()
    exit_code = EXIT_OK
    while step < t.steps:
        lr = lr_at(step, t.steps, peak, warmup, cfg.optim.min_lr)
        result = train_step(engine, batches, step, t.grad_accum, t.seed, dist, dtype, lr,
                            may_skip=skips < t.nonfinite_skips, skips=skips)
        if result.skipped:
            skips += 1
            log.warning("step %d skipped (non-finite loss or gradient): %d of train.nonfinite_skips=%d used",
                        step, skips, t.nonfinite_skips)
        step += 1
        interval_steps += 1
        if not result.skipped:
            interval_losses.append(result.loss)
        if samples_log:
            samples_log.write(json.dumps({"step": step, "epoch": loader.epoch, "ids": result.ids}) + "\n")
            samples_log.flush()
        if sink:
            sink.advance(step, result.loss)

        # sync point: one all-reduce tells every rank whether to stop or save now
        minutes_due = cfg.checkpoint.every_minutes and time.monotonic() - last_save > cfg.checkpoint.every_minutes * 60
        signalled, out_of_time, save_now = distributed.mean_across(
            [float(stop.signal is not None), float(stop.out_of_time), float(bool(minutes_due))], dist.device)
        preempted = signalled > 0  # one rank's notice stops them all, with the requeue code on each
        stop_now = preempted or out_of_time > 0
        save_now = save_now > 0 or bool(cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0)

        if step % t.log_every == 0 or step == t.steps or stop_now:
            elapsed = time.perf_counter() - interval_start
            data = loader.take_metrics()
            local_loss = sum(interval_losses) / len(interval_losses) if interval_losses else 0.0
            mean_loss, wait, mem, n_loss = distributed.mean_across(
                [local_loss, data["wait_s"], peak_memory_gb(dist.device), float(bool(interval_losses))], dist.device)
            images_per_s = interval_steps * effective_batch / elapsed
            if sink:
                sink.log(step, {"loss": mean_loss / n_loss if n_loss else float("nan"), "lr": lr,
                                "grad_norm": result.grad_norm, "epoch": loader.epoch, "images_per_s": images_per_s,
                                "step_s": elapsed / interval_steps, "tflops_per_device": flops_img * images_per_s / dist.world / 1e12,
                                "mfu": mfu(flops_img, images_per_s, dist.world, peak_tf), "mem_gb_per_rank": mem,
                                "nonfinite_skipped": skips, "data_wait_frac": min(1.0, wait / elapsed),
                                "data_mb_per_s": data["bytes"] / elapsed / 1e6,
                                "data_retries": data["retries"], "data_skipped": data["skipped"]})
            interval_start, interval_steps, interval_losses = time.perf_counter(), 0, []

        if save_now or stop_now or step == t.steps:
            client = {"step": step, "epoch": loader.epoch, "data": loader.state_dict(), "world": dist.world,
                      "config": cfg.to_dict(), "config_hash": cfg.hash(RESUME_FIXED), "nonfinite_skipped": skips,
                      "time": time.time()}
            tag, save_s = checkpoint.save(engine, run_dir, step, client, dist.is_main)
            if sink:
                sink.log(step, {"event": "checkpoint", "tag": tag, "save_s": save_s})
                checkpoint.apply_retention(run_dir / "checkpoints", cfg.checkpoint.keep_last, cfg.checkpoint.keep_every,
                                           protect=uploader.pending if uploader else set())
            if uploader:
                uploader.submit(tag)
            last_save = time.monotonic()
        if stop_now:
            log.info("stopping at step %d: %s", step, "preemption signal" if preempted else "time limit")
            exit_code = EXIT_REQUEUE if preempted else EXIT_OK
            break
    if uploader:
        uploader.close()  # the last checkpoint must reach object storage before the job ends
    if samples_log:
        samples_log.close()
    if sink:
        sink.close()
        (run_dir / "train_summary.json").write_text(json.dumps({"steps": step, "exit_code": exit_code,
                                                                "nonfinite_skipped": skips}) + "\n")
    # sync point: ranks leave together; launchers (torchrun, srun) tear the job down at the first
    # non-zero exit, which would otherwise kill a rank still finishing its own exit path
    torch.distributed.barrier()
    stop.ignore_from_now()
    return exit_code


def _open_sample_log(run_dir, rank: int):
    if os.environ.get(SAMPLE_LOG_ENV, "") in ("", "0"):
        return None
    (run_dir / "samples").mkdir(parents=True, exist_ok=True)
    return open(run_dir / "samples" / f"rank-{rank}.jsonl", "a")
