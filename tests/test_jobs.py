"""Ray jobs: the checkpoint manager on a real training run (embedded local Ray, and a real `ray job
submit` watching the run's S3 copy), and `maepipe submit ray` rendering `ray job submit`."""

from __future__ import annotations

import json
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, subprocess_env
from tests.helpers import write_small_dataset
from tests.train_runs import kill_job

# configs/demo.toml made tiny: 4 steps, checkpoints at steps 2 and 4
TRAIN = ["data.batch_size=16", "train.steps=4", "checkpoint.every_steps=2", "model.preset='micro'",
         "data.num_workers=0", "train.log_every=1"]
EVAL = ["--set", "eval.max_train_samples=48", "--set", "eval.linear_epochs=2", "--set", "eval.batch_size=64"]
STEPS = ["step-00000002", "step-00000004"]


def maepipe(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=subprocess_env(**env),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def manager(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """The job's entrypoint run directly: no RAY_ADDRESS, so it starts its own local Ray."""
    child_env = subprocess_env(**env)
    child_env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "jobs.checkpoint_manager", *args], cwd=cwd, env=child_env,
                          capture_output=True, text=True, timeout=600)


def train(root: Path, data: str, *extra: str) -> Path:
    maepipe("train", "--config", str(ROOT / "configs" / "demo.toml"), f"data.manifest='{data}'", "name='r'",
            f"out_dir='{root}'", *TRAIN, *extra, cwd=root)
    return root / "r"


def rows_of(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_manager_once_consolidates_evaluates_and_resumes(tmp_path):
    from safetensors import safe_open

    data = write_small_dataset(str(tmp_path / "shards"), {"train": [64], "val": [32]})
    run = train(tmp_path, data)
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == STEPS
    # a checkpoint whose writer died before the completion mark: the manager must leave it alone
    shutil.copytree(run / "checkpoints" / STEPS[1], run / "checkpoints" / "step-00000006",
                    ignore=shutil.ignore_patterns("client_state.json"))
    args = [str(run), "--consolidate", "--evaluate", "knn,linear", "--data", data, "--poll-s", "1", "--once", *EVAL]
    env = {"MAEPIPE_CACHE": str(tmp_path / "cache")}

    first = manager(*args, cwd=tmp_path, **env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    consolidated = sorted(p.name for p in (run / "consolidated").iterdir())
    assert consolidated == [f"{t}.safetensors" for t in STEPS]
    with safe_open(str(run / "consolidated" / f"{STEPS[1]}.safetensors"), "pt") as f:
        assert f.metadata()["format"] == "native" and f.metadata()["source"].endswith(STEPS[1])
        assert "blocks.0.attn.qkv.weight" in f.keys()
    rows = rows_of((run / "evals.jsonl").read_text())
    mae = {(r["step"], r["protocol"].split()[0]) for r in rows if r["encoder"] == "mae"}
    assert mae == {(2, "knn"), (2, "linear"), (4, "knn"), (4, "linear")}
    baselines = [(r["encoder"], r["protocol"].split()[0]) for r in rows if r["encoder"] != "mae"]
    assert sorted(baselines) == [("random_init", "knn"), ("random_init", "linear"),
                                 ("raw_pixels", "knn"), ("raw_pixels", "linear")]  # once per run
    assert all(r["train_samples"] == 48 and r["test_samples"] == 32 and r["checkpoint"].endswith(f"step-{r['step']:08d}")
               for r in rows)
    assert not (run / "consolidated" / "step-00000006.safetensors").exists()
    assert sorted(p.name for p in (run / "checkpoints" / "step-00000006").iterdir()) == sorted(
        p.name for p in (run / "checkpoints" / STEPS[1]).iterdir() if p.name != "client_state.json")  # untouched
    state = json.loads((run / "checkpoint_manager.json").read_text())
    assert set(state["done"]) == set(STEPS) and sorted(state["baselines"]) == ["knn", "linear"]
    assert "## Evaluation" in (run / "report.md").read_text()

    before = {p: p.stat().st_mtime_ns for p in (run / "consolidated").iterdir()}
    evals = (run / "evals.jsonl").read_text()
    second = manager(*args, cwd=tmp_path, **env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "nothing new" in second.stderr and "Started a local Ray" not in second.stdout + second.stderr
    assert (run / "evals.jsonl").read_text() == evals
    assert {p: p.stat().st_mtime_ns for p in (run / "consolidated").iterdir()} == before

    # the mark arrives: the next pass takes exactly that checkpoint (same weights as step 4, new step)
    shutil.copy(run / "checkpoints" / STEPS[1] / "client_state.json", run / "checkpoints" / "step-00000006")
    third = manager(str(run), "--consolidate", "--once", cwd=tmp_path, **env)
    assert third.returncode == 0, third.stderr[-3000:]
    assert (run / "consolidated" / "step-00000006.safetensors").exists()
    assert {p: p.stat().st_mtime_ns for p in (run / "consolidated").iterdir() if p in before} == before


def test_manager_usage_errors(tmp_path):
    for args, words in ((["--evaluate", "knn,svm"], "svm"), ([], "nothing to do"),
                        (["--consolidate", "--keep-last", "2"], "--upload-url"),
                        (["--consolidate", "--once", "--until-step", "4"], "not allowed")):
        done = manager(str(tmp_path), *args, cwd=tmp_path)
        assert done.returncode == 2 and words in done.stderr, (args, done.stderr)


@pytest.mark.integration
@pytest.mark.slow
def test_manager_ray_job_on_the_s3_copy(tmp_path, ray_head, s3_bucket, seaweedfs):
    """Training writes locally and uploads to S3; the manager, a real `ray job submit` through
    `maepipe submit ray manage`, works on the S3 copy only and prunes it to the newest checkpoint."""
    from pipeline.train.checkpoint import complete_tags

    data = write_small_dataset(str(tmp_path / "shards"), {"train": [64], "val": [32]})
    remote = f"{s3_bucket}/runs/r"
    train(tmp_path, data, f"checkpoint.upload_url='{remote}'")
    assert complete_tags(f"{remote}/checkpoints") == STEPS
    names = ["AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "MAEPIPE_CACHE"]
    env = {"MAEPIPE_CACHE": str(tmp_path / "cache"), **ray_head.env()}
    job = [remote, "--consolidate", "--evaluate", "knn", "--data", data, "--keep-last", "1", "--once", *EVAL]
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "submit", "ray", "manage", "--address",
                           ray_head.dashboard, *[a for n in names for a in ("--env", n)], *job],
                          cwd=ROOT, env=subprocess_env(**env), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "succeeded" in done.stdout, (done.stdout + done.stderr)[-4000:]

    import fsspec

    fs = fsspec.filesystem("s3", endpoint_url=seaweedfs.endpoint)
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{remote}/consolidated")) == [f"{t}.safetensors" for t in STEPS]
    rows = rows_of(fs.cat(f"{remote}/evals.jsonl").decode())
    assert sorted((r["encoder"], r["step"]) for r in rows) == [("mae", 2), ("mae", 4), ("random_init", 2),
                                                               ("raw_pixels", 2)]
    assert all(r["checkpoint"].startswith(f"{remote}/checkpoints/") for r in rows)
    assert complete_tags(f"{remote}/checkpoints") == STEPS[1:]  # --keep-last 1 on the object-store copy
    assert "## Evaluation" in fs.cat(f"{remote}/report.md").decode()
    assert json.loads(fs.cat(f"{remote}/config.json"))["name"] == "r"

    again = manager(*job, cwd=tmp_path, MAEPIPE_CACHE=env["MAEPIPE_CACHE"])  # a restarted manager: nothing to redo
    assert again.returncode == 0 and "nothing new" in again.stderr, again.stderr[-3000:]
    assert rows_of(fs.cat(f"{remote}/evals.jsonl").decode()) == rows


def dry_run(job: str, *args: str, **env: str) -> tuple[int, list[str], str]:
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "submit", "ray", job, "--dry-run", *args],
                          env=subprocess_env(**env), cwd=ROOT, capture_output=True, text=True, timeout=60)
    return done.returncode, shlex.split(done.stdout), done.stderr


def test_submit_ray_renders_ray_job_submit():
    rc, words, _ = dry_run("manage", "--address", "http://head:8265", "--env", "AWS_ENDPOINT_URL", "s3://b/runs/r",
                           "--consolidate", "--evaluate", "knn,linear", "--keep-last", "3", AWS_ENDPOINT_URL="http://s3:1")
    assert rc == 0 and Path(words[0]).name == "ray"
    assert words[1:] == ["job", "submit", "--address", "http://head:8265", "--working-dir", ".", "--runtime-env-json",
                         '{"env_vars": {"AWS_ENDPOINT_URL": "http://s3:1"}}', "--", "python", "-m",
                         "jobs.checkpoint_manager", "s3://b/runs/r", "--consolidate", "--evaluate", "knn,linear",
                         "--keep-last", "3"]
    rc, words, _ = dry_run("train", "--no-wait", "--entrypoint-num-cpus", "1", "--", "--config", "configs/vit_base.toml",
                           "--workers", "8", "--gpus", RAY_API_SERVER_ADDRESS="http://10.0.0.1:8265")
    assert rc == 0 and words[1:] == ["job", "submit", "--address", "http://10.0.0.1:8265", "--working-dir", ".",
                                     "--runtime-env-json", '{"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "300"}}',
                                     "--entrypoint-num-cpus", "1", "--no-wait", "--", "python", "-m", "jobs.train_ray",
                                     "--config", "configs/vit_base.toml", "--workers", "8", "--gpus"]
    rc, words, _ = dry_run("shard", "SRC", "s3://b/shards", "--shard-samples", "2000")
    assert rc == 0 and words[words.index("--"):] == ["--", "python", "-m", "jobs.shard_job", "SRC", "s3://b/shards",
                                                     "--shard-samples", "2000"]


def test_submit_ray_usage_errors(tmp_path):
    rc, _, err = dry_run("manage", "--env", "MAEPIPE_NOT_SET_ANYWHERE", "s3://b/r", "--once")
    assert rc == 2 and "MAEPIPE_NOT_SET_ANYWHERE" in err
    rc, _, err = dry_run("manage", "--working-dir", str(tmp_path), "s3://b/r")
    assert rc == 2 and "not a maepipe checkout" in err


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """(run folder, labelled manifest) of one 4-step training run with checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("manager-run")
    data = write_small_dataset(str(root / "shards"), {"train": [64], "val": [32]})
    return train(root, data), data


def start_manager(*args: str, log: Path, **env: str) -> subprocess.Popen:
    child_env = subprocess_env(**env)
    child_env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "jobs.checkpoint_manager", *args], cwd=log.parent, env=child_env,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_until(check, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert proc.poll() is None, f"manager exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)


def done_work(run: Path) -> dict[str, list[str]]:
    path = run / "checkpoint_manager.json"
    return json.loads(path.read_text())["done"] if path.exists() else {}


@pytest.mark.integration
def test_manager_polls_finetunes_a_new_checkpoint_once_and_stops_at_until_step(small_run, tmp_path):
    """Polling mode: step 2 is there at start, step 4 completes while the manager runs; each gets its
    work once (consolidation, a tiny fine-tune), the from-scratch baseline once, then --until-step 4 ends it."""
    source, data = small_run
    run = tmp_path / "r"
    shutil.copytree(source, run)
    mark = run / "checkpoints" / STEPS[1] / "client_state.json"
    held = mark.rename(tmp_path / "client_state.json")  # step 4 is still being written
    log = tmp_path / "manager.log"
    tiny = ["--set", "eval.finetune_epochs=1", "--set", "eval.finetune_samples=32", "--set", "eval.batch_size=16"]
    proc = start_manager(str(run), "--consolidate", "--evaluate", "finetune", "--data", data, "--poll-s", "0.5",
                         "--until-step", "4", "--no-report", *tiny, log=log, MAEPIPE_CACHE=str(tmp_path / "cache"))
    try:
        wait_until(lambda: set(done_work(run).get(STEPS[0], [])) == {"consolidate", "finetune"}, proc, log)
        wait_until(lambda: "nothing new" in log.read_text(), proc, log)  # polled again: step 4 is not complete
        assert STEPS[1] not in done_work(run) and not (run / "consolidated" / f"{STEPS[1]}.safetensors").exists()
        held.rename(mark)  # the completion mark arrives
        assert proc.wait(300) == 0, log.read_text()[-3000:]
    finally:
        kill_job(proc)
    text = log.read_text()
    assert {t: set(w) for t, w in done_work(run).items()} == {t: {"consolidate", "finetune"} for t in STEPS}
    assert sorted(p.name for p in (run / "consolidated").iterdir()) == [f"{t}.safetensors" for t in STEPS]
    rows = rows_of((run / "evals.jsonl").read_text())
    assert sorted((r["encoder"], r["step"]) for r in rows) == [("mae", 2), ("mae", 4), ("scratch", 2)]
    assert all(r["protocol"].startswith("finetune full 2steps") and r["train_samples"] == 32 and
               r["test_samples"] == 32 for r in rows)  # 1 epoch x 32 samples / batch 16
    for tag in STEPS:  # each checkpoint's work ran once
        assert text.count(f"{tag}: finetune, ") == 1 and text.count(f"{tag}: consolidate -> ") == 1, text[-3000:]


@pytest.mark.integration
def test_manager_stops_cleanly_on_sigterm(small_run, tmp_path):
    """A polling manager with no stop condition (what `ray job stop` ends): SIGTERM while it waits for
    new checkpoints ends it with exit 0 and its state intact."""
    source, _ = small_run
    run = tmp_path / "r"
    shutil.copytree(source, run)
    log = tmp_path / "manager.log"
    proc = start_manager(str(run), "--consolidate", "--poll-s", "0.5", "--no-report", log=log,
                         MAEPIPE_CACHE=str(tmp_path / "cache"))
    try:
        wait_until(lambda: "nothing new" in log.read_text(), proc, log)  # both done, polling
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0, log.read_text()[-3000:]
    finally:
        kill_job(proc)
    assert "stop requested" in log.read_text()
    assert {t: w for t, w in done_work(run).items()} == {t: ["consolidate"] for t in STEPS}
    assert sorted(p.name for p in (run / "consolidated").iterdir()) == [f"{t}.safetensors" for t in STEPS]
