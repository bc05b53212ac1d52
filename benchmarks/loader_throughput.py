"""Loader throughput per core: our StreamingLoader vs the loaders people run without it.

Real-photo JPEGs (scikit-image's bundled photos, randomly cropped, resized to ImageNet-like sizes,
flipped and re-encoded at varied quality) are written as an image folder and as shards. Then, in one
process each (samples/s of one process = per core), with the same MAE transform (RandomResizedCrop
0.2-1, 3/4-4/3, bicubic to 224, flip, normalize) and batch 64:
  ours     StreamingLoader (ranged shard reads, simplejpeg, reduced-scale decode when it can)
  folder   a plain PIL image-folder Dataset in a torch DataLoader (what users run without shards)
  wds      webdataset.WebDataset(shards).decode("pil") with the same transform, batched
Then on a real S3 server (SeaweedFS on 127.0.0.1): raw s3fs reads of every shard's bytes vs our read
path (ranged window reads + tar parsing, no decode) over the same bytes: our overhead over the
network limit; and the full loader from S3 vs from local disk.

    python benchmarks/loader_throughput.py [--images 800] [--no-s3]
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_shards.manifest import Manifest, write_manifest
from data_shards.writer import write_shard
from pipeline.config import DataConfig
from pipeline.data import StreamingLoader
from pipeline.data.transforms import CropSpec, random_resized_crop, to_tensor

SOURCES = ["astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "moon", "clock", "immunohistochemistry",
           "hubble_deep_field", "retina", "cat", "stereo_motorcycle", "grass", "gravel", "brick"]
MEAN, STD = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
SPEC = CropSpec(224)


def photos(n: int, seed: int = 0) -> list[tuple[bytes, int]]:
    """n distinct JPEGs (bytes, source label), ~375 px short side, long side <= 500, as in ImageNet."""
    import skimage.data

    rng = np.random.default_rng(seed)
    srcs = []
    for name in SOURCES:
        arr = getattr(skimage.data, name)()
        srcs.append(arr[0] if isinstance(arr, tuple) else arr)
    out = []
    for i in range(n):
        label = i % len(srcs)
        src = Image.fromarray(srcs[label])
        w, h = src.size
        frac, aspect = rng.uniform(0.4, 1.0), np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = min(w, int(np.sqrt(frac * w * h * aspect))), min(h, int(np.sqrt(frac * w * h / aspect)))
        x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
        img = src.crop((x, y, x + cw, y + ch))
        scale = min(rng.uniform(330, 420) / min(cw, ch), 500 / max(cw, ch))
        img = img.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.BICUBIC)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(rng.integers(75, 96)))
        out.append((buf.getvalue(), label))
    return out


def mae_view(img: Image.Image, key: int) -> torch.Tensor:
    """The same transform the peers use; ours applies it inside the loader."""
    arr = np.asarray(img.convert("RGB"))
    return to_tensor(random_resized_crop(arr, SPEC, np.random.default_rng(key)), MEAN, STD)


class Folder(torch.utils.data.Dataset):
    def __init__(self, files):
        self.files = files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        with Image.open(self.files[i]) as img:
            return mae_view(img, i), int(Path(self.files[i]).parent.name)


def wds_pipeline(urls: list[str], batch: int):
    import webdataset as wds

    return (wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg", "cls")
            .map(lambda s: (mae_view(s[0], 0), int(s[1]))).batched(batch))


def timed(batches) -> tuple[int, float]:
    start, n = time.perf_counter(), 0
    for b in batches:
        n += len(b["id"]) if isinstance(b, dict) else len(b[0])
    return n, time.perf_counter() - start


def ours(url: str, batch: int):
    cfg = DataConfig(manifest=url, batch_size=batch, num_workers=0, shuffle_window=1024)
    return StreamingLoader(cfg, 224, 3, seed=0, remainder="keep").epoch_batches()


def write_all(root: Path, images, shard_size: int) -> tuple[list[str], str]:
    files = []
    for i, (data, label) in enumerate(images):
        path = root / "folder" / str(label) / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        files.append(str(path))
    return files, write_shards(str(root / "shards"), images, shard_size)


def write_shards(dest: str, images, shard_size: int) -> str:
    shards = []
    for n, start in enumerate(range(0, len(images), shard_size)):
        samples = [{"__key__": f"{start + j:06d}", "jpg": d, "cls": str(lab).encode()}
                   for j, (d, lab) in enumerate(images[start:start + shard_size])]
        shards.append(write_shard(dest, f"train/train-{n:06d}.tar", samples))
    return write_manifest(dest, Manifest({"train": shards}, SOURCES))


def read_path(url: str) -> tuple[int, float]:
    """Our read path without decode: every window of the epoch order, ranged reads + tar parsing."""
    from data_shards.manifest import read_manifest
    from pipeline.data.order import EpochOrder
    from pipeline.data.shards import ShardReader
    from pipeline.data.stream import positions, read_window

    manifest = read_manifest(url)
    order = EpochOrder(tuple(s.samples for s in manifest.shards("train")), 0, 0, 1024)
    reader = ShardReader(manifest)
    start = time.perf_counter()
    for _, ps in positions(order, [(0, order.size)]):
        read_window(reader, order, "train", ps)
    return reader.stats.bytes, time.perf_counter() - start


def raw_s3fs(url: str) -> tuple[int, float]:
    from data_shards import storage
    from data_shards.manifest import read_manifest

    manifest = read_manifest(url)
    fs, _ = storage.filesystem(url)
    start, n = time.perf_counter(), 0
    for shard in manifest.shards("train"):
        n += len(fs.cat_file(storage.filesystem(manifest.shard_url(shard))[1]))
    return n, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=800)
    ap.add_argument("--shard-size", type=int, default=100)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="best of N passes per loader")
    ap.add_argument("--no-s3", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    images = photos(args.images)
    sizes = np.array([Image.open(io.BytesIO(d)).size for d, _ in images])
    print(f"{len(images)} JPEGs, mean {sizes[:, 0].mean():.0f}x{sizes[:, 1].mean():.0f} px, "
          f"{sum(len(d) for d, _ in images) / len(images) / 1024:.0f} KiB each; 1 process, batch {args.batch}, 224 px")
    with tempfile.TemporaryDirectory() as tmp:
        files, url = write_all(Path(tmp), images, args.shard_size)
        urls = sorted(str(p) for p in Path(tmp, "shards", "train").glob("*.tar"))
        runs = {
            "ours": lambda: ours(url, args.batch),
            "folder (PIL)": lambda: torch.utils.data.DataLoader(Folder(files), batch_size=args.batch, shuffle=True),
            "wds decode(pil)": lambda: wds_pipeline(urls, args.batch),
        }
        rate = {}
        for name, make in runs.items():
            rate[name] = max(n / s for n, s in (timed(make()) for _ in range(args.repeats)))
        for name, r in rate.items():
            print(f"  {name:<16} {r:7.1f} samples/s per core   ours / this = {rate['ours'] / r:.2f}")
        if args.no_s3:
            return
        from tests.servers import seaweedfs_env, start_seaweedfs

        server = start_seaweedfs(Path(tmp) / "weed")
        try:
            with seaweedfs_env(server):
                remote = write_shards(f"{server.make_bucket('bench')}/shards", images, args.shard_size)
                raw = max((raw_s3fs(remote) for _ in range(args.repeats)), key=lambda r: r[0] / r[1])
                mine = max((read_path(remote) for _ in range(args.repeats)), key=lambda r: r[0] / r[1])
                mib = lambda r: r[0] / r[1] / 2**20  # noqa: E731
                print(f"  S3 raw s3fs cat_file      {mib(raw):7.1f} MiB/s")
                print(f"  S3 our read path          {mib(mine):7.1f} MiB/s   ours / raw = {mib(mine) / mib(raw):.2f}")
                s3_rate = max(n / s for n, s in (timed(ours(remote, args.batch)) for _ in range(args.repeats)))
                print(f"  S3 full loader            {s3_rate:7.1f} samples/s   S3 / local = {s3_rate / rate['ours']:.2f}")
        finally:
            server.stop()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
