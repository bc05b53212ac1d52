"""`maepipe shard verify DEST [--decode]`: every shard's size, checksum, sample count and index
against the manifest (and, with --decode, every image decoded)."""

from __future__ import annotations

import hashlib
import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from data_shards import storage
from data_shards.images import Rejected, check_decodes
from data_shards.manifest import Manifest, ShardInfo, decode_index, read_manifest
from data_shards.tars import image_ext, parse_samples, scan_tar


@dataclass
class ShardCheck:
    path: str
    samples: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)


def check_shard(manifest: Manifest, shard: ShardInfo, decode: bool) -> ShardCheck:
    url = manifest.shard_url(shard)
    check = ShardCheck(shard.path)
    try:
        data = storage.read_bytes(url)
    except FileNotFoundError:
        check.problems.append("missing")
        return check
    check.bytes = len(data)
    if len(data) != shard.bytes:
        check.problems.append(f"size {len(data)} != manifest {shard.bytes}")
    if hashlib.sha256(data).hexdigest() != shard.sha256:
        check.problems.append("sha256 differs from the manifest")
    try:
        spans = scan_tar(io.BytesIO(data), url)
        samples = parse_samples(data, url)
    except Exception as err:  # noqa: BLE001 - any parse failure is a finding, reported with its type
        check.problems.append(f"unreadable tar: {type(err).__name__}: {err}")
        return check
    check.samples = len(samples)
    if len(samples) != shard.samples:
        check.problems.append(f"{len(samples)} samples != manifest {shard.samples}")
    if shard.index:
        try:
            offsets = decode_index(storage.read_bytes(manifest.index_url(shard)))
            expected = [s.start for s in spans] + ([spans[-1].end] if spans else [0])
            if not np.array_equal(offsets, expected):
                check.problems.append("index offsets do not match the tar")
        except FileNotFoundError:
            check.problems.append(f"index {shard.index} missing")
    if decode:
        for sample in samples:
            ext = image_ext([k for k in sample if not k.startswith("__")])
            try:
                if not ext:
                    raise Rejected("no image")
                check_decodes(sample[ext])
            except Rejected as err:
                check.problems.append(f"sample {sample['__key__']}: {err}")
    return check


def verify(dest: str, decode: bool = False, threads: int = 4) -> dict[str, list[ShardCheck]]:
    """Per split, one ShardCheck per shard in manifest order."""
    manifest = read_manifest(dest)
    with ThreadPoolExecutor(threads) as pool:
        return {split: list(pool.map(lambda s: check_shard(manifest, s, decode), shards))
                for split, shards in manifest.splits.items()}
