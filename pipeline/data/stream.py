"""The training stream: a torch IterableDataset whose batches are a pure function of the plan.

Each (rank, worker) reads its stream of the epoch order (see order.py) window by window, reading
each window's samples with one ranged read per shard, then decodes and augments them with a
generator seeded by (seed, epoch, global sample id): the same sample gets the same crop whichever
rank, worker or resume reads it.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from data_shards.manifest import read_manifest
from pipeline.data.decode import DecodeError, decode_image, image_key
from pipeline.data.order import EpochOrder, Interval, Plan, take, total
from pipeline.data.shards import ShardReader
from pipeline.data.transforms import CropSpec, center_resize, random_resized_crop, to_tensor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamSpec:
    """What a worker needs to rebuild its part of an epoch (picklable, small)."""

    manifest_url: str
    split: str
    seed: int
    epoch: int
    window: int
    shuffle: bool
    channels: int
    crop: CropSpec
    augment: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]
    attempts: int


def label_of(sample: dict) -> int:
    raw = sample.get("cls")
    if raw is None:
        return -1
    try:
        return int(raw.decode().strip() if isinstance(raw, bytes) else raw)
    except ValueError:
        return -1


def positions(order: EpochOrder, intervals: list[Interval]):
    """Yield (window k, [O positions]) runs in reading order, one window at a time."""
    for a, b in intervals:
        p = a
        while p < b:
            k = p // order.window
            end = min(b, (k + 1) * order.window)
            yield k, list(range(p, end))
            p = end


def read_window(reader: ShardReader, order: EpochOrder, split: str, ps: list[int]) -> list[tuple[int, dict]]:
    """The samples at O positions ps, in that order, as (global id, sample); one read per shard."""
    located = [order.locate(order.c_position(p)) for p in ps]
    by_shard: dict[int, list[int]] = defaultdict(list)
    for shard, idx in located:
        by_shard[shard].append(idx)
    fetched: dict[tuple[int, int], dict] = {}
    for shard, idxs in by_shard.items():
        lo, hi = min(idxs), max(idxs) + 1
        for i, sample in zip(range(lo, hi), reader.read(split, shard, lo, hi)):
            fetched[(shard, i)] = sample
    return [(order.global_id(s, i), fetched[(s, i)]) for s, i in located]


class SkipLog:
    """Log undecodable samples: the first `first` one by one, then one summary line per `every_s`
    (a damaged shard must not flood the log of every worker)."""

    def __init__(self, first: int = 5, every_s: float = 60.0):
        self.first, self.every_s = first, every_s
        self.count, self.quiet, self.last = 0, 0, 0.0

    def __call__(self, key: str, gid: int, url: str, err: Exception) -> None:
        self.count += 1
        now = time.monotonic()
        if self.count <= self.first:
            log.warning("skipping sample %s (id %d) of %s: %s", key, gid, url, err)
            self.last = now
            return
        self.quiet += 1
        if now - self.last >= self.every_s:
            log.warning("skipped %d more undecodable samples (%d in all in this worker); latest %s of %s: %s",
                        self.quiet, self.count, key, url, err)
            self.quiet, self.last = 0, now


class MAEStream(IterableDataset):
    """Yields collated batches for one rank: {'image', 'label', 'id', 'skipped', 'bytes', 'retries'}."""

    def __init__(self, spec: StreamSpec, plan: Plan, rank: int, start_batch: int):
        self.spec, self.plan, self.rank, self.start_batch = spec, plan, rank, start_batch
        self.skip_log = SkipLog()

    def __iter__(self):
        info = get_worker_info()
        n_workers = self.plan.layout.streams_per_rank
        loader_worker = info.id if info is not None else 0
        # DataLoader worker j serves batches t0 + j, t0 + j + W, ...: it plays stream (t0 + j) % W
        stream_id = (self.start_batch + loader_worker) % n_workers
        intervals = self.plan.streams[(self.rank, stream_id)]
        skip = self.plan.consumed_samples(stream_id, self.start_batch)
        yield from self._batches(intervals, skip)

    def _batches(self, intervals: list[Interval], skip: int):
        spec = self.spec
        manifest = read_manifest(spec.manifest_url)
        counts = tuple(s.samples for s in manifest.shards(spec.split))
        order = EpochOrder(counts, spec.seed, spec.epoch, spec.window, spec.shuffle)
        reader = ShardReader(manifest, attempts=spec.attempts)
        todo = take(intervals, skip, total(intervals))
        B = self.plan.layout.batch
        mean, std = np.asarray(spec.mean, np.float32), np.asarray(spec.std, np.float32)
        pending: list[tuple[int, dict]] = []
        for _, ps in positions(order, todo):
            pending += read_window(reader, order, spec.split, ps)
            while len(pending) >= B:
                yield self._collate(pending[:B], order, mean, std, reader)
                pending = pending[B:]
        if pending:  # only under remainder=keep (evaluation)
            yield self._collate(pending, order, mean, std, reader)

    def _collate(self, items, order, mean, std, reader: ShardReader) -> dict:
        spec = self.spec
        images, labels, ids, bad = [], [], [], []
        for gid, sample in items:
            try:
                arr = decode_image(sample[image_key(sample)], spec.channels, spec.crop.min_decode_side if spec.augment else 0)
                if spec.augment:
                    arr = random_resized_crop(arr, spec.crop, np.random.default_rng([spec.seed, spec.epoch, gid]))
                else:
                    arr = center_resize(arr, spec.crop.size)
                images.append(to_tensor(arr, mean, std))
            except DecodeError as err:
                bad.append(len(ids))
                images.append(None)
                self.skip_log(sample.get("__key__"), gid, sample.get("__url__", ""), err)
            labels.append(label_of(sample))
            ids.append(gid)
        if len(bad) == len(items):
            raise DecodeError(f"no image of a whole batch could be decoded (ids {ids[0]}..{ids[-1]}): is the data damaged?")
        for i in bad:  # keep batch shapes fixed: a bad sample is replaced by its nearest good neighbour
            j = next(j for d in range(1, len(items)) for j in (i - d, i + d) if 0 <= j < len(items) and j not in bad)
            images[i], labels[i] = images[j], labels[j]
        stats = reader.stats
        batch = {
            "image": torch.stack(images), "label": torch.tensor(labels, dtype=torch.long),
            "id": torch.tensor(ids, dtype=torch.long), "skipped": len(bad),
            "bytes": stats.bytes, "retries": stats.retries,
        }
        stats.bytes = stats.retries = 0
        return batch
