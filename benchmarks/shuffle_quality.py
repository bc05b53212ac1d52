"""How close the loader's batches are to i.i.d. draws, measured on labels.

Fashion-MNIST train images (10 balanced classes) are written as shards, then one epoch is read
with the real StreamingLoader (2 ranks x 2 workers, batch 64, default window 1024), once per seed. Two figures,
each beside the same figure for i.i.d. batches (uniform random permutations of the same labels):
  chi2   mean chi-square of a batch's label counts against the split's label frequencies
         (i.i.d.: about classes - 1 = 9; a batch dominated by few classes: much more)
  lag1   mean label overlap of consecutive batches on a rank, sum_k min(a_k, b_k) / B
         (sequential correlation: streaming that walks through a shard shows up here)
Shards are written twice: globally shuffled (what `maepipe shard` does) and sorted by class (an
adversarial input the window shuffle alone cannot fix: shows what the writer's shuffle buys).

    python benchmarks/shuffle_quality.py [--samples 12000] [--window 1024]
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np

from data_shards.manifest import Manifest, write_manifest
from data_shards.writer import write_shard
from pipeline.config import DataConfig
from pipeline.data import StreamingLoader
from tests.helpers import CLASSES, fashion_arrays, png_bytes


def write(dest: str, images, labels, order, shard_size: int) -> str:
    shards = []
    for n, start in enumerate(range(0, len(order), shard_size)):
        idx = order[start:start + shard_size]
        samples = [{"__key__": f"{i:06d}", "png": png_bytes(images[i]), "cls": str(int(labels[i])).encode()}
                   for i in idx]
        shards.append(write_shard(dest, f"train/train-{n:06d}.tar", samples))
    return write_manifest(dest, Manifest({"train": shards}, CLASSES))


def rank_label_batches(url: str, world: int, workers: int, batch: int, window: int, seed: int) -> list[np.ndarray]:
    """Per rank: (batches, B) labels of one epoch, in the order the training loop gets them."""
    cfg = DataConfig(manifest=url, batch_size=batch, num_workers=workers, shuffle_window=window, mean=[0.5], std=[0.5])
    out = []
    for rank in range(world):
        loader = StreamingLoader(cfg, 8, 1, rank=rank, world=world, seed=seed, augment=False)
        out.append(np.stack([b["label"].numpy() for b in loader.epoch_batches()]))
    return out


def figures(per_rank: list[np.ndarray], freq: np.ndarray) -> tuple[float, float]:
    chi2, lag1 = [], []
    for labels in per_rank:
        counts = np.stack([np.bincount(b, minlength=len(freq)) for b in labels])
        expect = labels.shape[1] * freq
        chi2 += list(((counts - expect) ** 2 / expect).sum(1))
        lag1 += list(np.minimum(counts[1:], counts[:-1]).sum(1) / labels.shape[1])
    return float(np.mean(chi2)), float(np.mean(lag1))


def iid(labels: np.ndarray, shape: tuple[int, int], world: int, rng) -> list[np.ndarray]:
    return [rng.permutation(labels)[: shape[0] * shape[1]].reshape(shape) for _ in range(world)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=12000)
    ap.add_argument("--shard-size", type=int, default=500)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    images, labels = fashion_arrays("train", args.samples)
    freq = np.bincount(labels, minlength=10) / len(labels)
    rng = np.random.default_rng(0)
    cases = {"globally shuffled shards": rng.permutation(len(labels)),
             "class-sorted shards": np.argsort(labels, kind="stable")}
    print(f"{args.samples} Fashion-MNIST samples, shards of {args.shard_size}, {args.world} ranks x {args.workers} "
          f"workers, batch {args.batch}, window {args.window}, {args.seeds} seeds")
    print(f"{'shards':<26} {'chi2 ours':>10} {'chi2 iid':>9} {'ratio':>6} {'lag1 ours':>10} {'lag1 iid':>9} {'ratio':>6}")
    for name, order in cases.items():
        with tempfile.TemporaryDirectory() as tmp:
            url = write(tmp, images, labels, order, args.shard_size)
            ours, ref = [], []
            for epoch_seed in range(args.seeds):
                got = rank_label_batches(url, args.world, args.workers, args.batch, args.window, seed=epoch_seed)
                ours.append(figures(got, freq))
                ref.append(figures(iid(labels, got[0].shape, args.world, rng), freq))
        (c, l), (ci, li) = np.mean(ours, 0), np.mean(ref, 0)
        print(f"{name:<26} {c:>10.2f} {ci:>9.2f} {c / ci:>6.2f} {l:>10.3f} {li:>9.3f} {l / li:>6.2f}")


if __name__ == "__main__":
    main()
