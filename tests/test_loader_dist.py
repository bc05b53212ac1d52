"""Data-state properties 2-4 (DESIGN.md) with every rank in its own OS process, as under torchrun.

Each rank is `python -m tests.loader_rank` (see there) with only (manifest, rank, world, workers, state)
in common; nothing is shared in memory, so what the ranks receive meets only in these assertions.
"""

import json
import subprocess
import sys

import pytest

from pipeline.data.order import Layout, Plan, total
from tests.conftest import subprocess_env
from tests.helpers import write_small_dataset
from tests.loader_tools import SHARDS

pytestmark = pytest.mark.dist
N, BATCH, STOP = sum(SHARDS), 4, 5


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_small_dataset(str(tmp_path_factory.mktemp("shards")), {"train": SHARDS})


def run_ranks(tmp_path, name, manifest, world, workers, state=None, stop=None) -> list[dict]:
    """Start `world` rank processes at once; -> each rank's record (see tests/loader_rank.py)."""
    extra = []
    if state is not None:
        path = tmp_path / f"{name}-state.json"
        path.write_text(json.dumps(state))
        extra += ["--state", str(path)]
    if stop is not None:
        extra += ["--stop", str(stop)]
    outs = [tmp_path / f"{name}-rank{r}.json" for r in range(world)]
    procs = [subprocess.Popen([sys.executable, "-m", "tests.loader_rank", manifest, str(r), str(world), str(workers),
                               str(outs[r]), *extra], env=subprocess_env(), stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    for r, proc in enumerate(procs):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"rank {r} of {name} failed:\n{err[-3000:]}"
    return [json.loads(out.read_text()) for out in outs]


def ids(batches: list[dict]) -> list[int]:
    return [i for b in batches for i in b["ids"]]


@pytest.fixture(scope="module")
def stopped(shards, tmp_path_factory):
    """2 rank processes, workers=2 each: STOP batches, state saved, then on to the end of the epoch."""
    return run_ranks(tmp_path_factory.mktemp("first"), "first", shards, 2, 2, stop=STOP)


def test_two_processes_split_the_epoch_exactly_and_resume_bitwise(shards, stopped, tmp_path):
    nb = N // (2 * BATCH)
    per_rank = [rec["before"] + rec["after"] for rec in stopped]
    assert [len(b) for b in per_rank] == [nb, nb]  # balanced: no rank waits at the epoch's end
    assert all(len(b["ids"]) == BATCH for rank in per_rank for b in rank)
    seen = ids(per_rank[0]) + ids(per_rank[1])
    assert len(seen) == len(set(seen)) == nb * 2 * BATCH  # no overlap, nothing twice
    assert N - len(seen) == N % (2 * BATCH)  # drop: only the last partial global batch is left out
    assert stopped[0]["state"] == stopped[1]["state"]  # every rank saves the same data state
    # fresh processes from the state saved at the stop give the very batches of the uninterrupted run
    resumed = run_ranks(tmp_path, "resumed", shards, 2, 2, state=stopped[0]["state"])
    for rank in range(2):
        assert resumed[rank]["before"] == stopped[rank]["after"]  # ids and image bytes (sha256), in order


@pytest.mark.parametrize("world,workers", [(1, 0), (3, 1)])
def test_elastic_resume_in_fresh_processes_covers_the_epoch_once(shards, stopped, tmp_path, world, workers):
    state = stopped[0]["state"]
    before = ids(stopped[0]["before"]) + ids(stopped[1]["before"])
    assert len(before) == len(set(before)) == STOP * 2 * BATCH
    resumed = run_ranks(tmp_path, f"world{world}", shards, world, workers, state=state)
    after = [i for rec in resumed for i in ids(rec["before"])]
    assert len({len(rec["before"]) for rec in resumed}) == 1  # balanced in the new layout too
    assert not set(before) & set(after) and len(after) == len(set(after))
    # what neither layout delivered is exactly what the new plan leaves out (< one of its global batches)
    left = Plan(Layout(2, 2, BATCH), [tuple(iv) for iv in state["remaining"]]).remaining_after(STOP)
    dropped = total(Plan(Layout(world, workers, BATCH), left).unassigned)
    assert N - len(before) - len(after) == dropped < world * BATCH
