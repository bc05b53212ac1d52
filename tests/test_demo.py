"""`maepipe demo` end to end on the real Fashion-MNIST: shards, training, checkpoint, eval table, report."""

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, subprocess_env

pytestmark = pytest.mark.slow


def test_demo_runs_the_whole_pipeline(tmp_path):
    out = tmp_path / "demo"
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "demo", "--minutes", "0.25", "--out", str(out),
                           "--eval-train-samples", "2000", "train.log_every=2", "eval.linear_epochs=2"],
                          capture_output=True, text=True, env=subprocess_env(), cwd=ROOT, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    run = out / "run"
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["samples"] == 60000 and manifest["splits"]["val"]["samples"] == 10000
    assert list((run / "checkpoints").glob("step-*/client_state.json"))
    assert list((run / "tensorboard").iterdir())
    rows = [json.loads(line) for line in (run / "evals.jsonl").read_text().splitlines()]
    table = {(r["encoder"], r["protocol"].split()[0]) for r in rows}
    assert table == {(e, p) for e in ("mae", "raw_pixels", "random_init") for p in ("knn", "linear")}
    assert all(r["test_samples"] == 10000 and 0.0 < r["top1"] <= 1.0 for r in rows)
    report = (run / "report.md").read_text()
    assert "raw_pixels" in report and "random_init" in report
    for picture in ("curves.png", "reconstruction.png"):
        assert (run / "report" / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "report" / "curves.png").name in report
