"""Build one planned shard: read its items, encode them, write the tar + index, then a done-record.

The done-record (DEST/_progress/SPLIT-NNNNNN.json: the ShardInfo and the shard's rejects) is
written after the tar and its index, so a record means the shard is whole: `--resume` trusts
records and rebuilds every shard without one. This function runs in pool processes and Ray tasks
alike, so it takes and returns plain picklable values.
"""

from __future__ import annotations

import json
from dataclasses import asdict

from data_shards import storage
from data_shards.images import ImageOptions, Rejected, encode_array, encode_image
from data_shards.plan import ShardSpec
from data_shards.sources import Item, load_idx
from data_shards.tars import image_ext, parse_samples
from data_shards.writer import write_shard

PROGRESS_DIR = "_progress"


def progress_url(dest: str, name: str) -> str:
    return storage.join(dest, PROGRESS_DIR, f"{name}.json")


def describe(item: Item) -> str:
    return {"file": item.ref, "idx": f"{item.ref}#{item.pos}", "tar": f"{item.ref}@{item.pos}"}[item.kind]


def _read(url: str, start: int | None = None, end: int | None = None) -> bytes:
    try:
        if start is None and not storage.is_remote(url):
            with open(url.removeprefix("file://"), "rb") as f:  # local files: skip fsspec's per-call setup
                return f.read()
        return storage.read_bytes(url, start, end)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as err:
        raise Rejected(f"unreadable: {type(err).__name__}: {err}") from err


def _tar_sample(item: Item) -> tuple[bytes, int]:
    """(image bytes, label) of a sample inside a source tar, read with one ranged read."""
    data = _read(item.ref, item.pos, item.end)
    try:
        samples = parse_samples(data, item.ref)
    except Exception as err:  # noqa: BLE001 - tar parsing raises many types; each is a reject
        raise Rejected(f"corrupt tar sample: {type(err).__name__}: {err}") from err
    sample = samples[0] if samples else None
    if not sample:
        raise Rejected("corrupt tar sample: no members in its byte range")
    ext = image_ext([k for k in sample if not k.startswith("__")])
    if not ext:
        raise Rejected("no image in sample")
    return sample[ext], item.label


def make_sample(key: str, item: Item, opts: ImageOptions) -> dict:
    """-> {'__key__', 'jpg'|'png', 'cls'?, 'json'?}; raises Rejected with the reason."""
    if item.kind == "idx":
        ext, data = encode_array(load_idx(item.ref)[item.pos], opts)
        meta = None
    else:
        raw, label = _tar_sample(item) if item.kind == "tar" else (_read(item.ref), item.label)
        ext, data = encode_image(raw, opts)
        meta = {"source": describe(item)}
    sample = {"__key__": key, ext: data}
    if item.label >= 0:
        sample["cls"] = str(item.label).encode()
    if meta:
        sample["json"] = json.dumps(meta, sort_keys=True).encode()
    return sample


def build_shard(dest: str, spec: ShardSpec, opts: ImageOptions) -> dict:
    """Write one shard; returns its record {'name', 'shard': ShardInfo dict or None, 'rejected': [...]}."""
    samples, rejected = [], []
    for i, item in enumerate(spec.items):
        key = f"{spec.split}-{spec.first + i:09d}"
        try:
            samples.append(make_sample(key, item, opts))
        except Rejected as err:
            rejected.append({"key": key, "source": describe(item), "reason": str(err)})
    info = write_shard(dest, spec.path, samples) if samples else None
    record = {"name": spec.name, "shard": asdict(info) if info else None, "rejected": rejected}
    storage.write_atomic(progress_url(dest, spec.name), json.dumps(record).encode())
    return record
