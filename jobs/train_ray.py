"""Pretraining on Ray Train workers: the same `train(cfg)` as `maepipe train`, one worker per rank.

    python -m jobs.train_ray --config configs/NAME.toml --workers 8 [--gpus] [--resume auto] [section.key=value ...]

Ray Train's TorchTrainer starts the workers, sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* and creates the
process group (gloo on CPU, NCCL with --gpus); pipeline.train adopts it. The driver exits with the
training's exit code (75 after a preemption checkpoint), read from RUN/train_summary.json.
Connects to RAY_ADDRESS when set (e.g. under `ray job submit`), else starts a local Ray.

Preemption: SIGTERM/SIGUSR1 to the driver (`ray job stop` sends SIGTERM) or to any worker process makes
every rank save a checkpoint at the next step boundary and stop (jobs/stop_notice.py); `--resume auto`
continues from it. Under `ray job stop`, RAY_JOB_STOP_WAIT_TIME_S must cover a step and a save.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def worker(config: dict) -> None:
    """Runs in every Ray Train worker (importable, so Ray can ship it)."""
    import logging

    from jobs import stop_notice
    from pipeline.config import load_config
    from pipeline.train.loop import StopFlag, train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(config["config"], config["overrides"])
    stop = StopFlag(cfg.train.time_limit_minutes * 60)
    stop_notice.attach(stop, config["stop"])
    train(cfg, stop)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Pretrain an MAE on Ray Train workers.")
    p.add_argument("--config", required=True, help="TOML run file (configs/*.toml)")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers = ranks")
    p.add_argument("--gpus", action="store_true", help="one GPU per worker, NCCL (else CPU workers, gloo)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--timeout-s", type=float, default=300.0, help="process-group timeout (a dead worker fails the rest)")
    p.add_argument("--resume", help="'auto' or a checkpoint path/URL")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = p.parse_args(argv)

    import ray
    from ray.train import RunConfig as RayRunConfig
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from jobs.stop_notice import NoticeTorchConfig, StopRequest, relay_driver_signals
    from pipeline.config import ConfigError, load_config

    overrides = list(args.overrides) + ([f'checkpoint.resume="{args.resume}"'] if args.resume else [])
    try:
        cfg = load_config(args.config, overrides)  # fail fast on the driver, before starting workers
    except ConfigError as err:
        print(f"train_ray: config error: {err}", file=sys.stderr)
        return 2
    address = os.environ.get("RAY_ADDRESS")
    # a local Ray gets a small object store: training passes nothing through it
    ray.init(address=address or "local", include_dashboard=False,
             **({} if address else {"object_store_memory": 2**30}))
    stop = StopRequest.remote()
    relay_driver_signals(stop)  # after ray.init, which installs its own SIGTERM handler
    run_dir = cfg.run_dir.resolve()
    config = {"config": str(Path(args.config).resolve()), "stop": stop,
              "overrides": overrides + [f'out_dir="{run_dir.parent}"', f'name="{run_dir.name}"']}
    trainer = TorchTrainer(
        worker, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=args.gpus,
                                     resources_per_worker={"CPU": args.cpus_per_worker}),
        torch_config=NoticeTorchConfig(backend="nccl" if args.gpus else "gloo", timeout_s=int(args.timeout_s)),
        run_config=RayRunConfig(name=f"{cfg.name}-ray", storage_path=str(run_dir / "ray")),
    )
    trainer.fit()
    summary = run_dir / "train_summary.json"
    return json.loads(summary.read_text())["exit_code"] if summary.exists() else 1


if __name__ == "__main__":
    sys.exit(main())
