"""Write one shard: a WebDataset tar, its offsets index and its ShardInfo.

Tars are byte-reproducible (fixed mtime, owner and mode), so the same samples give the same
sha256 whichever executor or process writes them. The bytes are exactly what
`webdataset.TarWriter(stream, encoder=False, mtime=0, user=..., group=..., mode=0o444)` writes
(tests/test_shard_writer.py holds the two side by side); the stdlib tarfile does it here so that
pool workers and Ray tasks need not import webdataset, whose import pulls in torch (~2 s a process).
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from typing import Iterable

from data_shards import storage
from data_shards.manifest import ShardInfo, encode_index

OWNER, MODE = "maepipe", 0o444


def tar_bytes(samples: Iterable[dict]) -> tuple[bytes, list[int]]:
    """Samples ({'__key__': str, ext: bytes, ...}) -> (tar bytes, n+1 sample start offsets).

    Members are KEY.EXT in sorted extension order; keys starting with '_' are metadata, not stored.
    """
    buf = io.BytesIO()
    offsets = []
    with tarfile.open(fileobj=buf, mode="w|") as tar:
        for sample in samples:
            offsets.append(tar.offset)
            key = sample["__key__"]
            for ext in sorted(sample):
                if ext.startswith("_"):
                    continue
                data = sample[ext]
                data = data.encode() if isinstance(data, str) else data
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, MODE, OWNER, OWNER
                tar.addfile(info, io.BytesIO(data))
        offsets.append(tar.offset)
    return buf.getvalue(), offsets


def write_shard(dest: str, rel_path: str, samples: Iterable[dict]) -> ShardInfo:
    """Write DEST/rel_path and DEST/rel_path.idx; the tar is whole before its name appears."""
    data, offsets = tar_bytes(samples)
    storage.write_atomic(storage.join(dest, rel_path), data)
    storage.write_atomic(storage.join(dest, rel_path + ".idx"), encode_index(offsets))
    return ShardInfo(path=rel_path, samples=len(offsets) - 1, bytes=len(data),
                     sha256=hashlib.sha256(data).hexdigest(), index=rel_path + ".idx")
