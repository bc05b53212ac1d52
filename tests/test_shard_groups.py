"""Shard groups (what each Slurm array task builds): the groups partition the plan, concurrent
tasks share DEST, and the finishing --resume run gives the dataset a single run gives.

slurm/shard_array.sbatch is run here by bash with the variables Slurm sets for array tasks; it is
not submitted to a real Slurm in this test."""

from __future__ import annotations

import json
import subprocess
import sys

from data_shards.shard import ShardOptions, build_group, group_specs, run_shard
from tests.conftest import ROOT, subprocess_env
from tests.shard_data import image_folder


def body(dest) -> dict:
    out = json.loads((dest / "manifest.json").read_text())
    out.pop("created")
    return out


def test_groups_partition_the_plan():
    specs = list(range(10))
    groups = [group_specs(specs, i, 4) for i in range(4)]
    assert sum(groups, []) == specs and all(2 <= len(g) <= 3 for g in groups)
    assert sum((group_specs(specs, i, 16) for i in range(16)), []) == specs


def test_groups_then_resume_equal_one_run(tmp_path):
    src = image_folder(tmp_path / "src", per_class=5)
    opts = dict(shard_samples=2, max_side=40, workers=1, progress=False)
    dest = tmp_path / "grouped"
    assert [build_group(str(src), str(dest), i, 3, ShardOptions(**opts)) for i in (2, 0)] == [3, 2]
    assert not (dest / "manifest.json").exists()
    assert build_group(str(src), str(dest), 1, 3, ShardOptions(**opts)) == 3
    grouped = run_shard(str(src), str(dest), ShardOptions(resume=True, **opts))
    single = run_shard(str(src), str(tmp_path / "single"), ShardOptions(**opts))
    assert grouped.num_samples("train") == 15
    assert {**body(dest), "source": ""} == {**body(tmp_path / "single"), "source": ""}
    assert single.splits == grouped.splits


def test_sbatch_script_tasks_and_finalize(tmp_path):
    src = image_folder(tmp_path / "src", per_class=3)
    dest = tmp_path / "out"
    script = str(ROOT / "slurm" / "shard_array.sbatch")
    env = subprocess_env(MAEPIPE=f"{sys.executable} -m pipeline.cli", SLURM_ARRAY_TASK_MIN="0",
                         SLURM_ARRAY_TASK_COUNT="2", SLURM_CPUS_PER_TASK="1")
    for task in ("1", "0"):
        run = subprocess.run(["bash", script, str(src), str(dest), "--shard-samples", "3"], capture_output=True,
                             text=True, env={**env, "SLURM_ARRAY_TASK_ID": task})
        assert run.returncode == 0, run.stderr[-2000:]
        assert f"group {task}/2:" in run.stdout
    run = subprocess.run(["bash", script, "--finalize", str(src), str(dest), "--shard-samples", "3"],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "train: 9 samples in 3 shards" in run.stdout
    missing = subprocess.run(["bash", script, str(src), str(dest)], capture_output=True, text=True,
                             env=subprocess_env())
    assert missing.returncode != 0 and "job array" in missing.stderr
