"""Sharding throughput: `maepipe shard` (1 and 2 workers) beside a plain single-process
`webdataset.ShardWriter` loop over the same JPEG files, at two dataset sizes (memory must stay flat).

The photos are real: crops of scikit-image's bundled photos at ImageNet-like sizes (about
300-500 x 250-400 px, JPEG quality 90), flipped and cropped so that every file differs. The sharder
copies them byte for byte after a full decode check (no resize asked), so the peer does the same
I/O minus the checks, the planning, the shuffle, the json member and the manifest. Each run is a
fresh process, timed from the call (imports excluded, the pool's start included); peak RSS is the
largest process of the run (the pool's workers included). Best of --repeats interleaved runs.

    python benchmarks/shard_throughput.py [--sizes 1000 3000] [--repeats 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_photos(folder: Path, n: int, seed: int = 0) -> None:
    import numpy as np
    import simplejpeg
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.hubble_deep_field()]
    rng = np.random.default_rng(seed)
    for i in range(n):
        photo = photos[i % len(photos)]
        h = int(rng.integers(250, min(400, photo.shape[0]) + 1))
        w = int(rng.integers(300, min(500, photo.shape[1]) + 1))
        y = int(rng.integers(0, photo.shape[0] - h + 1))
        x = int(rng.integers(0, photo.shape[1] - w + 1))
        crop = photo[y:y + h, x:x + w, :3]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        cls = folder / f"class{i % 10}"
        cls.mkdir(parents=True, exist_ok=True)
        (cls / f"{i:07d}.jpg").write_bytes(simplejpeg.encode_jpeg(np.ascontiguousarray(crop), quality=90))


# Each measured run is one of these, executed in a fresh interpreter that reports its own timing.
RUNNER = r"""
import json, resource, sys, time
kind, src, dest, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
if kind == "peer":
    import glob, os
    import webdataset as wds
    files = sorted(glob.glob(f"{src}/*/*.jpg"))
    os.makedirs(dest, exist_ok=True)
    t0 = time.perf_counter()
    with wds.ShardWriter(f"{dest}/peer-%06d.tar", maxcount=1000, verbose=0) as sink:
        for i, path in enumerate(files):
            with open(path, "rb") as f:
                sink.write({"__key__": f"{i:09d}", "jpg": f.read(), "cls": path.split("/")[-2].encode()})
    n = len(files)
else:
    from data_shards.shard import ShardOptions, run_shard
    t0 = time.perf_counter()
    m = run_shard(src, dest, ShardOptions(workers=workers, progress=False))
    n = m.num_samples("train")
seconds = time.perf_counter() - t0
kib = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print(json.dumps({"images": n, "seconds": seconds, "peak_rss_mib": kib / 1024}))
"""


def measure(kind: str, src: Path, dest: Path, workers: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", RUNNER, kind, str(src), str(dest), str(workers)], env=env,
                         check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["images_per_s"] = result["images"] / result["seconds"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 3000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    work = Path(args.out or tempfile.mkdtemp(prefix="shard-bench-"))
    rows = []
    for n in args.sizes:
        src = work / f"photos-{n}"
        if not src.exists():
            make_photos(src, n)
        mib = sum(p.stat().st_size for p in src.rglob("*.jpg")) / 2**20
        runs: dict[str, list[dict]] = {"peer": [], "1": [], "2": []}
        # interleaved repeats, best of each: the machine is shared, so single runs are noisy
        for r in range(args.repeats):
            runs["peer"].append(measure("peer", src, work / f"peer-{n}-{r}", 1))
            for workers in (1, 2):
                runs[str(workers)].append(measure("maepipe", src, work / f"ours-{n}-{workers}-{r}", workers))
        best = {k: max(v, key=lambda x: x["images_per_s"]) for k, v in runs.items()}
        for workers in (1, 2):
            rows.append((n, mib, workers, best[str(workers)], best["peer"]))
    print("| images | MiB | maepipe workers | maepipe img/s | ShardWriter img/s | ratio | maepipe peak RSS MiB | ShardWriter peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for n, mib, workers, ours, peer in rows:
        print(f"| {n} | {mib:.0f} | {workers} | {ours['images_per_s']:.0f} | {peer['images_per_s']:.0f} | "
              f"{ours['images_per_s'] / peer['images_per_s']:.2f} | {ours['peak_rss_mib']:.0f} | {peer['peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
