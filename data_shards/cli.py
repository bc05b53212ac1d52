"""`maepipe shard`: three forms under one subcommand.

    maepipe shard SRC DEST [options]          images -> WebDataset shards + manifest
    maepipe shard verify DEST [--decode]      check every shard against the manifest
    maepipe shard index URL... [--out DEST]   manifest + .idx sidecars for foreign shards
"""

from __future__ import annotations

import argparse
import re
import sys

from pipeline.config import ConfigError

USAGE = """maepipe shard SRC DEST [options]
       maepipe shard verify DEST [--decode]
       maepipe shard index URL... [--out DEST] [--split NAME]"""

SIZE_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
              "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """'500MB', '1.5GiB', '4096' -> bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: use e.g. 4096, 500MB, 1GiB")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2).lower()])


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "shard", usage=USAGE, help="images to WebDataset shards; verify or index shards",
        description="Images (a folder, a CSV/JSONL file list, idx(.gz) files or WebDataset tars) to shuffled "
                    "WebDataset shards plus DEST/manifest.json on any fsspec URL (local, s3://, ...); "
                    "`verify` checks a dataset, `index` makes a manifest for shards made by other tools.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("targets", nargs="+", metavar="SRC DEST | verify DEST | index URL...")
    g = p.add_argument_group("sharding (SRC DEST)")
    g.add_argument("--shard-samples", type=int, default=1000, help="most samples per shard")
    g.add_argument("--shard-bytes", type=parse_size, default=0,
                   help="most source bytes per shard (e.g. 500MB), estimated when planning; 0: no bound")
    g.add_argument("--max-side", type=int, default=0, help="shrink images so this side is at most PX; 0: keep")
    g.add_argument("--resize-side", choices=["longer", "shorter"], default="longer", help="the side --max-side bounds")
    g.add_argument("--quality", type=int, default=90, help="JPEG quality when re-encoding")
    g.add_argument("--lossless", action="store_true", default=None,
                   help="store PNG (default: PNG for idx sources, JPEG otherwise)")
    g.add_argument("--decode-check", action="store_true",
                   help="fully decode JPEGs copied unchanged (slower; default checks header and end marker)")
    g.add_argument("--seed", type=int, default=0, help="seed of the val draw and the global shuffle")
    g.add_argument("--no-shuffle", dest="shuffle", action="store_false", help="keep source order")
    g.add_argument("--val-fraction", type=float, default=0.0,
                   help="draw this fraction into a val split; 0 keeps the source's own splits")
    g.add_argument("--classes", default="", help="class names, comma-separated, overriding the source's")
    g.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local process pool, or one Ray task per shard")
    g.add_argument("--workers", type=int, default=0, help="local processes or Ray tasks in flight; 0: one per CPU")
    g.add_argument("--ray-address", default="", help="Ray cluster for --executor ray (default: RAY_ADDRESS or a new local one)")
    g.add_argument("--resume", action="store_true", help="finish an interrupted run in DEST")
    g.add_argument("--group", default="", metavar="I/N",
                   help="build only the I-th of N groups of the planned shards (Slurm array tasks); "
                        "then one run with --resume writes the manifest")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar or lines")
    v = p.add_argument_group("verify DEST")
    v.add_argument("--decode", action="store_true", help="also decode every image")
    i = p.add_argument_group("index URL...")
    i.add_argument("--out", default="", help="where the manifest goes (default: the shards' common folder)")
    i.add_argument("--split", default="train", help="split for tars not in a train/val/test folder")
    p.set_defaults(func=handle)


def handle(args) -> int:
    form, rest = args.targets[0], args.targets[1:]
    if form == "verify":
        if len(rest) != 1:
            raise ConfigError("usage: maepipe shard verify DEST [--decode] (one DEST)")
        return run_verify(rest[0], args.decode)
    if form == "index":
        if not rest:
            raise ConfigError("usage: maepipe shard index URL... [--out DEST] (at least one URL)")
        return run_index(rest, args.out, args.split)
    if len(args.targets) != 2:
        raise ConfigError(f"usage: maepipe shard SRC DEST (got {len(args.targets)} paths: {' '.join(args.targets)})")
    return run_shard_cli(args)


def run_shard_cli(args) -> int:
    from data_shards.shard import ShardOptions, build_group, run_shard

    options = ShardOptions(
        shard_samples=args.shard_samples, shard_bytes=args.shard_bytes, max_side=args.max_side,
        resize_side=args.resize_side, quality=args.quality, lossless=args.lossless,
        decode_check=args.decode_check, seed=args.seed,
        shuffle=args.shuffle, val_fraction=args.val_fraction,
        classes=[c.strip() for c in args.classes.split(",")] if args.classes else [],
        executor=args.executor, workers=args.workers, ray_address=args.ray_address, resume=args.resume,
        progress=args.progress)
    src, dest = args.targets
    if args.group:
        index, _, count = args.group.partition("/")
        if not (index.isdigit() and count.isdigit() and int(count) > 0):
            raise ConfigError(f"--group must look like I/N, e.g. 3/16 (got {args.group!r})")
        built = build_group(src, dest, int(index), int(count), options)
        print(f"group {args.group}: {built} shards built; finish with `maepipe shard {src} {dest} --resume`")
        return 0
    manifest = run_shard(src, dest, options)
    for split, shards in manifest.splits.items():
        print(f"{split}: {sum(s.samples for s in shards)} samples in {len(shards)} shards, "
              f"{sum(s.bytes for s in shards) / 2**20:.1f} MiB")
    print(f"manifest: {manifest.url}")
    return 0


def run_verify(dest: str, decode: bool) -> int:
    from data_shards.verify import verify

    try:
        results = verify(dest, decode)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(str(err)) from err
    bad = 0
    for split, checks in results.items():
        for check in checks:
            if check.problems:
                bad += 1
                print(f"FAIL {check.path}: {'; '.join(check.problems)}")
        samples = sum(c.samples for c in checks)
        print(f"{split}: {len(checks)} shards, {samples} samples, {sum(c.bytes for c in checks) / 2**20:.1f} MiB, "
              f"{sum(1 for c in checks if c.problems)} bad")
    print(f"{'FAILED' if bad else 'OK'}: {bad} bad shard(s){' (images decoded)' if decode else ''}")
    return 1 if bad else 0


def run_index(urls: list[str], out: str, split: str) -> int:
    from data_shards.index import index_shards

    manifest = index_shards(urls, out, split)
    for name, shards in manifest.splits.items():
        print(f"{name}: {sum(s.samples for s in shards)} samples in {len(shards)} shards")
    print(f"manifest: {manifest.url}")
    return 0


if __name__ == "__main__":
    from pipeline.cli import main

    sys.exit(main(["shard", *sys.argv[1:]]))
