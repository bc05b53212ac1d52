"""Step time and memory per rank for ZeRO 1/2/3 beside plain data parallel (ZeRO 0), plus checkpoint
save and restore times, on the tiny preset with 2 ranks (torchrun, gloo on CPU, or NCCL on GPUs).

    python benchmarks/train_zero.py [--steps 20] [--img 32] [--patch 4] [--batch 16] [--nproc 2]

Each stage trains `steps` steps saving at the middle and the end, then a second job resumes from
the middle checkpoint (same world size) to time the restore. Reports medians over steps 3..N and
the ratio of each stage to ZeRO 0 (the peer) measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import subprocess_env  # noqa: E402
from tests.helpers import write_small_dataset  # noqa: E402
from tests.servers import free_ports  # noqa: E402

TOML = """name = "zero{stage}"
out_dir = "{out}"
[model]
preset = "tiny"
img_size = {img}
patch_size = {patch}
in_chans = 1
[data]
manifest = "{manifest}"
batch_size = {batch}
num_workers = 1
mean = [0.286]
std = [0.353]
[train]
steps = {steps}
log_every = 1
zero_stage = {stage}
[checkpoint]
every_steps = {half}
"""


def torchrun(nproc: int, config: Path, *args: str) -> None:
    (port,) = free_ports(1)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={port}", "-m", "pipeline.cli", "train", "--config", str(config), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env())
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")


def measure(root: Path, manifest: str, stage: int, a) -> dict:
    cfg = root / f"zero{stage}.toml"
    cfg.write_text(TOML.format(stage=stage, out=root / "runs", img=a.img, patch=a.patch, manifest=manifest,
                               batch=a.batch, steps=a.steps, half=a.steps // 2))
    torchrun(a.nproc, cfg)
    run_dir = root / "runs" / f"zero{stage}"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r and r["step"] > 2]
    saves = [r["save_s"] for r in rows if r.get("event") == "checkpoint"]
    # restore: a fresh job resumes from the middle checkpoint and runs one more step
    torchrun(a.nproc, cfg, "--resume", str(run_dir / "checkpoints" / f"step-{a.steps // 2:08d}"),
             f"train.steps={a.steps // 2 + 1}", f"name=zero{stage}-resume")
    resumed = [json.loads(line) for line in (root / "runs" / f"zero{stage}-resume" / "metrics.jsonl").read_text().splitlines()]
    return {"stage": stage, "step_s": statistics.median(r["step_s"] for r in steps),
            "images_per_s": statistics.median(r["images_per_s"] for r in steps),
            "mem_gb_per_rank": max(r["mem_gb_per_rank"] for r in steps),
            "save_s": statistics.median(saves), "restore_s": next(r["restore_s"] for r in resumed if "restore_s" in r)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--img", type=int, default=32)
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--nproc", type=int, default=2)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        need = a.batch * a.nproc * (a.steps + 2)
        manifest = write_small_dataset(str(root / "shards"), {"train": [need // 2 + 1, need // 2 + 1]})
        results = [measure(root, manifest, stage, a) for stage in (0, 1, 2, 3)]
    base = results[0]
    print(f"tiny preset, {a.img} px / patch {a.patch}, batch {a.batch} per rank, {a.nproc} ranks, {a.steps} steps")
    print("| ZeRO | step s | img/s | peak mem GB/rank | save s | restore s | step time vs ZeRO 0 |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['stage']} | {r['step_s']:.3f} | {r['images_per_s']:.1f} | {r['mem_gb_per_rank']:.2f} | "
              f"{r['save_s']:.2f} | {r['restore_s']:.2f} | {r['step_s'] / base['step_s']:.2f} |")


if __name__ == "__main__":
    main()
