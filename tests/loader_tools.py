"""Helpers for the loader tests: build loaders on a manifest and record what every rank receives."""

from __future__ import annotations

import itertools

import torch

from pipeline.config import DataConfig
from pipeline.data import StreamingLoader

SHARDS = [23, 17, 30, 11, 19, 26, 14]  # 7 shards, 140 samples: not divisible by ranks x workers


def config(url: str, workers: int, batch: int = 4, window: int = 16, **kw) -> DataConfig:
    return DataConfig(manifest=url, batch_size=batch, num_workers=workers, shuffle_window=window,
                      mean=[0.5], std=[0.5], **kw)


def loaders(url: str, world: int, workers: int, seed: int = 7, **kw) -> list[StreamingLoader]:
    """One loader per rank, as each rank's process would build it (ranks never talk to each other)."""
    batch = kw.pop("batch", 4)
    window = kw.pop("window", 16)
    cfg = config(url, workers, batch, window, **{k: kw.pop(k) for k in list(kw) if hasattr(DataConfig, k)})
    return [StreamingLoader(cfg, 16, 1, rank=r, world=world, seed=seed, **kw) for r in range(world)]


def take_batches(loader: StreamingLoader, steps: int) -> list[dict]:
    """The next `steps` batches of the endless stream (crossing epochs), then the loader is paused."""
    return list(itertools.islice(iter(loader), steps))


def ids(batches: list[dict]) -> list[list[int]]:
    return [b["id"].tolist() for b in batches]


def flat(batches: list[dict]) -> list[int]:
    return [i for b in batches for i in b["id"].tolist()]


def same_batches(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"]) and torch.equal(x["id"], y["id"])
        for x, y in zip(a, b))
