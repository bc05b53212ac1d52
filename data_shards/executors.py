"""Run build_shard over the planned shards: a local process pool or one Ray task per shard.

Both call the same function on the same specs, so they write the same bytes; they differ only in
where the work runs. `on_done(record)` is called in the driver as each shard finishes (any order).
"""

from __future__ import annotations

import multiprocessing
import os
from itertools import islice
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Callable

from data_shards.build import build_shard
from data_shards.images import ImageOptions
from data_shards.plan import ShardSpec

OnDone = Callable[[dict], None]


def run_local(dest: str, specs: list[ShardSpec], opts: ImageOptions, workers: int, on_done: OnDone,
              ray_address: str = "") -> None:
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(specs) <= 1:
        for spec in specs:
            on_done(build_shard(dest, spec, opts))
        return
    # spawn, not fork: a forked child inherits s3fs sessions bound to the parent's event loop and hangs
    with ProcessPoolExecutor(min(workers, len(specs)), mp_context=multiprocessing.get_context("spawn")) as pool:
        # keep a bounded number in flight so that the items of a huge plan are pickled as needed
        queue = iter(specs)
        pending = {pool.submit(build_shard, dest, spec, opts) for spec in islice(queue, 2 * workers)}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                on_done(future.result())
            pending |= {pool.submit(build_shard, dest, spec, opts) for spec in islice(queue, len(done))}


def run_ray(dest: str, specs: list[ShardSpec], opts: ImageOptions, workers: int, on_done: OnDone,
            ray_address: str = "") -> None:
    """One task per shard on the cluster at ray_address (or RAY_ADDRESS, or a new local one)."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address=ray_address or None, include_dashboard=False, log_to_driver=False)
    try:
        task = ray.remote(num_cpus=1, max_retries=3)(build_shard)
        limit = workers * 2 if workers else max(2, int(ray.cluster_resources().get("CPU", 1)) * 2)
        queue = iter(specs)
        pending = [task.remote(dest, spec, opts) for spec in islice(queue, limit)]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            on_done(ray.get(done[0]))
            pending += [task.remote(dest, spec, opts) for spec in islice(queue, 1)]
    finally:
        if started:
            ray.shutdown()


EXECUTORS = {"local": run_local, "ray": run_ray}
