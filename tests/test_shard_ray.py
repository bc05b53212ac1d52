"""The Ray executor: one task per shard gives the bytes the local pool gives, in-process on a
local Ray and as a real `ray job submit` to a `ray start --head` cluster."""

from __future__ import annotations

import json
import subprocess

import pytest

from data_shards.manifest import read_manifest
from data_shards.shard import ShardOptions, run_shard
from tests.conftest import subprocess_env
from tests.shard_data import image_folder, idx_files

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def shas(manifest) -> dict:
    return {split: [s.sha256 for s in shards] for split, shards in manifest.splits.items()}


def test_ray_executor_matches_local_pool(tmp_path, monkeypatch):
    import ray

    from tests.servers import ray_env

    for k, v in ray_env().items():
        monkeypatch.setenv(k, v)
    src = image_folder(tmp_path / "src", per_class=6)
    opts = dict(shard_samples=4, val_fraction=0.2, seed=1, max_side=40, progress=False)
    local = run_shard(str(src), str(tmp_path / "local"), ShardOptions(workers=2, **opts))
    ray.init(address="local", num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False,
             log_to_driver=False)
    try:
        on_ray = run_shard(str(src), str(tmp_path / "ray"), ShardOptions(executor="ray", **opts))
    finally:
        ray.shutdown()
    assert shas(on_ray) == shas(local) and len(on_ray.shards("train")) == 4
    strip = lambda m: {**json.loads(m.to_json()), "created": ""}  # noqa: E731
    assert {**strip(on_ray), "source": ""} == {**strip(local), "source": ""}


def test_ray_job_submit_shards_idx(tmp_path, ray_head):
    src = idx_files(tmp_path / "fashion-mnist", n_train=30, n_test=10)
    dest = tmp_path / "out"
    run = subprocess.run(
        ["ray", "job", "submit", "--address", ray_head.dashboard, "--",
         "python", "-m", "jobs.shard_job", str(src), str(dest), "--shard-samples", "8", "--no-progress"],
        env=subprocess_env(**ray_head.env()), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert "succeeded" in run.stdout
    manifest = read_manifest(str(dest))
    assert manifest.num_samples("train") == 30 and manifest.num_samples("val") == 10
    assert manifest.options["lossless"] is True and len(manifest.shards("train")) == 4
    local = run_shard(str(src), str(tmp_path / "local"), ShardOptions(shard_samples=8, workers=1, progress=False))
    assert shas(manifest) == shas(local)
