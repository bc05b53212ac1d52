"""Write the whole Fashion-MNIST (60k train, 10k test as split `val`) as PNG shards with a manifest.

    python benchmarks/fmnist_shards.py runs/fmnist-shards

Uses the Debian package dataset-fashion-mnist (no download). Samples are shuffled before sharding,
as `maepipe shard` does, so every shard is a random draw of its split.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

# Run as a script from the repository root: the Fashion-MNIST readers live in tests/helpers.py.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_shards.manifest import Manifest, write_manifest  # noqa: E402
from data_shards.writer import write_shard  # noqa: E402
from tests.helpers import CLASSES, fashion_arrays, png_bytes  # noqa: E402


def write_fashion_mnist(dest: str, shard_samples: int = 5000, seed: int = 0) -> str:
    splits = {}
    for split, source in (("train", "train"), ("val", "test")):
        images, labels = fashion_arrays(source)
        perm = np.random.default_rng(seed).permutation(len(images))
        shards = []
        for n, start in enumerate(range(0, len(perm), shard_samples)):
            idx = perm[start:start + shard_samples]
            samples = [{"__key__": f"{source}-{i:05d}", "png": png_bytes(images[i]),
                        "cls": str(int(labels[i])).encode()} for i in idx]
            shards.append(write_shard(dest, f"{split}/{split}-{n:06d}.tar", samples))
        splits[split] = shards
    return write_manifest(dest, Manifest(splits, CLASSES, source="fashion-mnist idx (Debian dataset-fashion-mnist)",
                                         options={"shard_samples": shard_samples, "seed": seed}))


if __name__ == "__main__":
    print(write_fashion_mnist(sys.argv[1] if len(sys.argv) > 1 else "runs/fmnist-shards"))
