"""One rank of a real multi-process loader run (tests/test_loader_dist.py starts one OS process per rank).

    python -m tests.loader_rank MANIFEST RANK WORLD WORKERS OUT.json [--state IN.json] [--stop K]

Takes K batches (all of the epoch when --stop is absent), records the data state there, then takes the
rest of the epoch; writes {"before": [...], "state": {...}, "after": [...]} where each batch is
{"ids": [...], "image_sha": hex of its image tensor's bytes}.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json

from pipeline.data import StreamingLoader
from tests.loader_tools import config


def record(batches) -> list[dict]:
    return [{"ids": b["id"].tolist(), "image_sha": hashlib.sha256(b["image"].numpy().tobytes()).hexdigest()}
            for b in batches]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("manifest")
    p.add_argument("rank", type=int)
    p.add_argument("world", type=int)
    p.add_argument("workers", type=int)
    p.add_argument("out")
    p.add_argument("--state")
    p.add_argument("--stop", type=int)
    p.add_argument("--remainder", default="drop")
    args = p.parse_args()
    loader = StreamingLoader(config(args.manifest, args.workers), 16, 1, rank=args.rank, world=args.world, seed=7,
                             remainder=args.remainder)
    if args.state:
        with open(args.state) as f:
            loader.load_state_dict(json.load(f))
    epoch = loader.epoch_batches()  # one generator: the stop below does not restart the stream
    before = record(itertools.islice(epoch, args.stop))
    state = loader.state_dict()
    after = record(epoch)
    with open(args.out, "w") as f:
        json.dump({"before": before, "state": state, "after": after}, f)


if __name__ == "__main__":
    main()
