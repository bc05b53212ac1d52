"""Multi-process training with real DeepSpeed on gloo: interrupted runs continue bit for bit.

Each ZeRO stage's uninterrupted 2-rank run is made once (module fixture) and every interrupted
variant is compared with it: SIGUSR1 to one rank, kill -9 of the whole job, kill -9 of one rank
under torchrun --max-restarts, two torchrun agents as two nodes, Ray Train workers. Elastic resume (2 -> 1 and 1 -> 2 ranks)
is checked on the sample ids each rank consumed: none repeated, none lost.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections import Counter

import psutil
import pytest

from tests.conftest import ROOT, subprocess_env
from tests.helpers import write_small_dataset
from tests.servers import free_ports, ray_env
from tests.train_runs import (consumed, kill_job, losses, rank_processes, records, run, start, torchrun,
                              wait_for_step, write_config)

pytestmark = pytest.mark.dist
STEPS = 10
EXIT_REQUEUE = 75


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-dist")
    # 160 samples: one epoch is 10 steps of 2 ranks x 8, or 20 steps of 1 rank x 8
    return root, write_small_dataset(str(root / "shards"), {"train": [80, 80]})


@pytest.fixture(scope="module")
def reference(data):
    """stage -> {step: loss} of an uninterrupted 2-rank run, made on first use."""
    root, manifest = data
    made = {}

    def get(stage: int, steps: int = STEPS) -> dict[int, float]:
        if (stage, steps) not in made:
            name = f"ref{stage}" if steps == STEPS else f"ref{stage}-{steps}"
            cfg = write_config(root / f"{name}.toml", manifest, root / "runs", name, steps, stage)
            assert run(torchrun(2, cfg), root / f"{name}.log") == 0, (root / f"{name}.log").read_text()[-3000:]
            made[stage, steps] = losses(root / "runs" / name)
            assert sorted(made[stage, steps]) == list(range(1, steps + 1))
        return made[stage, steps]

    return get


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_sigusr1_then_kill9_resume_is_bitwise(data, reference, stage):
    root, manifest = data
    name = f"chain{stage}"
    run_dir, log = root / "runs" / name, root / f"{name}.log"
    cfg = write_config(root / f"{name}.toml", manifest, root / "runs", name, STEPS, stage)

    # 1. preemption notice to rank 1 only: the ranks agree, save and exit with the requeue code
    job = start(torchrun(2, cfg, "checkpoint.every_steps=2"), log)
    wait_for_step(run_dir, job, 3)
    rank_processes(job)[1].send_signal(signal.SIGUSR1)
    assert job.wait(120) == 1  # torchrun's own status for any failed worker (75 included)
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["exit_code"] == EXIT_REQUEUE and summary["steps"] < STEPS, log.read_text()[-3000:]
    # torchrun's report: the first rank out exited 75, and torchrun's SIGTERM to the other (sent as
    # soon as it saw that) must not turn the other rank's own 75 into -15: both exit with the requeue code
    report = log.read_text()
    assert report.count("exitcode  : 75") == 2 and "exitcode  : -15" not in report, report[-3000:]
    stopped = summary["steps"]

    # 2. resume, then kill -9 the whole job a few steps later (past at least one periodic checkpoint)
    job = start(torchrun(2, cfg, "--resume", "auto", "checkpoint.every_steps=2"), log)
    killed_at = wait_for_step(run_dir, job, stopped + 3)
    kill_job(job)
    assert killed_at < STEPS, "the job finished before it could be killed: nothing was tested"

    # 3. resume again and finish: every step's loss equals the uninterrupted run's, bit for bit
    assert run(torchrun(2, cfg, "--resume", "auto", "checkpoint.every_steps=2"), log) == 0, log.read_text()[-3000:]
    restores = [r for r in records(run_dir) if r.get("event") == "restore"]
    assert [r["step"] for r in restores][0] == stopped and len(restores) == 2
    assert losses(run_dir) == reference(stage)


def _epoch0_ids(run_dir) -> list[int]:
    return [i for (epoch, ids) in consumed(run_dir).values() if epoch == 0 for i in ids]


@pytest.mark.parametrize("stage, before, after, first_steps", [(3, 2, 1, 3), (1, 1, 2, 4)])
def test_elastic_resume_consumes_every_sample_once(data, stage, before, after, first_steps):
    root, manifest = data
    name = f"elastic{stage}-{before}to{after}"
    run_dir, log = root / "runs" / name, root / f"{name}.log"
    epoch_steps_after = (160 - first_steps * 8 * before) // (8 * after)
    total = first_steps + epoch_steps_after
    cfg = write_config(root / f"{name}.toml", manifest, root / "runs", name, total, stage)
    assert run(torchrun(before, cfg, f"train.steps={first_steps}"), log) == 0, log.read_text()[-3000:]
    # another world size: converted through DeepSpeed's universal checkpoint, data re-planned
    assert run(torchrun(after, cfg, "--resume", "auto"), log) == 0, log.read_text()[-3000:]
    assert (run_dir / "checkpoints" / f"step-{first_steps:08d}" / "universal").is_dir()
    ids = _epoch0_ids(run_dir)
    assert Counter(ids).most_common(1)[0][1] == 1, "a sample was consumed twice in epoch 0"
    assert sorted(ids) == list(range(160)), "samples of epoch 0 were lost"
    assert max(losses(run_dir)) == total


def test_killed_rank_makes_the_other_exit(data, tmp_path):
    """No launcher watching: rank 0 must fail on its own (gloo error or the collective timeout)."""
    root, manifest = data
    cfg = write_config(tmp_path / "c.toml", manifest, tmp_path / "runs", "dead", 1000, 2)
    (port,) = free_ports(1)
    base = dict(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK="0")
    cmd = [sys.executable, "-m", "pipeline.cli", "train", "--config", str(cfg), "train.dist_timeout_s=30"]
    ranks = [start(cmd, tmp_path / f"rank{r}.log", RANK=str(r), **base) for r in (0, 1)]
    try:
        wait_for_step(tmp_path / "runs" / "dead", ranks[0], 2)
        kill_job(ranks[1])
        code = ranks[0].wait(180)  # a hang would end the test here with TimeoutExpired
        assert code not in (0, None)
    finally:
        for proc in ranks:
            kill_job(proc)


def test_torchrun_max_restarts_resumes_from_checkpoint(data, reference):
    """kill -9 of one worker: torchrun stops the other, starts a new attempt, which resumes from the newest checkpoint."""
    root, manifest = data
    run_dir, log = root / "runs" / "restart", root / "restart.log"
    cfg = write_config(root / "restart.toml", manifest, root / "runs", "restart", STEPS, 2)
    job = start(torchrun(2, cfg, "--resume", "auto", "checkpoint.every_steps=2", extra=("--max-restarts=1",)), log)
    try:
        wait_for_step(run_dir, job, 3)  # past the checkpoint of step 2
        rank_processes(job)[1].kill()
        killed_at = max(losses(run_dir))
        assert job.wait(300) == 0, log.read_text()[-3000:]
    finally:
        kill_job(job)
    assert killed_at < STEPS, "the job finished before its worker was killed: nothing was tested"
    events = records(run_dir)
    (restore,) = [i for i, r in enumerate(events) if r.get("event") == "restore"]
    saved = [r["tag"] for r in events[:restore] if r.get("event") == "checkpoint"]
    assert saved and events[restore]["from"].endswith(saved[-1])  # the newest checkpoint at the kill
    text = log.read_text()
    assert "failed (exitcode: -9) local_rank: 1" in text  # torchrun saw the kill, and went on in the same run
    assert f"resumed from {events[restore]['from']} at step {events[restore]['step']}" in text
    assert losses(run_dir) == reference(2)


def test_two_nodes_on_one_machine_match_two_ranks(data, reference):
    """Two torchrun agents (--nnodes=2, node ranks 0 and 1) meeting over 127.0.0.1: one 2 x 1 job."""
    root, manifest = data
    cfg = write_config(root / "nodes.toml", manifest, root / "runs", "nodes", STEPS, 2)
    (port,) = free_ports(1)
    agents = [start([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={n}",
                     "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
                     "-m", "pipeline.cli", "train", "--config", str(cfg)], root / f"node{n}.log") for n in (0, 1)]
    try:
        assert [a.wait(300) for a in agents] == [0, 0], (root / "node0.log").read_text()[-3000:]
    finally:
        for a in agents:
            kill_job(a)
    assert losses(root / "runs" / "nodes") == reference(2)


def test_changed_model_is_refused(data, tmp_path):
    root, manifest = data
    cfg = write_config(tmp_path / "c.toml", manifest, tmp_path / "runs", "refuse", 2, 1)
    assert run(torchrun(1, cfg), tmp_path / "a.log") == 0
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", "--config", str(cfg), "--resume", "auto",
                           "model.mask_ratio=0.5", "train.steps=4"], capture_output=True, text=True,
                          env=subprocess_env())
    assert done.returncode == 2
    assert "model.mask_ratio: 0.75 -> 0.5" in done.stderr


@pytest.mark.integration
def test_ray_train_workers_match_torchrun(data, reference, tmp_path):
    """jobs/train_ray.py: two Ray Train CPU workers (gloo) run the same training as torchrun's two ranks."""
    root, manifest = data
    cfg = write_config(root / "ray.toml", manifest, root / "runs", "ray", STEPS, 2)
    env = subprocess_env(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled", RAY_ADDRESS="")
    done = subprocess.run([sys.executable, "-m", "jobs.train_ray", "--config", str(cfg), "--workers", "2"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert losses(root / "runs" / "ray") == reference(2)


def _train_workers(driver: subprocess.Popen) -> list[psutil.Process]:
    """The Ray Train worker processes of a driver that started its own local Ray."""
    return sorted((p for p in psutil.Process(driver.pid).children(recursive=True)
                   if "RayTrainWorker" in " ".join(p.cmdline())), key=lambda p: p.pid)


def _last_step_per_rank(run_dir) -> dict[int, int]:
    last: dict[int, int] = {}
    for rank, step in consumed(run_dir):
        last[rank] = max(last.get(rank, 0), step)
    return last


@pytest.mark.integration
@pytest.mark.slow
def test_ray_train_preemption_saves_and_resumes_bitwise(data, reference, ray_head):
    """A Ray Train job stopped by `ray job stop` (SIGTERM to the driver), resumed by a driver on its own
    Ray and stopped by SIGTERM to one worker process: each time every rank saves the same step and exits
    75; the run finished from there matches an uninterrupted one, loss for loss and sample for sample."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    root, manifest = data
    steps = 60  # 6 epochs: the notices land mid-run with many steps to spare, and resumes cross epochs
    run_dir, log = root / "runs" / "ray-preempt", root / "ray-preempt.log"
    cfg = write_config(root / "ray-preempt.toml", manifest, root / "runs", "ray-preempt", steps, 2)
    driver = [sys.executable, "-m", "jobs.train_ray", "--config", str(cfg), "--workers", "2", "--resume", "auto"]

    # 1. a real job (`maepipe submit ray train`), stopped through the job API (what `ray job stop` calls):
    # the supervisor's SIGTERM reaches the driver, which relays it to the workers
    env = subprocess_env(MAEPIPE_SAMPLE_LOG="1", **ray_env())
    env.pop("RAY_ADDRESS", None)  # else the job CLI ignores --address and asks the GCS for the dashboard
    submitted = subprocess.run([sys.executable, "-m", "pipeline.cli", "submit", "ray", "train", "--address",
                                ray_head.dashboard, "--no-wait", "--env", "MAEPIPE_SAMPLE_LOG", "--", *driver[3:]],
                               cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    (job_id,) = set(re.findall(r"raysubmit_\w+", submitted.stdout + submitted.stderr))
    client = JobSubmissionClient(ray_head.dashboard)
    deadline = time.monotonic() + 300
    while max(losses(run_dir), default=0) < 3:
        assert time.monotonic() < deadline, client.get_job_logs(job_id)[-3000:]
        time.sleep(0.05)
    assert client.stop_job(job_id)
    while not (status := client.get_job_status(job_id)).is_terminal():
        assert time.monotonic() < deadline, client.get_job_logs(job_id)[-3000:]
        time.sleep(0.5)
    job_log = client.get_job_logs(job_id)
    assert status == JobStatus.STOPPED, job_log[-3000:]
    summary = json.loads((run_dir / "train_summary.json").read_text())
    first = summary["steps"]
    assert summary["exit_code"] == EXIT_REQUEUE and first < steps, job_log[-3000:]
    assert "driver got SIGTERM" in job_log and _last_step_per_rank(run_dir) == {0: first, 1: first}
    assert (run_dir / "checkpoints" / f"step-{first:08d}" / "client_state.json").exists()

    # 2. the driver alone, on a Ray it starts (its workers inherit its environment); SIGTERM to one
    # worker process stops both ranks
    local = {**ray_env(), "RAY_ADDRESS": ""}
    job = start(driver, log, **local)
    try:
        wait_for_step(run_dir, job, first + 3)
        (victim, _) = _train_workers(job)
        victim.send_signal(signal.SIGTERM)
        assert job.wait(300) == EXIT_REQUEUE, log.read_text()[-3000:]
    finally:
        kill_job(job)
    second = json.loads((run_dir / "train_summary.json").read_text())["steps"]
    assert first < second < steps and _last_step_per_rank(run_dir) == {0: second, 1: second}

    # 3. resubmitted: finishes from the second checkpoint, every step's loss as in the uninterrupted run,
    # and every sample of every epoch consumed exactly once
    assert run(driver, log, **local) == 0, log.read_text()[-3000:]
    assert [r["step"] for r in records(run_dir) if r.get("event") == "restore"] == [first, second]
    assert losses(run_dir) == reference(2, steps)
    by_epoch: dict[int, Counter] = {}
    for epoch, ids in consumed(run_dir).values():
        by_epoch.setdefault(epoch, Counter()).update(ids)
    assert sorted(by_epoch) == list(range(6)) and all(sorted(c) == list(range(160)) and set(c.values()) == {1}
                                                      for c in by_epoch.values())
