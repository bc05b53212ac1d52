"""List a source into items: what each output sample will be read from, decided before any work.

Kinds (picked from what SRC holds):
- folder: images under a folder, recursively. Class subfolders become labels (sorted names, as in
  ImageNet's train layout); top-level train/val/test folders become the source's own splits.
- list: a CSV or JSONL file with a path column (path/url/file/image) and optional label
  (integer or class name) and split columns; relative paths are relative to the list's folder.
- idx: Fashion-MNIST/MNIST idx(.gz) files; train-* is the train split, t10k-*/test-* is val.
- tar: existing WebDataset tars (a folder of them, one tar, or a maepipe dataset), re-sharded.
An item is a plain tuple so that plans of millions of items stay small and quick to pickle.
"""

from __future__ import annotations

import csv
import functools
import gzip
import io
import json
import os
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from data_shards import storage
from data_shards.tars import IMAGE_EXTS as TAR_IMAGE_EXTS
from data_shards.tars import image_ext, scan_tar

IMAGE_EXTS = {f".{e}" for e in TAR_IMAGE_EXTS} | {".gif"}
FOLDER_SPLITS = {"train": "train", "val": "val", "validation": "val", "valid": "val", "test": "test"}
IDX_SPLITS = {"train": "train", "t10k": "val", "test": "val"}
PATH_COLUMNS = ("path", "url", "file", "filename", "image")
LABEL_COLUMNS = ("label", "cls", "class")
FASHION_MNIST = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot"]


class SourceError(ValueError):
    """SRC is missing or cannot be read as any source kind; the message says what was expected."""


class Item(NamedTuple):
    kind: str
    """'file', 'idx' or 'tar': how the builder reads it."""
    ref: str
    """File URL, idx images URL, or tar URL."""
    pos: int
    """idx: image number; tar: first byte of the sample; file: 0."""
    end: int
    """tar: end of the sample's bytes; else 0."""
    label: int
    """-1 when unlabelled."""
    size: int
    """Estimated stored bytes, for --shard-bytes (0 when unknown)."""
    split: str
    """The source's own split, '' when it has none."""


@dataclass
class Listing:
    kind: str
    items: list[Item]
    classes: list[str] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    """Files refused while listing (unsupported extensions), as rejected.jsonl rows."""
    lossless: bool = False
    """Raw pixels (idx): stored as PNG by default, since JPEG would change them."""


def _url(fs, path: str) -> str:
    """A listed path back to a URL (local paths stay plain paths)."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return path if "file" in protocols else fs.unstrip_protocol(path)


def _ext(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def _is_idx(path: str) -> bool:
    return "-images-idx" in path.rsplit("/", 1)[-1]


def list_source(src: str, need_sizes: bool = False) -> Listing:
    """Detect SRC's kind and list it; raises SourceError when SRC is missing or of no known kind."""
    fs, path = storage.filesystem(src)
    try:
        found = storage.retry(lambda: fs.exists(path), f"stat {src}")
    except PermissionError as err:
        raise SourceError(f"source {src} cannot be read: {err} (check the credentials)") from err
    if not found:
        raise SourceError(f"source {src} does not exist: give an image folder, a CSV/JSONL file list, "
                          "idx(.gz) files or WebDataset tars")
    if not fs.isdir(path):
        ext = _ext(path.removesuffix(".gz"))
        if _is_idx(path):
            return list_idx(src, [path], fs)
        if ext in (".csv", ".jsonl", ".json"):
            return list_file_list(src, need_sizes)
        if ext == ".tar":
            return list_tars(src, [path], fs)
        raise SourceError(f"source {src} is a file of no known kind: a file list must end in .csv or .jsonl, "
                          "idx files must be named like train-images-idx3-ubyte(.gz), shards like *.tar")
    files = storage.retry(lambda: fs.find(path, detail=True), f"list {src}")
    names = sorted(files)
    idx = [p for p in names if _is_idx(p)]
    if idx:
        return list_idx(src, idx, fs)
    if storage.exists(storage.join(src, "manifest.json")) or any(p.endswith(".tar") for p in names) \
            and not any(_ext(p) in IMAGE_EXTS for p in names):
        return list_tars(src, [p for p in names if p.endswith(".tar")], fs)
    return list_folder(src, path, {p: files[p] for p in names}, fs)


def list_folder(src: str, root: str, files: dict[str, dict], fs) -> Listing:
    root = root.rstrip("/")
    rel = {p: p[len(root) + 1:] for p in files}
    rel = {p: r for p, r in rel.items() if not any(part.startswith(".") for part in r.split("/"))}
    if not rel:
        raise SourceError(f"source folder {src} holds no files")
    tops = {r.split("/", 1)[0] for r in rel.values() if "/" in r}
    has_splits = bool(tops) and all(r.count("/") >= 1 for r in rel.values()) and tops <= set(FOLDER_SPLITS)
    depth = 1 if has_splits else 0
    labelled = all(r.count("/") >= depth + 1 for r in rel.values())
    class_names = sorted({r.split("/")[depth] for r in rel.values()}) if labelled else []
    class_of = {name: i for i, name in enumerate(class_names)}
    items, rejected = [], []
    for p, r in rel.items():
        parts = r.split("/")
        split = FOLDER_SPLITS[parts[0]] if has_splits else ""
        url = _url(fs, p)
        if _ext(p) not in IMAGE_EXTS:
            rejected.append({"source": url, "reason": f"unsupported format ({_ext(p) or 'no extension'})"})
            continue
        label = class_of[parts[depth]] if labelled else -1
        items.append(Item("file", url, 0, 0, label, int(files[p].get("size") or 0), split))
    return Listing("folder", items, class_names, rejected)


def _read_rows(src: str) -> list[dict]:
    text = storage.read_bytes(src).decode("utf-8-sig")
    if _ext(src) == ".csv":
        return list(csv.DictReader(io.StringIO(text)))
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise SourceError(f"{src} line {n} is not JSON ({err}); a JSONL list has one object per line") from err
    return rows


def list_file_list(src: str, need_sizes: bool) -> Listing:
    rows = _read_rows(src)
    if not rows:
        raise SourceError(f"file list {src} has no rows")
    columns = set(rows[0])
    path_col = next((c for c in PATH_COLUMNS if c in columns), None)
    if path_col is None:
        raise SourceError(f"file list {src} has no path column: name one of {', '.join(PATH_COLUMNS)} "
                          f"(it has {', '.join(sorted(columns))})")
    label_col = next((c for c in LABEL_COLUMNS if c in columns), None)
    base = src.rsplit("/", 1)[0] if "/" in src else "."
    raw_labels = [str(r.get(label_col, "")).strip() if label_col else "" for r in rows]
    given = [v for v in raw_labels if v != ""]
    numeric = all(v.lstrip("-").isdigit() for v in given)
    if numeric:
        classes = [str(i) for i in range(max(map(int, given)) + 1)] if given else []
        label_of = {v: int(v) for v in given}
    else:
        classes = sorted(set(given))
        label_of = {v: i for i, v in enumerate(classes)}
    urls = []
    for r in rows:
        p = str(r[path_col]).strip()
        urls.append(p if "://" in p or p.startswith("/") else storage.join(base, p))
    sizes = _sizes(urls) if need_sizes else [int(r.get("size") or 0) for r in rows]
    items, rejected = [], []
    for url, r, label, size in zip(urls, rows, raw_labels, sizes):
        split = FOLDER_SPLITS.get(str(r.get("split", "")).strip().lower(), str(r.get("split", "")).strip())
        if _ext(url) not in IMAGE_EXTS:
            rejected.append({"source": url, "reason": f"unsupported format ({_ext(url) or 'no extension'})"})
            continue
        items.append(Item("file", url, 0, 0, label_of.get(label, -1), size, split))
    return Listing("list", items, classes, rejected)


def _sizes(urls: list[str]) -> list[int]:
    """File sizes for byte-bounded shards (a missing file counts 0 and is rejected when read)."""
    from concurrent.futures import ThreadPoolExecutor

    def size(url: str) -> int:
        fs, path = storage.filesystem(url)
        try:
            return int(fs.size(path) or 0)
        except (FileNotFoundError, PermissionError):
            return 0

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(size, urls))


def _idx_header(data: bytes, url: str) -> tuple[int, ...]:
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise SourceError(f"{url} is not an unsigned-byte idx file (bad magic number)")
    ndim = data[3]
    return tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))


@functools.lru_cache(maxsize=4)
def load_idx(url: str) -> np.ndarray:
    """The whole idx array (cached per process: each builder reads a file once, not once per shard)."""
    data = storage.read_bytes(url)
    if url.endswith(".gz"):
        data = gzip.decompress(data)
    shape = _idx_header(data, url)
    return np.frombuffer(data, np.uint8, offset=4 + 4 * len(shape)).reshape(shape)


def list_idx(src: str, image_paths: list[str], fs) -> Listing:
    items = []
    for p in sorted(image_paths):
        url = _url(fs, p)
        prefix = p.rsplit("/", 1)[-1].split("-images-idx", 1)[0]
        split = IDX_SPLITS.get(prefix, prefix)
        labels_url = url.replace("-images-idx3", "-labels-idx1")
        labels = load_idx(labels_url) if storage.exists(labels_url) else None
        shape = load_idx(url).shape
        if labels is not None and len(labels) != shape[0]:
            raise SourceError(f"{labels_url} has {len(labels)} labels for {shape[0]} images in {url}")
        size = int(np.prod(shape[1:]))
        items += [Item("idx", url, i, 0, int(labels[i]) if labels is not None else -1, size, split)
                  for i in range(shape[0])]
    labelled = [it.label for it in items if it.label >= 0]
    classes = FASHION_MNIST if "fashion" in src.lower() and labelled and max(labelled) < 10 else \
        [str(i) for i in range(max(labelled) + 1)] if labelled else []
    return Listing("idx", items, classes, lossless=True)


def list_tars(src: str, tar_paths: list[str], fs) -> Listing:
    from data_shards.manifest import read_manifest

    classes: list[str] = []
    tars: list[tuple[str, str]] = []  # (url, split)
    if fs.isdir(fs._strip_protocol(src)) and storage.exists(storage.join(src, "manifest.json")):
        manifest = read_manifest(src)
        classes = manifest.classes
        tars = [(manifest.shard_url(s), split) for split, shards in manifest.splits.items() for s in shards]
    else:
        for p in tar_paths:
            parent = p.rsplit("/", 2)[-2] if p.count("/") >= 1 else ""
            tars.append((_url(fs, p), FOLDER_SPLITS.get(parent, "")))
    if not tars:
        raise SourceError(f"source {src} holds no .tar shards")
    items, rejected = [], []
    for url, split in tars:
        tfs, tpath = storage.filesystem(url)
        try:
            with tfs.open(tpath, "rb", block_size=8 << 20) as f:
                samples = scan_tar(f, url)
        except ValueError as err:  # unsafe member names, or not a tar
            raise SourceError(str(err)) from err
        for s in samples:
            if not image_ext(s.exts):
                rejected.append({"source": f"{url}#{s.key}", "reason": f"no image in sample (has {', '.join(s.exts)})"})
                continue
            items.append(Item("tar", url, s.start, s.end, s.label, s.end - s.start, split))
    if not classes:
        labelled = [it.label for it in items if it.label >= 0]
        classes = [str(i) for i in range(max(labelled) + 1)] if labelled else []
    return Listing("tar", items, classes, rejected)
