"""`run_shard(src, dest, options) -> Manifest`: the whole sharding run, as the CLI, the demo and
the Ray job call it.

Order of work: check SRC and DEST (clear errors before anything is written), list the source,
plan every shard up front, record the plan in DEST/_plan.json, build the shards that have no
done-record yet (all of them, unless resuming), then write DEST/rejected.jsonl and, last and
atomically, DEST/manifest.json, and remove the run's scratch files.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from data_shards import storage
from data_shards.build import PROGRESS_DIR
from data_shards.executors import EXECUTORS
from data_shards.images import ImageOptions
from data_shards.manifest import MANIFEST_NAME, Manifest, ShardInfo, manifest_url, read_manifest, write_manifest
from data_shards.plan import ShardSpec, fingerprint, make_plan
from data_shards.progress import Progress
from data_shards.sources import Listing, SourceError, list_source
from pipeline.config import ConfigError

log = logging.getLogger("data_shards")
PLAN_NAME = "_plan.json"
REJECTED_NAME = "rejected.jsonl"


@dataclass
class ShardOptions:
    shard_samples: int = 1000
    """Most samples per shard (--shard-samples)."""
    shard_bytes: int = 0
    """Most source bytes per shard, estimated from file sizes when planning (--shard-bytes); 0: no bound."""
    max_side: int = 0
    """Shrink images whose bounded side exceeds this many pixels (--max-side); 0 keeps sizes."""
    resize_side: str = "longer"
    """Which side --max-side bounds: 'longer' or 'shorter' (--resize-side)."""
    quality: int = 90
    """JPEG quality for re-encoded images, 1-100 (--quality)."""
    lossless: bool | None = None
    """Store PNG instead of JPEG (--lossless); None: PNG for raw-pixel sources (idx), JPEG otherwise."""
    decode_check: bool = False
    """Fully decode JPEGs that are copied unchanged (--decode-check); else header + end-marker checks only."""
    seed: int = 0
    """Seed of the val draw and the global shuffle (--seed)."""
    shuffle: bool = True
    """Shuffle each split globally before cutting it into shards (--no-shuffle keeps source order)."""
    val_fraction: float = 0.0
    """Draw this fraction of all samples into a val split (--val-fraction); 0 keeps the source's splits."""
    classes: list[str] = field(default_factory=list)
    """Class names overriding the source's (--classes); label i is classes[i]."""
    executor: str = "local"
    """'local' (process pool) or 'ray' (one task per shard) (--executor)."""
    workers: int = 0
    """Local processes, or Ray tasks in flight (--workers); 0: one per CPU."""
    ray_address: str = ""
    """Ray cluster to use with --executor ray ('' : RAY_ADDRESS, else a new local cluster)."""
    resume: bool = False
    """Finish an interrupted run in DEST, building only the shards it lacks (--resume)."""
    progress: bool = True
    """Show a progress bar (or log lines when not on a terminal)."""

    def check(self) -> None:
        if self.shard_samples < 1:
            raise ConfigError(f"--shard-samples must be at least 1 (got {self.shard_samples})")
        if self.shard_bytes < 0:
            raise ConfigError(f"--shard-bytes must be >= 0 (got {self.shard_bytes}); 0 means no byte bound")
        if self.max_side < 0:
            raise ConfigError(f"--max-side must be >= 0 pixels (got {self.max_side}); 0 keeps sizes")
        if self.resize_side not in ("longer", "shorter"):
            raise ConfigError(f"--resize-side must be 'longer' or 'shorter' (got {self.resize_side!r})")
        if not 1 <= self.quality <= 100:
            raise ConfigError(f"--quality must be in 1..100 (got {self.quality})")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"--val-fraction must be in [0, 1) (got {self.val_fraction})")
        if self.executor not in EXECUTORS:
            raise ConfigError(f"--executor must be one of {', '.join(EXECUTORS)} (got {self.executor!r})")
        if self.workers < 0:
            raise ConfigError(f"--workers must be >= 0 (got {self.workers}); 0 uses every CPU")

    def recorded(self, lossless: bool) -> dict:
        """The options that decide the output bytes (stored in the manifest); not where it ran."""
        out = {k: v for k, v in asdict(self).items()
               if k not in ("executor", "workers", "ray_address", "resume", "progress", "classes")}
        out["lossless"] = lossless
        return out


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def check_source(src: str) -> None:
    fs, path = storage.filesystem(src)
    try:
        found = storage.retry(lambda: fs.exists(path), f"stat {src}")
    except (PermissionError, OSError) as err:
        raise ConfigError(f"source {src} cannot be read ({type(err).__name__}: {err}); check the path and "
                          "the credentials (AWS_* variables for s3://)") from err
    if not found:
        raise ConfigError(f"source {src} does not exist: give an image folder, a CSV/JSONL file list, "
                          "idx(.gz) files or WebDataset tars")


def check_writable(dest: str) -> None:
    """Write and delete a probe object, so an unwritable or unauthorized DEST fails before any work."""
    probe = storage.join(dest, f"_probe-{uuid.uuid4().hex[:8]}")
    try:
        storage.write_atomic(probe, b"maepipe write probe\n")
        fs, path = storage.filesystem(probe)
        storage.retry(lambda: fs.rm(path), f"delete {probe}")
    except (PermissionError, FileNotFoundError, OSError) as err:
        raise ConfigError(f"destination {dest} is not writable ({type(err).__name__}: {err}); check that the "
                          "folder or bucket exists and the credentials allow writing") from err


def _ours(name: str) -> bool:
    return name in (MANIFEST_NAME, PLAN_NAME, PROGRESS_DIR, REJECTED_NAME) or name.startswith(("_probe-", PLAN_NAME + ".tmp-"))


def check_dest_state(dest: str, fp: str, resume: bool) -> tuple[Manifest | None, dict | None]:
    """(finished manifest of this very plan, unfinished plan record to resume); errors on anything else."""
    if storage.exists(manifest_url(dest)):
        manifest = read_manifest(dest)
        if manifest.options.get("fingerprint") == fp:
            return manifest, None
        raise ConfigError(f"destination {dest} already holds a different dataset (made from "
                          f"{manifest.source or 'another source'}): choose another DEST or delete it")
    plan_url = storage.join(dest, PLAN_NAME)
    if storage.exists(plan_url):
        record = json.loads(storage.read_bytes(plan_url))
        if not resume:
            raise ConfigError(f"destination {dest} holds an unfinished run (from {record.get('source')}): "
                              "rerun with --resume to finish it, or delete DEST to start over")
        if record.get("fingerprint") != fp:
            raise ConfigError(f"--resume: the unfinished run in {dest} was made from another source or other "
                              f"options (source {record.get('source')}, options {record.get('options')}); "
                              "rerun with those, or delete DEST to start over")
        return None, record
    fs, path = storage.filesystem(dest)
    if fs.isdir(path):
        # object stores may list a folder marker for the folder itself: not content
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False, refresh=True)
                 if p.rstrip("/") != path.rstrip("/")]
        others = [n for n in names if not _ours(n)]
        if others:
            raise ConfigError(f"destination {dest} is not empty and holds no maepipe dataset (it has "
                              f"{others[0]}, ...): choose an empty DEST")
    return None, None


def _done_records(dest: str) -> dict[str, dict]:
    fs, path = storage.filesystem(storage.join(dest, PROGRESS_DIR))
    if not fs.isdir(path):
        return {}
    records = {}
    for p in fs.ls(path, detail=False, refresh=True):
        if p.endswith(".json"):
            record = json.loads(storage.read_bytes(storage.join(dest, PROGRESS_DIR, p.rsplit("/", 1)[-1])))
            records[record["name"]] = record
    return records


def _cleanup(dest: str) -> None:
    """Remove the run's scratch: done-records, the plan, and local temp files of killed writes."""
    fs, path = storage.filesystem(dest)
    for name in (PROGRESS_DIR, PLAN_NAME):
        p = f"{path.rstrip('/')}/{name}"
        if fs.exists(p):
            fs.rm(p, recursive=True)
    if storage.is_remote(dest):
        fs.invalidate_cache()
        if fs.exists(f"{path.rstrip('/')}/{PROGRESS_DIR}"):
            # some object stores (SeaweedFS) keep an emptied folder as a 'name/' marker object
            fs.rm_file(f"{path.rstrip('/')}/{PROGRESS_DIR}/")
    else:
        for p in fs.glob(f"{path.rstrip('/')}/*/*.tmp-*"):
            fs.rm(p)


@dataclass
class Run:
    """A planned run in DEST: what prepare() found and decided, shared by run_shard and build_group."""
    src: str
    dest: str
    options: ShardOptions
    listing: Listing
    specs: list[ShardSpec]
    recorded: dict
    fingerprint: str
    created: str
    records: dict[str, dict]
    """Done-records of the shards already built (name -> record)."""
    finished: Manifest | None = None
    """DEST already holds this very dataset."""
    t0: float = field(default_factory=time.perf_counter)


def prepare(src: str, dest: str, options: ShardOptions, share: bool = False) -> Run:
    """Check SRC and DEST, list, plan, and record the plan in DEST. share=True (array tasks) joins an
    unfinished run of the same plan without --resume, since the other tasks of the array write it too."""
    options.check()
    src, dest = src.rstrip("/"), dest.rstrip("/")
    t0 = time.perf_counter()
    check_source(src)
    check_writable(dest)
    try:
        listing = list_source(src, need_sizes=options.shard_bytes > 0)
    except SourceError as err:
        raise ConfigError(str(err)) from err
    lossless = listing.lossless if options.lossless is None else options.lossless
    recorded = options.recorded(lossless)
    specs = make_plan(listing, options.shard_samples, options.shard_bytes, options.val_fraction, options.seed,
                      options.shuffle)
    fp = fingerprint(specs, src, recorded)
    log.info("%s: %s source, %d items (%d refused while listing) -> %d shards, planned in %.1fs", src,
             listing.kind, len(listing.items), len(listing.rejected), len(specs), time.perf_counter() - t0)
    finished, unfinished = check_dest_state(dest, fp, options.resume or share)
    run = Run(src, dest, options, listing, specs, recorded, fp, unfinished["created"] if unfinished else _now(),
              {}, finished, t0)
    if finished is None:
        if unfinished is None:
            storage.write_atomic(storage.join(dest, PLAN_NAME), json.dumps(
                {"fingerprint": fp, "created": run.created, "source": src, "options": recorded}).encode())
        else:
            run.records = _done_records(dest)
    return run


def build(run: Run, specs: list[ShardSpec]) -> Progress:
    """Build the given shards that have no done-record yet, with the run's executor."""
    todo = [s for s in specs if s.name not in run.records]
    if len(todo) < len(specs):
        log.info("resuming: %d of %d shards already done, building %d", len(specs) - len(todo), len(specs),
                 len(todo))
    progress = Progress(len(todo), sum(len(s.items) for s in todo), enabled=run.options.progress)

    def on_done(record: dict) -> None:
        run.records[record["name"]] = record
        shard = record["shard"] or {"samples": 0, "bytes": 0}
        progress.update(shard["samples"], shard["bytes"], len(record["rejected"]))

    opts = run.options
    image_opts = ImageOptions(opts.max_side, opts.resize_side, opts.quality, run.recorded["lossless"],
                              opts.decode_check)
    try:
        EXECUTORS[opts.executor](run.dest, todo, image_opts, opts.workers, on_done, opts.ray_address)
    finally:
        progress.close()
    return progress


def finalize(run: Run, progress: Progress | None = None) -> Manifest:
    """rejected.jsonl, then the manifest (last, atomic), then remove the scratch files."""
    splits: dict[str, list[ShardInfo]] = {}
    rejected = list(run.listing.rejected)
    for spec in run.specs:
        record = run.records[spec.name]
        if record["shard"]:
            splits.setdefault(spec.split, []).append(ShardInfo(**record["shard"]))
        rejected += record["rejected"]
    storage.write_atomic(storage.join(run.dest, REJECTED_NAME),
                         "".join(json.dumps(r, sort_keys=True) + "\n" for r in rejected).encode())
    manifest = Manifest(splits, run.options.classes or run.listing.classes, run.src,
                        {**run.recorded, "fingerprint": run.fingerprint}, run.created)
    manifest.url = write_manifest(run.dest, manifest)
    _cleanup(run.dest)
    elapsed = time.perf_counter() - run.t0
    images, nbytes = (progress.images, progress.bytes) if progress else (0, 0)
    log.info("wrote %d samples in %d shards to %s (%s); rejected %d (listed in %s); %.1fs, %.0f img/s, %.1f MiB/s",
             sum(s.samples for v in splits.values() for s in v), sum(len(v) for v in splits.values()), run.dest,
             ", ".join(f"{k} {sum(s.samples for s in v)}" for k, v in splits.items()), len(rejected),
             storage.join(run.dest, REJECTED_NAME), elapsed, images / max(elapsed, 1e-9),
             nbytes / max(elapsed, 1e-9) / 2**20)
    return manifest


def run_shard(src: str, dest: str, options: ShardOptions | None = None) -> Manifest:
    """Shard SRC into DEST (see the module doc); returns the manifest written to DEST/manifest.json.

    Raises ConfigError for a bad option, a missing source, an unwritable DEST or a DEST holding
    something else, all before any shard is written.
    """
    run = prepare(src, dest, options or ShardOptions())
    if run.finished is not None:
        log.info("%s already holds this dataset (same source, options and plan): nothing to do", run.dest)
        _cleanup(run.dest)
        return run.finished
    return finalize(run, build(run, run.specs))


def group_specs(specs: list[ShardSpec], index: int, count: int) -> list[ShardSpec]:
    """The index-th of count contiguous, near-equal groups of the planned shards."""
    lo, hi = len(specs) * index // count, len(specs) * (index + 1) // count
    return specs[lo:hi]


def build_group(src: str, dest: str, index: int, count: int, options: ShardOptions | None = None) -> int:
    """Build only group index/count of the plan (a Slurm array task); returns how many shards it holds.

    Every task plans the same shards, so the groups partition them; once all tasks are done,
    `run_shard(..., resume=True)` (or `maepipe shard SRC DEST --resume`) writes the manifest.
    """
    if not 0 <= index < count:
        raise ConfigError(f"--group {index}/{count}: the index must be in 0..{count - 1}")
    run = prepare(src, dest, options or ShardOptions(), share=True)
    if run.finished is not None:
        return 0
    mine = group_specs(run.specs, index, count)
    build(run, mine)
    log.info("group %d/%d: %d shards done; when every group is, finish with `maepipe shard %s %s --resume`",
             index, count, len(mine), run.src, run.dest)
    return len(mine)
