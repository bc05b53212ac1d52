"""Data-state properties 1-4 (DESIGN.md) on real shards, real DataLoader worker processes.

Each rank is its own StreamingLoader, as in its own process: what a rank receives depends on nothing
but (manifest, seed, epoch, world, rank, workers), so recording ranks one after the other is faithful.
"""

import json

import numpy as np
import pytest
import torch

from pipeline.data import StreamingLoader
from pipeline.data.order import total
from tests.helpers import fashion_arrays, write_small_dataset
from tests.loader_tools import SHARDS, config, flat, ids, loaders, same_batches, take_batches

N = sum(SHARDS)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_small_dataset(str(tmp_path_factory.mktemp("shards")), {"train": SHARDS, "val": [9, 8]})


def epoch_ids(url, world, workers, seed=7, **kw):
    return [ids(list(loader.epoch_batches())) for loader in loaders(url, world, workers, seed, **kw)]


def test_identical_sequences_across_runs_and_different_per_seed(shards):
    a = epoch_ids(shards, 2, 2)
    assert a == epoch_ids(shards, 2, 2)
    assert a != epoch_ids(shards, 2, 2, seed=8)
    # augmentation is seeded too: whole batches are bitwise identical across two runs
    first = [take_batches(loader, 3) for loader in loaders(shards, 2, 2)]
    second = [take_batches(loader, 3) for loader in loaders(shards, 2, 2)]
    assert all(same_batches(x, y) for x, y in zip(first, second))


@pytest.mark.parametrize("world,workers", [(2, 2), (3, 2), (2, 3), (4, 0), (1, 3)])
def test_balanced_batch_counts_and_no_sample_twice(shards, world, workers):
    assert len(SHARDS) % (world * max(1, workers))  # the interesting case
    per_rank = epoch_ids(shards, world, workers)
    nb = N // (world * 4)
    assert [len(b) for b in per_rank] == [nb] * world
    assert all(len(batch) == 4 for rank in per_rank for batch in rank)
    seen = [i for rank in per_rank for batch in rank for i in batch]
    assert len(seen) == len(set(seen)) and N - len(seen) < world * 4  # drop: < one global batch lost


def test_wrap_remainder_fills_the_last_global_batch(shards):
    per_rank = epoch_ids(shards, 3, 2, remainder="wrap")
    assert [len(b) for b in per_rank] == [-(-N // 12)] * 3
    seen = [i for rank in per_rank for batch in rank for i in batch]
    assert set(seen) == set(range(N)) and len(seen) - N < 12


def test_ids_are_the_samples_the_images_come_from(shards):
    """Unaugmented 28 px views must equal the source image of each reported id."""
    (loader,) = loaders(shards, 1, 2, augment=False)
    loader.spec_args["crop"] = loader.spec_args["crop"].__class__(28)
    images, _ = fashion_arrays("train", N)
    for batch in loader.epoch_batches():
        for img, i in zip(batch["image"], batch["id"].tolist()):
            expect = torch.from_numpy(images[i].astype(np.float32) / 255).sub(0.5).div(0.5)
            assert torch.allclose(img[0], expect, atol=1e-6)


def test_epochs_differ_and_each_covers_the_split(shards):
    (loader,) = loaders(shards, 1, 2)
    nb = loader.batches_per_epoch()
    batches = take_batches(loader, 2 * nb)
    e0, e1 = flat(batches[:nb]), flat(batches[nb:])
    assert e0 != e1 and sorted(e0) == sorted(e1) and len(set(e0)) == len(e0) == nb * 4
    assert loader.epoch == 1


@pytest.mark.parametrize("world,workers", [(2, 2), (1, 3), (2, 0)])
def test_exact_resume_is_bitwise_at_any_step(shards, world, workers):
    nb = loaders(shards, world, workers)[0].batches_per_epoch()
    total_steps = nb + 6  # into the next epoch
    full = [take_batches(loader, total_steps) for loader in loaders(shards, world, workers)]
    for step in (1, 5, nb - 1, nb, nb + 3):
        for rank in range(world):
            before = loaders(shards, world, workers)[rank]
            assert same_batches(take_batches(before, step), full[rank][:step])
            state = json.loads(json.dumps(before.state_dict()))  # it travels as JSON in the checkpoint
            assert len(json.dumps(state)) < 1000
            after = loaders(shards, world, workers)[rank]
            after.load_state_dict(state)
            assert same_batches(take_batches(after, total_steps - step), full[rank][step:]), (world, workers, step, rank)


def consume(url, world, workers, steps, state=None, **kw):
    """Every rank takes `steps` batches (after loading `state`); -> (ids consumed, state, loaders)."""
    ranks = loaders(url, world, workers, **kw)
    got = []
    for loader in ranks:
        if state is not None:
            loader.load_state_dict(state)
        got += flat(take_batches(loader, steps) if steps is not None else list(loader.epoch_batches()))
    states = [loader.state_dict() for loader in ranks]
    assert all(s == states[0] for s in states)  # the data state is the same on every rank
    return got, states[0], ranks


@pytest.mark.parametrize("old,new,steps", [((2, 2), (1, 3), 5), ((1, 0), (2, 2), 9), ((1, 2), (2, 0), 20),
                                            ((2, 2), (1, 3), 0)])
def test_elastic_resume_covers_exactly_the_unconsumed_samples(shards, old, new, steps):
    before, state, _ = consume(shards, *old, steps)
    assert len(before) == len(set(before)) == steps * old[0] * 4
    after, end_state, ranks = consume(shards, *new, None, state)
    assert not set(before) & set(after) and len(after) == len(set(after))
    # what neither layout delivered is exactly what the new plan had to drop (< one global batch)
    plan = ranks[0].plan()
    order_ids = set(range(N)) - set(before) - set(after)
    assert len(order_ids) == total(plan.unassigned) < new[0] * 4
    assert end_state["batches_done"] == plan.batches_per_rank


def test_elastic_twice_then_next_epoch_is_whole(shards):
    before, state, _ = consume(shards, 2, 2, 4)
    middle, state, _ = consume(shards, 1, 3, 6, state)
    after, state, ranks = consume(shards, 2, 1, None, state)
    got = before + middle + after
    assert len(got) == len(set(got)) and N - len(got) < 8
    # the next epoch is the one a run that always had this layout gets
    (fresh,) = loaders(shards, 2, 1)[:1]
    nb = fresh.batches_per_epoch()
    expect = take_batches(fresh, 2 * nb)[nb:]
    assert same_batches(take_batches(ranks[0], nb), expect) and ranks[0].epoch == 1


def test_state_refuses_a_different_order(shards):
    (a,) = loaders(shards, 1, 0)
    take_batches(a, 2)
    (b,) = loaders(shards, 1, 0, seed=99)
    with pytest.raises(ValueError, match="seed"):
        b.load_state_dict(a.state_dict())


def test_evaluation_pass_keeps_every_sample_once(shards):
    """remainder=keep (evaluation): one pass over val on 2 ranks, every sample exactly once, no hang."""
    got = []
    for loader in loaders(shards, 2, 2, split="val", shuffle=False, augment=False, remainder="keep"):
        got += flat(list(loader.epoch_batches()))
    assert sorted(got) == list(range(17))


def test_too_few_samples_for_one_batch_is_a_clear_error(shards):
    from pipeline.data import DataStop

    with pytest.raises(DataStop, match="fewer than one global batch"):
        StreamingLoader(config(shards, 0, batch=16), 16, 1, world=2, split="val")


@pytest.mark.parametrize("old,new,steps", [((3, 2), (2, 2), 5), ((3, 2), (1, 0), 0), ((2, 3), (3, 1), 8)])
def test_elastic_resume_under_wrap_repeats_only_the_new_plans_padding(shards, old, new, steps):
    """remainder=wrap: real samples are neither lost nor repeated across the stop; the only repeats are
    those the new layout needs to fill its last global batch (< new world x batch)."""
    before, state, _ = consume(shards, *old, steps, remainder="wrap")
    assert len(before) == len(set(before)) == steps * old[0] * 4
    after, _, ranks = consume(shards, *new, None, state, remainder="wrap")
    assert not set(before) & set(after) and set(before) | set(after) == set(range(N))
    assert len(before) + len(after) - N == len(after) - len(set(after)) < new[0] * 4
    assert len(after) == ranks[0].plan().batches_per_rank * new[0] * 4
