"""Ray job: shard a dataset with one Ray task per output shard, on the cluster running the job.

    ray job submit --address http://HEAD:8265 -- python -m jobs.shard_job SRC DEST [maepipe shard options]

Takes the options of `maepipe shard` (see `python -m jobs.shard_job --help`), with --executor ray
unless told otherwise. Inside a job, RAY_ADDRESS names the cluster, so the tasks run there.
"""

from __future__ import annotations

import sys

from pipeline.cli import main as maepipe


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not any(a == "--executor" or a.startswith("--executor=") for a in argv):
        argv += ["--executor", "ray"]
    return maepipe(["shard", *argv])


if __name__ == "__main__":
    sys.exit(main())
