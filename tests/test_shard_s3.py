"""Sharding to and from s3:// on a real SeaweedFS server (started by the session fixture)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from data_shards import storage
from data_shards.manifest import read_manifest
from data_shards.shard import ShardOptions, run_shard
from tests.conftest import subprocess_env
from tests.shard_data import image_folder, read_split

pytestmark = pytest.mark.integration


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "shard", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_shards_to_s3_and_verifies(tmp_path, seaweedfs, s3_bucket):
    src = image_folder(tmp_path / "src", per_class=5)
    (src / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    dest = f"{s3_bucket}/datasets/pets"
    env = subprocess_env(**seaweedfs.env())
    run = cli(src, dest, "--shard-samples", "4", "--val-fraction", "0.2", "--workers", "2", "--max-side", "40",
              env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "train: 13 samples" in run.stdout and "val: 2 samples" in run.stdout  # broken.jpg was drawn into val
    check = cli("verify", dest, "--decode", env=env)
    assert check.returncode == 0 and "OK" in check.stdout, check.stdout + check.stderr
    rejected = storage.read_bytes(f"{dest}/rejected.jsonl").decode().splitlines()
    assert [json.loads(r)["source"].rsplit("/", 1)[-1] for r in rejected] == ["broken.jpg"]
    assert not storage.exists(f"{dest}/_plan.json") and not storage.exists(f"{dest}/_progress")

    # the same options on a local path give the same bytes
    local = run_shard(str(src), str(tmp_path / "local"), ShardOptions(
        shard_samples=4, val_fraction=0.2, workers=1, max_side=40, progress=False))
    remote = read_manifest(dest)
    assert {k: [s.sha256 for s in v] for k, v in remote.splits.items()} == \
           {k: [s.sha256 for s in v] for k, v in local.splits.items()}
    assert len(read_split(remote, "val")) == 2


def test_file_list_of_s3_urls(tmp_path, seaweedfs, s3_bucket):
    src = image_folder(tmp_path / "src", per_class=3)
    lines = []
    for i, p in enumerate(sorted(src.rglob("*.*"))):
        key = f"raw/{p.parent.name}/{p.name}"
        storage.write_atomic(f"{s3_bucket}/{key}", p.read_bytes())
        # half the rows relative to the list's folder, half as full URLs
        lines.append({"path": key if i % 2 else f"{s3_bucket}/{key}", "label": p.parent.name})
    storage.write_atomic(f"{s3_bucket}/list.jsonl", "".join(json.dumps(r) + "\n" for r in lines).encode())
    manifest = run_shard(f"{s3_bucket}/list.jsonl", str(tmp_path / "out"), ShardOptions(workers=2, progress=False))
    assert manifest.num_samples("train") == 9 and manifest.classes == ["cat", "dog", "fish"]
    for sample in read_split(manifest, "train"):
        url = json.loads(sample["json"])["source"]
        assert url.startswith("s3://")
        if url.endswith(".jpg"):
            assert storage.read_bytes(url) == sample["jpg"]


def test_unauthorized_destination_fails_before_work(tmp_path, seaweedfs, s3_bucket):
    src = image_folder(tmp_path / "src", per_class=1)
    wrong = subprocess_env(**{**seaweedfs.env(), "AWS_SECRET_ACCESS_KEY": "not-the-secret"})
    run = cli(src, f"{s3_bucket}/ds", env=wrong)
    assert run.returncode == 2 and "not writable" in run.stderr, run.stderr[-2000:]
    unknown = subprocess_env(**{**seaweedfs.env(), "AWS_ACCESS_KEY_ID": "nobody"})
    run = cli(src, f"{s3_bucket}/ds", env=unknown)
    assert run.returncode == 2 and "not writable" in run.stderr, run.stderr[-2000:]
    fs, path = storage.filesystem(s3_bucket)
    assert fs.ls(path, refresh=True) == []
