"""Small real datasets for tests: Fashion-MNIST images written as shards with the project's writer."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np
from PIL import Image

from data_shards.manifest import Manifest, write_manifest
from data_shards.writer import write_shard

FASHION = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def fashion_arrays(split: str = "train", limit: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(N, 28, 28) uint8 images and (N,) labels from the Debian dataset-fashion-mnist package."""
    prefix = "train" if split == "train" else "t10k"
    with gzip.open(FASHION / f"{prefix}-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(FASHION / f"{prefix}-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    if limit:
        images, labels = images[:limit], labels[:limit]
    return images, labels


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_small_dataset(dest: str, shard_sizes: dict[str, list[int]], seed: int = 0) -> str:
    """Fashion-MNIST samples into shards of the given sizes per split; returns the manifest URL."""
    need = sum(sum(v) for v in shard_sizes.values())
    images, labels = fashion_arrays("train", need)
    splits, i = {}, 0
    for split, sizes in shard_sizes.items():
        shards = []
        for n, size in enumerate(sizes):
            samples = [{"__key__": f"{split}-{i + j:07d}", "png": png_bytes(images[i + j]),
                        "cls": str(int(labels[i + j])).encode()} for j in range(size)]
            shards.append(write_shard(dest, f"{split}/{split}-{n:06d}.tar", samples))
            i += size
        splits[split] = shards
    return write_manifest(dest, Manifest(splits, CLASSES, source="fashion-mnist (test)"))
