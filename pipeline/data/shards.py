"""Read runs of samples out of shards: one ranged read per run when the shard has an index."""

from __future__ import annotations

import io
from collections import OrderedDict
from dataclasses import dataclass, field

from webdataset.tariterators import group_by_keys, tar_file_iterator

from data_shards import storage
from data_shards.manifest import Manifest, decode_index


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


@dataclass
class ShardReader:
    """Per-process reader; holds shard indexes and (for shards without one) the last whole shard."""

    manifest: Manifest
    attempts: int = 8
    stats: ReadStats = field(default_factory=ReadStats)
    _indexes: dict = field(default_factory=dict)
    _whole: OrderedDict = field(default_factory=OrderedDict)

    def _read(self, url: str, start: int | None = None, end: int | None = None) -> bytes:
        try:
            data = storage.read_bytes(url, start, end, attempts=self.attempts, on_retry=self.stats.count_retry)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"shard {url} is listed in {self.manifest.url} but missing: restore it, or rebuild the "
                "dataset (`maepipe shard ... --resume` rewrites missing shards)") from None
        self.stats.bytes += len(data)
        return data

    def offsets(self, shard_id: int, split: str):
        key = (split, shard_id)
        if key not in self._indexes:
            shard = self.manifest.shards(split)[shard_id]
            self._indexes[key] = decode_index(self._read(self.manifest.index_url(shard))) if shard.index else None
        return self._indexes[key]

    def read(self, split: str, shard_id: int, lo: int, hi: int) -> list[dict]:
        """Samples lo..hi-1 of a shard (hi exclusive), each {'__key__', ext: bytes, ...}."""
        shard = self.manifest.shards(split)[shard_id]
        url = self.manifest.shard_url(shard)
        offsets = self.offsets(shard_id, split)
        if offsets is not None:
            samples = parse_tar(self._read(url, int(offsets[lo]), int(offsets[hi])), url)
        else:
            if url not in self._whole:
                self._whole[url] = parse_tar(self._read(url), url)
                while len(self._whole) > 2:
                    self._whole.popitem(last=False)
            samples = self._whole[url][lo:hi]
        if len(samples) != hi - lo:
            raise ValueError(f"{url}: expected samples {lo}..{hi - 1} but the bytes hold {len(samples)}; "
                             "the shard or its index is damaged: run `maepipe shard verify`")
        return samples
