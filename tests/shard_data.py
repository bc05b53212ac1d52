"""Small real inputs for the sharding tests: JPEG/PNG folders cut from scikit-image's photos,
Fashion-MNIST idx files, and tars written by plain webdataset (as another tool would)."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np
import simplejpeg
from PIL import Image

from tests.helpers import fashion_arrays


def photo_crops(n: int, seed: int = 0, size: tuple[int, int] = (48, 64)) -> list[np.ndarray]:
    """n distinct RGB crops (h, w) of real photos."""
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        photo = photos[i % len(photos)]
        y = int(rng.integers(0, photo.shape[0] - size[0] + 1))
        x = int(rng.integers(0, photo.shape[1] - size[1] + 1))
        out.append(np.ascontiguousarray(photo[y:y + size[0], x:x + size[1], :3]))
    return out


def jpeg(arr: np.ndarray, quality: int = 90) -> bytes:
    return simplejpeg.encode_jpeg(arr, quality=quality)


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def image_folder(root: Path, per_class: int = 6, classes=("cat", "dog", "fish"), size=(48, 64)) -> Path:
    """root/CLASS/NNN.jpg (one PNG per class too), like ImageNet's train layout."""
    crops = photo_crops(per_class * len(classes), size=size)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = crops[c * per_class + i]
            if i == 0:
                (root / name / f"{i:03d}.png").write_bytes(png(arr))
            else:
                (root / name / f"{i:03d}.jpg").write_bytes(jpeg(arr))
    return root


def idx_files(root: Path, n_train: int = 40, n_test: int = 12) -> Path:
    """train-/t10k- images and labels idx.gz files holding the first Fashion-MNIST images."""
    root.mkdir(parents=True, exist_ok=True)
    for prefix, split, n in (("train", "train", n_train), ("t10k", "val", n_test)):
        images, labels = fashion_arrays("train" if split == "train" else "test", n)
        header = bytes([0, 0, 8, 3]) + b"".join(int(d).to_bytes(4, "big") for d in images.shape)
        (root / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + images.tobytes()))
        header = bytes([0, 0, 8, 1]) + len(labels).to_bytes(4, "big")
        (root / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(header + labels.tobytes()))
    return root


def foreign_tars(root: Path, shards: int = 2, per_shard: int = 5) -> list[Path]:
    """Tars as another tool writes them: webdataset's default TarWriter, .jpeg images, labels as
    .cls in the first shard and as .json {"label": ...} in the others."""
    import json

    import webdataset as wds

    root.mkdir(parents=True, exist_ok=True)
    crops = photo_crops(shards * per_shard, seed=1)
    paths = []
    for s in range(shards):
        path = root / f"foreign-{s:04d}.tar"
        with wds.TarWriter(str(path)) as writer:
            for i in range(per_shard):
                n = s * per_shard + i
                sample = {"__key__": f"img/{n:05d}", "jpeg": jpeg(crops[n])}
                if s == 0:
                    sample["cls"] = str(n % 3).encode()
                else:
                    sample["json"] = json.dumps({"label": n % 3, "name": f"n{n}"}).encode()
                writer.write(sample)
        paths.append(path)
    return paths


def read_split(manifest, split: str) -> list[dict]:
    """All samples of a split, in shard order, read with the project's shard reader."""
    from pipeline.data.shards import ShardReader

    reader = ShardReader(manifest)
    out = []
    for i, shard in enumerate(manifest.shards(split)):
        out += reader.read(split, i, 0, shard.samples)
    return out
