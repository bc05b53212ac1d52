"""Read runs of samples out of shards: one ranged read per run when the shard has an index."""

from __future__ import annotations

import gc
import io
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field

import fsspec
from webdataset.tariterators import group_by_keys, tar_file_iterator

from data_shards import storage
from data_shards.manifest import Manifest, decode_index

log = logging.getLogger(__name__)
_INHERITED: list = []


def _keep_inherited_filesystems() -> None:
    """In a forked child (a DataLoader worker), keep the parent's cached fsspec instances alive.

    An s3fs instance's finalizer closes its aiohttp session through the event loop it was made on.
    Run in a forked child, that is the parent's loop, whose epoll set the child shares: the parent's
    pooled S3 connections stop being watched and its next request hangs until the read timeout
    (15 s each, seen here). So the child never finalizes what it inherited: reachable instances are
    pinned here (fsspec drops them from its cache in the child), and unreachable ones are collected
    by the parent just before the fork (gc.collect below). The child makes its own clients.
    """
    todo = [fsspec.AbstractFileSystem]
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        _INHERITED.extend(vars(cls).get("_cache", {}).values())


os.register_at_fork(before=gc.collect, after_in_child=_keep_inherited_filesystems)


def parse_tar(data: bytes, url: str = "") -> list[dict]:
    """Tar bytes (whole samples, any prefix/suffix of a shard) -> samples in file order."""
    files = ({**f, "__url__": url} for f in tar_file_iterator(io.BytesIO(data)))
    return list(group_by_keys(files))


@dataclass
class ReadStats:
    bytes: int = 0
    retries: int = 0

    def count_retry(self, _err: BaseException) -> None:
        self.retries += 1

    def count_client_retries(self, n: int) -> None:
        self.retries += n


@dataclass
class ShardReader:
    """Per-process reader; holds shard indexes and (for shards without one) the last whole shard."""

    manifest: Manifest
    attempts: int = 8
    stats: ReadStats = field(default_factory=ReadStats)
    _indexes: dict = field(default_factory=dict)
    _whole: OrderedDict = field(default_factory=OrderedDict)

    def _read(self, url: str, start: int | None = None, end: int | None = None, what: str = "shard") -> bytes:
        """Bytes [start, end) of url; a read that dies half way is re-issued whole (storage.read_bytes),
        so samples are only ever parsed from complete ranges: no repeats, no gaps."""
        try:
            data = storage.read_bytes(url, start, end, attempts=self.attempts, on_retry=self.stats.count_retry,
                                      on_client_retries=self.stats.count_client_retries)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{what} {url} is listed in {self.manifest.url} but missing: restore it, or rebuild the "
                "dataset (`maepipe shard ... --resume` rewrites missing shards)") from None
        self.stats.bytes += len(data)
        return data

    def offsets(self, shard_id: int, split: str):
        """The shard's sample offsets, or None (no index, or its index is gone: whole-shard reads)."""
        key = (split, shard_id)
        if key not in self._indexes:
            shard = self.manifest.shards(split)[shard_id]
            self._indexes[key] = None
            if shard.index:
                url = self.manifest.index_url(shard)
                try:
                    self._indexes[key] = decode_index(self._read(url, what="index"))
                except FileNotFoundError:
                    log.warning("index %s is missing: reading %s whole instead of by ranges", url,
                                self.manifest.shard_url(shard))
        return self._indexes[key]

    def read(self, split: str, shard_id: int, lo: int, hi: int) -> list[dict]:
        """Samples lo..hi-1 of a shard (hi exclusive), each {'__key__', ext: bytes, ...}."""
        shard = self.manifest.shards(split)[shard_id]
        url = self.manifest.shard_url(shard)
        offsets = self.offsets(shard_id, split)
        if offsets is not None:
            samples = parse_tar(self._read(url, int(offsets[lo]), int(offsets[hi])), url)
        else:
            if url not in self._whole:  # a ranged read of the manifest's size, so a cut-off body is caught
                self._whole[url] = parse_tar(self._read(url, 0, shard.bytes), url)
                while len(self._whole) > 2:
                    self._whole.popitem(last=False)
            samples = self._whole[url][lo:hi]
        if len(samples) != hi - lo:
            raise ValueError(f"{url}: expected samples {lo}..{hi - 1} but the bytes hold {len(samples)}; "
                             "the shard or its index is damaged: run `maepipe shard verify`")
        return samples


def check_shards(manifest: Manifest, split: str) -> None:
    """Fail fast, before any batch, when shards of `split` are missing or shorter than the manifest says.

    One listing per shard folder (paged by the store), not one request per shard.
    """
    folders: dict[str, dict[str, int]] = {}

    def size(url: str) -> int | None:
        folder, name = url.rsplit("/", 1)
        if folder not in folders:
            fs, path = storage.filesystem(folder)
            try:
                listing = storage.retry(lambda: fs.ls(path, detail=True), f"list {folder}")
            except FileNotFoundError:
                listing = []
            folders[folder] = {entry["name"].rsplit("/", 1)[-1]: entry.get("size") or 0 for entry in listing}
        return folders[folder].get(name)

    missing, short, no_index = [], [], 0
    for shard in manifest.shards(split):
        url = manifest.shard_url(shard)
        found = size(url)
        if found is None:
            missing.append(url)
        elif found < shard.bytes:
            short.append(f"{url} ({found} of {shard.bytes} bytes)")
        no_index += bool(shard.index) and size(manifest.index_url(shard)) is None
    if missing or short:
        problems = [f"missing: {u}" for u in missing[:5]] + [f"truncated: {u}" for u in short[:5]]
        more = len(missing) + len(short) - len(problems)
        raise FileNotFoundError(
            f"{len(missing)} missing and {len(short)} truncated shard(s) of split {split!r} in {manifest.url}: "
            + "; ".join(problems) + (f"; and {more} more" if more > 0 else "")
            + ". Restore them, or rebuild the dataset (`maepipe shard ... --resume` rewrites missing shards)")
    if no_index:
        log.warning("%d shard index file(s) of split %r are missing: those shards are read whole", no_index, split)
