"""`maepipe train --config configs/NAME.toml [section.key=value ...]`: the same under any launcher."""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.config import describe, load_config


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="pretrain an MAE (alone, or under torchrun / deepspeed / srun / Ray Train)",
                       description="Pretrain an MAE. Rank and world size come from the launcher's environment.")
    p.add_argument("--config", help="TOML run file (configs/*.toml)")
    p.add_argument("--resume", help="'auto' (newest complete checkpoint), or a checkpoint/run path or URL")
    p.add_argument("--help-config", action="store_true", help="list every config field with its default and meaning")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="override config fields")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.help_config:
        print(describe())
        return 0
    # a JSON string is a valid TOML basic string, whatever the path holds
    overrides = list(args.overrides) + ([f"checkpoint.resume={json.dumps(args.resume)}"] if args.resume else [])
    cfg = load_config(args.config, overrides)
    from pipeline.train.loop import train

    return train(cfg)


if __name__ == "__main__":
    from pipeline.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
