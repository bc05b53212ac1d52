"""Faults on local shards: corrupt samples skipped and counted, the skip limit, missing shards and indexes."""

import logging
import os

import pytest

from data_shards.manifest import Manifest, write_manifest
from data_shards.writer import write_shard
from pipeline.data import DataStop
from tests.helpers import CLASSES, fashion_arrays, png_bytes, write_small_dataset
from tests.loader_tools import SHARDS, flat, loaders, same_batches, take_batches

BAD_EVERY = 5  # ids 0, 5, 10, ... carry bytes that are no image at all


def write_damaged(dest: str) -> str:
    images, labels = fashion_arrays("train", sum(SHARDS))
    shards, i = [], 0
    for n, size in enumerate(SHARDS):
        samples = []
        for j in range(i, i + size):
            image = png_bytes(images[j]) if j % BAD_EVERY else b"\xff\xd8\xff\xe0 truncated jpeg" + bytes(40)
            samples.append({"__key__": f"s{j:05d}", "jpg" if j % BAD_EVERY == 0 else "png": image,
                            "cls": str(int(labels[j])).encode()})
        shards.append(write_shard(dest, f"train/train-{n:06d}.tar", samples))
        i += size
    return write_manifest(dest, Manifest({"train": shards}, CLASSES))


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    return write_damaged(str(tmp_path_factory.mktemp("damaged")))


def test_corrupt_samples_are_skipped_counted_and_logged_rate_limited(damaged, caplog):
    (loader,) = loaders(damaged, 1, 0, max_skip_fraction=0.3)
    with caplog.at_level(logging.WARNING, logger="pipeline.data.stream"):
        batches = list(loader.epoch_batches())
    ids = flat(batches)
    metrics = loader.take_metrics()
    assert metrics["skipped"] == sum(1 for i in ids if i % BAD_EVERY == 0) > 5
    assert metrics["samples"] == len(ids) and all(b["image"].shape == (4, 1, 16, 16) for b in batches)
    lines = [r.getMessage() for r in caplog.records]
    assert sum("skipping sample" in m for m in lines) == 5  # then summaries only, at most one a minute
    assert len(lines) <= 6
    # a bad sample's slot holds a copy of a good neighbour, never garbage
    for b in batches:
        for k, i in enumerate(b["id"].tolist()):
            if i % BAD_EVERY == 0:
                assert any(b["image"][k].equal(b["image"][m]) for m in range(4) if m != k)


def test_too_many_corrupt_samples_stop_the_run_with_a_clear_message(damaged):
    (loader,) = loaders(damaged, 1, 2, max_skip_fraction=0.01)
    with pytest.raises(DataStop, match=r"could not be decoded, over data.max_skip_fraction=0.01.*shard verify"):
        list(loader.epoch_batches())


def test_skip_limit_counts_the_whole_run_not_the_metrics_window(damaged):
    (loader,) = loaders(damaged, 1, 0, max_skip_fraction=0.015)  # 1.5% of the 1000-sample grace: 15 skips
    with pytest.raises(DataStop):
        for _ in loader.epoch_batches():
            loader.take_metrics()  # the training loop drains metrics every step; the limit must still hold


@pytest.fixture
def fresh(tmp_path):
    return write_small_dataset(str(tmp_path / "ds"), {"train": SHARDS})


def test_missing_shard_fails_before_the_first_batch_naming_it(fresh):
    gone = os.path.join(os.path.dirname(fresh), "train", "train-000003.tar")
    os.remove(gone)
    with pytest.raises(FileNotFoundError, match=r"missing: .*train-000003\.tar"):
        loaders(fresh, 2, 2)


def test_truncated_shard_is_named(fresh):
    path = os.path.join(os.path.dirname(fresh), "train", "train-000005.tar")
    os.truncate(path, os.path.getsize(path) // 2)
    with pytest.raises(FileNotFoundError, match=r"truncated: .*train-000005\.tar"):
        loaders(fresh, 1, 0)


@pytest.mark.parametrize("workers", [0, 2])
def test_shard_lost_mid_run_fails_fast_naming_it(fresh, workers, caplog):
    (loader,) = loaders(fresh, 1, workers)
    for name in os.listdir(os.path.join(os.path.dirname(fresh), "train")):
        os.remove(os.path.join(os.path.dirname(fresh), "train", name))
    with caplog.at_level(logging.WARNING), \
            pytest.raises(FileNotFoundError, match=r"shard .*train-0000\d\d\.tar is listed in .* but missing"):
        next(iter(loader))
    assert "retry" not in caplog.text  # not a transient error: no backoff before failing


def test_missing_index_falls_back_to_whole_shard_reads(fresh, caplog):
    expect = take_batches(loaders(fresh, 2, 2)[1], 12)
    for n in (0, 4):
        os.remove(os.path.join(os.path.dirname(fresh), "train", f"train-00000{n}.tar.idx"))
    with caplog.at_level(logging.WARNING):
        (_, loader) = loaders(fresh, 2, 2)
        assert "2 shard index file(s)" in caplog.text
    assert same_batches(take_batches(loader, 12), expect)
