"""The shard manifest: DEST/manifest.json, written last and atomically.

    {
      "format": "maepipe-shards", "version": 1,
      "splits": {"train": {"samples": 60000, "shards": [
          {"path": "train/train-000000.tar", "samples": 1000, "bytes": 812544,
           "sha256": "...", "index": "train/train-000000.tar.idx"}, ...]}, "val": {...}},
      "classes": ["T-shirt/top", ...],            # label i is classes[i]; [] when unlabelled
      "source": "...", "options": {...},           # what made it, for reproducibility
      "created": "2026-11-28T00:00:00Z"
    }

Shard paths are relative to the manifest's folder, so a dataset can be copied anywhere.
The optional index beside each shard holds each sample's starting byte offset (npy int64, n+1
entries: the last is where the final sample ends) so a reader can fetch any run of samples with one
ranged read.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from data_shards import storage

FORMAT, VERSION = "maepipe-shards", 1
MANIFEST_NAME = "manifest.json"


@dataclass
class ShardInfo:
    path: str
    """Relative to the manifest's folder."""
    samples: int
    bytes: int
    sha256: str
    index: str = ""
    """Relative path of the offsets index ('' when the shard has none)."""


@dataclass
class Manifest:
    splits: dict[str, list[ShardInfo]]
    classes: list[str] = field(default_factory=list)
    source: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    url: str = ""
    """Where this manifest was read from (not stored); shard URLs are resolved against its folder."""

    @property
    def root(self) -> str:
        return self.url.rsplit("/", 1)[0] if "/" in self.url else "."

    def resolve(self, path: str) -> str:
        """A shard path from the manifest -> URL: relative paths are under root; full URLs (foreign
        shards indexed where they lie) stay as they are."""
        return path if "://" in path or path.startswith("/") else storage.join(self.root, path)

    def shard_url(self, shard: ShardInfo) -> str:
        return self.resolve(shard.path)

    def index_url(self, shard: ShardInfo) -> str:
        return self.resolve(shard.index) if shard.index else ""

    def num_samples(self, split: str) -> int:
        return sum(s.samples for s in self.shards(split))

    def shards(self, split: str) -> list[ShardInfo]:
        if split not in self.splits:
            raise KeyError(f"split {split!r} is not in {self.url or 'the manifest'}; it has {', '.join(self.splits) or 'none'}")
        return self.splits[split]

    def to_json(self) -> str:
        body = {
            "format": FORMAT, "version": VERSION,
            "splits": {name: {"samples": sum(s.samples for s in shards), "shards": [asdict(s) for s in shards]}
                       for name, shards in self.splits.items()},
            "classes": self.classes, "source": self.source, "options": self.options, "created": self.created,
        }
        return json.dumps(body, indent=1, sort_keys=False) + "\n"


def manifest_url(dest: str) -> str:
    """Accept DEST or DEST/manifest.json."""
    return dest if dest.endswith(".json") else storage.join(dest, MANIFEST_NAME)


def read_manifest(url: str) -> Manifest:
    url = manifest_url(url)
    try:
        raw = storage.read_bytes(url)
    except FileNotFoundError:
        raise FileNotFoundError(f"no shard manifest at {url}: make one with `maepipe shard SRC DEST` "
                                "(or `maepipe shard index` for existing WebDataset tars)") from None
    body = json.loads(raw)
    if body.get("format") != FORMAT:
        raise ValueError(f"{url} is not a maepipe shard manifest (format {body.get('format')!r})")
    if body.get("version", 0) > VERSION:
        raise ValueError(f"{url} has manifest version {body['version']}; this maepipe reads up to {VERSION}: upgrade it")
    splits = {name: [ShardInfo(**s) for s in split["shards"]] for name, split in body["splits"].items()}
    return Manifest(splits, body.get("classes", []), body.get("source", ""), body.get("options", {}),
                    body.get("created", ""), url)


def write_manifest(dest: str, manifest: Manifest) -> str:
    url = manifest_url(dest)
    storage.write_atomic(url, manifest.to_json().encode())
    return url


def encode_index(offsets: list[int] | np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(offsets, dtype=np.int64))
    return buf.getvalue()


def decode_index(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)
