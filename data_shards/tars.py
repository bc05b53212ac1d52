"""Walk a WebDataset tar: its samples as byte spans, with safe member names only.

A sample is a run of consecutive members sharing a key (webdataset's rule: the key is the path up
to the first dot of the file name). Its span runs from its first member's header to the end of its
last member's data, so `bytes[start:end]` parses on its own (what the `.idx` sidecar relies on).
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import BinaryIO

# webdataset's key/extension split: "dir/a.b.jpg" -> ("dir/a", "b.jpg")
KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff")


class UnsafeTarError(ValueError):
    """A tar member whose name would escape the extraction folder (absolute or with '..')."""


@dataclass
class TarSample:
    key: str
    start: int
    end: int
    exts: list[str]
    label: int = -1
    """From a `.cls` member (ASCII integer) or a `.json` member's "label"/"cls"; -1 when absent."""


def check_name(name: str, url: str) -> None:
    if name.startswith("/") or ".." in PurePosixPath(name).parts:
        raise UnsafeTarError(f"{url}: member {name!r} has an absolute path or '..'; refusing this tar "
                             "(rebuild it with relative member names)")


def _label(ext: str, data: bytes) -> int:
    try:
        if ext == "cls":
            return int(data.strip())
        if ext == "json":
            meta = json.loads(data)
            for name in ("label", "cls"):
                if isinstance(meta, dict) and isinstance(meta.get(name), int):
                    return meta[name]
    except (ValueError, UnicodeDecodeError):
        pass
    return -1


def scan_tar(fileobj: BinaryIO, url: str) -> list[TarSample]:
    """Samples of an uncompressed tar in file order. Raises UnsafeTarError on unsafe names."""
    samples: list[TarSample] = []
    try:
        tar = tarfile.open(fileobj=fileobj, mode="r:")
    except tarfile.ReadError as err:
        raise ValueError(f"{url} is not an uncompressed tar ({err}); decompress .tar.gz/.tgz shards first") from err
    with tar:
        for member in tar:
            check_name(member.name, url)
            if not member.isfile():
                continue
            match = KEY_EXT.match(member.name)
            if not match:
                continue
            key, ext = match.groups()
            # data blocks are padded to 512 bytes; the next header starts right after
            end = member.offset_data + -(-member.size // 512) * 512
            if samples and samples[-1].key == key:
                samples[-1].end = end
                samples[-1].exts.append(ext)
            else:
                samples.append(TarSample(key, member.offset, end, [ext]))
            if ext in ("cls", "json") and samples[-1].label < 0 and member.size < 1 << 20:
                samples[-1].label = _label(ext, tar.extractfile(member).read())
    return samples


def image_ext(exts: list[str]) -> str:
    """The sample's image extension ('' when it has none); lower-case match on the last part."""
    for ext in exts:
        if ext.rsplit(".", 1)[-1].lower() in IMAGE_EXTS:
            return ext
    return ""


def parse_samples(data: bytes, url: str = "") -> list[dict]:
    """Tar bytes (whole samples) -> [{'__key__', '__url__', ext: bytes, ...}] in file order, grouped
    by webdataset's key rule (stdlib tarfile: no webdataset/torch import in workers)."""
    samples: list[dict] = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            check_name(member.name, url)
            match = KEY_EXT.match(member.name) if member.isfile() else None
            if not match:
                continue
            key, ext = match.groups()
            if not samples or samples[-1]["__key__"] != key:
                samples.append({"__key__": key, "__url__": url})
            samples[-1][ext] = tar.extractfile(member).read()
    return samples
