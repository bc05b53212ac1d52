"""`maepipe report RUN [--data DEST] [--no-pictures] [--samples N]`: RUN/report.md and RUN/report.html.

RUN is a run folder (local or s3://): its config.json, metrics.jsonl, evals.jsonl and checkpoints.
"""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("report", help="write RUN/report.md and a self-contained RUN/report.html",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run folder, local or s3://...")
    p.add_argument("--data", default="", help="shard set for the reconstruction images (default: the run's data.manifest)")
    p.add_argument("--no-pictures", action="store_true", help="skip the reconstruction pictures (no checkpoint loading)")
    p.add_argument("--samples", type=int, default=8, help="images in the reconstruction grids")
    p.set_defaults(func=run)


def run(args) -> int:
    from pipeline.eval.report import write_report

    print(write_report(args.run, args.data, pictures=not args.no_pictures, samples=args.samples))
    return 0
