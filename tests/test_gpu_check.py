"""benchmarks/gpu_check.sh on a machine without CUDA: the CPU --smoke path of the GPU benchmark, end to end."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from pipeline.config import ModelConfig
from pipeline.train.flops import mae_flops_per_image
from tests.conftest import ROOT, subprocess_env

# the peer is built from timm's Block/PatchEmbed (found, not imported: the benchmark handles this venv's torchvision)
pytestmark = pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is not installed")


def test_gpu_check_smoke_writes_a_sane_report(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=subprocess_env(OUT=str(out), PYTHON=sys.executable))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "running the CPU --smoke mode" in proc.stdout
    assert {"env.txt", "gpu_model.json", "gpu_model.log"} <= {p.name for p in out.iterdir()}
    assert "torch" in (out / "env.txt").read_text()

    report = json.loads((out / "gpu_model.json").read_text())
    assert report["settings"]["smoke"] is True and report["device"]["type"] == "cpu"
    assert report["device"]["matmul_tflops"] > 0
    cfg = ModelConfig(preset="micro", img_size=32, patch_size=4, in_chans=3, mask_ratio=0.75)

    # our weights loaded into the timm reference give the same loss: the two compute one function
    [check] = report["checks"]
    assert check["abs_diff"] < 1e-5 and check["loss_ours"] > 0

    rows = {(r["model"], r["variant"]): r for r in report["results"]}
    variants = ("fp32", "bf16", "bf16_sdpa_flash", "bf16_sdpa_efficient", "bf16_sdpa_math", "bf16_compiled")
    assert set(rows) == {(m, v) for m in ("ours", "peer") for v in variants}
    for (model, variant), r in rows.items():
        if variant == "bf16_sdpa_efficient" and r["status"] != "ok":
            # CPU torch has no memory-efficient attention kernel: recorded, not fatal
            assert "No viable backend" in r["status"], r["status"]
            continue
        assert r["status"] == "ok", (model, variant, r["status"])
        assert r["images_per_s"] > 0 and r["tflops"] > 0
        assert 0 < r["step_ms_min"] <= r["step_ms"] <= r["step_ms_max"]
        assert r["images_per_s"] == pytest.approx(report["settings"]["batch"] / (r["step_ms"] / 1e3))
        assert r["flops_per_image"] == mae_flops_per_image(cfg)
        assert r["mfu"] is None and r["peak_mem_gb"] is None  # no peak or GPU memory on a CPU

    ratios = {r["variant"]: r["ours_over_peer"] for r in report["ratios"]["ours_over_peer"]}
    assert {"fp32", "bf16", "bf16_compiled", "bf16_sdpa_flash", "bf16_sdpa_math"} <= set(ratios)
    for variant, ratio in ratios.items():
        assert ratio == pytest.approx(rows["ours", variant]["images_per_s"] / rows["peer", variant]["images_per_s"])
    over_math = {(r["model"], r["backend"]): r["over_math"] for r in report["ratios"]["sdpa_over_math"]}
    assert over_math["ours", "flash"] == pytest.approx(
        rows["ours", "bf16_sdpa_flash"]["images_per_s"] / rows["ours", "bf16_sdpa_math"]["images_per_s"])
    assert "CPU SMOKE" in (out / "gpu_model.log").read_text()
