"""The epoch order and plans as pure functions: permutation, balance, exact and elastic bookkeeping."""

import itertools

import numpy as np
import pytest

from pipeline.data.order import EpochOrder, Layout, Plan, take, total

COUNTS = (23, 17, 30, 11, 19, 26, 14)  # 7 shards, 140 samples: not divisible by any ranks x workers used


def positions_of(intervals):
    return [p for a, b in intervals for p in range(a, b)]


@pytest.mark.parametrize("shuffle", [True, False])
def test_epoch_order_is_a_permutation_of_all_samples(shuffle):
    order = EpochOrder(COUNTS, seed=5, epoch=2, window=16, shuffle=shuffle)
    ids = [order.global_id(*order.locate(order.c_position(p))) for p in range(order.size)]
    assert sorted(ids) == list(range(sum(COUNTS)))
    assert (ids == sorted(ids)) == (not shuffle)


def test_epoch_order_depends_on_seed_and_epoch_only():
    def ids(seed, epoch):
        o = EpochOrder(COUNTS, seed, epoch, 16)
        return [o.global_id(*o.locate(o.c_position(p))) for p in range(o.size)]

    assert ids(1, 0) == ids(1, 0)
    assert ids(1, 0) != ids(1, 1)
    assert ids(1, 0) != ids(2, 0)


@pytest.mark.parametrize("world,workers,batch", list(itertools.product([1, 2, 3, 4], [0, 1, 2, 3], [1, 4, 5])))
@pytest.mark.parametrize("remainder", ["drop", "wrap"])
def test_plans_are_balanced_and_cover_the_epoch(world, workers, batch, remainder):
    n = sum(COUNTS)
    plan = Plan(Layout(world, workers, batch, remainder), [(0, n)])
    per_step = world * batch
    nb = plan.batches_per_rank
    assert nb == (n // per_step if remainder == "drop" else -(-n // per_step))
    W = max(1, workers)
    for r in range(world):  # every rank: nb batches of `batch` samples, stream w holding batches w, w+W, ...
        assert sum(total(plan.streams[(r, w)]) for w in range(W)) == nb * batch
        for w in range(W):
            assert total(plan.streams[(r, w)]) == len(range(w, nb, W)) * batch
    used = positions_of([iv for s in plan.streams.values() for iv in s])
    if remainder == "drop":
        assert len(set(used)) == len(used)  # nothing twice
        left = positions_of(plan.unassigned)
        assert sorted(used + left) == list(range(n)) and len(left) < per_step
    else:
        assert set(used) == set(range(n)) and len(used) - n < per_step  # wrap repeats < one global batch


@pytest.mark.parametrize("old,new", [((2, 2), (1, 3)), ((1, 0), (2, 2)), ((3, 1), (2, 0)), ((2, 3), (4, 2))])
@pytest.mark.parametrize("done", [0, 1, 3, 6])
def test_remaining_after_is_exactly_what_was_not_consumed(old, new, done):
    n = sum(COUNTS)
    plan = Plan(Layout(*old, 4), [(0, n)])
    done = min(done, plan.batches_per_rank)
    consumed = []
    for (r, w), ivs in plan.streams.items():
        consumed += positions_of(take(ivs, 0, plan.consumed_samples(w, done)))
    assert len(consumed) == done * old[0] * 4
    left = plan.remaining_after(done)
    assert sorted(consumed + positions_of(left)) == list(range(n))
    # the next layout plans over exactly that remainder
    nxt = Plan(Layout(*new, 4), left)
    assert total(nxt.remaining) + len(consumed) == n


def test_take_slices_the_concatenation():
    ivs = [(0, 3), (10, 12), (20, 25)]
    assert take(ivs, 2, 6) == [(2, 3), (10, 12), (20, 21)]
    assert take(ivs, 0, 0) == [] and take(ivs, 5, 100) == [(20, 25)]
    assert np.array_equal(positions_of(take(ivs, 1, 9)), positions_of(ivs)[1:9])


@pytest.mark.parametrize("world,workers,batch", list(itertools.product([1, 2, 3, 5], [0, 2, 3], [4, 7])))
def test_keep_splits_evenly_and_covers_every_sample_once(world, workers, batch):
    n = sum(COUNTS)
    plan = Plan(Layout(world, workers, batch, "keep"), [(0, n)])
    W = max(1, workers)
    shares = [sum(total(plan.streams[(r, w)]) for w in range(W)) for r in range(world)]
    assert max(shares) - min(shares) <= 1
    used = positions_of([iv for s in plan.streams.values() for iv in s])
    assert sorted(used) == list(range(n))
    for r in range(world):  # full batches except a rank's last, which its own worker holds
        nb_rank = -(-shares[r] // batch)
        assert nb_rank <= plan.batches_per_rank
        for w in range(W):
            full = len(range(w, nb_rank, W)) * batch
            assert full - total(plan.streams[(r, w)]) == (nb_rank * batch - shares[r] if (nb_rank - 1) % W == w else 0)


@pytest.mark.parametrize("old,new", [((3, 2), (2, 2)), ((3, 1), (1, 0)), ((2, 5), (3, 2)), ((4, 0), (3, 3))])
@pytest.mark.parametrize("done", [0, 1, 2, 3, 5, 9])
def test_wrap_padding_is_not_carried_into_an_elastic_resume(old, new, done):
    """Under wrap, the old plan's padding (repeats of the epoch's first samples) is no part of what is left:
    the consumed real samples plus the remainder are each sample exactly once, and the new plan pads only
    its own last global batch."""
    n, batch = sum(COUNTS), 4
    plan = Plan(Layout(*old, batch, "wrap"), [(0, n)])
    assert total(plan.remaining) < plan.batches_per_rank * old[0] * batch  # this layout pads
    done = min(done, plan.batches_per_rank)
    consumed = []
    for (r, w), ivs in plan.streams.items():
        consumed += positions_of(take(ivs, 0, plan.consumed_samples(w, done)))
    real = set(consumed)  # a padded repeat consumed before the stop is a sample already seen
    left = positions_of(plan.remaining_after(done))
    assert sorted(real | set(left)) == list(range(n)) and not real & set(left) and len(left) == len(set(left))
    nxt = Plan(Layout(*new, batch, "wrap"), plan.remaining_after(done))
    used = positions_of([iv for s in nxt.streams.values() for iv in s])
    assert set(used) == set(left) and len(used) - len(left) < new[0] * batch
