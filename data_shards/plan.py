"""The up-front plan: which item goes into which shard, a pure function of (listing, options).

Splits come from a val fraction (a seeded draw over all items) or else from the source's own
splits; each split is shuffled globally with the seed and cut into shards by sample count and/or
estimated bytes. Nothing here depends on timing, so every executor writes the same bytes, and a
resumed run rebuilds exactly the shards that are missing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from data_shards.sources import Item, Listing


@dataclass
class ShardSpec:
    split: str
    number: int
    items: list[Item]
    first: int
    """Position of the shard's first sample in its split: keys are f'{split}-{first + i:09d}'."""

    @property
    def path(self) -> str:
        return f"{self.split}/{self.split}-{self.number:06d}.tar"

    @property
    def name(self) -> str:
        return f"{self.split}-{self.number:06d}"


def assign_splits(items: list[Item], val_fraction: float, seed: int) -> dict[str, list[Item]]:
    if val_fraction > 0:
        n_val = round(len(items) * val_fraction)
        order = np.random.default_rng([seed, 1]).permutation(len(items))
        val = set(order[:n_val].tolist())
        return {"train": [it for i, it in enumerate(items) if i not in val],
                "val": [it for i, it in enumerate(items) if i in val]}
    splits: dict[str, list[Item]] = {}
    for it in items:
        splits.setdefault(it.split or "train", []).append(it)
    return splits


def cut(items: list[Item], shard_samples: int, shard_bytes: int) -> list[list[Item]]:
    """Consecutive runs of at most shard_samples items and (when > 0) shard_bytes estimated bytes;
    an item bigger than shard_bytes gets a shard of its own."""
    shards: list[list[Item]] = []
    current: list[Item] = []
    size = 0
    for it in items:
        if current and (len(current) >= shard_samples or (shard_bytes and size + it.size > shard_bytes)):
            shards.append(current)
            current, size = [], 0
        current.append(it)
        size += it.size
    if current:
        shards.append(current)
    return shards


def make_plan(listing: Listing, shard_samples: int, shard_bytes: int, val_fraction: float, seed: int,
              shuffle: bool = True) -> list[ShardSpec]:
    specs = []
    for n, (split, items) in enumerate(sorted(assign_splits(listing.items, val_fraction, seed).items())):
        if shuffle:
            # one stream per split name, so adding a split never reshuffles another
            stream = int.from_bytes(hashlib.sha256(split.encode()).digest()[:4], "little")
            order = np.random.default_rng([seed, 2, stream]).permutation(len(items))
            items = [items[i] for i in order]
        first = 0
        for number, chunk in enumerate(cut(items, shard_samples, shard_bytes)):
            specs.append(ShardSpec(split, number, chunk, first))
            first += len(chunk)
    return specs


def fingerprint(specs: list[ShardSpec], source: str, options: dict) -> str:
    """Names what the run will write: the same plan and options always give the same value."""
    h = hashlib.sha256(json.dumps({"source": source, "options": options}, sort_keys=True).encode())
    for spec in specs:
        h.update(f"{spec.path}\n".encode())
        for it in spec.items:
            h.update(repr(tuple(it)).encode())
    return h.hexdigest()
