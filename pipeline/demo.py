"""`maepipe demo`: the whole pipeline on the embedded defaults, on one machine.

Fashion-MNIST (Debian's dataset-fashion-mnist) -> local shards -> a tiny MAE pretrained on the CPU
for a bounded time -> checkpoint -> kNN and linear probe of MAE features, raw pixels and a random
encoder on the same split -> RUN/report.md with the table, a loss curve and reconstructions.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from pipeline.config import ConfigError, load_config

log = logging.getLogger("maepipe.demo")
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.toml"


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline on Fashion-MNIST on this machine (~10 minutes on 2 cores)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=6.0, help="pretraining budget in minutes (default 6)")
    p.add_argument("--out", default="runs/demo", help="folder for shards and the run (default runs/demo)")
    p.add_argument("--source", default=str(FASHION_MNIST), help="Fashion-MNIST idx folder (default: Debian's)")
    p.add_argument("--eval-train-samples", type=int, default=20000,
                   help="training samples for the kNN bank and the linear probe (0: all 60,000)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="override fields of configs/demo.toml")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from data_shards.manifest import manifest_url
    from data_shards.shard import ShardOptions, run_shard
    from data_shards.storage import exists
    from pipeline.eval.evaluate import evaluate
    from pipeline.eval.report import write_report
    from pipeline.eval.runs import EVALS, append_jsonl, tag_rows
    from pipeline.train.checkpoint import find_checkpoint, load_pretrained, read_client_state
    from pipeline.train.loop import train

    if args.minutes <= 0:
        raise ConfigError(f"--minutes={args.minutes}: must be positive")
    source = Path(args.source)
    if not (source / "train-images-idx3-ubyte.gz").exists():
        raise ConfigError(f"no Fashion-MNIST idx files in {source}: install Debian's dataset-fashion-mnist "
                          "(`apt-get install dataset-fashion-mnist`) or pass --source DIR")
    out = Path(args.out)
    shards, started = out / "shards", time.monotonic()

    # 1. shards: train (60k) and val (the 10k test set), PNG so the 28 px images stay lossless
    if exists(manifest_url(str(shards))):
        log.info("demo: reusing shards in %s", shards)
    else:
        run_shard(str(source), str(shards), ShardOptions(shard_samples=5000, seed=0, workers=1))
    shard_s = time.monotonic() - started

    # 2. pretraining, bounded by time (the config's step count sets the lr schedule)
    cfg = load_config(DEMO_CONFIG, [f"data.manifest={json.dumps(str(shards))}", f"out_dir={json.dumps(str(out))}", "name='run'",
                                    f"train.time_limit_minutes={args.minutes}",
                                    f"eval.max_train_samples={args.eval_train_samples}", *args.overrides])
    train_started = time.monotonic()
    code = train(cfg)
    if code != 0:
        log.error("demo: training stopped with exit code %d", code)
        return code
    train_s = time.monotonic() - train_started

    # 3. frozen-feature evaluation with both baselines, on the same split and protocol
    run_dir = str(cfg.run_dir)
    ckpt = find_checkpoint(run_dir)
    model, cfg = load_pretrained(ckpt)
    eval_started = time.monotonic()
    rows = evaluate(model, cfg, ("knn", "linear"), baselines=True)
    step = read_client_state(ckpt)["step"]
    tag_rows(rows, ckpt, step, cfg.data.manifest)
    append_jsonl(f"{run_dir}/{EVALS}", rows)
    eval_s = time.monotonic() - eval_started

    # 4. the report: table, loss curve, reconstructions
    report = write_report(run_dir)
    total = time.monotonic() - started
    log.info("demo: done in %.0f s (shard %.0f s, train %.0f s, eval %.0f s): %s", total, shard_s, train_s, eval_s, report)
    for row in rows:
        print(f"{row['encoder']:<12} {row['protocol']:<36} top-1 {100 * row['top1']:.2f}%")
    print(f"report: {report}")
    return 0
