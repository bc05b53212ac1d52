"""Labelled splits through the streaming loader, and frozen features of them.

Feature extraction is the slow part of kNN and the linear probe (one encoder pass per image), so
`FeatureCache` keeps each (encoder, split) result in memory for every protocol that needs it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Callable

import torch

from pipeline.config import RunConfig
from pipeline.data import StreamingLoader

log = logging.getLogger(__name__)

FeatureFn = Callable[[torch.Tensor], torch.Tensor]
"""(B, C, H, W) normalized images -> (B, D) features."""


@dataclass
class Features:
    x: torch.Tensor  # (N, D) float32
    y: torch.Tensor  # (N,) long
    seconds: float

    def __len__(self) -> int:
        return len(self.y)


def split_loader(cfg: RunConfig, split: str, max_samples: int = 0, augment: bool = False,
                 shuffle: bool = False, seed: int = 0) -> StreamingLoader:
    """One rank's view of a labelled split at the model's input size; eval keeps the last short batch."""
    data = replace(cfg.data, batch_size=cfg.eval.batch_size)
    return StreamingLoader(data, cfg.model.img_size, cfg.model.in_chans, rank=0, world=1, seed=seed,
                           augment=augment, shuffle=shuffle, split=split,
                           remainder="drop" if augment else "keep", max_samples=max_samples)


def check_labelled(loader: StreamingLoader) -> int:
    """Number of classes; a clear error when the manifest has no class names."""
    if not loader.classes:
        raise ValueError(f"{loader.url} lists no classes: evaluation needs a labelled dataset "
                         "(shard an image folder with class subfolders, or idx files with labels)")
    return len(loader.classes)


@torch.no_grad()
def extract(fn: FeatureFn, loader: StreamingLoader) -> Features:
    """One pass over the split: (N, D) features and (N,) labels, in the split's order."""
    start = time.perf_counter()
    xs, ys = [], []
    for batch in loader.epoch_batches():
        xs.append(fn(batch["image"]).float())
        ys.append(batch["label"])
    y = torch.cat(ys)
    if (y < 0).any():
        raise ValueError(f"split {loader.split!r} of {loader.url} has samples without a label (cls): "
                         "evaluation needs every sample labelled")
    out = Features(torch.cat(xs), y, time.perf_counter() - start)
    log.info("features: %d x %d from split %r in %.1fs", *out.x.shape, loader.split, out.seconds)
    return out


def raw_pixels(imgs: torch.Tensor) -> torch.Tensor:
    """The baseline representation: the normalized pixels themselves, flattened."""
    return imgs.flatten(1)


class FeatureCache:
    """(name, split) -> Features, computed once per evaluation."""

    def __init__(self, cfg: RunConfig):
        self.cfg, self.store = cfg, {}

    def get(self, name: str, fn: FeatureFn, split: str, max_samples: int = 0) -> Features:
        key = (name, split, max_samples)
        if key not in self.store:
            self.store[key] = extract(fn, split_loader(self.cfg, split, max_samples))
        return self.store[key]
