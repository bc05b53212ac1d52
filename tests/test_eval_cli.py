"""`maepipe eval` and `maepipe report` on a checkpoint made by `maepipe train`, local and on S3."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from tests.conftest import subprocess_env
from tests.helpers import write_small_dataset

TRAIN = ["model.preset='micro'", "model.img_size=32", "model.patch_size=8", "model.in_chans=1",
         "data.mean=[0.286]", "data.std=[0.353]", "data.batch_size=32", "data.num_workers=0",
         "train.steps=4", "train.log_every=1", "checkpoint.every_steps=2", "eval.batch_size=64",
         "eval.linear_epochs=3", "eval.finetune_epochs=1"]


def maepipe(*args: str, cwd) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A real 4-step MAE training run with checkpoints at steps 2 and 4, on small Fashion-MNIST shards."""
    root = tmp_path_factory.mktemp("evalrun")
    data = write_small_dataset(str(root / "shards"), {"train": [160, 160], "val": [96]})
    maepipe("train", f"data.manifest='{data}'", "name='r'", f"out_dir='{root}'", *TRAIN, cwd=root)
    return root / "r", data


def test_eval_and_report_on_local_checkpoint(trained_run):
    run, data = trained_run
    ckpt = run / "checkpoints" / "step-00000002"
    maepipe("eval", str(ckpt), "--data", data, "--knn", "--linear", "--baselines", cwd=run.parent)
    maepipe("eval", str(run), "--finetune", "--set", "eval.finetune_blocks=1", cwd=run.parent)  # newest checkpoint
    rows = [json.loads(line) for line in (run / "evals.jsonl").read_text().splitlines()]
    assert {(r["encoder"], r["protocol"].split()[0], r["step"]) for r in rows} == {
        ("mae", "knn", 2), ("raw_pixels", "knn", 2), ("random_init", "knn", 2),
        ("mae", "linear", 2), ("raw_pixels", "linear", 2), ("random_init", "linear", 2), ("mae", "finetune", 4)}
    assert all(r["test_samples"] == 96 and r["train_samples"] == 320 for r in rows)
    assert [r["protocol"] for r in rows if r["encoder"] == "mae" and r["step"] == 4][0].startswith("finetune last1")

    maepipe("report", str(run), cwd=run.parent)
    md = (run / "report.md").read_text()
    for text in ("## Training", "## Evaluation", "raw_pixels", "random_init", "finetune last1",
                 "report/curves.png", "report/reconstruction.png", "report/reconstruction_series.png"):
        assert text in md, text
    for name in ("curves.png", "reconstruction.png", "reconstruction_series.png"):
        assert Image.open(run / "report" / name).size[0] > 100
    html = (run / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "src='report/" not in html  # self-contained


def test_eval_rejects_bad_override(trained_run):
    run, _ = trained_run
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "eval", str(run), "--set", "eval.pool='max'"],
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "eval.pool" in proc.stderr


@pytest.mark.integration
def test_eval_and_report_on_s3_checkpoint(trained_run, s3_bucket, seaweedfs):
    import fsspec

    run, data = trained_run
    fs = fsspec.filesystem("s3", endpoint_url=seaweedfs.endpoint)
    remote = f"{s3_bucket}/runs/r"
    for name in ("config.json", "metrics.jsonl"):
        fs.put(str(run / name), f"{remote}/{name}")
    fs.put(str(run / "checkpoints" / "step-00000004"), f"{remote}/checkpoints/", recursive=True)
    fs.put(str(run.parent / "shards"), f"{s3_bucket}/", recursive=True)
    maepipe("eval", f"{remote}/checkpoints/step-00000004", "--data", f"{s3_bucket}/shards", "--knn",
            cwd=run.parent)
    rows = [json.loads(line) for line in fs.cat(f"{remote}/evals.jsonl").decode().splitlines()]
    assert [(r["encoder"], r["step"], r["test_samples"]) for r in rows] == [("mae", 4, 96)]
    maepipe("report", remote, "--data", f"{s3_bucket}/shards", cwd=run.parent)
    md = fs.cat(f"{remote}/report.md").decode()
    assert "report/reconstruction.png" in md and fs.exists(f"{remote}/report/reconstruction.png")
    assert "data:image/png;base64," in fs.cat(f"{remote}/report.html").decode()
