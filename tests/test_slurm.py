"""The sbatch scripts in slurm/, submitted to a real one-node Slurm cluster (slurm/local_cluster.sh).

Each test submits a script the way a user would and reads what Slurm and the run left behind:
job state, restart count, exit code, the job log and the run directory.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_shards.manifest import read_manifest
from tests.conftest import ROOT, subprocess_env
from tests.helpers import fashion_arrays, write_small_dataset

pytestmark = pytest.mark.integration

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "squeue", "sinfo", "scancel")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
HANG_GUARD_S = 600  # not a performance bound: only stops a stuck job from hanging the suite


def _found(name: str) -> bool:
    return bool(shutil.which(name) or os.access(f"/usr/sbin/{name}", os.X_OK))


@pytest.fixture(scope="session")
def slurm():
    """A one-node Slurm cluster for the session; yields the environment that points clients at it."""
    missing = [n for n in DAEMONS + CLIENTS if not _found(n)]
    if missing:
        pytest.skip(f"Slurm is not installed (missing {', '.join(missing)}): "
                    "apt-get install slurmctld slurmd slurm-client munge")
    # not under pytest's tmp folders: munged wants every folder above its socket searchable by all
    state = Path(tempfile.mkdtemp(prefix="maepipe-slurm-"))
    script = str(ROOT / "slurm" / "local_cluster.sh")
    subprocess.run([script, "start", str(state)], check=True, timeout=180)
    env = subprocess_env(SLURM_CONF=str(state / "slurm.conf"), PYTHON=sys.executable,
                         RAY=str(Path(sys.executable).parent / "ray"))
    try:
        yield env
    finally:
        subprocess.run([script, "stop", str(state)], timeout=180)
        shutil.rmtree(state, ignore_errors=True)


def sbatch(env: dict, *args: str) -> str:
    out = subprocess.run(["sbatch", "--parsable", f"--chdir={ROOT}", *args], env=env, check=True,
                         capture_output=True, text=True, timeout=60)
    return out.stdout.strip().split(";")[0]


def job_info(env: dict, job: str) -> dict[str, str]:
    """`scontrol show job -o JOB` as a dict (first record: an array's first task)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True,
                         timeout=60).stdout.splitlines()
    return dict(re.findall(r"(\w+)=(\S*)", out[0])) if out else {}


def wait_job(env: dict, job: str) -> dict[str, str]:
    """Until the job ended for good (a requeued job passes through PENDING again)."""
    deadline = time.monotonic() + HANG_GUARD_S
    while time.monotonic() < deadline:
        info = job_info(env, job)
        if info.get("JobState") in FINAL_STATES:
            return info
        time.sleep(1)
    subprocess.run(["scancel", job], env=env, timeout=60)
    pytest.fail(f"job {job} still not finished after {HANG_GUARD_S}s: {job_info(env, job)}")


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss from RUN/metrics.jsonl; a step logged twice would be a resume that redid work."""
    seen: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "event" in record:  # checkpoint / restore records sit beside the step records
            continue
        assert record["step"] not in seen, f"step {record['step']} logged twice in {run_dir}/metrics.jsonl"
        seen[record["step"]] = record["loss"]
    return seen


@pytest.mark.dist
def test_train_preempted_requeues_and_resumes(slurm, tmp_path):
    manifest = write_small_dataset(str(tmp_path / "shards"), {"train": [100, 100, 100]})
    steps = 24
    common = [f"data.manifest={manifest}", "data.batch_size=16", "data.num_workers=1", f"train.steps={steps}",
              "train.log_every=1", "checkpoint.every_minutes=0",
              f"out_dir={tmp_path / 'runs'}"]
    log = tmp_path / "preempted.log"
    # 1 node x 2 tasks, gloo on CPU; the notice comes from scancel below, not from a time limit
    job = sbatch(slurm, "--ntasks=2", f"--output={log}", "slurm/train.sbatch", *common, "name=preempted")
    reference = sbatch(slurm, "--ntasks=2", f"--output={tmp_path / 'reference.log'}", "slurm/train.sbatch",
                       *common, "name=reference")

    # preempt once training is under way (the handler is installed before the first step)
    metrics = tmp_path / "runs" / "preempted" / "metrics.jsonl"
    deadline = time.monotonic() + HANG_GUARD_S
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
        assert job_info(slurm, job).get("JobState") in ("PENDING", "RUNNING"), log.read_text()
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.5)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=slurm, check=True, timeout=60)

    info = wait_job(slurm, job)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text
    assert int(info["Restarts"]) == 1, info
    assert "got SIGUSR1" in text and f"requeueing job {job}" in text, text
    stopped = int(re.search(r"stopping at step (\d+): preemption signal", text).group(1))
    assert 5 <= stopped < steps
    assert re.search(rf"resumed from \S+/preempted/checkpoints/step-{stopped:08d} at step {stopped}\b", text), text
    assert "training step ended with exit code 0" in text
    summary = json.loads((tmp_path / "runs" / "preempted" / "train_summary.json").read_text())
    assert (summary["steps"], summary["exit_code"]) == (steps, 0)

    ref_info = wait_job(slurm, reference)
    assert ref_info["JobState"] == "COMPLETED" and int(ref_info["Restarts"]) == 0, ref_info
    # the run that was preempted and resumed computed the very losses of the uninterrupted one
    got, want = losses(tmp_path / "runs" / "preempted"), losses(tmp_path / "runs" / "reference")
    assert sorted(got) == list(range(1, steps + 1)) == sorted(want)
    for step in got:
        assert math.isclose(got[step], want[step], rel_tol=1e-6), (step, got[step], want[step])
    assert got[steps] < got[1]  # and it learned something


@pytest.mark.dist
def test_train_notice_during_startup_still_requeues(slurm, tmp_path):
    """A notice that comes while the tasks still import and connect (no handler, no checkpoint yet)."""
    manifest = write_small_dataset(str(tmp_path / "shards"), {"train": [64]})
    log = tmp_path / "early.log"
    # submitted the other way users have: `maepipe submit slurm train`
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "submit", "slurm", "train", "--ntasks-per-node", "2", "--output", str(log),
         "--config", "configs/demo.toml", f"data.manifest={manifest}", "data.batch_size=16", "data.num_workers=0",
         "train.steps=4", "train.time_limit_minutes=0", f"out_dir={tmp_path / 'runs'}", "name=early"],
        env=slurm, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    job = re.search(r"as job (\d+)", out.stdout).group(1)
    deadline = time.monotonic() + HANG_GUARD_S
    while not (log.exists() and " run 1 on " in log.read_text()):
        assert time.monotonic() < deadline, "job never started"
        time.sleep(0.2)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=slurm, check=True, timeout=60)
    info = wait_job(slurm, job)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and int(info["Restarts"]) == 1, text
    assert f"requeueing job {job}" in text and " run 2 on " in text, text
    summary = json.loads((tmp_path / "runs" / "early" / "train_summary.json").read_text())
    assert (summary["steps"], summary["exit_code"]) == (4, 0)


def test_ray_cluster_runs_driver(slurm, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import ray\n"
        "ray.init()  # RAY_ADDRESS from the sbatch script\n"
        "square = ray.remote(lambda x: x * x)\n"
        "print('RESULT', sum(ray.get([square.remote(i) for i in range(10)])), 'NODES', len(ray.nodes()))\n")
    log = tmp_path / "ray.log"
    # short (Ray's socket paths must fit 107 bytes) and unique (another test session may have a job of the same id)
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray-"))
    env = dict(slurm, RAY_OBJECT_STORE_BYTES=str(200 * 2**20), RAY_TMP=str(ray_tmp))
    job = sbatch(env, "--cpus-per-task=2", f"--output={log}", "slurm/ray_cluster.sbatch", sys.executable, str(driver))
    info = wait_job(slurm, job)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text
    assert "Ray cluster of 1 node(s) at 127.0.0.1:" in text
    assert "RESULT 285 NODES 1" in text
    assert not ray_tmp.exists()  # torn down with the job


def test_ray_cluster_driver_failure_fails_job(slurm, tmp_path):
    log = tmp_path / "ray.log"
    env = dict(slurm, RAY_OBJECT_STORE_BYTES=str(200 * 2**20), RAY_TMP=tempfile.mkdtemp(prefix="ray-"))
    job = sbatch(env, f"--output={log}", "slurm/ray_cluster.sbatch", sys.executable, "-c",
                 "import ray, sys; ray.init(); sys.exit(3)")
    info = wait_job(slurm, job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "3:0", log.read_text()


def test_shard_array_builds_shares_then_manifest(slurm, tmp_path):
    # an image folder: class subfolders become labels
    images, labels = fashion_arrays("train", 60)
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = tmp_path / "src" / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(image)).save(folder / f"{i:03d}.png")
    dest = tmp_path / "dest"
    job = sbatch(slurm, "--array=0-2", f"--output={tmp_path}/shard-%A_%a.out", "slurm/shard_array.sbatch",
                 str(tmp_path / "src"), str(dest), "--shard-samples", "10")
    tasks = [wait_job(slurm, f"{job}_{i}") for i in range(3)]
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("shard-*.out")))
    assert all(t["JobState"] == "COMPLETED" for t in tasks), logs
    finisher = re.search(r"submitted job (\d+)", logs).group(1)
    info = wait_job(slurm, finisher)
    finisher_log = (tmp_path / f"maepipe-shard-manifest-{finisher}.out").read_text()
    assert info["JobState"] == "COMPLETED", finisher_log
    manifest = read_manifest(str(dest))
    shards = [s for split in manifest.splits.values() for s in split]
    assert len(shards) == 6 and sum(s.samples for s in shards) == 60, manifest
    verify = subprocess.run([sys.executable, "-m", "pipeline.cli", "shard", "verify", str(dest)], env=slurm,
                            capture_output=True, text=True, timeout=300)
    assert verify.returncode == 0, verify.stdout + verify.stderr
