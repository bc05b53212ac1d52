"""`maepipe submit slurm`: the sbatch command it renders (no Slurm needed; tests/test_slurm.py submits for real)."""

from __future__ import annotations

import shlex
import subprocess
import sys

from tests.conftest import ROOT, subprocess_env


def dry_run(script: str, *args: str) -> tuple[int, str, str]:
    """--dry-run comes first: everything after the first positional belongs to the script."""
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "submit", "slurm", script, "--dry-run", *args],
                          env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=60)
    return done.returncode, done.stdout, done.stderr


def test_train_one_task_per_gpu_notice_and_env():
    rc, out, _ = dry_run("train", "--nodes", "4", "--gpus-per-node", "8", "--time", "24:00:00", "--notice-s", "600",
                         "--config", "configs/vit_large.toml", "data.manifest=s3://bucket/x", "train.steps=9")
    assert rc == 0
    words = shlex.split(out)
    assert "CONFIG=configs/vit_large.toml" in words and "RESUME=auto" in words
    assert words[words.index("sbatch"):] == [
        "sbatch", "--parsable", "--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--time=24:00:00",
        "--signal=B:USR1@600", str(ROOT / "slurm" / "train.sbatch"), "data.manifest=s3://bucket/x", "train.steps=9"]


def test_shard_array_and_ray_driver_keep_their_options():
    rc, out, _ = dry_run("shard", "--array-tasks", "16", "--cpus-per-task", "8", "SRC", "s3://b/d", "--max-side", "512")
    assert rc == 0
    assert shlex.split(out)[-5:] == [str(ROOT / "slurm" / "shard_array.sbatch"), "SRC", "s3://b/d", "--max-side", "512"]
    assert "--array=0-15" in out and "--cpus-per-task=8" in out
    rc, out, _ = dry_run("ray", "--nodes", "2", "python", "-m", "jobs.shard_job", "--executor", "ray")
    assert rc == 0
    assert shlex.split(out)[-6:] == [str(ROOT / "slurm" / "ray_cluster.sbatch"), "python", "-m", "jobs.shard_job",
                                     "--executor", "ray"]


def test_missing_arguments_are_usage_errors():
    rc, _, err = dry_run("ray")
    assert rc == 2 and "give the driver command" in err
    rc, _, err = dry_run("shard", "only-src")
    assert rc == 2 and "SRC DEST" in err
