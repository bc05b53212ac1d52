"""`maepipe eval CHECKPOINT --data DEST [--knn] [--linear] [--finetune] [--baselines] [--set section.key=value ...]`

Loads a checkpoint (a checkpoint folder, or a run folder for its newest one; local or s3://),
runs the chosen protocols on the labelled splits of DEST, prints the table and appends its rows to
RUN/evals.jsonl, where RUN is the checkpoint's run folder.
"""

from __future__ import annotations

import argparse
import logging


log = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="kNN / linear probe / fine-tuning of a checkpoint, with baselines",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="RUN, RUN/checkpoints/step-NNNNNNNN, local or s3://...")
    p.add_argument("--data", default="", help="labelled shard set (DEST or DEST/manifest.json); default: the run's data.manifest")
    p.add_argument("--knn", action="store_true", help="weighted kNN on frozen features")
    p.add_argument("--linear", action="store_true", help="linear probe (BatchNorm without affine + linear head)")
    p.add_argument("--finetune", action="store_true", help="fine-tuning (eval.finetune_blocks=k: only the last k blocks)")
    p.add_argument("--baselines", action="store_true",
                   help="also raw pixels and a random-init encoder (kNN, linear), a from-scratch ViT (fine-tuning)")
    p.add_argument("--out", default="", help="where to append the rows (default RUN/evals.jsonl)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="section.key=value",
                   help="config override, repeatable: --set eval.max_train_samples=10000 --set eval.pool=cls")
    p.set_defaults(func=run)


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("encoder", "protocol", "top-1 %", "train n", "test n", "wall s")
    for r in rows:
        table.add_row(r["encoder"], r["protocol"], f"{100 * r['top1']:.2f}", str(r["train_samples"]),
                      str(r["test_samples"]), f"{r['wall_s'] + r.get('feature_s', 0):.0f}")
    Console().print(table)


def run(args) -> int:
    from data_shards import storage
    from pipeline.eval.evaluate import evaluate_checkpoint
    from pipeline.eval.runs import EVALS, append_jsonl, run_of
    from pipeline.train.checkpoint import find_checkpoint

    which = tuple(name for name in ("knn", "linear", "finetune") if getattr(args, name)) or ("knn", "linear")
    ckpt = find_checkpoint(args.checkpoint)
    overrides = ([f"data.manifest={args.data!r}"] if args.data else []) + list(args.overrides)
    rows = evaluate_checkpoint(ckpt, which, overrides, baselines=args.baselines)
    print_table(rows)
    out = args.out or storage.join(run_of(ckpt), EVALS)
    append_jsonl(out, rows)
    log.info("appended %d rows to %s", len(rows), out)
    return 0
