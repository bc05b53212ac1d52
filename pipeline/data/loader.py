"""StreamingLoader: epochs of batches for one rank, with a small JSON state for exact/elastic resume.

    loader = StreamingLoader(cfg.data, img_size=32, channels=1, rank=r, world=w, seed=cfg.train.seed)
    for batch in loader: ...            # endless: epoch after epoch
    state = loader.state_dict()         # after k batches: goes into the checkpoint
    loader.load_state_dict(state)       # same layout: bitwise the same next batches;
                                        # another world size or worker count: the rest of the epoch
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

import torch
from torch.utils.data import DataLoader

from data_shards.manifest import manifest_url, read_manifest
from pipeline.config import DataConfig
from pipeline.data.order import Layout, Plan, total
from pipeline.data.shards import check_shards
from pipeline.data.stream import MAEStream, StreamSpec
from pipeline.data.transforms import CropSpec

log = logging.getLogger(__name__)
STATE_VERSION = 1
EMPTY_METRICS = {"samples": 0, "bytes": 0, "retries": 0, "skipped": 0, "wait_s": 0.0}
SKIP_GRACE = 1000  # samples; see _check_skips


def channel_stats(values: list[float], channels: int, name: str) -> tuple[float, ...]:
    """One normalization value per channel; RGB statistics on a grayscale model become their mean."""
    if len(values) == channels:
        return tuple(values)
    if channels == 1:
        return (sum(values) / len(values),)
    raise ValueError(f"data.{name} has {len(values)} values but images have {channels} channels: give {channels}")


class DataStop(RuntimeError):
    """The stream cannot go on (e.g. too many undecodable samples); the message says why."""


class StreamingLoader:
    def __init__(self, cfg: DataConfig, img_size: int, channels: int, rank: int = 0, world: int = 1,
                 seed: int = 0, augment: bool = True, shuffle: bool = True, split: str | None = None,
                 remainder: str | None = None, max_samples: int = 0):
        self.cfg, self.rank, self.seed = cfg, rank, seed
        self.url = manifest_url(cfg.manifest)
        self.split = split or cfg.split
        manifest = read_manifest(self.url)
        check_shards(manifest, self.split)  # a missing shard fails here, naming it, not hours into the epoch
        self.num_samples = min(manifest.num_samples(self.split), max_samples or 1 << 62)
        self.classes = manifest.classes
        self.layout = Layout(world, cfg.num_workers, cfg.batch_size, remainder or cfg.remainder)
        self.spec_args = dict(
            manifest_url=self.url, split=self.split, seed=seed, window=cfg.shuffle_window, shuffle=shuffle,
            channels=channels, augment=augment, attempts=cfg.retries,
            crop=CropSpec(img_size, tuple(cfg.crop_scale), tuple(cfg.crop_ratio), cfg.hflip),
            mean=channel_stats(cfg.mean, channels, "mean"), std=channel_stats(cfg.std, channels, "std"),
        )
        self.epoch, self.batches_done = 0, 0
        self.remaining = [(0, self.num_samples)]
        self.metrics = dict(EMPTY_METRICS)
        self._metrics_since = time.perf_counter()
        self.seen, self.skipped = 0, 0  # whole-run totals behind the max_skip_fraction check
        if Plan(self.layout, self.remaining).batches_per_rank == 0:
            raise DataStop(f"split {self.split!r} of {self.url} has {self.num_samples} samples, fewer than one global "
                           f"batch ({world} ranks x data.batch_size={cfg.batch_size}): lower data.batch_size")

    def plan(self) -> Plan:
        return Plan(self.layout, self.remaining)

    def batches_per_epoch(self) -> int:
        return Plan(self.layout, [(0, self.num_samples)]).batches_per_rank

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "epoch": self.epoch, "batches_done": self.batches_done,
                "remaining": [list(iv) for iv in self.remaining], "layout": asdict(self.layout),
                "seed": self.seed, "window": self.cfg.shuffle_window, "split": self.split,
                "num_samples": self.num_samples}

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("seed", self.seed), ("window", self.cfg.shuffle_window), ("split", self.split),
                          ("num_samples", self.num_samples)):
            if state[key] != mine:
                raise ValueError(f"data state was saved with {key}={state[key]!r} but this run has {mine!r}: "
                                 "the epoch order would differ, so the position cannot be carried over")
        self.epoch = state["epoch"]
        remaining = [tuple(iv) for iv in state["remaining"]]
        old = Layout(**state["layout"])
        if old == self.layout:
            self.remaining, self.batches_done = remaining, state["batches_done"]
        else:  # elastic: what the old layout had not consumed becomes this layout's epoch remainder
            self.remaining = Plan(old, remaining).remaining_after(state["batches_done"])
            self.batches_done = 0
            log.info("data: layout changed %s -> %s; %d samples left in epoch %d", old, self.layout,
                     total(self.remaining), self.epoch)

    def _dataloader(self, plan: Plan) -> DataLoader:
        spec = StreamSpec(epoch=self.epoch, **self.spec_args)
        workers = self.layout.workers
        return DataLoader(MAEStream(spec, plan, self.rank, self.batches_done), batch_size=None,
                          num_workers=workers, pin_memory=torch.cuda.is_available(),
                          prefetch_factor=4 if workers else None)

    def epoch_batches(self):
        """The batches left in the current epoch (for evaluation: one pass, then stop)."""
        plan = self.plan()
        if self.batches_done >= plan.batches_per_rank:
            return
        it = iter(self._dataloader(plan))
        while self.batches_done < plan.batches_per_rank:
            start = time.perf_counter()
            batch = next(it, None)
            if batch is None:  # remainder=keep: this rank's share ended a batch early
                break
            self.metrics["wait_s"] += time.perf_counter() - start
            self.batches_done += 1
            batch_skips = batch["skipped"]
            for key in ("bytes", "retries", "skipped"):
                self.metrics[key] += batch.pop(key)
            self.metrics["samples"] += len(batch["id"])
            self.seen += len(batch["id"])
            self.skipped += batch_skips
            self._check_skips()
            yield batch

    def __iter__(self):
        while True:
            yield from self.epoch_batches()
            self.epoch += 1
            self.batches_done = 0
            self.remaining = [(0, self.num_samples)]

    def _check_skips(self) -> None:
        # judged over the run so far, with the first SKIP_GRACE samples counted as if SKIP_GRACE had been
        # seen, so that two bad samples among the first hundred do not stop a run at 1%
        frac = self.cfg.max_skip_fraction
        if self.skipped > frac * max(self.seen, SKIP_GRACE):
            raise DataStop(f"{self.skipped} of {self.seen} samples read on rank {self.rank} could not be decoded, "
                           f"over data.max_skip_fraction={frac}: check the shards with "
                           "`maepipe shard verify --decode`, or raise data.max_skip_fraction")

    def take_metrics(self) -> dict:
        """Counters since the last call, for the training metrics: samples, bytes, retries, skipped,
        wait_s (time the training loop spent waiting for a batch), elapsed_s, and the rates
        samples_per_s, bytes_per_s and wait_fraction (wait_s / elapsed_s)."""
        now = time.perf_counter()
        out = dict(self.metrics, elapsed_s=now - self._metrics_since)
        span = max(out["elapsed_s"], 1e-9)
        out.update(samples_per_s=out["samples"] / span, bytes_per_s=out["bytes"] / span,
                   wait_fraction=min(1.0, out["wait_s"] / span))
        self.metrics, self._metrics_since = dict(EMPTY_METRICS), now
        return out
