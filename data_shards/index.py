"""`maepipe shard index URL... [--out DEST]`: a manifest (and .idx sidecars) for WebDataset shards
made by other tools, so that the streaming loader can read them like its own.

Each URL is a tar, a glob of tars, or a folder/prefix holding tars. Every tar is read once: its
size, sha256 and samples (the usual image keys; `.cls` or a `.json` "label" for classes) go into
the manifest, and each sample's start offset into a `.idx` sidecar beside the tar. The split is
the tar's folder name when it is train/val/test (else --split). Shard paths are relative to DEST
when the tars lie under it, else full URLs.
"""

from __future__ import annotations

import hashlib
import io
from concurrent.futures import ThreadPoolExecutor

from data_shards import storage
from data_shards.manifest import Manifest, ShardInfo, encode_index, manifest_url, read_manifest, write_manifest
from data_shards.sources import FOLDER_SPLITS
from data_shards.tars import scan_tar
from pipeline.config import ConfigError


def expand(url: str) -> list[str]:
    """A tar URL, a glob or a folder -> sorted tar URLs; ConfigError when nothing matches."""
    fs, path = storage.filesystem(url)
    if any(c in path for c in "*?["):
        paths = fs.glob(path)
    elif fs.isdir(path):
        paths = [p for p in fs.find(path) if p.endswith(".tar")]
    elif fs.exists(path):
        paths = [path]
    else:
        raise ConfigError(f"{url} does not exist: give WebDataset .tar files, a glob or a folder of them")
    paths = sorted(p for p in paths if p.endswith(".tar"))
    if not paths:
        raise ConfigError(f"{url} holds no .tar shards")
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return [p if "file" in protocols else fs.unstrip_protocol(p) for p in paths]


def index_tar(url: str) -> tuple[int, int, str, list[int], list[int]]:
    """(samples, bytes, sha256, offsets, labels) of one tar; writes URL.idx beside it."""
    data = storage.read_bytes(url)
    try:
        samples = scan_tar(io.BytesIO(data), url)
    except ValueError as err:  # unsafe member names or not a tar
        raise ConfigError(str(err)) from err
    offsets = [s.start for s in samples] + [samples[-1].end if samples else 0]
    storage.write_atomic(url + ".idx", encode_index(offsets))
    return len(samples), len(data), hashlib.sha256(data).hexdigest(), offsets, [s.label for s in samples]


def _split_of(url: str, default: str) -> str:
    parent = url.rsplit("/", 2)[-2] if url.count("/") >= 1 else ""
    return FOLDER_SPLITS.get(parent, default)


def _relative(url: str, root: str) -> str:
    return url[len(root) + 1:] if url.startswith(root.rstrip("/") + "/") else url


def index_shards(urls: list[str], out: str = "", split: str = "train", threads: int = 4) -> Manifest:
    tars = sorted({t for url in urls for t in expand(url.rstrip("/"))})
    if not out:
        first = tars[0].rsplit("/", 1)[0]
        parent = first.rsplit("/", 1)[0] if _split_of(tars[0], "") else first
        out = parent if all(t.startswith(parent + "/") for t in tars) else first
    out = out.rstrip("/")
    source = " ".join(urls)
    if storage.exists(manifest_url(out)):
        existing = read_manifest(out)
        if not (existing.options.get("indexed") and existing.source == source):
            raise ConfigError(f"{out} already holds a manifest for another dataset ({existing.source}): "
                              "give another --out")
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(index_tar, tars))
    splits: dict[str, list[ShardInfo]] = {}
    labels: list[int] = []
    for url, (samples, nbytes, sha, _, shard_labels) in zip(tars, results):
        rel = _relative(url, out)
        splits.setdefault(_split_of(url, split), []).append(ShardInfo(rel, samples, nbytes, sha, rel + ".idx"))
        labels += [x for x in shard_labels if x >= 0]
    classes = [str(i) for i in range(max(labels) + 1)] if labels else []
    manifest = Manifest(splits, classes, source, {"indexed": True})
    manifest.url = write_manifest(out, manifest)
    return manifest
