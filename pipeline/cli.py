"""`maepipe`: one entry point; each subcommand lives beside the code it drives.

Every module in COMMANDS exposes `add_parser(subparsers)`, which registers its subcommand and
sets `func` to a handler taking the parsed args and returning an exit code. Modules are imported
only when their subcommand runs, so `maepipe shard --help` does not import torch or DeepSpeed.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from pipeline.config import ConfigError

# subcommand -> module that implements it
COMMANDS = {
    "shard": "data_shards.cli",
    "train": "pipeline.train.cli",
    "eval": "pipeline.eval.cli",
    "report": "pipeline.eval.report_cli",
    "export": "pipeline.train.export",
    "demo": "pipeline.demo",
    "submit": "pipeline.submit",
}

EXIT_USAGE = 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="maepipe", description="Masked Autoencoder pretraining at cluster scale.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = argv[0] if argv and argv[0] in COMMANDS else None
    for name, module in COMMANDS.items():
        if wanted is None or name == wanted:
            importlib.import_module(module).add_parser(sub)
        else:
            sub.add_parser(name, help=f"see `maepipe {name} --help`")
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except ConfigError as err:
        print(f"maepipe {args.command}: config error: {err}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
