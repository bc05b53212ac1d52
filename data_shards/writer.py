"""Write one shard: a WebDataset tar, its offsets index and its ShardInfo.

Tars are byte-reproducible (fixed mtime, owner and mode), so the same samples give the same
sha256 whichever executor or process writes them.
"""

from __future__ import annotations

import hashlib
import io
from typing import Iterable

import webdataset as wds

from data_shards import storage
from data_shards.manifest import ShardInfo, encode_index


def tar_bytes(samples: Iterable[dict]) -> tuple[bytes, list[int]]:
    """Samples ({'__key__': str, ext: bytes, ...}) -> (tar bytes, n+1 sample start offsets)."""
    buf = io.BytesIO()
    offsets = []
    writer = wds.TarWriter(buf, encoder=False, mtime=0, user="maepipe", group="maepipe", mode=0o444)
    for sample in samples:
        offsets.append(writer.tarstream.offset)
        writer.write(sample)
    offsets.append(writer.tarstream.offset)
    writer.close()
    return buf.getvalue(), offsets


def write_shard(dest: str, rel_path: str, samples: Iterable[dict]) -> ShardInfo:
    """Write DEST/rel_path and DEST/rel_path.idx; the tar is whole before its name appears."""
    data, offsets = tar_bytes(samples)
    storage.write_atomic(storage.join(dest, rel_path), data)
    storage.write_atomic(storage.join(dest, rel_path + ".idx"), encode_index(offsets))
    return ShardInfo(path=rel_path, samples=len(offsets) - 1, bytes=len(data),
                     sha256=hashlib.sha256(data).hexdigest(), index=rel_path + ".idx")
