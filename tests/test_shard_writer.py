"""The shard writer and reader without webdataset in the hot path still speak webdataset exactly."""

from __future__ import annotations

import io

import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_iterator

from data_shards.tars import parse_samples
from data_shards.writer import tar_bytes
from tests.shard_data import jpeg, photo_crops


def samples():
    crops = photo_crops(5, size=(20, 30))
    return [{"__key__": f"train-{i:09d}", "jpg": jpeg(c), "cls": str(i % 3).encode(),
             "json": b'{"source": "x"}'} for i, c in enumerate(crops)]


def test_tar_bytes_equal_webdataset_tarwriter():
    buf = io.BytesIO()
    writer = wds.TarWriter(buf, encoder=False, mtime=0, user="maepipe", group="maepipe", mode=0o444)
    offsets = []
    for sample in samples():
        offsets.append(writer.tarstream.offset)
        writer.write(sample)
    offsets.append(writer.tarstream.offset)
    writer.close()
    assert tar_bytes(samples()) == (buf.getvalue(), offsets)


def test_parse_samples_equals_webdataset_grouping():
    data, offsets = tar_bytes(samples())
    theirs = list(group_by_keys({**f, "__url__": "u"} for f in tar_file_iterator(io.BytesIO(data))))
    assert parse_samples(data, "u") == theirs
    # any run of whole samples parses on its own (what the .idx range reads rely on)
    assert parse_samples(data[offsets[1]:offsets[3]], "u") == theirs[1:3]
