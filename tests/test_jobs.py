"""Ray jobs: the checkpoint manager on a real training run (embedded local Ray, and a real `ray job
submit` watching the run's S3 copy), and `maepipe submit ray` rendering `ray job submit`."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, subprocess_env
from tests.helpers import write_small_dataset

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
    assert sorted((run / "checkpoints" / "step-00000006").iterdir()) != []  # untouched
    state = json.loads((run / "checkpoint_manager.json").read_text())
    assert set(state["done"]) == set(STEPS) and sorted(state["baselines"]) == ["knn", "linear"]
    assert "## Evaluation" in (run / "report.md").read_text()

    before = {p: p.stat().st_mtime_ns for p in (run / "consolidated").iterdir()}
    evals = (run / "evals.jsonl").read_text()
    second = manager(*args, cwd=tmp_path, **env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "nothing new" in second.stderr and "Started a local Ray" not in second.stderr
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
